"""Offline target features: capture them once into a store, train from the store."""
