"""draftforge.decode: the built-in speculative decoder as a library (EAGLE-3 chains / trees, DFlash blocks)."""
