"""Throughput of the SQLite buffer alone, for `edgefleet bench agent`.

`bench_buffer(rows)` appends `rows` readings (one device, 10 assets x 6 tags, 60-sample
calls as one poll cycle would produce) with the default commit settings, then claims and
acknowledges them in 1,000-row batches, in a fresh buffer in a temporary folder.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

from .buffer import BufferConfig, SqliteBuffer

__all__ = ["bench_buffer", "current_rss_mb"]


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() / 1e6
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def bench_buffer(rows: int = 200_000) -> dict[str, float]:
    """Figures: `append_rows_per_s` (append + commit, until every row is committed),
    `claim_ack_rows_per_s` (claim_batch + ack of 1,000-row batches until empty),
    `rss_mb` (after the run), `rss_mb_growth` (during it), `bytes_per_row` (file size
    over rows at the end of the append phase)."""
    cycle = [
        Sample(f"press-{a:02d}", tag, 0, 0.0, Quality.GOOD)
        for a in range(10)
        for tag in ("temp_c", "pressure_bar", "vibration_rms", "current_a", "speed_rpm", "flow")
    ]
    start_ns = 1_795_000_000_000_000_000
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-buffer-") as folder:
        config = BufferConfig(path=Path(folder) / "buffer.db", min_free_bytes=0)
        rss_before = current_rss_mb()
        with SqliteBuffer.open(config) as buffer:
            # Build each cycle's samples outside the timed region: we time the buffer.
            cycles = []
            for c in range(-(-rows // len(cycle))):
                ts = start_ns + c * 1_000_000_000
                cycles.append(
                    [Sample(s.asset, s.tag, ts, 20.0 + (c % 97) * 0.5, s.quality) for s in cycle]
                )
            cycles[-1] = cycles[-1][: rows - (len(cycles) - 1) * len(cycle)]
            t0 = time.perf_counter()
            for samples in cycles:
                buffer.append("bench-device", samples)
            buffer.flush()
            append_s = time.perf_counter() - t0
            del cycles
            bytes_on_disk = buffer.stats().bytes_on_disk
            t0 = time.perf_counter()
            drained = 0
            while (batch := buffer.claim_batch(max_rows=1000)) is not None:
                buffer.ack(batch.device, batch.last_seq)
                drained += len(batch.readings)
            claim_s = time.perf_counter() - t0
            assert drained == rows, (drained, rows)
        rss_after = current_rss_mb()
    return {
        "rows": float(rows),
        "append_rows_per_s": round(rows / append_s),
        "claim_ack_rows_per_s": round(rows / claim_s),
        "bytes_per_row": round(bytes_on_disk / rows, 1),
        "rss_mb": round(rss_after, 1),
        "rss_mb_growth": round(rss_after - rss_before, 1),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench_buffer()))
