"""A small OpenAI-API client on the standard library: what `regenerate` and `bench` send to a served model.

asyncio HTTP/1.1, one connection per request (the project needs no aiohttp / httpx); `get` is the
blocking form for health checks and metrics. Every failure to complete a request (network,
timeout, a cut-off or malformed response) is a TransientError: the callers decide on retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit


class TransientError(Exception):
    """The request did not complete (network, timeout, 5xx, malformed answer): another try may work."""


_SSL: ssl.SSLContext | None = None


async def _exchange(method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> tuple[int, bytes]:
    global _SSL
    parts = urlsplit(url)
    https = parts.scheme == "https"
    if https and _SSL is None:
        _SSL = ssl.create_default_context()
    reader, writer = await asyncio.open_connection(
        parts.hostname, parts.port or (443 if https else 80), ssl=_SSL if https else None, limit=1 << 20
    )
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
                "Accept: application/json", "User-Agent: draftforge"]  # fmt: skip
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before a response")
        proto, _, rest = status_line.decode("latin-1").partition(" ")
        if not proto.startswith("HTTP/"):
            raise ValueError(f"not an HTTP response: {status_line[:60]!r}")
        status = int(rest.split(" ", 1)[0])
        fields: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n"):
            if not line:
                raise ConnectionError("connection closed inside the response headers")
            key, _, value = line.decode("latin-1").partition(":")
            fields[key.strip().lower()] = value.strip()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            chunks = []
            while size := int((await reader.readline()).split(b";")[0], 16):  # ValueError when cut off
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            data = b"".join(chunks)
        elif "content-length" in fields:
            data = await reader.readexactly(int(fields["content-length"]))
        else:
            data = await reader.read()
        return status, data
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def http_request(
    method: str, url: str, body: Any = None, *, timeout: float = 600.0, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """(status, body bytes) of one request with a JSON body; TransientError when it did not complete."""
    payload = None if body is None else json.dumps(body, ensure_ascii=False).encode()
    try:
        return await asyncio.wait_for(_exchange(method, url, payload, headers or {}), timeout)
    except TimeoutError as e:
        raise TransientError(f"no complete response within {timeout:g}s") from e
    except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as e:
        raise TransientError(f"{type(e).__name__}: {e}".rstrip(": ")) from e


def api_url(server: str, path: str) -> str:
    """`http://host:port` or `http://host:port/v1` + `/v1/...` path."""
    base = server.rstrip("/")
    return (base.removesuffix("/v1") if path.startswith("/v1/") else base) + path


def error_message(data: bytes) -> str:
    """The server's own error message when its body is OpenAI-style JSON, else the body's start."""
    try:
        obj = json.loads(data)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:500]
    except ValueError:
        return data[:300].decode("utf-8", "replace")


async def discover_model(servers: list[str], headers: Mapping[str, str], timeout: float = 30.0) -> str:
    """The first model id that a server lists at /v1/models."""
    problems = []
    for url in servers:
        try:
            status, data = await http_request("GET", api_url(url, "/v1/models"), timeout=timeout, headers=headers)
            if status == 200:
                return json.loads(data)["data"][0]["id"]
            problems.append(f"{url}: HTTP {status}")
        except (TransientError, ValueError, KeyError, IndexError) as e:
            problems.append(f"{url}: {e}")
    raise RuntimeError("no server listed a model at /v1/models (" + "; ".join(problems) + "); pass --model")


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body text) of a blocking GET; urllib's errors propagate (a health check waits on them)."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")
