"""Training-step throughput and peak memory of the draft, TTT attention paths compared.

One full step = 7 TTT steps, loss, backward, AdamW step, for the SmolLM2-135M draft shape at
batch 1. Each (path, dtype, L) runs in its own subprocess so its peak RSS (os.wait4 rusage of
that child) is clean; a path stops at the first L that runs out of the memory limit. Prints a
table and writes JSON. Every ratio in it is taken within this run: the efficient path against the
dense reference at the same L and dtype, and the step against the GEMM rate below. Upstream
SpecForge is not run here (its loss is a Triton kernel); its side-by-side figures are in the README,
with the day they were measured. A figure from another run or host is not a baseline.

Each child also counts the FLOPs of one step (torch.utils.flop_counter; the CPU flash-attention
kernel counted at its causal half) and, right after timing the step, measures this machine's GEMM
rate on the step's own matmul shapes and dtypes (each distinct shape timed alone, weighted by its
FLOPs in the step): the step's GFLOP/s as a share of that rate says how far from the matmul rate
it runs, measured in the same process under the same load.

    python benchmarks/train_step.py                       # the full table
    python benchmarks/train_step.py --lengths 512 --iters 1 --paths efficient --dtypes bf16
    python benchmarks/train_step.py --online --dtypes bf16 --paths efficient   # SmolLM2 forward included
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

GIB = 1 << 30
SHAPE = dict(  # the SmolLM2-135M draft (target: 30 layers, hidden 576)
    hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
    rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, max_position_embeddings=8192,
    vocab_size=49152, draft_vocab_size=16000, target_hidden_size=576, aux_layer_ids=[2, 15, 27],
)
GEMM_SHARE_GOAL = 0.75  # the efficient bf16 step's GFLOP/s as a share of the GEMM rate on its shapes
MEMORY_GOALS = {4096: 3.0, 8192: 6.0}  # peak GiB of the efficient path
RESULTS = Path(__file__).parent / "results" / "train_step.json"


# ---------------------------------------------------------------------------------------------
# child: one configuration


def random_batch_fn(L: int, seed: int = 0, shape: dict | None = None) -> tuple[Callable[[], dict], object]:
    """Features given (offline): random aux / final hidden, every position supervised; `shape`: a
    DraftModelConfig dict (default: the SmolLM2 draft)."""
    import torch

    from draftforge.draft.config import DraftModelConfig
    from draftforge.draft.model import Eagle3Draft

    g = torch.Generator().manual_seed(seed)
    cfg = DraftModelConfig(**(shape or SHAPE))
    draft = Eagle3Draft(cfg)
    V, Dv, Ht = cfg.vocab_size, cfg.draft_vocab_size, cfg.target_hidden_size
    ids = torch.sort(torch.randperm(V, generator=g)[:Dv]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    draft.set_vocab_mapping(ids - torch.arange(Dv), t2d)
    draft.load_target_embedding(torch.randn(V, Ht, generator=g) * 0.02)
    head = torch.randn(V, Ht, generator=g) * 0.05
    head[t2d] *= 4  # the target's argmax lands in the draft vocabulary: all positions supervised
    batch = dict(
        input_ids=torch.randint(0, V, (1, L), generator=g),
        attention_mask=torch.ones(1, L, dtype=torch.long),
        loss_mask=torch.ones(1, L, dtype=torch.long),
        aux=torch.randn(1, L, 3 * Ht, generator=g),
        final_hidden=torch.randn(1, L, Ht, generator=g),
        target_lm_head_weight=head,
    )
    return (lambda: batch), draft


def online_batch_fn(L: int, seed: int = 0) -> tuple[Callable[[], dict], object]:
    """Target forward included: real ShareGPT text (the first conversations, chat-templated and
    concatenated to L tokens) through SmolLM2-135M-Instruct in bf16 on every call, the draft
    vocabulary = the Dv most frequent tokens of that text, the target's real lm_head as teacher."""
    import torch

    from draftforge.data.conversations import Row, iter_conversations
    from draftforge.data.template import load_tokenizer, render
    from draftforge.data.vocab import select_vocab
    from draftforge.draft.config import DraftModelConfig
    from draftforge.draft.model import Eagle3Draft
    from draftforge.target.hf import HFTarget

    target = HFTarget.from_pretrained("smollm2", None, torch.bfloat16)
    tokenizer = load_tokenizer("smollm2")
    ids: list[int] = []
    for item in iter_conversations(["sharegpt"]):
        if isinstance(item, Row):
            ids += tokenizer(render(tokenizer, item.data["conversations"]), add_special_tokens=False)["input_ids"]
        if len(ids) >= 4 * L:
            break
    V = target.head.weight.shape[0]
    vocab = select_vocab(torch.bincount(torch.tensor(ids), minlength=V).numpy(), SHAPE["draft_vocab_size"])
    cfg = DraftModelConfig.from_target_config(target.config, SHAPE["draft_vocab_size"], target.aux_layers)
    draft = Eagle3Draft(cfg)
    draft.set_vocab_mapping(vocab.d2t, vocab.t2d)
    draft.load_target_embedding(target.embed_weight.float())
    input_ids = torch.tensor([ids[:L]])
    mask = torch.ones_like(input_ids)

    def batch() -> dict:
        feats = target.features(input_ids, mask)
        return dict(input_ids=input_ids, attention_mask=mask, loss_mask=mask, aux=feats.aux,
                    final_hidden=feats.final_hidden, target_lm_head_weight=target.head.weight)

    return batch, draft


def make_step(spec: dict) -> tuple[Callable[[], object], object, object]:
    """(step, draft, optimizer): one full training step of the configuration `spec`."""
    import torch

    from draftforge.train.ttt import ttt_forward, ttt_objective

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    L, bf16 = spec["L"], spec["dtype"] == "bf16"
    get_batch, draft = online_batch_fn(L) if spec["online"] else random_batch_fn(L, shape=spec.get("shape"))
    params = [p for p in draft.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> object:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = ttt_forward(draft, **get_batch(), steps=spec["steps"], attention=spec["path"],
                              checkpoint=spec["checkpoint"])
        ttt_objective(out).backward()
        opt.step()
        return out

    return step, draft, opt


def run_child(spec: dict) -> dict:
    step, _, _ = make_step(spec)
    out = step()  # warm-up (allocator, oneDNN primitive caches)
    times = []
    for _ in range(spec["iters"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # before the counting step
    flops, gemms = count_step(step)
    ms = 1e3 * min(times)
    step_gflops = flops / ms / 1e6
    gemm_gflops = gemm_rate(gemms)
    return dict(
        ms=ms, ms_all=[round(1e3 * t, 1) for t in times], supervised=out.count.tolist(), self_maxrss_gib=maxrss,
        gflop_per_step=round(flops / 1e9, 3), gflop_per_token=round(flops / 1e9 / spec["L"], 4),
        step_gflops=round(step_gflops, 1), gemm_gflops=round(gemm_gflops, 1),
        gemm_share=round(step_gflops / gemm_gflops, 3), loadavg=os.getloadavg(),
    )


def count_step(step: Callable[[], object]) -> tuple[float, dict[tuple, int]]:
    """(FLOPs of one call of `step`, {(batch, m, k, n, dtype name): count} of its matmuls).

    torch's counter has no formula for the CPU flash-attention kernel: counted here as torch
    counts the fused kernels (2 matmuls forward, 4 backward with the recompute), at the causal
    half of the key blocks ((L+1) / 2L), which is what the kernel computes."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def causal(flops: int, q_len: int, is_causal: bool) -> int:
        return flops * (q_len + 1) // (2 * q_len) if is_causal else flops

    def cpu_flash(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
        return causal(sdpa_flop_count(q, k, v), q[2], is_causal)

    def cpu_flash_backward(grad_out, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                           **kwargs) -> int:
        return causal(sdpa_backward_flop_count(grad_out, q, k, v), q[2], is_causal)

    gemm_ops = {aten.mm: (0, 1), aten.addmm: (1, 2), aten.bmm: (0, 1), aten.baddbmm: (1, 2)}

    class GemmShapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: dict[tuple, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            where = gemm_ops.get(func.overloadpacket)
            if where is not None:
                a, b = args[where[0]], args[where[1]]
                key = (a.shape[0] if a.dim() == 3 else 1, a.shape[-2], a.shape[-1], b.shape[-1], str(a.dtype))
                self.seen[key] = self.seen.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_backward,
    })
    shapes = GemmShapes()
    with counter, shapes:
        step()
    return float(counter.get_total_flops()), shapes.seen


def gemm_rate(gemms: dict[tuple, int], min_s: float = 0.05) -> float:
    """GFLOP/s of this machine's matmuls on exactly these shapes and dtypes (contiguous operands), each
    timed alone (best of repeated runs of at least `min_s`), weighted by its share of the FLOPs."""
    import torch

    flops = seconds = 0.0
    for (batch, m, k, n, dtype), count in gemms.items():
        dt = getattr(torch, dtype.removeprefix("torch."))
        a, b = torch.randn(batch, m, k).to(dt), torch.randn(batch, k, n).to(dt)
        mm = torch.bmm if batch > 1 else (lambda x, y: torch.mm(x[0], y[0]))
        mm(a, b)
        best, reps, t_all = float("inf"), 1, 0.0
        while t_all < 3 * min_s:
            t0 = time.perf_counter()
            for _ in range(reps):
                mm(a, b)
            t = time.perf_counter() - t0
            best, t_all = min(best, t / reps), t_all + t
            reps = max(reps, int(reps * min_s / max(t, 1e-6)))
        flops += count * 2.0 * batch * m * k * n
        seconds += count * best
    return flops / seconds / 1e9


# ---------------------------------------------------------------------------------------------
# parent: subprocess per configuration, RSS watchdog, table


def add_measure_arguments(ap: argparse.ArgumentParser, mem_limit_gib: float, timeout_s: float) -> None:
    """`measure`'s limits, and the hidden flags it starts a child with."""
    ap.add_argument("--mem-limit-gib", type=float, default=mem_limit_gib, help="a child above this RSS is killed: OOM")
    ap.add_argument("--timeout-s", type=float, default=timeout_s, help="a child running longer is killed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)


def ran_as_child(args: argparse.Namespace, run: Callable[[dict], dict]) -> bool:
    """In a child that `measure` started: run its spec, write the JSON result, and say so."""
    if not args.child:
        return False
    Path(args.child_out).write_text(json.dumps(run(json.loads(args.child))))
    return True


def measure(spec: dict, mem_limit_gib: float, timeout_s: float, script: str = __file__) -> dict:
    """Run one configuration in a child (`script --child SPEC --child-out FILE`, whose JSON has "ms");
    kill it above the memory limit or the time limit."""
    with tempfile.NamedTemporaryFile("w+", suffix=".json") as f:
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
        if spec.get("omp_wait_policy"):
            env["OMP_WAIT_POLICY"] = spec["omp_wait_policy"]
        proc = subprocess.Popen([sys.executable, script, "--child", json.dumps(spec), "--child-out", f.name],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        killed: dict[str, str] = {}
        stop = threading.Event()

        def watchdog() -> None:
            t0 = time.monotonic()
            while not stop.wait(0.05):
                rss = _rss_gib(proc.pid)
                if rss is not None and rss > mem_limit_gib:
                    killed["why"] = f"out of memory (> {mem_limit_gib:g} GiB limit)"
                elif time.monotonic() - t0 > timeout_s:
                    killed["why"] = f"timeout (> {timeout_s:g} s)"
                else:
                    continue
                proc.kill()
                return

        th = threading.Thread(target=watchdog, daemon=True)
        th.start()
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        th.join()
        peak = usage.ru_maxrss * 1024 / GIB  # kilobytes on Linux
        res: dict = dict(spec, peak_rss_gib=round(peak, 3))
        if killed or proc.returncode != 0:
            why = killed.get("why") or ("out of memory (killed)" if proc.returncode in (-9, 137)
                                        else f"failed rc={proc.returncode}: {stderr.strip()[-400:]}")
            return dict(res, error=why)
        child = json.loads(Path(f.name).read_text())
        return dict(res, **child, tok_s=round(spec["L"] / (child["ms"] / 1e3), 1))


def _rss_gib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        return None
    return None


def goals(r: dict, online: bool) -> str:
    """MET / MISSED for the efficient path's GEMM share (bf16 steps) and memory (4k, 8k)."""
    if r["path"] != "efficient" or online:
        return ""
    checks = []
    if r["dtype"] == "bf16":
        checks.append((r["gemm_share"] >= GEMM_SHARE_GOAL, f"share >= {GEMM_SHARE_GOAL:.0%}"))
    if r["L"] in MEMORY_GOALS:
        checks.append((r["peak_rss_gib"] <= MEMORY_GOALS[r["L"]], f"peak <= {MEMORY_GOALS[r['L']]:g} GiB"))
    return ", ".join(f"{'MET' if ok else 'MISSED'} ({text})" for ok, text in checks)


def table(results: list[dict], online: bool) -> str:
    head = (f"{'L':>5} {'dtype':>5} {'path':>10} {'ms/step':>9} {'tok/s':>7} {'peak GiB':>8} "
            f"{'GFLOP/tok':>9} {'GFLOP/s':>7} {'GEMM GFLOP/s':>12} {'share':>5} {'vs reference':>12}  goal")
    lines = [head, "-" * len(head)]
    reference = {(r["L"], r["dtype"]): r["tok_s"] for r in results if r["path"] == "reference" and "error" not in r}
    for r in results:
        if "error" in r:
            body = f"{'':>9} {'':>7} {r['peak_rss_gib']:>8.2f}   {r['error']}"
            lines.append(f"{r['L']:>5} {r['dtype']:>5} {r['path']:>10} {body}")
            continue
        ref = reference.get((r["L"], r["dtype"]))
        versus = f"{r['tok_s'] / ref:.2f}x" if ref and r["path"] != "reference" else "-"
        lines.append(f"{r['L']:>5} {r['dtype']:>5} {r['path']:>10} {r['ms']:>9.0f} {r['tok_s']:>7.0f} "
                     f"{r['peak_rss_gib']:>8.2f} {r['gflop_per_token']:>9.3f} {r['step_gflops']:>7.0f} "
                     f"{r['gemm_gflops']:>12.0f} {r['gemm_share']:>5.0%} {versus:>12}  {goals(r, online)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 8192])
    ap.add_argument("--paths", nargs="+", default=["reference", "efficient"],
                    choices=["reference", "efficient", "blockwise"])
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["bf16", "fp32"],
                    help="default: bf16 and fp32 where bf16 runs natively, else fp32 (emulated bf16 is ~100x slower)")
    ap.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up (best is reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7, help="TTT steps")
    ap.add_argument("--checkpoint", action="store_true", help="gradient checkpointing of the unrolled steps")
    ap.add_argument("--online", action="store_true", help="include the SmolLM2 target forward (online_batch_fn)")
    ap.add_argument("--omp-wait-policy", choices=["PASSIVE", "ACTIVE"], default=None,
                    help="PASSIVE when the cores are shared: spinning OpenMP threads then cost up to 4x")
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_measure_arguments(ap, mem_limit_gib=18.0, timeout_s=1800.0)
    args = ap.parse_args()
    if ran_as_child(args, run_child):
        return
    if args.dtypes is None:
        from draftforge.config import native_bf16

        native = native_bf16()
        args.dtypes = ["bf16", "fp32"] if native else ["fp32"]
        if not native:
            print("bf16 is emulated on this CPU (no AVX512-BF16 / AMX): timing fp32 only (--dtypes bf16 forces it)")

    results = []
    for dtype in args.dtypes:
        for path in args.paths:
            for L in sorted(args.lengths):
                spec = dict(L=L, dtype=dtype, path=path, iters=args.iters, threads=args.threads, steps=args.steps,
                            checkpoint=args.checkpoint, online=args.online, omp_wait_policy=args.omp_wait_policy)
                r = measure(spec, args.mem_limit_gib, args.timeout_s)
                results.append(r)
                msg = r.get("error") or (f"{r['ms']:.0f} ms/step, {r['tok_s']:.0f} tok/s, {r['step_gflops']:.0f} "
                                         f"GFLOP/s = {r['gemm_share']:.0%} of the GEMM rate {r['gemm_gflops']:.0f} "
                                         f"(load {r['loadavg'][0]:.2f})")
                print(f"  L={L} {dtype} {path}: {msg}, peak {r['peak_rss_gib']:.2f} GiB", flush=True)
                if "error" in r:
                    break  # longer sequences of this path would run out too
    print()
    print(table(results, args.online))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), shape=SHAPE,
                threads=args.threads, ttt_steps=args.steps, batch=1, online=args.online,
                checkpoint=args.checkpoint, omp_wait_policy=args.omp_wait_policy,
                loadavg_at_end=os.getloadavg())
    args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
