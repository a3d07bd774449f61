"""The edge agent: one asyncio process that runs the pipeline end to end.

```
sources ─(IngestQueue, bounded)─► ingest loop ─► SqliteBuffer ─► Forwarder ─► fog
                                     │ inference (one batched ONNX call per cycle)
                                     └► alerts (local MQTT / webhook)
heartbeat loop ─► buffer (gauges as readings) + fog (wire Heartbeat)
/metrics, /healthz
```

Contracts
---------
* **Every accepted sample reaches the buffer or is counted.** Sources hand samples to a
  bounded `IngestQueue` (`INGEST_QUEUE_SAMPLES`). When it is full, a *polled* source waits
  before its next poll (its schedule slips; nothing read is lost), a *streaming* source's
  sample is refused and counted (`ingest_refused_total`, logged once per episode): a
  push protocol cannot be paused from here.
* **Inference runs before the append**, on the cycle's samples, so the `ml:<version>:*`
  readings of a window are committed with the data that produced it, and an alert leaves
  within the cycle that saw the anomaly.
* **A full buffer under `when_full: block` holds the pipeline**: the ingest loop retries
  the refused append every `BLOCKED_RETRY_S` until acknowledgements free space, the
  queue fills, and sources wait as described above. Logged when it starts and ends.
* **Shutdown (SIGTERM/SIGINT)**: sources stop; what is queued is appended; the buffer is
  flushed; the forwarder sends what it can for `drain_timeout_s`; the buffer is closed.
  Whatever was not sent stays in the buffer for the next start. Exit status 0.
* A model that fails to load does not stop collection: the agent runs without inference
  and reports the problem in `/healthz`, heartbeats and the log.
* **New models** come from one model updater at most (`fleet.ModelUpdater`): the control
  plane's rollouts (`fleet:`) or, in standalone mode, an MLflow alias (`model_source:`,
  edge-agent/standalone.py). Either way a new model is verified, shadowed on live windows
  and swapped in between two ingest cycles; the previous one stays on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from edgefleet.protocols.source import PolledSource, Sample, StreamingSource

from .alerts import AlertSink
from .buffer import BufferFull, SqliteBuffer
from .config import AgentConfig
from .forwarder import BufferExecutor, Forwarder, Transport, build_transport
from .heartbeat import HeartbeatBuilder
from .metrics import MetricsServer

if TYPE_CHECKING:
    from .inference import Inferencer

__all__ = ["Agent", "AgentStats", "IngestQueue", "run_agent"]

log = logging.getLogger(__name__)

INGEST_QUEUE_SAMPLES: Final = 100_000  # samples between the sources and the buffer
INGEST_CHUNK_SAMPLES: Final = 20_000  # samples appended per buffer call at most
BLOCKED_RETRY_S: Final = 0.2
STALE_POLLS: Final = 3  # a polled source with no poll for this many intervals is stale
STREAM_STALE_S: Final = 60.0


def _agent_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0.0.0+unknown"


@dataclasses.dataclass(slots=True)
class AgentStats:
    started_monotonic: float = dataclasses.field(default_factory=time.monotonic)
    samples_in: int = 0  # samples appended to the buffer (sources' own, not inference)
    inference_rows: int = 0  # windows scored
    anomalies: int = 0
    heartbeats: int = 0
    cycles: int = 0  # ingest loop iterations (buffer appends)
    blocked_s: float = 0.0  # time spent holding for a full buffer


class IngestQueue:
    """Bounded hand-off from sources to the ingest loop, counted in samples.

    `put` (polled sources) waits for room; `offer` (streaming sources, called from their
    callbacks on the event loop) never waits: a sample that does not fit is refused and
    counted in `refused`. `take` waits for at least one sample and returns up to
    `max_samples` of what is queued, in arrival order."""

    def __init__(self, max_samples: int = INGEST_QUEUE_SAMPLES) -> None:
        self.max_samples = max_samples
        self.refused = 0
        self._chunks: list[list[Sample]] = []
        self._size = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._refusing = False

    def __len__(self) -> int:
        return self._size

    async def put(self, samples: list[Sample]) -> None:
        while self._size and self._size + len(samples) > self.max_samples:
            self._room.clear()
            await self._room.wait()
        self._append(samples)

    def offer(self, sample: Sample) -> bool:
        if self._size >= self.max_samples:
            self.refused += 1
            if not self._refusing:
                self._refusing = True
                log.warning("ingest queue full (%d samples): refusing streamed samples "
                            "until it drains (counted in ingest_refused_total)", self.max_samples)
            return False
        if self._refusing:
            self._refusing = False
            log.info("ingest queue accepts streamed samples again (%d refused so far)",
                     self.refused)
        if self._chunks and len(self._chunks[-1]) < 1024:  # streamed samples, grouped
            self._chunks[-1].append(sample)
            self._size += 1
            self._ready.set()
        else:
            self._append([sample])
        return True

    def _append(self, samples: list[Sample]) -> None:
        if samples:
            self._chunks.append(samples)
            self._size += len(samples)
            self._ready.set()

    async def take(self, max_samples: int = INGEST_CHUNK_SAMPLES) -> list[Sample]:
        while not self._size:
            self._ready.clear()
            await self._ready.wait()
        return self.take_nowait(max_samples)

    def take_nowait(self, max_samples: int = INGEST_CHUNK_SAMPLES) -> list[Sample]:
        taken: list[Sample] = []
        while self._chunks and len(taken) < max_samples:
            chunk = self._chunks[0]
            room = max_samples - len(taken)
            if len(chunk) <= room:
                taken.extend(chunk)
                self._chunks.pop(0)
            else:
                taken.extend(chunk[:room])
                self._chunks[0] = chunk[room:]
        self._size -= len(taken)
        self._room.set()
        return taken


@dataclasses.dataclass(slots=True)
class _SourceState:
    source: Any
    polled: bool
    interval_s: float
    last_ok: float | None = None  # monotonic time of the last good poll / sample
    last_poll: float | None = None
    down_reason: str | None = None


class Agent:
    """One running agent: build with `Agent(config, …)`, then `await agent.run(stop)`.

    Attributes read by heartbeats, /metrics and /healthz (see `heartbeat.snapshot_agent`):
    `config`, `stats`, `sources`, `source_health()`, `buffer`, `bx`, `forwarder`,
    `scorer`, `alerts`, `queue`, `model_error`, `healthz()`."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        sources: Sequence[Any] | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.version = _agent_version()
        self.stats = AgentStats()
        self.queue = IngestQueue()
        self.sources = list(sources) if sources is not None else [c.build() for c in config.sources]
        self._states = {
            source.name: _SourceState(
                source,
                polled=isinstance(source, PolledSource),
                interval_s=float(getattr(cfg, "poll_interval_s", 1.0) or 1.0),
            )
            for source, cfg in zip(self.sources, config.sources, strict=False)
        }
        for source in self.sources[len(config.sources):]:  # injected extras (tests)
            self._states[source.name] = _SourceState(
                source, isinstance(source, PolledSource), 1.0)
        self._transport = transport
        self.buffer: SqliteBuffer | None = None
        self.bx: BufferExecutor | None = None
        self.forwarder: Forwarder | None = None
        self.alerts: AlertSink | None = None
        self.metrics: MetricsServer | None = None
        self.inferencer: Inferencer | None = None
        self.scorer: Any = None
        self.updater: Any = None  # fleet.ModelUpdater: config.fleet or config.model_source
        self.model_error: str | None = None
        self.problems: list[str] = []  # reported in /healthz and heartbeats until restart
        self.applied_generation = 0
        self._ingest_alive = False
        self._blocked_since: float | None = None

    # ---- reporting ----------------------------------------------------------------------

    def source_health(self) -> dict[str, str]:
        now = time.monotonic()
        health = {}
        for name, state in self._states.items():
            if state.polled:
                if state.down_reason is not None:
                    health[name] = "down"
                elif state.last_poll is None or now - state.last_poll > STALE_POLLS * max(
                    state.interval_s, 1.0
                ):
                    health[name] = "stale" if state.last_poll is not None else "starting"
                else:
                    health[name] = "up"
            else:
                connected = getattr(state.source, "connected", None)
                if connected is False:
                    health[name] = "down"
                elif state.last_ok is not None and now - state.last_ok <= STREAM_STALE_S:
                    health[name] = "up"
                else:
                    health[name] = "stale" if state.last_ok is not None else "starting"
        return health

    def healthz(self) -> tuple[bool, dict[str, Any]]:
        problems = list(self.problems)
        if self.buffer is None:
            problems.append("buffer not open")
        if not self._ingest_alive:
            problems.append("ingest loop not running")
        if self._blocked_since is not None:
            problems.append(f"buffer full for {time.monotonic() - self._blocked_since:.0f} s")
        details: dict[str, Any] = {
            "device": self.config.device,
            "problems": problems,
            "sources": self.source_health(),
            "model_version": getattr(self.scorer, "version", None),
        }
        if self.model_error:
            details["model_error"] = self.model_error
        # Buffer-full and model problems degrade the agent but it still works: only a dead
        # pipeline is unhealthy.
        return self.buffer is not None and self._ingest_alive, details

    # ---- lifecycle ----------------------------------------------------------------------

    def _load_model(self) -> None:
        model = self.config.model
        if model is None:
            log.info("no model configured: forwarding without inference")
            return
        from .inference import Inferencer, ModelBundle, ModelLoadError  # onnxruntime: ~0.3 s

        try:
            bundle = ModelBundle.load(model.path, threshold=model.threshold)
            self.inferencer = Inferencer.from_bundle(bundle, model.assets)
        except ModelLoadError as err:
            self.model_error = str(err)
            log.error("model %s not loaded (%s): forwarding without inference", model.path, err)
            return
        self.scorer = self.inferencer.scorer
        if self.alerts is not None:
            self.alerts.threshold = bundle.threshold
        log.info("model %s version %s loaded (threshold %g)", bundle.name, bundle.version,
                 bundle.threshold)

    async def _start_model_updates(self) -> None:
        """The model updater of `config.fleet` or `config.model_source`: it serves the
        store's current model if there is one (the model the fleet or the MLflow alias last
        gave this device wins over `model.path`), and every later one, swapped in between
        two ingest cycles."""
        from .inference import ModelLoadError
        from .model_manager import ModelStoreError

        running = self.scorer.bundle if self.scorer is not None else None
        # A model must take the windows this agent's configured model was made for.
        features = running.features if running is not None else None
        state_dir = self.config.effective_state_dir
        if self.config.fleet is not None:
            from .fleet import build_updater

            self.updater = build_updater(self.config.fleet, state_dir=state_dir,
                                         swap=self._swap_model, features=features)
        else:
            from .standalone import build_follower

            assert self.config.model_source is not None
            self.updater = build_follower(self.config.model_source.mlflow,
                                          state_dir=state_dir, swap=self._swap_model,
                                          features=features)
        label = self.updater.label
        try:
            stored = await asyncio.to_thread(self.updater.store.current_bundle)
        except (ModelStoreError, ModelLoadError) as err:
            stored = None
            self.problems.append(f"{label} model store: {err}")
            log.error("%s model store: %s; running the configured model, if any", label, err)
        bundle = stored if stored is not None else running
        if bundle is not None:
            self._swap_model(bundle)  # wrapped so that inference also feeds shadow runs

    def _swap_model(self, bundle: Any) -> None:
        """The updater's swap: runs on the event loop, so between two ingest cycles."""
        from .fleet import inferencer_for

        assets = self.config.model.assets if self.config.model is not None else None
        self.inferencer = inferencer_for(bundle, self.updater.observe, assets=assets,
                                         previous=self.inferencer)
        self.scorer = self.inferencer.scorer
        self.model_error = None
        if self.alerts is not None:
            self.alerts.threshold = bundle.threshold
        log.info("model %s version %s serving (threshold %g)", bundle.name, bundle.version,
                 bundle.threshold)

    def _open(self) -> None:
        buffer = SqliteBuffer.open(self.config.buffer)
        stats = buffer.stats()
        self.buffer = buffer
        self.bx = BufferExecutor(buffer)
        if buffer.quarantined_at_open is not None:
            # Loud on purpose: rows in the old file will not reach the fog.
            self.problems.append(f"corrupt buffer quarantined as {buffer.quarantined_at_open}")
            log.critical("BUFFER QUARANTINED: %s was corrupt and was moved aside to %s; a "
                         "fresh buffer was started; rows in the old file are not forwarded "
                         "(keep it for inspection)", self.config.buffer.path,
                         buffer.quarantined_at_open)
        if stats.depth:
            log.info("buffer %s: %d rows from an earlier run waiting to be sent",
                     self.config.buffer.path, stats.depth)

    async def run(self, stop: asyncio.Event, *, on_ready: Callable[[Agent], None] | None = None
                  ) -> int:
        await asyncio.to_thread(self._open)
        assert self.buffer is not None and self.bx is not None
        config = self.config
        transport = self._transport or build_transport(config.fog, config.device)
        self.forwarder = Forwarder(config.fog, self.bx, transport, config.device)
        if config.alerts.enabled:
            self.alerts = AlertSink(config.alerts, device=config.device)
        self._load_model()
        if config.fleet is not None or config.model_source is not None:
            await self._start_model_updates()
        if config.metrics.enabled:
            self.metrics = MetricsServer(config.metrics, self, agent_version=self.version)
            await self.metrics.start()
        try:
            await self._run_tasks(stop, on_ready)
        finally:
            await self._shutdown(transport)
        return 0

    async def _run_tasks(self, stop: asyncio.Event, on_ready: Callable[[Agent], None] | None
                         ) -> None:
        assert self.forwarder is not None
        pipeline: list[asyncio.Task[Any]] = []
        sources: list[asyncio.Task[Any]] = []
        for state in self._states.values():
            runner = self._poll_loop(state) if state.polled else self._stream(state)
            sources.append(asyncio.create_task(runner, name=f"source-{state.source.name}"))
        pipeline.append(asyncio.create_task(self._ingest_loop(), name="ingest"))
        pipeline.append(asyncio.create_task(self.forwarder.run(), name="forwarder"))
        pipeline.append(asyncio.create_task(self._flush_loop(), name="flush"))
        pipeline.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        if self.alerts is not None:
            pipeline.append(asyncio.create_task(self.alerts.run(), name="alerts"))
        if self.updater is not None:
            pipeline.append(asyncio.create_task(self.updater.run(stop),
                                                name=self.updater.label))
        if self.metrics is not None:
            pipeline.append(asyncio.create_task(self.metrics.serve(), name="metrics"))
        log.info("agent %s (edgefleet %s) running: %d source(s), forwarding to %s",
                 self.config.device, self.version, len(sources), self.config.fog.url)
        if on_ready is not None:
            on_ready(self)
        stopper = asyncio.create_task(stop.wait(), name="stop")
        everything = [stopper, *pipeline, *sources]
        try:
            done, _ = await asyncio.wait(everything, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                failure = None if task is stopper or task.cancelled() else task.exception()
                if failure is not None:
                    log.critical("task %s failed: %r; stopping", task.get_name(), failure)
                    raise failure
            log.info("stopping: sources first, then the queued samples, then the forwarder")
            await _cancel(sources)
            await self._close_sources()
            ingest = pipeline[0]
            await self._settle_queue(ingest)
            await _cancel(pipeline)
        finally:
            await _cancel(everything)

    async def _settle_queue(self, ingest: asyncio.Task[Any]) -> None:
        """Let the ingest loop append what the sources queued (the stop is not lost data)."""
        deadline = time.monotonic() + max(5.0, self.config.drain_timeout_s)
        while len(self.queue) and not ingest.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if len(self.queue):
            log.warning("%d queued samples not appended at stop (buffer full?)", len(self.queue))

    async def _close_sources(self) -> None:
        for state in self._states.values():
            close = getattr(state.source, "close", None)
            if close is not None:
                try:
                    await asyncio.wait_for(close(), 5.0)
                except Exception as err:  # noqa: BLE001 - one source's close must not stop the rest
                    log.warning("source %s did not close cleanly: %s", state.source.name, err)

    async def _shutdown(self, transport: Transport) -> None:
        bx, forwarder = self.bx, self.forwarder
        if bx is not None and self.buffer is not None:
            try:
                await bx.call(self.buffer.flush)
                if forwarder is not None:
                    left = await forwarder.drain(self.config.drain_timeout_s)
                    if left:
                        log.info("%d rows stay buffered for the next start", left)
                    else:
                        log.info("buffer drained")
            finally:
                with contextlib.suppress(Exception):
                    await transport.close()
                if self.updater is not None:
                    with contextlib.suppress(Exception):
                        await self.updater.client.aclose()
                if self.metrics is not None:
                    await self.metrics.close()
                await bx.call(self.buffer.close)
                bx.shutdown()
                self.buffer = None

    # ---- tasks --------------------------------------------------------------------------

    async def _poll_loop(self, state: _SourceState) -> None:
        source: PolledSource = state.source
        interval = state.interval_s
        next_at = time.monotonic()
        while True:
            try:
                samples = await source.poll()
            except Exception as err:  # noqa: BLE001 - a poll fault is the source's health, not the agent's end
                if state.down_reason is None:
                    log.warning("source %s: poll failed (%s); retrying every %.3g s",
                                source.name, err, interval)
                state.down_reason = str(err)
                samples = []
            else:
                now = time.monotonic()
                state.last_poll = now
                all_bad = bool(samples) and all(s.value is None for s in samples)
                if all_bad and state.down_reason is None:
                    state.down_reason = "every point unreadable"
                elif not all_bad:
                    if state.down_reason is not None:
                        log.info("source %s: reading again", source.name)
                    state.down_reason = None
                    state.last_ok = now
            if samples:
                await self.queue.put(samples)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < -interval:  # fell behind (slow device or a blocked buffer): skip ticks
                next_at = time.monotonic()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

    async def _stream(self, state: _SourceState) -> None:
        source: StreamingSource = state.source
        queue = self.queue

        def emit(sample: Sample) -> None:
            if queue.offer(sample):
                state.last_ok = time.monotonic()

        await source.run(emit)

    async def _ingest_loop(self) -> None:
        assert self.bx is not None and self.buffer is not None and self.forwarder is not None
        bx, buffer, forwarder = self.bx, self.buffer, self.forwarder
        device = self.config.device
        self._ingest_alive = True
        try:
            while True:
                samples = await self.queue.take()
                rows = samples
                if self.inferencer is not None:
                    results = self.inferencer.run(samples)
                    if results:
                        rows = samples + self.inferencer.to_samples(results)
                        self._publish_alerts(results)
                await self._append(bx, buffer, device, rows)
                self.stats.samples_in += len(samples)
                self.stats.cycles += 1
                forwarder.notify(len(rows))
        finally:
            self._ingest_alive = False

    def _publish_alerts(self, results: Sequence[Any]) -> None:
        self.stats.inference_rows += len(results)
        for result in results:
            if result.is_anomaly:
                self.stats.anomalies += 1
                if self.alerts is not None:
                    self.alerts.publish_result(result)

    async def _append(self, bx: BufferExecutor, buffer: SqliteBuffer, device: str,
                      rows: list[Sample]) -> None:
        while True:
            try:
                await bx.call(buffer.append, device, rows)
            except BufferFull as err:
                if self._blocked_since is None:
                    self._blocked_since = time.monotonic()
                    log.warning("%s (when_full: block): holding the sources until the fog "
                                "acknowledges rows", err)
                await asyncio.sleep(BLOCKED_RETRY_S)
                continue
            if self._blocked_since is not None:
                held = time.monotonic() - self._blocked_since
                self.stats.blocked_s += held
                log.info("buffer accepts rows again after %.1f s", held)
                self._blocked_since = None
            return

    async def _flush_loop(self) -> None:
        """Commit staged rows when no append comes to do it (a quiet line)."""
        assert self.bx is not None and self.buffer is not None
        interval = self.config.buffer.commit_interval_s
        while True:
            await asyncio.sleep(interval)
            await self.bx.call(self.buffer.flush_if_due)

    async def _heartbeat_loop(self) -> None:
        assert self.bx is not None and self.buffer is not None and self.forwarder is not None
        builder = HeartbeatBuilder(self, self.version)
        sending: asyncio.Task[bool] | None = None
        while True:
            await asyncio.sleep(self.config.heartbeat.interval_s)
            if self.updater is not None:
                self.applied_generation = self.updater.generation or 0
            report = await builder.build()
            try:
                await self.bx.call(self.buffer.append, self.config.device, report.samples)
            except BufferFull:
                pass  # counted by the buffer (appends_refused); the wire heartbeat still goes
            else:
                self.forwarder.notify(len(report.samples))
            self.stats.heartbeats += 1
            if sending is None or sending.done():
                sending = asyncio.create_task(self.forwarder.send_heartbeat(report.heartbeat),
                                              name="heartbeat-send")


async def _cancel(tasks: Sequence[asyncio.Task[Any]], timeout_s: float = 10.0) -> None:
    """Cancel `tasks` and wait up to `timeout_s` for them to finish. A task that ignores
    its cancellation (a protocol library stuck in its own teardown) is logged and left
    behind, so that it cannot hold up the drain that follows."""
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: a failure was already logged where it happened
    for task in pending:
        log.warning("task %s did not stop within %g s of its cancellation; going on without "
                    "it", task.get_name(), timeout_s)


async def run_agent(
    config: AgentConfig,
    *,
    stop: asyncio.Event | None = None,
    sources: Sequence[Any] | None = None,
    transport: Transport | None = None,
    on_ready: Callable[[Agent], None] | None = None,
) -> int:
    """Run an agent until `stop` is set or SIGTERM/SIGINT arrives; returns the exit status."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    try:
        return await Agent(config, sources=sources, transport=transport).run(
            stop, on_ready=on_ready)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
