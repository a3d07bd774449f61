"""The agent's self-report: a wire `Heartbeat`, plus gauges stored as readings.

The wire `Heartbeat` (protocols/wire.py) carries liveness, versions, buffer depth and the
full-policy counters. What it has no field for — the health of each source, inference
latency, CPU, memory, free disk, the forwarder's counters — travels as *readings* of the
asset `agent` (configurable: `heartbeat.asset`) in the agent's own seq stream, so it is
buffered, forwarded, deduplicated and completeness-counted like any data, and survives an
outage. One heartbeat = one `HeartbeatReport(heartbeat, samples)`, all samples stamped
with the same `ts`. Tags (all values floats; a figure that is unknown is left out, never
sent as 0):

=============================  =========================================================
tag                            value
=============================  =========================================================
`uptime_s`                     seconds since the agent started
`cpu_percent`                  process CPU (user+system) since the previous heartbeat, %
                               of one core (can exceed 100 with several threads busy)
`rss_mb`                       resident memory, MiB
`disk_free_mb`                 free space of the buffer's filesystem, MiB
`infer_p50_us`, `infer_p99_us` model latency per scoring call, microseconds
`inference_errors_total`       scoring calls that failed or returned non-finite scores
`buffer_depth`                 unacknowledged rows in the buffer
`buffer_oldest_age_s`          age of the oldest unacknowledged row (0 when empty)
`buffer_bytes`                 buffer files on disk
`buffer_full`                  1 while appends are refused, else 0
`dropped_total`                rows dropped by `when_full: drop_oldest` (ever)
`compacted_total`              rows replaced by aggregates under `downsample` (ever)
`dlq_batches`                  dead-lettered batches waiting for an operator
`fwd_rows_total`, `fwd_batches_total`, `fwd_retries_total`, `fwd_dead_lettered_rows_total`
                               the forwarder's counters since start
`fog_connected`                1 if the last send reached the fog, else 0
`source.<name>.up`             1 if the source's health is `up`, else 0
=============================  =========================================================

plus any counters the caller adds (`extra`, e.g. `anomalies_total`). A source whose name
makes `source.<name>.up` longer than an identifier (128 characters) is reported only in
`status`. `Heartbeat.status` is a compact text: `ok`, or `degraded: ` and the reasons
(sources not up, buffer full, fog unreachable, dead letters, model problems), cut to the
wire's 256 characters.

`process_sample()` reads `/proc/self/statm` and `resource.getrusage` (no psutil on the
edge); `disk_free_bytes()` uses `shutil.disk_usage`.

`HeartbeatBuilder(agent, version).build()` and `snapshot_agent(agent)` read a running
agent duck-typed; the attributes they use (all optional except `config`) are listed on
`snapshot_agent`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple

from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import IDENTIFIER_PATTERN, Heartbeat, Quality

from .buffer import BufferStats

__all__ = [
    "HEARTBEAT_ASSET",
    "AgentSnapshot",
    "CpuMeter",
    "HeartbeatBuilder",
    "HeartbeatReport",
    "ProcessFigures",
    "SourceFigures",
    "build_heartbeat",
    "disk_free_bytes",
    "figures_of",
    "heartbeat_from_snapshot",
    "process_sample",
    "snapshot_agent",
]

log = logging.getLogger(__name__)

HEARTBEAT_ASSET: Final = "agent"
STATUS_MAX: Final = 256  # wire.StatusText
_MIB: Final = 1024 * 1024
_IDENTIFIER: Final = re.compile(IDENTIFIER_PATTERN)


# ---- the process ------------------------------------------------------------------------


def process_sample() -> tuple[float, int]:
    """(CPU seconds used by this process so far, user + system; resident set in bytes).

    RSS comes from `/proc/self/statm`; where there is no /proc, the peak RSS that
    `getrusage` reports stands in for it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
        rss = resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = usage.ru_maxrss * 1024  # Linux reports KiB
    return cpu, rss


def disk_free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Free bytes (for unprivileged users) of the filesystem holding `path`, or its
    nearest existing parent; None if it cannot be read."""
    target = Path(path)
    for candidate in (target, *target.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


class CpuMeter:
    """CPU % of one core between successive `percent()` calls (the first call measures
    from construction). `clock` and `sample` are injectable for tests."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sample: Callable[[], tuple[float, int]] = process_sample,
    ) -> None:
        self._clock = clock
        self._sample = sample
        self._last = (clock(), sample()[0])

    def percent(self) -> float | None:
        now, cpu = self._clock(), self._sample()[0]
        last_now, last_cpu = self._last
        self._last = (now, cpu)
        elapsed = now - last_now
        if elapsed <= 0:
            return None
        return max(0.0, 100.0 * (cpu - last_cpu) / elapsed)


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessFigures:
    cpu_seconds: float
    rss_bytes: int
    cpu_percent: float | None = None
    disk_free_bytes: int | None = None

    @classmethod
    def measure(
        cls, *, cpu_meter: CpuMeter | None = None, disk_path: str | os.PathLike[str] | None = None
    ) -> ProcessFigures:
        cpu, rss = process_sample()
        return cls(
            cpu_seconds=cpu,
            rss_bytes=rss,
            cpu_percent=cpu_meter.percent() if cpu_meter is not None else None,
            disk_free_bytes=disk_free_bytes(disk_path) if disk_path is not None else None,
        )


# ---- one heartbeat ----------------------------------------------------------------------


class HeartbeatReport(NamedTuple):
    """A heartbeat: the wire message, and the gauges to append to the buffer."""

    heartbeat: Heartbeat
    samples: list[Sample]


def figures_of(stats: Any) -> dict[str, Any]:
    """A stats object as a dict: a mapping as is, a dataclass by its fields, else its
    public attributes; {} for None."""
    if stats is None:
        return {}
    if isinstance(stats, Mapping):
        return dict(stats)
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _clip(text: str, limit: int = STATUS_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# forwarder stats field -> heartbeat tag
_FORWARDER_TAGS: Final = (
    ("rows_sent", "fwd_rows_total"),
    ("batches_sent", "fwd_batches_total"),
    ("retries", "fwd_retries_total"),
    ("dead_lettered_rows", "fwd_dead_lettered_rows_total"),
    ("connected", "fog_connected"),
)


def build_heartbeat(
    device: str,
    agent_version: str,
    model_version: str | None,
    buffer_stats: BufferStats | None,
    forwarder_stats: Mapping[str, Any] | Any,
    source_health: Mapping[str, str],
    infer_p50_us: float | None,
    infer_p99_us: float | None,
    started_monotonic: float,
    *,
    applied_generation: int = 0,
    inference_errors_total: int = 0,
    process: ProcessFigures | None = None,
    extra: Mapping[str, float | int] | None = None,
    problems: tuple[str, ...] | list[str] = (),
    asset: str = HEARTBEAT_ASSET,
    now_ns: int | None = None,
    now_monotonic: float | None = None,
) -> HeartbeatReport:
    """Build one heartbeat (pure: the caller measures; see the module docstring for the
    tags). `forwarder_stats` is a mapping or a `ForwarderStats`-like object (fields
    `rows_sent`, `batches_sent`, `retries`, `dead_lettered_rows`, `connected`,
    `last_error`); `source_health` maps each source's name to `up`, `down`, `stale`, …;
    `problems` are extra reasons for a degraded status (e.g. a model that failed to load).
    `buffer_stats` None means the buffer could not be read (reported in `status`)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    now_monotonic = time.monotonic() if now_monotonic is None else now_monotonic
    uptime_s = max(0.0, now_monotonic - started_monotonic)
    forwarder = figures_of(forwarder_stats)
    values: dict[str, float] = {"uptime_s": round(uptime_s, 3)}
    reasons: list[str] = []

    if process is not None:
        if process.cpu_percent is not None:
            values["cpu_percent"] = round(process.cpu_percent, 2)
        values["rss_mb"] = round(process.rss_bytes / _MIB, 2)
        if process.disk_free_bytes is not None:
            values["disk_free_mb"] = round(process.disk_free_bytes / _MIB, 1)
    if infer_p50_us is not None:
        values["infer_p50_us"] = float(infer_p50_us)
    if infer_p99_us is not None:
        values["infer_p99_us"] = float(infer_p99_us)
    if model_version is not None or inference_errors_total:
        values["inference_errors_total"] = float(inference_errors_total)

    if buffer_stats is not None:
        oldest = buffer_stats.oldest_unacked_ts
        values["buffer_depth"] = float(buffer_stats.depth)
        values["buffer_oldest_age_s"] = (
            round(max(0.0, (now_ns - oldest) / 1e9), 3) if oldest is not None else 0.0
        )
        values["buffer_bytes"] = float(buffer_stats.bytes_on_disk)
        values["buffer_full"] = 1.0 if buffer_stats.full else 0.0
        values["dropped_total"] = float(buffer_stats.dropped_total)
        values["compacted_total"] = float(buffer_stats.compacted_total)
        values["dlq_batches"] = float(buffer_stats.dlq_batches)
        if buffer_stats.full:
            reasons.append(f"buffer full ({buffer_stats.full_reason or 'refusing appends'})")
        if buffer_stats.dlq_batches:
            reasons.append(f"{buffer_stats.dlq_batches} dead-lettered batch(es)")
    else:
        reasons.append("buffer unreadable")

    for field, tag in _FORWARDER_TAGS:
        number = _number(forwarder.get(field))
        if number is not None:
            values[tag] = number
    if forwarder.get("connected") is False:
        last_error = forwarder.get("last_error")
        reasons.append(f"fog unreachable ({last_error})" if last_error else "fog unreachable")

    down = []
    for name, health in sorted(source_health.items()):
        tag = f"source.{name}.up"
        if _IDENTIFIER.match(tag):
            values[tag] = 1.0 if health == "up" else 0.0
        if health != "up":
            down.append(f"{name} {health}")
    if down:
        reasons.insert(0, "source " + ", ".join(down))

    for tag, value in (extra or {}).items():
        number = _number(value)
        if number is not None and _IDENTIFIER.match(tag):
            values[tag] = number
    reasons.extend(problems)

    status = "ok" if not reasons else _clip("degraded: " + "; ".join(reasons))
    heartbeat = Heartbeat(
        device=device,
        ts=now_ns,
        agent_version=agent_version,
        model_version=model_version,
        applied_generation=applied_generation,
        buffer_depth=buffer_stats.depth if buffer_stats is not None else 0,
        buffer_oldest_ts=buffer_stats.oldest_unacked_ts if buffer_stats is not None else None,
        dropped_total=buffer_stats.dropped_total if buffer_stats is not None else 0,
        compacted_total=buffer_stats.compacted_total if buffer_stats is not None else 0,
        inference_errors_total=inference_errors_total,
        uptime_s=uptime_s,
        status=status,
    )
    samples = [
        Sample(asset, tag, now_ns, value, Quality.GOOD) for tag, value in values.items()
    ]
    return HeartbeatReport(heartbeat, samples)


# ---- reading a running agent ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SourceFigures:
    name: str
    health: str  # up, down, stale, … (the agent's judgement)
    samples: int
    bad: int
    rejected: int
    reconnects: int


@dataclasses.dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """Everything heartbeats and /metrics report, read from the agent at one instant."""

    device: str
    agent_version: str
    model_version: str | None
    applied_generation: int
    started_monotonic: float
    taken_monotonic: float
    taken_ns: int
    buffer: BufferStats | None
    forwarder: dict[str, Any]
    sources: tuple[SourceFigures, ...]
    inference_p50_us: float | None
    inference_p99_us: float | None
    inference_errors_total: int
    # anomalies_total, heartbeats_total, samples_in_total, inference_rows_total,
    # ingest_refused_total, alerts_sent_total, alerts_failed_total, alerts_dropped_total
    counters: dict[str, int]
    process: ProcessFigures
    problems: tuple[str, ...]

    @property
    def uptime_s(self) -> float:
        return max(0.0, self.taken_monotonic - self.started_monotonic)


def _latency(scorer: Any, percentile: float) -> float | None:
    method = getattr(scorer, "latency_us", None)
    if method is None:
        return None
    try:
        value = method(percentile)
    except (ValueError, IndexError, ZeroDivisionError):
        return None
    return _number(value)


def _int_attr(obj: Any, *names: str) -> int:
    """The first of `names` (dotted paths allowed) that `obj` has as a number, else 0."""
    for name in names:
        value: Any = obj
        for part in name.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        number = _number(value)
        if number is not None:
            return int(number)
    return 0


async def _buffer_stats(agent: Any) -> BufferStats | None:
    buffer = getattr(agent, "buffer", None)
    if buffer is None:
        return None
    bx = getattr(agent, "bx", None)
    try:
        if bx is not None:
            stats: BufferStats = await bx.call(buffer.stats)
        else:
            stats = await asyncio.to_thread(buffer.stats)
    except (RuntimeError, OSError) as err:  # closed, or the disk failed
        log.debug("buffer stats unavailable: %s", err)
        return None
    return stats


async def snapshot_agent(
    agent: Any,
    agent_version: str,
    *,
    cpu_meter: CpuMeter | None = None,
    disk_path: str | os.PathLike[str] | None = None,
) -> AgentSnapshot:
    """Read a running agent's figures. Buffer stats are read through `agent.bx.call`
    (the buffer's executor thread), never on the event loop.

    Reads, each optional except `config`: `config.device`, `config.buffer.path`;
    `stats.started_monotonic`, `stats.anomalies`, `stats.heartbeats`, `stats.samples_in`,
    `stats.inference_rows`; `sources` (each `.name`, `.stats` a `SourceStats`);
    `source_health() -> dict[str, str]`; `buffer` and `bx`; `forwarder.stats`;
    `scorer.version`, `scorer.latency_us(p)`, `scorer.errors` (or `scorer.stats.errors`);
    `alerts.stats` (`sent`, `failed`, `dropped`); `queue.refused`; `applied_generation`;
    `model_error`; `problems` (more reasons for a degraded status).
    """
    config = agent.config
    stats = getattr(agent, "stats", None)
    buffer = await _buffer_stats(agent)
    health_fn = getattr(agent, "source_health", None)
    health: dict[str, str] = dict(health_fn()) if callable(health_fn) else {}
    sources = tuple(
        SourceFigures(
            name=source.name,
            health=health.get(source.name, "unknown"),
            samples=_int_attr(source, "stats.samples"),
            bad=_int_attr(source, "stats.bad"),
            rejected=_int_attr(source, "stats.rejected"),
            reconnects=_int_attr(source, "stats.reconnects"),
        )
        for source in getattr(agent, "sources", ()) or ()
    )
    scorer = getattr(agent, "scorer", None)
    model_version = getattr(scorer, "version", None) if scorer is not None else None
    alerts = getattr(agent, "alerts", None)
    forwarder = getattr(agent, "forwarder", None)
    problems = []
    model_error = getattr(agent, "model_error", None)
    if model_error:
        problems.append(f"model: {model_error}")
    problems.extend(getattr(agent, "problems", ()) or ())
    started = getattr(stats, "started_monotonic", None)
    counters = {
        "anomalies_total": _int_attr(stats, "anomalies"),
        "heartbeats_total": _int_attr(stats, "heartbeats"),
        "samples_in_total": _int_attr(stats, "samples_in"),
        "inference_rows_total": _int_attr(stats, "inference_rows"),
        "ingest_refused_total": _int_attr(agent, "queue.refused"),
        "alerts_sent_total": _int_attr(alerts, "stats.sent"),
        "alerts_failed_total": _int_attr(alerts, "stats.failed"),
        "alerts_dropped_total": _int_attr(alerts, "stats.dropped"),
    }
    return AgentSnapshot(
        device=config.device,
        agent_version=agent_version,
        model_version=str(model_version) if model_version is not None else None,
        applied_generation=_int_attr(agent, "applied_generation"),
        started_monotonic=float(started) if started is not None else time.monotonic(),
        taken_monotonic=time.monotonic(),
        taken_ns=time.time_ns(),
        buffer=buffer,
        forwarder=figures_of(getattr(forwarder, "stats", None)),
        sources=sources,
        inference_p50_us=_latency(scorer, 50) if scorer is not None else None,
        inference_p99_us=_latency(scorer, 99) if scorer is not None else None,
        inference_errors_total=_int_attr(scorer, "errors", "stats.errors"),
        counters=counters,
        process=ProcessFigures.measure(
            cpu_meter=cpu_meter,
            disk_path=disk_path if disk_path is not None else config.buffer.path.parent,
        ),
        problems=tuple(problems),
    )


def heartbeat_from_snapshot(
    snapshot: AgentSnapshot, *, asset: str = HEARTBEAT_ASSET
) -> HeartbeatReport:
    """The heartbeat for one snapshot (extra gauges: anomalies, ingest refusals, dropped
    alerts)."""
    counters = snapshot.counters
    return build_heartbeat(
        snapshot.device,
        snapshot.agent_version,
        snapshot.model_version,
        snapshot.buffer,
        snapshot.forwarder,
        {source.name: source.health for source in snapshot.sources},
        snapshot.inference_p50_us,
        snapshot.inference_p99_us,
        snapshot.started_monotonic,
        applied_generation=snapshot.applied_generation,
        inference_errors_total=snapshot.inference_errors_total,
        process=snapshot.process,
        extra={
            key: counters[key]
            for key in ("anomalies_total", "ingest_refused_total", "alerts_dropped_total")
            if key in counters
        },
        problems=snapshot.problems,
        asset=asset,
        now_ns=snapshot.taken_ns,
        now_monotonic=snapshot.taken_monotonic,
    )


class HeartbeatBuilder:
    """Builds heartbeats for a running agent (see `snapshot_agent` for what it reads);
    keeps the CPU meter between beats so `cpu_percent` covers each interval."""

    def __init__(self, agent: Any, agent_version: str) -> None:
        self.agent = agent
        self.agent_version = agent_version
        self._cpu = CpuMeter()
        heartbeat_config = getattr(agent.config, "heartbeat", None)
        self.asset: str = getattr(heartbeat_config, "asset", HEARTBEAT_ASSET)

    async def build(self) -> HeartbeatReport:
        snapshot = await snapshot_agent(self.agent, self.agent_version, cpu_meter=self._cpu)
        return heartbeat_from_snapshot(snapshot, asset=self.asset)
