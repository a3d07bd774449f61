"""A small HTTP/1.1 keep-alive client for the simulated fleet, answering with
`httpx.Response` objects so that the agent's own `FleetClient` runs on it unchanged.

Why not httpx itself: with hundreds of simulated agents in one process, httpx's connection
pool checks every pooled connection (a `getpeername` system call each) for every request
it assigns, and the simulator, not the control plane, became the bench's bottleneck
(measured with py-spy at 1,000 agents: most of the fleet process's CPU). This client does
the least a simulated agent needs:

* `get`, `post` (`json=` or `content=`) and `stream` on the control plane's origin, over at
  most `size` connections (a request waits for a free one); any other origin (a
  pre-signed object-store URL) goes through `fallback`, an `httpx.AsyncClient`;
* bodies by `Content-Length` or chunked; no body for HEAD, 204 and 304;
* failures raise httpx's own errors (`ConnectError`, `ReadError`, `ReadTimeout`), which
  the agent's client already handles as network faults; a request on a kept-alive
  connection the server closed meanwhile is retried once on a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx

__all__ = ["SimpleHttp"]

_MAX_HEAD = 64 * 1024


class SimpleHttp:
    """Keep-alive HTTP/1.1 to one origin (see the module doc)."""

    def __init__(self, base_url: str, size: int, timeout_s: float,
                 fallback: httpx.AsyncClient) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"simulated agents speak plain http to the control plane, "
                             f"not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.origin = f"http://{parts.netloc}"
        self.timeout_s = timeout_s
        self.fallback = fallback
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, url: str, *, headers: dict[str, str] | None = None,
                  **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, headers=headers, **kwargs)

    async def post(self, url: str, *, headers: dict[str, str] | None = None,
                   json: Any = None, content: bytes | None = None,
                   **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, headers=headers, json=json, content=content,
                                  **kwargs)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                     **kwargs: Any) -> AsyncIterator[httpx.Response]:
        if not url.startswith(self.origin + "/"):
            async with self.fallback.stream(method, url, headers=headers, **kwargs) as answer:
                yield answer
            return
        yield await self.request(method, url, headers=headers)  # small bodies: read whole

    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                      json: Any = None, content: bytes | None = None,
                      **kwargs: Any) -> httpx.Response:
        import httpx

        if not url.startswith(self.origin + "/"):
            return await self.fallback.request(method, url, headers=headers, json=json,
                                               content=content, **kwargs)
        if kwargs:
            raise TypeError(f"SimpleHttp does not support {sorted(kwargs)}")
        fields = dict(headers or {})
        if json is not None:
            content = _json_bytes(json)
            fields.setdefault("Content-Type", "application/json")
        body = content or b""
        target = url[len(self.origin):]
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in fields.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        async with self._slots:
            status, answer_headers, answer_body = await self._exchange(raw, method)
        return httpx.Response(status, headers=answer_headers, content=answer_body,
                              request=httpx.Request(method, url))

    async def _exchange(self, raw: bytes, method: str
                        ) -> tuple[int, list[tuple[str, str]], bytes]:
        import httpx

        for attempt in (1, 2):
            reused = bool(self._idle)
            try:
                if reused:
                    reader, writer = self._idle.pop()
                else:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.timeout_s)
            except (OSError, TimeoutError) as err:
                raise httpx.ConnectError(f"{type(err).__name__}: {err}") from err
            try:
                writer.write(raw)
                status, headers, body, keep = await asyncio.wait_for(
                    _read_response(reader, method), self.timeout_s)
            except TimeoutError as err:
                writer.close()
                raise httpx.ReadTimeout(f"no answer within {self.timeout_s} s") from err
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as err:
                writer.close()
                if reused and attempt == 1:
                    continue  # the server closed the idle connection meanwhile
                raise httpx.ReadError(f"{type(err).__name__}: {err}") from err
            if keep:
                self._idle.append((reader, writer))
            else:
                writer.close()
            return status, headers, body
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def _read_response(reader: asyncio.StreamReader, method: str
                         ) -> tuple[int, list[tuple[str, str]], bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _MAX_HEAD:
        raise ValueError("response head too large")
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    version, code, *_ = status_line.split(" ", 2)
    status = int(code)
    headers = []
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    fields = {k.lower(): v for k, v in headers}
    keep = version == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", keep
    if fields.get("transfer-encoding", "").lower() == "chunked":
        chunks = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers from our servers
                break
            chunks += await reader.readexactly(size)
            await reader.readexactly(2)
        # The body is whole now: drop the framing header so httpx does not decode it again.
        headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        return status, headers, bytes(chunks), keep
    if "content-length" in fields:
        return status, headers, await reader.readexactly(int(fields["content-length"])), keep
    return status, headers, await reader.read(), False  # until the server closes
