"""`LocalSink`: a loopback stand-in for the fog's ingest, for tests, benches and demos.

It speaks the forwarder's side of the contract (edge-agent/forwarder.py) for real: HTTP/1.1
with keep-alive, `POST /v1/ingest` of gzip or plain bodies in the binary wire encoding or
wire JSON, batches and heartbeats, bearer tokens per device. Every body is decoded and
fully validated (`protocols/wire.py`); a body that fails is answered 400 with the reason.

It keeps, per device, the set of seqs received as merged ranges (so memory follows the
number of gaps, not rows), counts duplicates, and records batch arrivals in a bounded
list, which is what the outage, live-first and kill -9 tests assert on. `stop()` closes
the listening socket (the agent sees connection refused, a real outage), `start()` opens
it again on the same port. `refuse` makes it answer a status for chosen devices.

Not a fog: nothing is stored beyond these counters (and, when `keep_readings` is set, the
last readings in a bounded deque).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import gzip
import http.server
import json
import logging
import socket
import socketserver
import sys
import threading
import time
import zlib
from typing import Any, Final

from edgefleet.protocols.wire import (
    Batch,
    Heartbeat,
    Reading,
    WireError,
    decode_upload,
)

__all__ = ["Arrival", "LocalSink", "SeqRanges"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 64 * 1024**2
MAX_ARRIVALS: Final = 200_000


class SeqRanges:
    """A set of ints stored as sorted, merged, inclusive ranges."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.count = 0

    def add(self, first: int, last: int) -> int:
        """Add [first, last]; returns how many of those seqs were already present."""
        overlap = 0
        i = bisect.bisect_left(self._ends, first - 1)
        new_start, new_end = first, last
        j = i
        while j < len(self._starts) and self._starts[j] <= last + 1:
            start, end = self._starts[j], self._ends[j]
            overlap += max(0, min(end, last) - max(start, first) + 1)
            new_start, new_end = min(new_start, start), max(new_end, end)
            j += 1
        self.count += (last - first + 1) - overlap
        self._starts[i:j] = [new_start]
        self._ends[i:j] = [new_end]
        return overlap

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def gaps(self, low: int = 1) -> list[tuple[int, int]]:
        """Missing inclusive ranges between `low` and the highest seq present."""
        missing = []
        expected = low
        for start, end in zip(self._starts, self._ends, strict=True):
            if start > expected:
                missing.append((expected, start - 1))
            expected = max(expected, end + 1)
        return missing

    @property
    def highest(self) -> int:
        return self._ends[-1] if self._ends else 0


@dataclasses.dataclass(frozen=True, slots=True)
class Arrival:
    device: str
    first_seq: int
    last_seq: int
    max_ts: int  # the newest reading's ts
    received_ns: int


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    sink: LocalSink

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client left (or `stop` cut it off): nothing to report
        super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.sink._lock:
            self.server.sink._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.sink._lock:
            self.server.sink._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("sink: " + format, *args)

    def do_POST(self) -> None:
        status, body, headers = self.server.sink.handle(self.path, self.headers, self._body())
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        body = json.dumps(self.server.sink.summary()).encode()
        self.send_response(200 if self.path == "/stats" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes | None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return None
        return self.rfile.read(length)


class LocalSink:
    """See the module docstring. `tokens` maps device → bearer token (None: no auth)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: dict[str, str] | None = None,
        keep_readings: int = 0,
    ) -> None:
        self.host = host
        self.port = port
        self.tokens = tokens
        self.refuse: dict[str, tuple[int, str]] = {}  # device -> (status, reason)
        self.retry_after: float | None = None  # set: answer 503 with this Retry-After
        self.seqs: dict[str, SeqRanges] = {}
        self.rows = 0
        self.duplicates = 0
        self.batches = 0
        self.bytes_in = 0
        self.rejected: collections.Counter[int] = collections.Counter()
        self.heartbeats: dict[str, Heartbeat] = {}
        self.arrivals: collections.deque[Arrival] = collections.deque(maxlen=MAX_ARRIVALS)
        self.readings: collections.deque[Reading] = collections.deque(maxlen=keep_readings or 1)
        self._keep = keep_readings > 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1/ingest"

    def start(self) -> LocalSink:
        server = _Server((self.host, self.port), _Handler)
        server.sink = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name="local-sink",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection: clients see connection refused."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:  # keep-alive connections too: a real outage
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- requests ----------------------------------------------------------------------

    def handle(
        self, path: str, headers: Any, raw: bytes | None
    ) -> tuple[int, bytes, dict[str, str]]:
        if path.split("?", 1)[0] != "/v1/ingest":
            return self._reject(404, "not found")
        if raw is None:
            return self._reject(413, f"body over {MAX_BODY_BYTES} bytes")
        if self.retry_after is not None:
            return self._reject(503, "busy", {"Retry-After": f"{self.retry_after:g}"})
        try:
            data = self._decompress(raw, headers.get("Content-Encoding"))
            message = self._decode(data, headers.get("Content-Type") or "")
        except (WireError, ValueError, OSError, EOFError, zlib.error) as err:
            return self._reject(400, str(err)[:500])
        device = message.device
        if self.tokens is not None:
            expected = self.tokens.get(device)
            if expected is None or headers.get("Authorization") != f"Bearer {expected}":
                return self._reject(401, f"no valid token for device {device!r}")
        if device in self.refuse:
            status, reason = self.refuse[device]
            return self._reject(status, reason)
        if isinstance(message, Heartbeat):
            with self._lock:
                self.heartbeats[device] = message
            return 202, b'{"status": "accepted"}', {}
        self._record(message, len(raw))
        return 202, b'{"status": "accepted"}', {}

    def _reject(
        self, status: int, reason: str, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        with self._lock:
            self.rejected[status] += 1
        return status, json.dumps({"error": reason}).encode(), headers or {}

    @staticmethod
    def _decompress(raw: bytes, encoding: str | None) -> bytes:
        if encoding in (None, "", "identity"):
            return raw
        if encoding == "gzip":
            return gzip.decompress(raw)
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")

    @staticmethod
    def _decode(data: bytes, content_type: str) -> Batch | Heartbeat:
        return decode_upload(data, content_type)

    def _record(self, batch: Batch, size: int) -> None:
        max_ts = max(reading.ts for reading in batch.readings)
        with self._lock:
            ranges = self.seqs.setdefault(batch.device, SeqRanges())
            duplicates = ranges.add(batch.first_seq, batch.last_seq)
            self.duplicates += duplicates
            self.rows += len(batch.readings) - duplicates
            self.batches += 1
            self.bytes_in += size
            self.arrivals.append(
                Arrival(batch.device, batch.first_seq, batch.last_seq, max_ts, time.time_ns())
            )
            if self._keep:
                self.readings.extend(batch.readings)

    # ---- reading the results -----------------------------------------------------------

    def received(self, device: str) -> SeqRanges:
        with self._lock:
            return self.seqs.get(device) or SeqRanges()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rows": self.rows,
                "duplicates": self.duplicates,
                "batches": self.batches,
                "bytes_in": self.bytes_in,
                "rejected": {str(k): v for k, v in self.rejected.items()},
                "devices": {
                    device: {"rows": r.count, "highest": r.highest, "gaps": len(r.gaps())}
                    for device, r in self.seqs.items()
                },
            }
