"""Chat completions over several OpenAI-compatible servers: round-robin, retries with backoff, and servers
leaving and rejoining the rotation. `regenerate` drives many rows through it (its module docstring states
the reliability contract this implements).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from draftforge.serving.http import TransientError, api_url, error_message, http_request


class RequestFailed(Exception):
    """A request the server rejected (a 4xx other than 408 / 429) or that failed after every retry;
    `reason` is a short key (`http_400`, `retries_exhausted`) for an errors file and a summary."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class AllServersDown(RuntimeError):
    """Every server has been out of rotation for longer than give_up_after."""


@dataclass
class Server:
    url: str
    limit: int  # concurrent requests
    inflight: int = 0
    failures: int = 0  # consecutive failed requests
    down_until: float = 0.0
    cooldown: float = 0.0
    ok: int = 0
    failed: int = 0
    outages: int = 0


@dataclass(frozen=True)
class Rotation:
    concurrency: int = 8  # requests in flight per server
    max_failures: int = 3  # failed requests in a row that take a server out of rotation
    cooldown: float = 10.0  # first out-of-rotation period; doubles while the server stays down
    max_cooldown: float = 300.0
    give_up_after: float = 300.0  # stop the run when no server has answered for this long


class ServerPool:
    """Round-robin over the servers that are in rotation and have a free slot.

    A server out of rotation comes back after its cooldown as a probe (one request at a time)
    until a request succeeds.
    """

    def __init__(self, urls: Iterable[str], rotation: Rotation = Rotation(),
                 log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.servers = [Server(url.rstrip("/"), rotation.concurrency, cooldown=rotation.cooldown) for url in urls]
        if not self.servers:
            raise ValueError("no server given")
        self.rotation = rotation
        self.log = log
        self.last_success = time.monotonic()
        self._next = 0
        self._changed = asyncio.Condition()

    def _limit(self, s: Server) -> int:
        return 1 if s.failures >= self.rotation.max_failures else s.limit

    @property
    def capacity(self) -> int:
        return sum(s.limit for s in self.servers)

    @property
    def down(self) -> list[Server]:
        return [s for s in self.servers if s.down_until > time.monotonic()]

    async def acquire(self) -> Server:
        async with self._changed:
            while True:
                now, n = time.monotonic(), len(self.servers)
                order = [self.servers[(self._next + i) % n] for i in range(n)]
                up = [s for s in order if s.down_until <= now]
                for s in up:
                    if s.inflight < self._limit(s):
                        s.inflight += 1
                        self._next = (self.servers.index(s) + 1) % n
                        return s
                wait = None
                if not up:
                    if now - self.last_success > self.rotation.give_up_after:
                        raise AllServersDown(
                            f"no server has answered for {now - self.last_success:.0f}s: "
                            + ", ".join(s.url for s in self.servers)
                        )
                    wait = min(s.down_until for s in self.servers) - now + 0.01
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)

    async def release(self, s: Server, healthy: bool) -> None:
        """Return the slot; `healthy` is False when the server failed to answer properly."""
        async with self._changed:
            s.inflight -= 1
            now = time.monotonic()
            if healthy:
                if s.failures >= self.rotation.max_failures:
                    self.log(f"regenerate: {s.url} is back in rotation")
                s.ok, s.failures, s.cooldown = s.ok + 1, 0, self.rotation.cooldown
                self.last_success = now
            else:
                s.failed += 1
                s.failures += 1
                if s.failures >= self.rotation.max_failures and s.down_until <= now:
                    s.down_until, s.outages = now + s.cooldown, s.outages + 1
                    self.log(f"regenerate: {s.url} out of rotation for {s.cooldown:.0f}s "
                             f"after {s.failures} failed requests in a row")  # fmt: skip
                    s.cooldown = min(2 * s.cooldown, self.rotation.max_cooldown)
            self._changed.notify_all()


@dataclass(frozen=True)
class Retry:
    retries: int = 6
    timeout: float = 600.0  # seconds per request
    backoff: float = 1.0  # first retry waits up to this; doubles per retry
    max_backoff: float = 30.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


async def complete(pool: ServerPool, body: dict[str, Any], retry: Retry,
                   headers: Mapping[str, str] | None = None) -> tuple[dict[str, Any], str]:  # fmt: skip
    """(response JSON, server url) of one chat completion, with retries across the servers."""
    last = ""
    for attempt in range(retry.retries + 1):
        if attempt:
            await asyncio.sleep(retry.delay(attempt))
        server = await pool.acquire()
        healthy = False
        try:
            status, data = await http_request("POST", api_url(server.url, "/v1/chat/completions"), body,
                                              timeout=retry.timeout, headers=headers)  # fmt: skip
            if status == 200:
                response = json.loads(data)
                if not isinstance(response, dict) or not isinstance(response.get("choices"), list) \
                        or not response["choices"]:
                    raise ValueError(f"no choices in {data[:200]!r}")
                healthy = True
                return response, server.url
            healthy = status < 500 and status != 408  # a 4xx comes from a working server
            if status >= 500 or status in (408, 429):
                last = f"{server.url}: HTTP {status}: {error_message(data)}"
                continue
            raise RequestFailed(f"http_{status}", error_message(data))
        except TransientError as e:
            last = f"{server.url}: {e}"
        except ValueError as e:  # a 200 whose body is not a chat completion
            last = f"{server.url}: malformed response: {e}"
        finally:
            await pool.release(server, healthy)
    raise RequestFailed("retries_exhausted", f"{retry.retries + 1} attempts; last: {last}")
