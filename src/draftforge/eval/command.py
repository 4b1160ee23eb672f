"""`draftforge eval`: τ, α_k, tokens/s and speedup of an exported draft with the built-in decoder
(chain / tree for EAGLE-3, blocks for DFlash) on prompt suites, next to n-gram prompt lookup's τ on
the same prompts; JSON, table and chart (eval/report.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from draftforge.decode.draft_dir import load_decoder
from draftforge.decode.spec import SpecConfig
from draftforge.eval.evaluate import evaluate_suite, warm_up
from draftforge.eval.ngram import NGRAM
from draftforge.target.base import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--draft", required=True, help="exported draft directory (sglang / vllm / speculators)")
    parser.add_argument("--target", default="smollm2", help="target HF directory or hub id; smollm2 = packaged")
    parser.add_argument("--suite", nargs="+", default=["mtbench"],
                        help="mtbench | jsonl:PATH | heldout:PATH[@FRACTION] (several allowed)")  # fmt: skip
    parser.add_argument("--configs", nargs="+", default=["1,3,1,4"], help="batch,steps,topk,draft_tokens ...")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="conversations per suite")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="target and draft dtype")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="eval_results.json", help="JSON results; the chart goes next to it (.png)")
    parser.add_argument("--no-baseline", action="store_true", help="skip plain decoding (no speedup, half the time)")
    parser.add_argument("--ngram", default=",".join(map(str, NGRAM)), metavar="MIN,MAX",
                        help="n-gram sizes of the prompt-lookup baseline reported beside τ (vLLM's "
                             "prompt_lookup_min / max); computed from the greedy tokens, temperature 0 only")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from draftforge.assets import resolve_model_path
    from draftforge.eval import report
    from draftforge.eval.suites import load_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    tpath = resolve_model_path(args.target)
    tokenizer = AutoTokenizer.from_pretrained(tpath)
    model = AutoModelForCausalLM.from_pretrained(tpath, dtype=dtype).eval()
    from draftforge.export.formats import check_draft_dir

    for finding in check_draft_dir(args.draft, model.config.to_dict()):  # what an engine would object to
        print(f"{finding.level.upper():5} {args.draft}: {finding.message}")
    decoder = load_decoder(args.draft, model, dtype)
    configs = [SpecConfig.parse(c) for c in args.configs]
    ngram = tuple(int(n) for n in args.ngram.split(","))
    if len(ngram) != 2 or not 1 <= ngram[0] <= ngram[1]:
        raise SystemExit(f"--ngram {args.ngram}: expected MIN,MAX with 1 <= MIN <= MAX")
    warm_up(decoder, tokenizer)
    results: dict[str, dict[str, Any]] = {}
    for name in args.suite:
        suite = load_suite(name, limit=args.limit)
        results[suite.name] = {}
        for spec in configs:
            results[suite.name][spec.key] = evaluate_suite(
                decoder, tokenizer, suite.conversations, spec, args.max_new_tokens, args.temperature, args.seed,
                progress=not args.no_progress, desc=f"{suite.name} {spec.key}", baseline=not args.no_baseline,
                ngram=ngram,
            )  # fmt: skip
    meta = {
        "target": str(args.target),
        "draft": str(args.draft),
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "device": str(decoder.target.device),
        "aux_layer_ids": decoder.draft.config.aux_layer_ids,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(args.out)
    report.write_json(out, meta, results)
    chart = report.plot(results, out.with_suffix(".png"), title=f"{Path(args.draft).name} on {args.target}")
    print(report.table(results))
    print(f"wrote {out}" + (f" and {chart}" if chart else ""))
    return 0
