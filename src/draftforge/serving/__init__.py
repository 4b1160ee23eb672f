"""Talking to inference engines: start them (engines, vllm_env, serve), send them requests (http, pool),
read their counters (metrics). Imports nothing from eval/ or the pipeline."""
