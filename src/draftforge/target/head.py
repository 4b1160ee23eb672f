"""The target without its body: lm_head and input embedding read straight from a HF checkpoint.

Offline training needs only these two matrices (the teacher is `final_hidden @ lm_head.T`, the draft
copies the embedding); loading an 8B target to get them would cost its full memory. The tensor names
come from the model built on the meta device (no weights allocated), the tensors from the
safetensors files that hold them (the index's weight_map says which), read lazily one by one. A tied
lm_head is the embedding.

`checkpoint_fingerprint` identifies a checkpoint cheaply (config, tensor layout, sampled bytes), so a
feature store can refuse a target other than the one it was captured with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from draftforge.assets import resolve_model_path
from draftforge.target.base import TargetHead
from draftforge.target.hf import check_aux_layers, final_norm, norm_gain, text_config
from draftforge.target.taps import default_aux_layers

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16  # bytes of each weight file hashed by the fingerprint
_VOLATILE = {"_name_or_path", "_model_name_or_path", "transformers_version"}  # config keys that name, not define


def _local_file(path: str, name: str) -> Path | None:
    """`name` inside a local dir or (downloaded on demand) a hub repo; None when the repo has no such file."""
    if Path(path).is_dir():
        p = Path(path) / name
        return p if p.is_file() else None
    from transformers.utils.hub import cached_file

    found = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def weight_map(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the index or the single-file checkpoint."""
    index = _local_file(path, INDEX)
    if index is not None:
        return json.loads(index.read_text())["weight_map"]
    single = _local_file(path, SINGLE)
    if single is None:
        raise FileNotFoundError(f"{path}: no {INDEX} or {SINGLE} (loading only the head needs safetensors weights)")
    return dict.fromkeys(_safetensors_header(single), SINGLE)


def _safetensors_header(file: Path) -> dict:
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _param_names(model: nn.Module, param: torch.Tensor) -> list[str]:
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is param]


def _checkpoint_key(names: list[str], keys: dict[str, str]) -> str | None:
    """The checkpoint key of a parameter: its own name, else the one key ending in its last two parts."""
    for name in names:
        if name in keys:
            return name
    for name in names:
        tail = ".".join(name.split(".")[-2:])
        hits = [k for k in keys if k == tail or k.endswith("." + tail)]
        if len(hits) == 1:
            return hits[0]
    return None


def _read(path: str, keys: dict[str, str], key: str) -> torch.Tensor:
    from safetensors import safe_open

    file = _local_file(path, keys[key])
    if file is None:
        raise FileNotFoundError(f"{path}: {keys[key]} (holding {key}) is missing")
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key)


class HeadOnlyTarget:
    """What the trainer needs of a target when features come from a store: config, taps, head (with
    the final norm's gain), embedding."""

    def __init__(self, config, aux_layers: list[int] | None, head: TargetHead, embed_weight: torch.Tensor) -> None:
        self.config = config
        self.aux_layers = list(aux_layers or default_aux_layers(text_config(config).num_hidden_layers))
        check_aux_layers(self.aux_layers, config)
        self.head = head
        self.embed_weight = embed_weight

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        aux_layers: list[int] | None = None,
        dtype: torch.dtype = torch.bfloat16,
        trust_remote_code: bool = False,
    ) -> HeadOnlyTarget:
        """Read lm_head and the embedding in `dtype` (the dtype the online target would hold them in)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        local = resolve_model_path(path)
        config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        keys = weight_map(local)
        embed = skeleton.get_input_embeddings().weight
        embed_key = _checkpoint_key(_param_names(skeleton, embed), keys)
        if embed_key is None:
            raise KeyError(f"{path}: no input embedding among the checkpoint tensors")
        embed_weight = _read(local, keys, embed_key).to(dtype)
        out = skeleton.get_output_embeddings().weight
        head_key = None if out is embed else _checkpoint_key(_param_names(skeleton, out), keys)
        if head_key is None and out is not embed:
            raise KeyError(f"{path}: no lm_head among the checkpoint tensors and the embeddings are not tied")
        head_weight = embed_weight if head_key is None else _read(local, keys, head_key).to(dtype)
        softcap = getattr(text_config(config), "final_logit_softcapping", None)
        norm = final_norm(skeleton)
        norm_key = _checkpoint_key(_param_names(skeleton, norm.weight), keys) if hasattr(norm, "weight") else None
        gain = norm_gain(norm, _read(local, keys, norm_key).float()) if norm_key else None
        head = TargetHead(weight=head_weight, logit_softcap=softcap, norm_gain=gain)
        return cls(config, aux_layers, head, embed_weight)


def checkpoint_fingerprint(path: str) -> str:
    """A hash of a checkpoint's config, tensor layout and 16 x 64 KiB sampled from each weight file.

    Cheap for any size (no full read) and different for different weights of the same architecture
    with overwhelming probability: fine-tunes change bytes everywhere.
    """
    local = resolve_model_path(path)
    h = hashlib.sha256()
    config_file = _local_file(local, "config.json")
    if config_file is None:
        raise FileNotFoundError(f"{path}: no config.json")
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in _VOLATILE}
    h.update(json.dumps(config, sort_keys=True).encode())
    for name in sorted(set(weight_map(local).values())):
        file = _local_file(local, name)
        if file is None:
            raise FileNotFoundError(f"{path}: {name} is missing")
        size = file.stat().st_size
        h.update(f"{name}:{size}:".encode() + json.dumps(_safetensors_header(file), sort_keys=True).encode())
        with open(file, "rb") as f:
            for i in range(_SAMPLES):
                f.seek(size * i // _SAMPLES)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()
