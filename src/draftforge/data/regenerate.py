"""Regenerate conversations with the target itself on OpenAI-compatible chat servers (vLLM, SGLang, ...).

    draftforge regenerate --input conv.jsonl --output regen.jsonl --server http://127.0.0.1:8000 \\
        --server http://127.0.0.1:8001 --max-tokens 1024 --resume

A draft learns to predict the target, so it should learn from the target's own answers: each
conversation is replayed turn by turn, keeping system and user messages and replacing every
assistant message with the target's answer to the history so far (its own earlier answers
included). A trailing user turn gets an answer too. `reasoning_content` is kept when the server
returns it. Replay stops at the first tool call or tool result (there is no tool to run), and after
`--max-turns` answers when given (an eval such as MT-bench asks two turns; later ones cost prompt
tokens a short draft eval never sees). `--exclude` skips the ids of an earlier set, so a second run
adds only new conversations.

Reliability contract:
- timeouts, dropped connections, malformed responses, 5xx, 408 and 429 are retried with
  exponential backoff (full jitter), each retry on the next server in rotation;
- a server failing `--max-failures` requests in a row leaves the rotation for a cooldown that
  doubles while it stays down; after it one probe request at a time tests it again. The run
  continues on the others and stops only when every server has been down for `--give-up-after` s;
- a request the server rejects (another 4xx) or that still fails after `--retries` retries makes
  its row an error in OUT.errors.jsonl with the reason, except that a later turn's rejection or
  empty answer (typically the context filling up) keeps the answered prefix, flagged as `stopped`;
- every finished row is appended as one line and fsync'ed, so a killed run resumes with
  `--resume`: rows already in OUT or OUT.errors.jsonl are skipped, a half-written last line is cut
  off. Input rows = output rows + error rows, with no duplicates.

Output rows keep `prepare`'s shape (`{"id", "conversations"[, "tools"]}`) plus a `regenerated`
record (model, sampling, per answer: finish_reason, token counts, server, and `stopped`).
Requests go through `serving.pool` (rotation, retries) and `serving.http` (the HTTP client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from draftforge.data.conversations import FORMATS, Reject, Row, iter_conversations
from draftforge.serving.http import discover_model
from draftforge.serving.pool import AllServersDown, RequestFailed, Retry, Rotation, Server, ServerPool, complete

# ------------------------------------------------------------------------------------- one conversation


class RowError(Exception):
    """A row cannot be regenerated for a reason of its own (no user turn, an empty answer); `reason`
    is a short key for the errors file and the summary, as RequestFailed's is."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Sampling:
    """What the target is asked; recorded in every output row."""

    model: str
    temperature: float = 0.0
    top_p: float | None = None
    max_tokens: int | None = None
    reasoning: bool | None = None  # chat_template_kwargs.enable_thinking; None = the template's default
    seed: int | None = None  # per-answer seed = seed + crc32(id/turn): order-independent, reproducible
    extra_body: dict[str, Any] = field(default_factory=dict)

    def body(self, messages: list[dict[str, Any]], key: str, tools: list | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.seed is not None:
            body["seed"] = (self.seed + zlib.crc32(key.encode())) % 2**31
        if tools:
            body["tools"] = tools
        extra = dict(self.extra_body)
        kwargs = dict(extra.pop("chat_template_kwargs", None) or {})
        if self.reasoning is not None:
            kwargs["enable_thinking"] = self.reasoning
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        return {**body, **extra}


def _answer(response: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The assistant turn and its record (finish reason, token counts) from a chat completion."""
    choice = response["choices"][0]
    message = choice.get("message") or {}
    turn: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    reasoning = message.get("reasoning_content") or message.get("reasoning")  # SGLang / vLLM names
    if reasoning:
        turn["reasoning_content"] = reasoning
    if message.get("tool_calls"):
        turn["tool_calls"] = message["tool_calls"]
    usage = response.get("usage") or {}
    info = {"finish_reason": choice.get("finish_reason"), "completion_tokens": usage.get("completion_tokens"),
            "prompt_tokens": usage.get("prompt_tokens")}  # fmt: skip
    return turn, info


async def regenerate_row(row: dict[str, Any], pool: ServerPool, sampling: Sampling, retry: Retry,
                         headers: Mapping[str, str] | None = None, max_turns: int | None = None) -> dict[str, Any]:
    """The row with every assistant turn replaced by the target's answer, cut after `max_turns` answers
    when given; raises RowError."""
    history: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    stopped = None
    for turn in row["conversations"]:
        if turn["role"] == "tool" or turn.get("tool_calls"):
            stopped = {"reason": "tool_call", "message": "replay stops at the first tool call or result"}
            break
        if turn["role"] == "assistant":
            continue  # replaced by the target's answer to the user turn before it
        if turn["role"] == "user" and max_turns is not None and len(records) >= max_turns:
            break
        out.append(turn)
        history.append({"role": turn["role"], "content": turn["content"]})
        if turn["role"] != "user":
            continue
        key = f"{row['id']}/{len(records)}"
        try:
            response, url = await complete(pool, sampling.body(history, key, row.get("tools")), retry, headers)
            answer, info = _answer(response)
            if not answer["content"].strip() and "tool_calls" not in answer:
                raise RowError("empty_answer", f"empty answer (finish_reason {info['finish_reason']})")
        except (RequestFailed, RowError) as e:
            if not records or e.reason == "retries_exhausted":
                raise
            out.pop()  # keep the answered prefix: a later turn overflowing the context is common
            stopped = {"reason": e.reason, "message": f"turn {len(records)}: {e}"}
            break
        out.append(answer)
        history.append({"role": "assistant", "content": answer["content"]})
        records.append({**info, "server": url})
        if "tool_calls" in answer:
            stopped = {"reason": "tool_call", "message": "the target called a tool"}
            break
    if not records:
        raise RowError("no_user_turn", stopped["message"] if stopped else "no user turn to answer")
    result: dict[str, Any] = {"id": row["id"], "conversations": out}
    if row.get("tools"):
        result["tools"] = row["tools"]
    result["regenerated"] = {"sampling": asdict(sampling), "max_turns": max_turns, "turns": records,
                             "stopped": stopped}
    return result


# ------------------------------------------------------------------------------------- files


def errors_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name.removesuffix(".jsonl") + ".errors.jsonl")


def read_rows(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The complete lines of an append-only JSONL file; with `repair`, a half-written last line is cut off."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")  # every line but the last ended with its newline: it was written completely
    rows = []
    for number, line in enumerate(lines[:-1], 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{number}: not JSON; not an output of `draftforge regenerate`?") from None
    if lines[-1] and repair:  # a run killed while writing this line: cut it, its row is done again
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(lines[-1]))
            os.fsync(f.fileno())
    return rows


class Appender:
    """One JSON object per line, flushed and fsync'ed as written: a kill loses at most the line in flight."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, obj: dict[str, Any]) -> None:
        self.file.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------------------- the run


@dataclass
class RunStats:
    rows: int = 0
    errors: int = 0
    tokens: int = 0
    seconds: float = 0.0
    inputs: int = 0  # input records (rows and rejects) this run was given
    skipped: int = 0  # already done by an earlier run (--resume) or excluded
    excluded: int = 0  # of those, the rows whose id an --exclude file holds
    aborted: str | None = None
    servers: list[Server] = field(default_factory=list)


def _location(item: Row | Reject) -> str:
    return f"{item.source}:{item.line}"


def _error_entry(item: Row | Reject, reason: str, message: str) -> dict[str, Any]:
    row_id = item.data["id"] if isinstance(item, Row) else item.id
    return {"id": row_id, "input": _location(item), "reason": reason, "message": message}


def plan(items: list[Row | Reject], done_rows: list[dict], errors: list[dict],
         excluded: set[str] = frozenset()) -> list[Row | Reject]:  # fmt: skip
    """The items still to do: rows whose id is in neither file nor `excluded`, rejects whose input location is
    not in the errors.

    An input reject may carry the id of a good row (a duplicate id): it marks its location done, not the id."""
    done_ids = {r["id"] for r in done_rows} | {e["id"] for e in errors if not e["reason"].startswith("input_")}
    done_ids |= excluded
    done_inputs = {e["input"] for e in errors if e["reason"].startswith("input_")}
    return [it for it in items if (it.data["id"] not in done_ids if isinstance(it, Row) else
                                   _location(it) not in done_inputs)]  # fmt: skip


async def _regenerate(todo: list[Row | Reject], output: Path, pool: ServerPool, sampling: Sampling, retry: Retry,
                      headers: Mapping[str, str], progress: bool, stats: RunStats, max_turns: int | None) -> None:
    from tqdm import tqdm

    out, err = Appender(output), Appender(errors_path(output))
    bar = tqdm(total=len(todo), unit="row", desc="regenerate", disable=not progress, dynamic_ncols=True)
    if progress:
        pool.log = bar.write
    t0 = time.monotonic()
    items = iter(todo)

    async def worker() -> None:
        for item in items:
            if isinstance(item, Reject):
                err.write(_error_entry(item, f"input_{item.reason}", item.message))
                stats.errors += 1
            else:
                try:
                    row = await regenerate_row(item.data, pool, sampling, retry, headers, max_turns)
                except (RequestFailed, RowError) as e:
                    err.write(_error_entry(item, e.reason, str(e)))
                    stats.errors += 1
                else:
                    out.write(row)
                    stats.rows += 1
                    stats.tokens += sum(t["completion_tokens"] or 0 for t in row["regenerated"]["turns"])
            bar.update(1)
            elapsed = max(time.monotonic() - t0, 1e-9)
            down = len(pool.down)
            bar.set_postfix_str(f"{stats.tokens / elapsed:.1f} tok/s, {stats.errors} errors"
                                + (f", {down} server(s) down" if down else ""))  # fmt: skip

    tasks = [asyncio.create_task(worker()) for _ in range(min(pool.capacity, max(1, len(todo))))]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        stats.seconds = time.monotonic() - t0
        bar.close()
        out.close()
        err.close()


def regenerate(
    inputs: list[str | Path], output: str | Path, servers: list[str], sampling: Sampling, retry: Retry = Retry(),
    rotation: Rotation = Rotation(), *, resume: bool = False, retry_errors: bool = False, fmt: str = "auto",
    max_rows: int | None = None, api_key: str | None = None, progress: bool = True, max_turns: int | None = None,
    exclude: Sequence[str | Path] = (),
) -> RunStats:  # fmt: skip
    """Regenerate `inputs` into `output` (module docstring); FileExistsError when OUT exists without `resume`.
    Rows whose id is in an `exclude` file are skipped (counted as done before)."""
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"--max-turns must be at least 1, got {max_turns}")
    missing = [str(path) for path in exclude if not Path(path).is_file()]
    if missing:  # before the inputs are read: those may be a whole dataset
        raise FileNotFoundError(f"--exclude {', '.join(missing)}: no such file")
    output = Path(output)
    errs = errors_path(output)
    if not resume and (output.exists() or errs.exists()):
        raise FileExistsError(f"{output} or {errs} exists: pass --resume to continue it, or --overwrite")
    done_rows, errors = read_rows(output, repair=True), read_rows(errs, repair=True)
    if done_rows and (was := done_rows[0]["regenerated"]["sampling"]) != asdict(sampling):
        raise ValueError(f"{output} was regenerated with other options ({was}); resume with the same ones")
    if done_rows and (was := done_rows[0]["regenerated"].get("max_turns")) != max_turns:
        raise ValueError(f"{output} was regenerated with --max-turns {was}; resume with the same one")
    if retry_errors and errors:
        errors = [e for e in errors if e["reason"].startswith("input_")]  # bad input stays bad
        errs.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    items = list(iter_conversations(inputs, fmt, max_rows))
    excluded = {row["id"] for path in exclude for row in read_rows(Path(path))}
    todo = plan(items, done_rows, errors, excluded)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    stats = RunStats(inputs=len(items), skipped=len(items) - len(todo),
                     excluded=sum(isinstance(it, Row) and it.data["id"] in excluded for it in items))

    async def main() -> None:
        pool = ServerPool(servers, rotation)
        stats.servers = pool.servers
        try:
            await _regenerate(todo, output, pool, sampling, retry, headers, progress, stats, max_turns)
        except AllServersDown as e:
            stats.aborted = str(e)

    asyncio.run(main())
    return stats


# ------------------------------------------------------------------------------------- summary


def _quantile(xs: list[int], q: float) -> int:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def summarize(output: str | Path) -> dict[str, Any]:
    """What OUT holds (all runs together): rows, answers, tokens, lengths, finish reasons, truncation, errors."""
    rows = read_rows(Path(output))
    errors = read_rows(errors_path(output))
    turns = [t for r in rows for t in r["regenerated"]["turns"]]
    lengths = [t["completion_tokens"] for t in turns if t.get("completion_tokens") is not None]
    truncated = [r["id"] for r in rows if any(t["finish_reason"] == "length" for t in r["regenerated"]["turns"])]
    stopped = Counter(r["regenerated"]["stopped"]["reason"] for r in rows if r["regenerated"]["stopped"])
    return {
        "rows": len(rows),
        "answers": len(turns),
        "completion_tokens": sum(lengths),
        "prompt_tokens": sum(t.get("prompt_tokens") or 0 for t in turns),
        "length": {"min": min(lengths), "p50": _quantile(lengths, 0.5), "p90": _quantile(lengths, 0.9),
                   "p99": _quantile(lengths, 0.99), "max": max(lengths), "mean": statistics.fmean(lengths)}
        if lengths else None,  # fmt: skip
        "finish_reasons": dict(Counter(str(t["finish_reason"]) for t in turns).most_common()),
        "truncated_answers": sum(t["finish_reason"] == "length" for t in turns),
        "truncated_rows": truncated,
        "stopped_rows": dict(stopped),
        "errors": len(errors),
        "error_reasons": dict(Counter(e["reason"] for e in errors).most_common()),
    }


def format_summary(summary: dict[str, Any], stats: RunStats, output: Path) -> str:
    s, lines = summary, []
    rate = f"{stats.rows / max(stats.seconds, 1e-9):.2f} rows/s, {stats.tokens / max(stats.seconds, 1e-9):.1f} tok/s"
    lines.append(f"this run: {stats.rows} rows, {stats.errors} errors, {stats.tokens} tokens in {stats.seconds:.1f}s "
                 f"({rate}); {stats.skipped} done before" + (f" ({stats.excluded} excluded)" if stats.excluded else ""))
    lines.append(f"{output}: {s['rows']} rows, {s['answers']} answers, {s['completion_tokens']} completion tokens "
                 f"({s['prompt_tokens']} prompt tokens)")  # fmt: skip
    if s["length"]:
        q = s["length"]
        lines.append(f"answer tokens: min {q['min']}  p50 {q['p50']}  p90 {q['p90']}  p99 {q['p99']}  "
                     f"max {q['max']}  mean {q['mean']:.1f}")  # fmt: skip
    lines.append("finish reasons: " + ", ".join(f"{k} {v}" for k, v in s["finish_reasons"].items()))
    if s["truncated_answers"]:
        lines.append(f"TRUNCATED: {s['truncated_answers']} answers (finish_reason=length) in "
                     f"{len(s['truncated_rows'])} rows, e.g. {', '.join(map(str, s['truncated_rows'][:5]))}; "
                     "raise --max-tokens or filter on regenerated.turns[].finish_reason")  # fmt: skip
    if s["stopped_rows"]:
        lines.append("rows cut short (answered prefix kept): "
                     + ", ".join(f"{k} {v}" for k, v in s["stopped_rows"].items()))  # fmt: skip
    lines.append(f"errors: {s['errors']} in {errors_path(output)}"
                 + (" (" + ", ".join(f"{k} {v}" for k, v in s["error_reasons"].items()) + ")" if s["errors"] else ""))
    for sv in stats.servers:
        lines.append(f"server {sv.url}: {sv.ok} answered, {sv.failed} failed, out of rotation {sv.outages}x")
    left = stats.inputs - stats.skipped - stats.rows - stats.errors
    lines.append(f"inputs {stats.inputs} = written {s['rows']} + errors {s['errors']}" if not left
                 else f"inputs {stats.inputs}: {left} not done yet; continue with --resume")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", action="append", required=True, metavar="PATH",
                        help="conversations in any format `prepare` reads; 'sharegpt' = the packaged ShareGPT V3")
    parser.add_argument("--output", required=True, metavar="OUT.jsonl")
    parser.add_argument("--server", action="append", required=True, metavar="URL",
                        help="OpenAI-compatible server (http://host:port[/v1]); repeat for round-robin")
    parser.add_argument("--model", help="model name to request (default: the first one /v1/models lists)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight per server")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy: the answers a temperature-0 deployment verifies against")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="per answer (default: the server's limit)")
    parser.add_argument("--reasoning", choices=["on", "off"], default=None,
                        help="chat_template_kwargs.enable_thinking (default: the chat template's own default)")
    parser.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON",
                        help='merged into every request, e.g. \'{"top_k": 20, "repetition_penalty": 1.05}\'')
    parser.add_argument("--seed", type=int, default=None, help="reproducible sampling per row and turn")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--max-rows", type=int, default=None, help="only the first N usable conversations")
    parser.add_argument("--max-turns", type=int, default=None,
                        help="answer at most N user turns per conversation, cutting the rest (default: all)")
    parser.add_argument("--exclude", action="append", default=[], metavar="DONE.jsonl",
                        help="skip the ids of rows in this file (an earlier regenerated set); repeatable")
    parser.add_argument("--resume", action="store_true", help="continue OUT: skip rows in OUT and OUT.errors.jsonl")
    parser.add_argument("--retry-errors", action="store_true", help="with --resume: retry the rows in the errors file")
    parser.add_argument("--overwrite", action="store_true", help="start OUT afresh")
    parser.add_argument("--retries", type=int, default=6, help="retries per request")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay bound (doubles per retry)")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="failed requests in a row that take a server out of rotation")
    parser.add_argument("--cooldown", type=float, default=10.0, help="first out-of-rotation period (doubles)")
    parser.add_argument("--give-up-after", type=float, default=300.0,
                        help="stop (resumable) when no server has answered for this long")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.overwrite:
        for path in (output, errors_path(output)):
            path.unlink(missing_ok=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = args.model or asyncio.run(discover_model(args.server, headers))
    except RuntimeError as e:
        print(f"draftforge regenerate: {e}", file=sys.stderr)
        return 2
    reasoning = None if args.reasoning is None else args.reasoning == "on"
    sampling = Sampling(model, args.temperature, args.top_p, args.max_tokens, reasoning, args.seed, args.extra_body)
    retry = Retry(args.retries, args.timeout, args.backoff)
    rotation = Rotation(args.concurrency, args.max_failures, args.cooldown, give_up_after=args.give_up_after)
    try:
        stats = regenerate(args.input, output, args.server, sampling, retry, rotation, resume=args.resume,
                           retry_errors=args.retry_errors, fmt=args.format, max_rows=args.max_rows,
                           api_key=args.api_key, progress=not args.no_progress, max_turns=args.max_turns,
                           exclude=args.exclude)  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"draftforge regenerate: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished rows are in {output}; continue with --resume", file=sys.stderr)
        return 130
    print(format_summary(summarize(output), stats, output))
    if stats.aborted:
        print(f"STOPPED: {stats.aborted}; continue with --resume once a server is up", file=sys.stderr)
        return 1
    return 0
