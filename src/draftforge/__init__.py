"""draftforge: train EAGLE-3 draft models and hand them to SGLang and vLLM."""

__version__ = "0.1.0"
