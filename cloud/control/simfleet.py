"""`SimulatedFleet`: many lightweight agents in one asyncio loop, running the real agent's
model-management code against a control plane.

```
SimulatedFleet(url, public key, root, count) ─► enroll_all(operator headers, labels_for)
    (one enrollment token per agent, POST /v1/enroll) ─► per agent: ModelStore(root/<name>,
    keep=2) + FleetClient + ModelUpdater (edge-agent/fleet.py, unchanged)
run(stop) / start() … stop(): every agent polls its desired state (first poll staggered over
    one interval), downloads, verifies, shadows, swaps, reports, rolls back — the agent's
    code; one shared keep-alive HTTP client (`simhttp.py`: httpx's answers, a lighter
  pool, at most `max_connections` connections); one feeder task hands each
    shadowing agent a seeded [rows, F] feature batch every `observe_s` (`observe`)
```

* **What is simulated.** Only the data plane: the feature windows are drawn from a seeded
  normal distribution per agent (`means`, `stds`, one column per feature of the fleet's
  `FeatureSpec`), and the `swap` callback records the model instead of serving it. With
  `set_spikes`, every third batch of an agent carries one row whose first feature is
  `spike_value` (a sensor fault, or drift a model was not trained for).
* **Network outages.** `set_offline(names, True)`: those agents stop polling, and any
  request of theirs still in flight fails as a connection error (`httpx.ConnectError`),
  exactly what the agent sees when its uplink drops. `set_offline(names, False)`: they
  poll again at once.
* **Bounded.** Stores keep 2 versions; the swap keeps no bundle; the pool has at most
  `max_connections` connections (requests queue for one, up to `timeout_s`).
* **Threads.** `start()` runs the loop in a thread of its own (for synchronous callers:
  tests, benches); `models()`, `counters()`, `set_offline` and `set_spikes` may be called
  from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

import numpy as np

from .simhttp import SimpleHttp

if TYPE_CHECKING:
    import httpx

    from edgefleet.edge_agent.fleet import ModelUpdater
    from edgefleet.edge_agent.inference import ModelBundle
    from edgefleet.edge_agent.model_manager import ModelStore
    from edgefleet.protocols.features import FeatureSpec

__all__ = ["SimAgent", "SimulatedFleet", "memory_tempdir"]

log = logging.getLogger(__name__)

SPIKE_EVERY: Final = 3  # with spikes on, one batch in this many carries a spike row


class _Link:
    """The agent's view of the shared httpx client: fails like a dropped uplink while the
    agent is offline."""

    def __init__(self) -> None:
        self.agent: SimAgent | None = None
        self.http: SimpleHttp | None = None

    def _client(self) -> SimpleHttp:
        import httpx

        if self.agent is not None and self.agent.offline:
            raise httpx.ConnectError("simulated network outage")
        if self.http is None:
            raise httpx.ConnectError("the simulated fleet is not running")
        return self.http

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self._client().get(url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self._client().post(url, **kwargs)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, **kwargs: Any
                     ) -> AsyncIterator[httpx.Response]:
        async with self._client().stream(method, url, **kwargs) as response:
            yield response

    async def aclose(self) -> None:  # the fleet owns the shared client
        return None


class _Recorder:
    """The no-op swap: records which model the agent would now serve."""

    def __init__(self, serving: str | None) -> None:
        self.serving = serving  # "name/version" of the last bundle swapped in
        self.swaps = 0

    def swap(self, bundle: ModelBundle) -> None:
        folder = Path(bundle.path).parent  # <store>/<name>/<version>/model.onnx
        self.serving = f"{folder.parent.name}/{folder.name}"
        self.swaps += 1


@dataclass(eq=False)
class SimAgent:
    """One simulated agent: the real updater and store, and what it serves."""

    name: str
    index: int
    token: str
    store: ModelStore
    updater: ModelUpdater
    link: _Link
    recorder: _Recorder
    rng: np.random.Generator
    batches: int = 0
    offline: bool = False
    spikes: bool = False
    online: asyncio.Event | None = field(default=None, repr=False)

    @property
    def serving(self) -> str | None:
        return self.recorder.serving


class SimulatedFleet:
    """N simulated agents against the control plane at `url` (see the module doc)."""

    def __init__(
        self,
        url: str,
        public_key: str,
        root: Path,
        count: int,
        *,
        features: FeatureSpec,
        poll_s: float = 5.0,
        prefix: str = "sim",
        means: Iterable[float] | None = None,
        stds: Iterable[float] | None = None,
        rows_per_batch: int = 8,
        observe_s: float = 0.5,
        spike_value: float = 6.0,
        max_connections: int = 32,
        timeout_s: float = 30.0,
        backoff_initial_s: float = 0.5,
        backoff_cap_s: float = 5.0,
        seed: int = 7,
    ) -> None:
        from edgefleet.protocols.manifest import load_public_key

        if count < 1:
            raise ValueError("a fleet needs at least one agent")
        self.url = url.rstrip("/")
        self.public_keys = [load_public_key(public_key)]
        self.root = Path(root)
        self.count = count
        self.features = features
        self.width = len(features.feature_names())
        self.poll_s = poll_s
        self.prefix = prefix
        self.means = np.asarray(list(means) if means is not None else [0.0] * self.width)
        self.stds = np.asarray(list(stds) if stds is not None else [1.0] * self.width)
        if self.means.shape != (self.width,) or self.stds.shape != (self.width,):
            raise ValueError(f"means and stds need {self.width} values (the spec's features)")
        self.rows_per_batch = rows_per_batch
        self.observe_s = observe_s
        self.spike_value = spike_value
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_cap_s = backoff_cap_s
        self.seed = seed
        self.agents: dict[str, SimAgent] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    # --- enrollment ---------------------------------------------------------------------

    def name_of(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}"

    async def enroll_all(
        self,
        operator_headers: dict[str, str],
        labels_for: Callable[[int], dict[str, str]] | None = None,
        *,
        concurrency: int = 32,
    ) -> None:
        """Enroll agents 0…count-1 through the API (an enrollment token each, with
        `labels_for(index)`, default site=plant-a/plant-b alternating), and build them."""
        import httpx

        labels_for = labels_for or _default_labels
        gate = asyncio.Semaphore(concurrency)

        async def one(http: httpx.AsyncClient, index: int) -> None:
            name = self.name_of(index)
            async with gate:
                for attempt in range(3):  # a keep-alive connection the server just closed
                    try:
                        token = await self._enroll(http, operator_headers, name,
                                                   labels_for(index))
                        break
                    except httpx.TransportError:
                        if attempt == 2:
                            raise
                        await asyncio.sleep(0.5)
            self.add_agent(name, token, index=index)

        limits = httpx.Limits(max_connections=concurrency,
                              max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as http:
            await asyncio.gather(*(one(http, i) for i in range(self.count)
                                   if self.name_of(i) not in self.agents))

    async def _enroll(self, http: httpx.AsyncClient, operator_headers: dict[str, str],
                      name: str, labels: dict[str, str]) -> str:
        made = await http.post(f"{self.url}/v1/enrollment-tokens", headers=operator_headers,
                               json={"labels": labels, "ttl_s": 3600})
        if made.status_code != 201:
            raise RuntimeError(f"enrollment token for {name}: {made.status_code} "
                               f"{made.text[:200]}")
        enrolled = await http.post(f"{self.url}/v1/enroll", json={
            "token": made.json()["token"], "device": name})
        if enrolled.status_code != 201:
            raise RuntimeError(f"enroll {name}: {enrolled.status_code} {enrolled.text[:200]}")
        return str(enrolled.json()["token"])

    def add_agent(self, name: str, token: str, *, index: int | None = None) -> SimAgent:
        """A simulated agent for a device already enrolled (its device token)."""
        from edgefleet.edge_agent.fleet import FleetClient, ModelUpdater
        from edgefleet.edge_agent.model_manager import ModelStore

        if self._loop is not None:
            raise RuntimeError("add agents before the fleet runs")
        index = len(self.agents) if index is None else index
        store = ModelStore(self.root / name, self.public_keys, self.features, keep=2)
        link = _Link()
        client = FleetClient(self.url, token, cast("httpx.AsyncClient", link))
        recorder = _Recorder(store.current)
        updater = ModelUpdater(
            store, client, recorder.swap, poll_min_s=self.poll_s,
            poll_max_s=max(self.poll_s, 30.0), backoff_initial_s=self.backoff_initial_s,
            backoff_cap_s=self.backoff_cap_s, rng=random.Random(self.seed * 100_003 + index))
        agent = SimAgent(name=name, index=index, token=token, store=store, updater=updater,
                         link=link, recorder=recorder,
                         rng=np.random.default_rng([self.seed, index]))
        link.agent = agent
        self.agents[name] = agent
        return agent

    # --- running ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run every agent and the feeder until `stop` is set."""
        import httpx

        limits = httpx.Limits(max_connections=self.max_connections,
                              max_keepalive_connections=self.max_connections)
        timeout = httpx.Timeout(self.timeout_s, pool=max(self.timeout_s, 60.0))
        self._loop = asyncio.get_running_loop()
        # Installs write and fsync files in worker threads; with hundreds of agents
        # installing at once the default pool (cores + 4 threads) queues them on the disk.
        self._loop.set_default_executor(ThreadPoolExecutor(32, "simfleet-io"))
        self._stop = stop
        async with httpx.AsyncClient(timeout=timeout, limits=limits,
                                     follow_redirects=False) as http:
            tasks = []
            simple = SimpleHttp(self.url, self.max_connections, self.timeout_s, http)
            for agent in self.agents.values():
                agent.link.http = simple
                agent.online = asyncio.Event()
                if not agent.offline:
                    agent.online.set()
                tasks.append(asyncio.create_task(self._agent(agent, stop),
                                                 name=f"simagent-{agent.name}"))
            tasks.append(asyncio.create_task(self._feed(stop), name="simfleet-feeder"))
            try:
                await stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for agent in self.agents.values():
                    agent.link.http = None
                await simple.aclose()
                self._loop = None

    async def _agent(self, agent: SimAgent, stop: asyncio.Event) -> None:
        assert agent.online is not None
        stagger = random.Random(self.seed + agent.index).uniform(0, self.poll_s)
        if await _wait(stop, stagger):
            return
        while not stop.is_set():
            if agent.offline:
                waiter = asyncio.ensure_future(agent.online.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
                continue
            delay = await agent.updater.poll_once(stop)
            if await _wait(stop, delay):
                return

    async def _feed(self, stop: asyncio.Event) -> None:
        """Every `observe_s`: one feature batch to each shadowing agent (the agent's
        inference cycle calls `observe` the same way)."""
        agents = list(self.agents.values())
        while not await _wait(stop, self.observe_s):
            for number, agent in enumerate(agents, start=1):
                if agent.updater.shadowing:
                    agent.updater.observe(self._batch(agent))
                if number % 64 == 0:
                    await asyncio.sleep(0)

    def _batch(self, agent: SimAgent) -> np.ndarray[Any, Any]:
        agent.batches += 1
        rows = agent.rng.normal(self.means, self.stds, (self.rows_per_batch, self.width))
        if agent.spikes and agent.batches % SPIKE_EVERY == 0:
            rows[0, 0] = self.spike_value
        return rows

    def start(self) -> SimulatedFleet:
        """Run the fleet in a thread of its own until `stop()`."""
        if self._thread is not None:
            raise RuntimeError("the fleet is already running")
        ready = threading.Event()

        def main() -> None:
            async def body() -> None:
                stop = asyncio.Event()
                self._stop = stop
                self._loop = asyncio.get_running_loop()
                ready.set()
                await self.run(stop)

            try:
                asyncio.run(body())
            except BaseException as err:  # noqa: BLE001 - reported by stop()
                self._failure = err
                ready.set()

        self._thread = threading.Thread(target=main, name="simulated-fleet", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        if self._failure is not None:
            raise RuntimeError("the simulated fleet failed") from self._failure

    def __enter__(self) -> SimulatedFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- control and views --------------------------------------------------------------

    def _names(self, names: Iterable[str] | None) -> list[str]:
        if names is None:
            return list(self.agents)
        chosen = list(names)
        unknown = [n for n in chosen if n not in self.agents]
        if unknown:
            raise KeyError(f"no simulated agent(s) {unknown[:5]}")
        return chosen

    def set_offline(self, names: Iterable[str] | None, offline: bool) -> None:
        """Cut (or restore) the network of these agents (None: all)."""
        for name in self._names(names):
            agent = self.agents[name]
            agent.offline = offline
            event, loop = agent.online, self._loop
            if event is not None and loop is not None:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(event.clear if offline else event.set)

    def set_spikes(self, names: Iterable[str] | None, spikes: bool) -> None:
        """Spike rows in every third feature batch of these agents (None: all)."""
        for name in self._names(names):
            self.agents[name].spikes = spikes

    def models(self) -> dict[str, str | None]:
        """Agent → the model it serves ("name/version", None before its first one)."""
        return {name: agent.serving for name, agent in self.agents.items()}

    def counters(self) -> dict[str, int]:
        """The updaters' counters summed over the fleet, plus swaps and feature batches."""
        total: dict[str, int] = {}
        for agent in self.agents.values():
            for key, value in agent.updater.counters.items():
                total[key] = total.get(key, 0) + value
        total["swaps_recorded"] = sum(a.recorder.swaps for a in self.agents.values())
        total["batches"] = sum(a.batches for a in self.agents.values())
        return total

    def tokens(self) -> dict[str, str]:
        """Agent → its device token (to call the device API as that agent)."""
        return {name: agent.token for name, agent in self.agents.items()}


def memory_tempdir(prefix: str) -> Path:
    """A new private folder (mkdtemp, 0700) for simulated agents' model stores: in
    /dev/shm where there is one (each real gateway fsyncs on a disk of its own; hundreds of
    stores on one shared disk would measure that disk), else in the temp folder."""
    shm = Path("/dev/shm")  # noqa: S108 - only a private mkdtemp folder is made in it
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=where))


def _default_labels(index: int) -> dict[str, str]:
    return {"site": "plant-a" if index % 2 == 0 else "plant-b", "line": str(index % 4)}


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `stop` is set; True when stopped."""
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
    return stop.is_set()
