"""The training memory model (src/draftforge/train/memory_model.py) against measurements, and its
table for the 8B / 70B / 235B recipes (issue 7).

(a) Validation: one full training step (7 TTT steps, loss, backward, AdamW whose state already
exists, as in every step after the first) per configuration, each in its own child process
(train_step.make_step / measure), batch 1, one thread. Two measurements per child: live tensor
bytes (those alive before the step, found through the garbage collector, plus the peak of the CPU
allocator's running total during the step from torch's memory profiler: what a GPU's
max_memory_allocated would report), for the forward, the backward and the whole step; and the
process's peak RSS. Predicted RSS = model + the process baseline, measured once as the RSS of the
same step for a negligible shape minus that shape's (~1 MB) prediction. Shapes: the SmolLM2 draft
and a mid-size one (Llama-3.2-1B-like: hidden 2048, draft vocabulary 32k); CPU attention paths (the
GPU runs "blockwise").
(b) The table: recipe draft shapes at 2k / 8k / 32k tokens, TTT 7, bf16, gradient checkpointing
off / on, the GPU attention path, the recipe's gradient accumulation, against an 80 GB GPU.

    python benchmarks/memory_model.py              # ~12 CPU-minutes; writes benchmarks/results/memory_model.json
    python benchmarks/memory_model.py --quick      # SmolLM2 draft at 1k / 2k only
    python benchmarks/memory_model.py --table-only # (b) alone: refreshes the table in the JSON

glibc keeps freed heap blocks below its (adaptive, up to 32 MB) mmap threshold, so at 4k+ tokens
the peak RSS exceeds live memory + baseline; MALLOC_MMAP_THRESHOLD_=1048576 in the environment makes
freed blocks go back to the OS and the RSS follow the live tensors.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import time
from pathlib import Path

from train_step import GIB, SHAPE, add_measure_arguments, make_step, measure, ran_as_child

from draftforge.draft.config import DraftModelConfig
from draftforge.train.memory_model import (
    GPU_GIB,
    format_table,
    measured_peaks,
    recipe_memory,
    recipe_shape,
    training_memory,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "memory_model.json"
RECIPES = ("llama-3.1-8b-instruct", "llama-3.3-70b-instruct", "qwen3-235b-a22b")
H100_GIB = GPU_GIB["80 GB (H100)"]  # what torch can allocate on an 80 GB H100 after the CUDA context
MID = dict(SHAPE, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
           intermediate_size=8192, vocab_size=128256, draft_vocab_size=32000, target_hidden_size=2048)
TINY = dict(SHAPE, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=512, draft_vocab_size=256, target_hidden_size=64)
# (name, shape, L, dtype, attention path, checkpoint)
FULL = ([("smollm2", SHAPE, L, "bf16", "efficient", ck) for L in (1024, 2048, 4096, 8192) for ck in (False, True)]
        + [("smollm2", SHAPE, 4096, "bf16", "blockwise", ck) for ck in (False, True)]
        + [("smollm2", SHAPE, 2048, "fp32", "efficient", False), ("smollm2", SHAPE, 1024, "bf16", "reference", False)]
        + [("mid-2048", MID, L, "bf16", "efficient", ck) for L in (512, 1024, 2048) for ck in (False, True)])
QUICK = [("smollm2", SHAPE, L, "bf16", "efficient", ck) for L in (1024, 2048) for ck in (False, True)]


# ---------------------------------------------------------------------------------------------
# child


def run_child(spec: dict) -> dict:
    """One step after AdamW's state exists: its time, live tensor bytes before it and their peaks
    above that (whole step, forward, backward), this process's peak RSS."""
    import torch

    step, _, opt = make_step(spec)
    for group in opt.param_groups:  # allocate AdamW's state as the first step would
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    before = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                  for t in gc.get_objects() if isinstance(t, torch.Tensor)}.values())
    t0 = time.perf_counter()
    peaks = measured_peaks(step)
    ms = 1e3 * (time.perf_counter() - t0)
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return dict(ms=ms, tensors_before=before, peaks=peaks, vm_hwm_gib=int(hwm.group(1)) * 1024 / GIB)


# ---------------------------------------------------------------------------------------------
# parent


def predict(shape: dict, L: int, dtype: str, path: str, checkpoint: bool) -> dict:
    """The model for what the child runs: float32 random features and target head, fused AdamW."""
    return training_memory(DraftModelConfig(**shape), L, precision=dtype, attention=path, checkpoint=checkpoint,
                           feature_bytes=4, head_bytes=4, optimizer="fused")


def validate(configs: list, mem_limit_gib: float, timeout_s: float) -> tuple[float, list[dict]]:
    """(process baseline GiB, one row per configuration: predicted vs measured GiB and error %)."""
    def child(shape: dict, L: int, dtype: str, path: str, ck: bool) -> dict:
        spec = dict(L=L, dtype=dtype, path=path, checkpoint=ck, shape=shape, threads=1, steps=7, online=False,
                    omp_wait_policy="PASSIVE")
        r = measure(spec, mem_limit_gib, timeout_s, script=__file__)
        if "error" in r:
            raise SystemExit(f"{L} {dtype} {path} ckpt={ck}: {r['error']}")
        return r

    tiny = child(TINY, 64, "bf16", "efficient", False)
    baseline = tiny["peak_rss_gib"] - predict(TINY, 64, "bf16", "efficient", False)["peak_bytes"] / GIB
    print(f"process baseline (Python + torch + profiler, negligible shape): {baseline:.3f} GiB", flush=True)
    rows = []
    for name, shape, L, dtype, path, ck in configs:
        m = predict(shape, L, dtype, path, ck)
        r = child(shape, L, dtype, path, ck)
        row = dict(name=name, L=L, dtype=dtype, path=path, checkpoint=ck, moment=m["peak_phase"], ms=round(r["ms"]))
        pairs = {stage: (m["stages"].get(stage, m["peak_bytes"]) / GIB, (r["tensors_before"] + r["peaks"][stage]) / GIB)
                 for stage in ("step", "forward", "backward")}
        pairs["rss"] = (m["peak_bytes"] / GIB + baseline, r["peak_rss_gib"])
        for key, (pred, meas) in pairs.items():
            row[key] = dict(predicted_gib=round(pred, 3), measured_gib=round(meas, 3),
                            error_pct=round(100 * (pred - meas) / meas, 2))
        rows.append(row)
        print(f"  {name} L={L} {dtype} {path} ckpt={'on' if ck else 'off'}: "
              + ", ".join(f"{k} {v['predicted_gib']:.2f} vs {v['measured_gib']:.2f} GiB ({v['error_pct']:+.1f}%)"
                          for k, v in row.items() if isinstance(v, dict))
              + f", {r['ms'] / 1e3:.0f} s", flush=True)
    return baseline, rows


def validation_table(rows: list[dict]) -> str:
    """Predicted / measured GiB and error of the live tensors (forward, backward stages; the step's
    peak and its moment) and of the process RSS."""
    cols = ("forward", "backward", "step", "rss")
    head = (f"{'shape':<9} {'L':>5} {'dtype':>5} {'path':>9} {'ckpt':>4} "
            + " ".join(f"{c + ' GiB':>20}" for c in cols) + "  moment")
    lines = [head, "-" * len(head)]
    for r in rows:
        ck = "on" if r["checkpoint"] else "off"
        cells = " ".join(f"{r[c]['predicted_gib']:>6.2f} {r[c]['measured_gib']:>6.2f} {r[c]['error_pct']:>+5.1f}%"
                         for c in cols)
        lines.append(f"{r['name']:<9} {r['L']:>5} {r['dtype']:>5} {r['path']:>9} {ck:>4} {cells}  {r['moment']}")
    return "\n".join(lines)


def recipe_rows(lengths: list[int]) -> list[dict]:
    """The recipes' draft shapes on the GPU path (blockwise attention), TTT 7, bf16, ckpt off / on, as
    each recipe trains: its gradient accumulation, feature dtype, the target's weights when online."""
    rows = []
    for name in RECIPES:
        shape = recipe_shape(ROOT / "recipes" / f"{name}.yaml")
        rows += [dict(recipe_memory(*shape, L, ck), name=name) for L in lengths for ck in (False, True)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="validate the SmolLM2 draft at 1k / 2k only")
    ap.add_argument("--table-only", action="store_true", help="the recipe table alone (kept measurements)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768], help="recipe table lengths")
    ap.add_argument("--out", type=Path, default=RESULTS)
    add_measure_arguments(ap, mem_limit_gib=16.0, timeout_s=3600.0)
    args = ap.parse_args()
    if ran_as_child(args, run_child):
        return

    out: dict = dict(meta=dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=1,
                               ttt_steps=7, batch=1, gpu_budget_gib=H100_GIB))
    if not args.table_only:
        baseline, rows = validate(QUICK if args.quick else FULL, args.mem_limit_gib, args.timeout_s)
        worst = {k: max(abs(r[k]["error_pct"]) for r in rows) for k in ("forward", "backward", "step", "rss")}
        print("\n" + validation_table(rows))
        print("max |error| %: " + ", ".join(f"{k} {v:.1f}" for k, v in worst.items()))
        out.update(baseline_rss_gib=round(baseline, 3), validation=rows, max_abs_error_pct=worst)
    table = recipe_rows(args.lengths)
    print(f"\nrecipe draft shapes, GPU path, TTT 7, bf16 (budget {H100_GIB:g} GiB: an 80 GB GPU less its CUDA context)")
    print(format_table(table, H100_GIB))
    out["recipes"] = [dict(name=r["name"], setting=r["setting"], params=r["params"], static=r["static"],
                           per_token=r["per_token"], fixed=r["fixed"], peak_phase=r["peak_phase"],
                           peak_gib=round(r["peak_bytes"] / GIB, 2), fits_gpu=r["peak_bytes"] <= H100_GIB * GIB)
                      for r in table]
    if args.table_only and args.out.exists():  # keep the measured validation, refresh the table
        out = dict(json.loads(args.out.read_text()), recipes=out["recipes"])
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
