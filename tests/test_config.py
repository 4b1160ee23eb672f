"""`auto` precision: bf16 only where the machine runs it natively, recorded as the concrete value."""

import pytest

from draftforge import config as config_module
from draftforge.config import ConfigError, load_config


@pytest.mark.parametrize("native, precision, dtype", [(True, "bf16", "bfloat16"), (False, "fp32", "float32")])
def test_auto_resolves_to_what_runs_natively(monkeypatch, native, precision, dtype):
    monkeypatch.setattr(config_module, "native_bf16", lambda: native)
    config = load_config(None, [])  # the defaults are auto
    assert (config.train.precision, config.target.dtype) == (precision, dtype)
    assert '"precision": "auto"' not in config.to_json()  # runs and checkpoints record what was used


def test_explicit_settings_are_kept(monkeypatch):
    monkeypatch.setattr(config_module, "native_bf16", lambda: False)
    config = load_config(None, ["train.precision=bf16", "target.dtype=bfloat16"])
    assert (config.train.precision, config.target.dtype) == ("bf16", "bfloat16")


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="train.precision must be auto, bf16 or fp32"):
        load_config(None, ["train.precision=fp16"])


def test_unknown_target_dtype_is_refused():
    with pytest.raises(ConfigError, match="target.dtype must be auto, bfloat16, float16 or float32"):
        load_config(None, ["target.dtype=bf16"])  # the precision's spelling, not a torch dtype
