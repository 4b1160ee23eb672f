"""Analytic memory model of one draft training step (issue 7): will a draft shape, sequence length
and TTT depth fit a GPU, and what would gradient checkpointing buy?

Every term is a tensor that `ttt_forward`, the draft layer, the TTT attention, the fused loss or
AdamW keeps alive, counted from the code (tests/test_memory_model.py checks the saved-for-backward
bytes against autograd's own saved-tensor hooks). Nothing is fitted: the runtime baseline (CUDA
context, or the Python / torch process on CPU) is a separate input, measured, never folded in.

Memory is the largest of seven moments of a step, each `fixed + per_token * tokens`:
- teacher: the target head's draft-vocabulary softmax, built in row chunks before the unroll;
- fwd-attn / fwd-loss: inside the last TTT step's attention, then its fused lm_head + loss, when
  every step's activations are saved and the teacher probabilities are still held;
- bwd-start / bwd-mlp / bwd-attn: the last step's layer backward begins (after recomputing the
  step under checkpointing), then its MLP backward, then its attention backward;
- optimizer: gradients plus the AdamW update.
The efficient and blockwise attention paths are linear in the sequence length (blockwise holds
score blocks of `attention.BLOCK` query rows); the dense reference is quadratic.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from draftforge.config import RunConfig, load_recipe
from draftforge.draft.attention import BLOCK
from draftforge.draft.config import DraftModelConfig
from draftforge.target.base import DTYPES
from draftforge.train.loss import TEACHER_ROW_CHUNK, TEACHER_VOCAB_CHUNK, loss_chunks

GIB = 1 << 30
ACC = 4  # float32: softmax / accumulation / AdamW / gradients
PATHS = ("efficient", "blockwise", "reference")
STAGES = {"forward": ("teacher", "fwd"), "backward": ("bwd",), "optimizer": ("optimizer",)}
# GiB that torch can allocate on a GPU once the CUDA context is up, by the name recipes give the GPU
GPU_GIB = {"80 GB (H100)": 78.0, "141 GB (H200)": 139.0}
UNCOUNTED_SHARE = 0.1  # of it left free for what the model does not count: allocator fragmentation, cuBLAS workspaces


@dataclass(frozen=True)
class Dims:
    """The widths the terms are written in (bytes come from the precision)."""

    H: int
    Ht: int
    nh: int
    D: int
    Hq: int
    Hkv: int
    Q3: int  # q + k + v projection width
    I: int  # noqa: E741 (the MLP width, as in the papers)
    V: int
    Dv: int

    @classmethod
    def of(cls, cfg: DraftModelConfig) -> Dims:
        hq, hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        return cls(cfg.hidden_size, cfg.target_hidden_size, cfg.num_attention_heads, cfg.head_dim, hq, hkv,
                   hq + 2 * hkv, cfg.intermediate_size, cfg.vocab_size, cfg.draft_vocab_size)


def param_counts(cfg: DraftModelConfig) -> dict[str, int]:
    """Parameters of `Eagle3Draft` by part; `trainable` excludes the frozen embedding."""
    d = Dims.of(cfg)
    parts = dict(
        fc=3 * d.Ht * d.H,
        attention=2 * d.H * d.Q3 + d.Hq * d.H,
        mlp=3 * d.H * d.I,
        norms=4 * d.H,
        lm_head=d.H * d.Dv,
    )
    return dict(parts, trainable=sum(parts.values()), frozen_embedding=d.V * d.H)


def training_memory(
    cfg: DraftModelConfig,
    seq_len: int,
    batch: int = 1,
    ttt_steps: int = 7,
    precision: str = "bf16",
    attention: str = "efficient",
    checkpoint: bool = False,
    feature_bytes: int = 2,
    head_bytes: int = 2,
    grad_accum: int = 1,
    optimizer: str = "foreach",
    target_weights_bytes: int = 0,
    runtime_bytes: int = 0,
) -> dict[str, Any]:
    """Peak bytes of one training step (batch x seq_len tokens, all positions supervised: an upper
    bound) and where they go. `feature_bytes` / `head_bytes`: dtype sizes of the aux / final-hidden
    features and of the target lm_head; `optimizer`: "foreach" (the trainer's AdamW, one
    parameter-sized temporary) or "fused"; `grad_accum` > 1 keeps gradients alive through the
    forward; `target_weights_bytes`: the live target's weights besides its lm_head (online training:
    its forward runs before the draft step, so only the weights overlap the draft's peak);
    `runtime_bytes`: the process baseline (CUDA context, or Python + torch on CPU)."""
    if precision not in ("bf16", "fp32") or attention not in PATHS or optimizer not in ("foreach", "fused"):
        raise ValueError(f"precision={precision!r} attention={attention!r} optimizer={optimizer!r}")
    d, K, L, T = Dims.of(cfg), ttt_steps, seq_len, batch * seq_len
    c = 2 if precision == "bf16" else 4  # compute dtype (autocast)
    low = c != ACC
    p = param_counts(cfg)

    static = dict(
        params_fp32=ACC * p["trainable"],
        adamw_state=2 * ACC * p["trainable"],
        frozen_embedding_fp32=ACC * p["frozen_embedding"],
        vocab_buffers=8 * d.Dv + d.V,  # d2t, t2d
        target_lm_head=head_bytes * d.V * d.Ht,
        target_lm_head_split=c * d.V * d.Ht,  # loss._split_head keeps it, in the compute dtype
        online_target_weights=target_weights_bytes,
        runtime=runtime_bytes,
    )
    grads_all = ACC * p["trainable"]
    # backward of the last step: lm_head's float32 gradient exists (the loss computed it); o_proj and
    # the MLP take theirs through autocast's one cast per weight, so they accumulate over all steps in
    # the compute dtype and become float32 only at the very end
    grads_start = ACC * (p["lm_head"] + d.H)
    grads_mlp = grads_start + d.I * d.H * c  # down_proj
    grads_attn = grads_start + (d.Hq * d.H + 3 * d.I * d.H) * c + ACC * d.H

    # ---- per-token terms (bytes per token) --------------------------------------------------------
    inputs = 4 * d.Ht * feature_bytes + 3 * 8  # aux, final hidden, ids / attention / loss masks
    teacher = d.Dv * c + 28  # draft-vocabulary probabilities + argmax / masks / row maps
    e_part = d.Q3 * c  # token half of q/k/v, shared by all steps
    rope_tables = 2 * d.D * ACC
    aux_cast = 3 * d.Ht * c if feature_bytes != c else 0  # autocast's copy of aux, saved by fc
    saved_once = aux_cast + 2 * d.H * c + 4  # the embeddings and their input_layernorm output, 1/rms
    keep_tables = not low or checkpoint  # fp32 saves views of the tables; checkpointed closures keep them
    fwd_only = e_part * (not checkpoint) + rope_tables * (not keep_tables) + 8  # + padded ids
    closures = (e_part if checkpoint else 0) + (rope_tables if keep_tables else 0)
    loss_rows = 2 * d.H * c + 12  # per step, outside any checkpoint: normed rows' input, grad_h, 1/rms, index
    cache = (d.Hkv + d.Q3) * c  # a step's k and the q/k/v block its v is a view of (held in forward)

    steps = [_step_terms(d, k, L, c, low, attention) for k in range(K)]
    if checkpoint:  # kept: each step's input h and the k / v blocks later steps read
        saved_steps = [d.H * c + cache * (k < K - 1) + loss_rows for k in range(K)]
        cache_saved = [cache * (k < K - 1) for k in range(K)]
    else:
        saved_steps = [sum(s.values()) + loss_rows for s in steps]
        cache_saved = [s.get("k", 0) + s.get("qkv", 0) for s in steps]
    saved = saved_once + sum(saved_steps)
    cache_extra = K * cache - sum(cache_saved)  # held by the k / v lists in forward, not saved
    last = steps[-1]
    post_attn = last["h1"] + last["y2"] + last["mlp"]

    # ---- fixed terms (bytes) ----------------------------------------------------------------------
    w_qkv = d.Q3 * d.H * c if low else d.Q3 * 2 * d.H * ACC  # fp32 keeps the whole concatenated [q;k;v]
    w_cast = (d.Hq * d.H + 3 * d.I * d.H) * c * low  # autocast's cached o / gate / up / down casts
    weights_fwd = w_qkv * (1 if checkpoint else K + 1) + w_cast
    weights_bwd = weights_fwd + (w_qkv if checkpoint else 0)  # + the recomputed step's hidden-half copy
    grad_w = d.Dv * d.H * ACC  # each step's lm_head gradient, computed in the loss forward
    chunk, sub = loss_chunks(d.Dv)
    rows = max(1, min(chunk, T))
    sub = max(1, min(sub, rows))
    loss_ws = (d.Dv * d.H * c * 2 * low + d.Dv * d.H * ACC * (low and T > rows) + 2 * rows * d.Dv * c
               + sub * d.Dv * ACC * (2 * low + 1) + sub * d.Dv * c * low)
    tr = min(TEACHER_ROW_CHUNK, T)
    teacher_ws = tr * d.Dv * (c + ACC * (1 + low)) + tr * TEACHER_VOCAB_CHUNK * c

    # ---- the moments ------------------------------------------------------------------------------
    grads_fwd = grads_all if grad_accum > 1 else 0
    fwd = inputs + teacher + fwd_only + closures + cache_extra + saved_once + sum(saved_steps[:-1])
    if checkpoint:  # inside the last step's checkpointed function: its input, q and the attention output
        fwd_attn = fwd + d.H * c + d.Hq * c * 2 + last.get("lse", 0)
    else:
        fwd_attn = fwd + saved_steps[-1] - loss_rows - post_attn
    bwd = inputs + closures + saved - loss_rows + (sum(last.values()) - last["h"] if checkpoint else 0)
    phases = {
        "teacher": (grads_fwd + teacher_ws, inputs + teacher + d.Ht * feature_bytes),
        "fwd-attn": (grads_fwd + weights_fwd + grad_w * (K - 1),
                     fwd_attn + _attn_fwd_transient(d, K - 1, L, c, low, attention)),
        "fwd-loss": (grads_fwd + weights_fwd + grad_w * K + loss_ws,
                     fwd + saved_steps[-1] + 2 * d.H * c),  # + the step output and its normed rows
        "bwd-start": (grads_start + weights_bwd + grad_w * (K - 1), bwd + d.H * c),  # + d(output)
        "bwd-mlp": (grads_mlp + weights_bwd - d.I * d.H * c * (low and checkpoint) + grad_w * (K - 1),
                    bwd + d.H * c + 3 * d.I * c),  # + d(act), d(gate), d(up)
        "bwd-attn": (grads_attn + weights_bwd - w_cast * checkpoint + grad_w * (K - 1),
                     bwd - post_attn + (d.H + d.Hq) * c + _attn_bwd_transient(d, K - 1, L, c, low, attention)),
        "optimizer": (grads_all + ACC * p["trainable"] * (optimizer == "foreach"), inputs),
    }
    static_total = sum(static.values())
    peaks = {name: static_total + fixed + per_token * T for name, (fixed, per_token) in phases.items()}
    phase = max(peaks, key=peaks.get)
    hooked = (saved - K * d.H * c + (0 if aux_cast else 3 * d.Ht * feature_bytes)
              + rope_tables * (not low and not checkpoint)) * T + weights_fwd - w_cast * checkpoint
    return dict(
        shape=dict(cfg.to_dict()),
        setting=dict(seq_len=L, batch=batch, tokens=T, ttt_steps=K, precision=precision, attention=attention,
                     checkpoint=checkpoint, feature_bytes=feature_bytes, head_bytes=head_bytes,
                     grad_accum=grad_accum, optimizer=optimizer),
        params=p,
        static=static,
        per_token=dict(inputs=inputs, teacher=teacher, saved=saved, saved_per_step=saved_steps,
                       at_peak=phases[phase][1]),
        fixed=dict(weight_copies=weights_bwd, loss_grad_w=grad_w * K, loss_workspace=loss_ws,
                   teacher_workspace=teacher_ws),
        phases={name: dict(fixed=f, per_token=t, peak=peaks[name]) for name, (f, t) in phases.items()},
        peak_phase=phase,
        peak_bytes=peaks[phase],
        stages={stage: max(v for k, v in peaks.items() if k.split("-")[0] in names)
                for stage, names in STAGES.items()},
        # what autograd's saved-tensor hooks see after the forward (no loss gradient buffers: those
        # are attributes, not saved tensors; the aux features themselves when fc saves them uncast)
        saved_tensor_bytes=hooked,
    )


def _step_terms(d: Dims, k: int, L: int, c: int, low: bool, path: str) -> dict[str, int]:
    """Bytes per token that TTT step k saves for backward (no checkpointing), by tensor."""
    t = dict(
        h=d.H * c,  # hidden_norm input: fc(aux) at step 0, else the previous step's output
        norm=d.H * c + 4,  # its output (q/k/v input) and 1/rms
        rope=4 * d.D * c * low,  # cos / sin cast per rotation of q and of k (fp32: views of the tables)
        q=d.Hq * c,
        h1=d.H * c + 4,  # post_attention_layernorm input and 1/rms
        y2=d.H * c,  # its output (gate / up input)
        mlp=3 * d.I * c,  # gate, up, silu(gate) * up
    )
    if path == "reference":  # dense: repeated keys / values of all (k+1) L positions, mask, probabilities
        s = (k + 1) * L
        t.update(kv_copies=2 * (k + 1) * d.Hq * c, scores=d.nh * s * (ACC + c * low) + s, out=d.Hq * c)
        return t
    # efficient / blockwise: k, and the whole q/k/v block that v is a view of, stay saved; lse, a, b
    t.update(k=d.Hkv * c, qkv=d.Q3 * c, out=d.Hq * c, lse=d.nh * ACC * (1 + (k > 0) + k))
    if path == "blockwise":  # contiguous copies of k0 / v0 per step (the step-0 originals are not saved)
        t["kv_copies"] = 2 * d.Hkv * c  # and o_proj gets a transposed copy of the [B, H, L, D] output
        t["out"] += d.Hq * c
        if k == 0:
            t["k"] = t["qkv"] = 0
    return t


def _attn_fwd_transient(d: Dims, n: int, L: int, c: int, low: bool, path: str) -> int:
    """Bytes per token alive inside a step's attention forward (n diagonal keys) beyond its saved
    outputs: see `_TTTAttention.forward`."""
    if path == "reference":  # scores and their masked copy (probabilities and the output are saved)
        return 2 * d.nh * (n + 1) * L * c
    merge = (d.Hq * c + d.Hq * ACC * low * 2 + d.Hkv * ACC * low + n * d.nh * ACC) * (n > 0)  # o_c, f32 q / out
    if path == "blockwise":  # a [heads, BLOCK, L] block: scores, shifted, exp; the previous block's p
        return max(merge, d.nh * min(BLOCK, L) * (3 * ACC + c))
    return merge


def _attn_bwd_transient(d: Dims, n: int, L: int, c: int, low: bool, path: str) -> int:
    """Bytes per token alive inside a step's attention backward (n diagonal keys) beyond its saved
    tensors: see `_TTTAttention.backward` (and the reference's autograd graph)."""
    if path == "reference":  # in softmax backward: float32 d probabilities in and d scores out, the
        return d.nh * (n + 1) * L * (2 * ACC - c * low) + (n + 1) * d.Hq * c  # bf16 p freed; repeated dv
    dq_dkv = d.Hq * c + 2 * d.Hkv * c
    if path == "blockwise":  # float32 dk / dv per query head, dq, and score blocks (a new p, dp and
        causal = 2 * d.Hq * ACC + d.Hq * c + d.nh * min(BLOCK, L) * 5 * ACC  # ds while the last are alive)
    else:
        causal = dq_dkv
    if n == 0:
        return causal
    g = d.Hq * ACC * low + d.Hq * (c if low else ACC)  # float32 grad_out, its share for the causal keys
    qg = d.Hq * ACC * low  # float32 q (an alias in fp32), and later float32 dq
    rows = g + dq_dkv + qg + 2 * d.Hq * ACC  # D_i = sum(dO * out): float32 out and the product
    diag = g + dq_dkv + 2 * qg + 2 * d.Hkv * ACC * low + d.Hq * ACC + d.Hkv * ACC + 2 * n * d.Hkv * c
    return max(g + causal, rows, diag)


def measured_peaks(step: Callable[[], object]) -> dict[str, int]:
    """Peak bytes of CPU tensors alive while `step()` runs, above those alive before it, over the
    whole step and per stage (forward until the first autograd node runs, backward until the
    optimizer step, optimizer): the allocator's running total from torch's memory profiler, what a
    GPU's max_memory_allocated would report."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    ops = [e for e in events if e.get("ph") == "X"]
    starts = [min((e["ts"] for e in ops if e["name"].startswith(prefix)), default=float("inf"))
              for prefix in ("autograd::engine::evaluate_function", "Optimizer.step")]
    live, peaks, blocks = 0, dict.fromkeys(("step", *STAGES), 0), {}
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        nbytes, addr = e["args"]["Bytes"], e["args"]["Addr"]
        if nbytes > 0:
            blocks[addr] = nbytes
        elif blocks.pop(addr, None) is None:  # freed here, allocated before: not part of the step's total
            continue
        live += nbytes
        stage = list(STAGES)[sum(e["ts"] >= t for t in starts)]
        peaks[stage] = max(peaks[stage], live)
    peaks["step"] = max(peaks.values())
    return peaks


# ---- recipes and tables ---------------------------------------------------------------------------


def recipe_settings(run: RunConfig, meta: dict[str, Any]) -> tuple[DraftModelConfig, dict[str, Any]]:
    """The draft shape a recipe derives, and its training settings: TTT steps, precision, gradient
    accumulation and checkpointing, its micro-batch (token budget / max_length sequences), feature /
    head dtype sizes, and the target's other weights when it trains online. `run` and `meta` are a
    recipe's run config and `recipe:` section, read from a file or being written."""
    shape = dict(meta["draft"]["shape"], aux_layer_ids=run.target.aux_layers or meta["taps"]["hf_hidden_states"])
    cfg, head_bytes = DraftModelConfig(**shape), DTYPES[run.target.dtype].itemsize
    online = not run.features.store  # the target runs next to the draft: its weights stay on the GPU
    target = int(meta["hardware"]["target_weights_gb"] * 1e9) - head_bytes * cfg.vocab_size * cfg.target_hidden_size
    return cfg, dict(ttt_steps=run.train.ttt_steps, precision=run.train.precision, attention=run.train.attention,
                     checkpoint=run.train.gradient_checkpointing, grad_accum=run.train.grad_accum,
                     seq_len=run.data.max_length, batch=max(1, run.train.tokens_per_batch // run.data.max_length),
                     head_bytes=head_bytes, feature_bytes=head_bytes,  # a store's rows are decoded to the target dtype
                     target_weights_bytes=target if online else 0)


def recipe_shape(path: str | Path) -> tuple[DraftModelConfig, dict[str, Any]]:
    """`recipe_settings` of a recipe file."""
    return recipe_settings(*load_recipe(path))


def recipe_memory(cfg: DraftModelConfig, train: dict[str, Any], seq_len: int | None = None,
                  checkpoint: bool | None = None) -> dict[str, Any]:
    """`training_memory` of a recipe's draft (`recipe_settings`) as a GPU trains it: blockwise attention, with
    the recipe's TTT steps, precision, accumulation, feature / head dtypes and an online target's weights. One
    sequence of `seq_len` tokens with `checkpoint`; by default the recipe's own micro-batch and checkpointing."""
    own = seq_len is None
    return training_memory(cfg, train["seq_len"] if own else seq_len, batch=train["batch"] if own else 1,
                           ttt_steps=train["ttt_steps"], precision=train["precision"], attention="blockwise",
                           checkpoint=train["checkpoint"] if checkpoint is None else checkpoint,
                           feature_bytes=train["feature_bytes"], head_bytes=train["head_bytes"],
                           grad_accum=train["grad_accum"], target_weights_bytes=train["target_weights_bytes"])


def usable_gib(gpu: str) -> float:
    """What a training step may take of `gpu`: torch's allocatable GiB less the UNCOUNTED_SHARE."""
    return GPU_GIB[gpu] * (1 - UNCOUNTED_SHARE)


def fits(peak_bytes: int, gpu: str) -> bool:
    return peak_bytes <= usable_gib(gpu) * GIB


def format_table(rows: list[dict[str, Any]], budget_gib: float | None = None) -> str:
    """One line per `training_memory` result (its "name" if set): trainable parameters; GiB of fp32
    weights, AdamW state, frozen weights (embedding, target head, an online target); at the peak
    moment the bytes per token (features, teacher, activations, transients) and their GiB, the
    moment's other GiB (gradients, weight casts, loss buffers); the peak, and if it fits `budget_gib`."""
    head = (f"{'draft':<24} {'L':>6} {'ckpt':>4} {'params M':>8} {'weights':>7} {'AdamW':>6} {'frozen':>6} "
            f"{'KiB/token':>9} {'tokens':>6} {'other':>6} {'peak GiB':>8}  {'moment':<9}"
            + ("  fits" if budget_gib else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        s, st, ph = r["setting"], r["static"], r["phases"][r["peak_phase"]]
        frozen = sum(st.values()) - st["params_fp32"] - st["adamw_state"] - st["runtime"]
        act = ph["per_token"] * s["tokens"]
        name = r.get("name", f"H={r['shape']['hidden_size']}")
        line = (f"{name:<24} {s['seq_len']:>6} "
                f"{'on' if s['checkpoint'] else 'off':>4} {r['params']['trainable'] / 1e6:>8.0f} "
                f"{st['params_fp32'] / GIB:>7.2f} {st['adamw_state'] / GIB:>6.2f} {frozen / GIB:>6.2f} "
                f"{ph['per_token'] / 1024:>9.1f} {act / GIB:>6.2f} {(ph['fixed'] + st['runtime']) / GIB:>6.2f} "
                f"{r['peak_bytes'] / GIB:>8.2f}  {r['peak_phase']:<9}")
        if budget_gib:
            line += f"  {'yes' if r['peak_bytes'] <= budget_gib * GIB else 'NO'}"
        lines.append(line)
    return "\n".join(lines)
