"""The Modbus source against the real simulator on loopback (TCP) and a pty (RTU), and
Debian's mbpoll against the simulator's documented register map."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from edgefleet.firmware_sim.modbus_server import (
    INT16_FULL_SCALE,
    ModbusFault,
    ModbusRtuSimServer,
    ModbusSimConfig,
    ModbusSimServer,
    sim_points,
)
from edgefleet.firmware_sim.model import TAGS, AnomalyKind, AssetKind, Plant
from edgefleet.firmware_sim.server import ProtocolServer
from edgefleet.protocols.modbus import ModbusSource, ModbusSourceConfig
from edgefleet.protocols.source import Sample
from edgefleet.protocols.wire import Quality

pytestmark = pytest.mark.integration

ASSETS = [("pump-1", AssetKind.PUMP), ("compressor-1", AssetKind.COMPRESSOR),
          ("conveyor-1", AssetKind.CONVEYOR)]
DEADLINE_S = 30.0  # generous: the machine is shared


def make_plant(anomaly_rate: float = 0.05) -> Plant:
    return Plant(ASSETS, seed=11, anomaly_rate=anomaly_rate, start_ns=1_795_000_000 * 10**9)


@contextlib.asynccontextmanager
async def serving(plant: Plant, config: ModbusSimConfig | None = None
                  ) -> AsyncIterator[ModbusSimServer]:
    server = ModbusSimServer(config or ModbusSimConfig(), plant)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def by_asset(samples: Sequence[Sample]) -> dict[str, dict[str, Sample]]:
    result: dict[str, dict[str, Sample]] = {}
    for sample in samples:
        result.setdefault(sample.asset, {})[sample.tag] = sample
    return result


def qualities(samples: Sequence[Sample], asset: str) -> set[Quality]:
    return {s.quality for s in samples if s.asset == asset}


async def poll_until(source: ModbusSource, check: Callable[[list[Sample]], bool], what: str,
                     timeout_s: float = DEADLINE_S) -> list[Sample]:
    """Poll until `check(samples)` holds; waits are polled conditions with a deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await source.poll()
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {samples}")
        await asyncio.sleep(0.05)  # pacing between polls, not synchronisation


def assert_matches_plant(samples: Sequence[Sample], plant: Plant, encoding: str) -> None:
    got = by_asset(samples)
    assert set(got) == set(plant.assets)
    for asset in plant.assets:
        values = plant.values(asset)
        for spec in TAGS[plant.assets[asset].kind]:
            sample = got[asset][spec.name]
            assert sample.quality is Quality.GOOD
            assert sample.value is not None
            expected = values[spec.name]
            if encoding == "float32":
                assert sample.value == pytest.approx(expected, rel=1e-6, abs=1e-30)
            else:
                step = (spec.high - spec.low) / INT16_FULL_SCALE
                clamped = min(spec.high, max(spec.low, expected))
                assert abs(sample.value - clamped) <= step / 2 + 1e-9
        assert got[asset]["anomaly_kind"].value == int(plant.status(asset))
        assert got[asset]["anomaly_active"].value == float(plant.status(asset) != 0)


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


# ---- values ----------------------------------------------------------------------------


@pytest.mark.parametrize(("byte_order", "word_order"),
                         [("big", "big"), ("big", "little"), ("little", "little")])
@pytest.mark.parametrize("table", ["input", "holding"])
@pytest.mark.parametrize("encoding", ["float32", "int16"])
def test_values_equal_the_plant(byte_order: Any, word_order: Any, table: Any,
                                encoding: Any) -> None:
    plant = make_plant()

    async def scenario() -> None:
        config = ModbusSimConfig(byte_order=byte_order, word_order=word_order)
        async with serving(plant, config) as server:
            source = server.source_config(table=table, encoding=encoding).build()
            try:
                assert_matches_plant(await source.poll(), plant, encoding)
                # The simulator follows the plant.
                plant.advance_to(plant.now_ns + 60 * 10**9)
                server.update(plant)
                assert_matches_plant(await source.poll(), plant, encoding)
            finally:
                await source.close()
        assert source.stats.bad == 0

    run(scenario())


def test_coil_and_kind_register_carry_the_label() -> None:
    plant = make_plant(anomaly_rate=0.5)
    # Advance simulated time until some asset is in an anomaly episode and another is not.
    while not (any(plant.status(a) for a in plant.assets)
               and not all(plant.status(a) for a in plant.assets)):
        plant.advance_to(plant.now_ns + 30 * 10**9)

    async def scenario() -> None:
        async with serving(plant) as server:
            assert isinstance(server, ProtocolServer)
            source = server.source_config().build()
            try:
                got = by_asset(await source.poll())
            finally:
                await source.close()
        for asset in plant.assets:
            status = plant.status(asset)
            assert got[asset]["anomaly_active"].value == (1.0 if status else 0.0)
            assert AnomalyKind(int(got[asset]["anomaly_kind"].value or 0)) is status

    run(scenario())


def test_rtu_over_a_pty() -> None:
    plant = make_plant()

    async def scenario() -> None:
        server = ModbusRtuSimServer(ModbusSimConfig(word_order="little"), plant, "pump-1")
        assert isinstance(server, ProtocolServer)
        await server.start()
        try:
            config = ModbusSourceConfig.model_validate({
                "devices": [{"name": "pump-1", "serial_port": server.slave_path,
                             "baudrate": 115200, "timeout_s": 2.0}],
                "points": sim_points("pump-1", AssetKind.PUMP, server.config) + [
                    {**p, "tag": p["tag"] + "_int16"} for p in sim_points(
                        "pump-1", AssetKind.PUMP, server.config, encoding="int16",
                        table="holding", label=False)
                ],
            })
            assert config.devices[0].serial_port == server.slave_path
            source = config.build()
            try:
                samples = await source.poll()
                got = by_asset(samples)["pump-1"]
                for spec in TAGS[AssetKind.PUMP]:
                    expected = plant.values("pump-1")[spec.name]
                    assert got[spec.name].value == pytest.approx(expected, rel=1e-6)
                    step = (spec.high - spec.low) / INT16_FULL_SCALE
                    assert abs((got[spec.name + "_int16"].value or 0) - expected) <= step
                assert got["anomaly_active"].value == float(plant.status("pump-1") != 0)
                assert {s.quality for s in samples} == {Quality.GOOD}
                # An exception code over RTU is bad quality too, and recovers.
                server.set_fault(ModbusFault(exception_code=0x04))
                assert {s.quality for s in await source.poll()} == {Quality.BAD}
                server.clear_fault()
                await poll_until(source, lambda s: {x.quality for x in s} == {Quality.GOOD},
                                 "RTU recovery")
            finally:
                await source.close()
        finally:
            await server.stop()

    run(scenario())


# ---- faults ----------------------------------------------------------------------------

FAULTS = {
    "slow": ModbusFault(delay_s=3.0),
    "drop": ModbusFault(drop=True),
    "illegal_address": ModbusFault(exception_code=0x02),
    "device_failure": ModbusFault(exception_code=0x04),
    "silent": ModbusFault(silent=True),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_is_bad_for_that_device_only_and_recovers(fault: str) -> None:
    plant = make_plant()
    victim = "compressor-1"

    async def scenario() -> None:
        async with serving(plant) as server:
            source = server.source_config(
                timeout_s=1.0, reconnect_initial_s=0.05, reconnect_cap_s=0.5).build()
            try:
                assert_matches_plant(await source.poll(), plant, "float32")
                server.set_fault(victim, FAULTS[fault])
                samples = await source.poll()
                assert qualities(samples, victim) == {Quality.BAD}
                for asset in plant.assets:
                    if asset != victim:
                        assert qualities(samples, asset) == {Quality.GOOD}
                assert source.device_failing(victim) is not None
                assert source.stats.errors
                server.clear_fault(victim)
                await poll_until(source, lambda s: qualities(s, victim) == {Quality.GOOD},
                                 f"recovery from {fault}")
                assert source.device_failing(victim) is None
            finally:
                await source.close()

    run(scenario())


@pytest.mark.parametrize("fault", ["slow", "dead"])
def test_slow_or_dead_device_does_not_delay_the_others(fault: str) -> None:
    """Other devices' samples are read within their own timeout of the poll's start while
    one device takes (or fails for) far longer."""
    plant = make_plant()
    victim = "pump-1"
    own_timeout_s, victim_timeout_s, delay_s = 1.0, 8.0, 4.0

    async def scenario() -> None:
        async with serving(plant) as server:
            config = server.source_config(timeout_s=own_timeout_s)
            devices = [d.model_copy(update={"timeout_s": victim_timeout_s})
                       if d.name == victim else d for d in config.devices]
            source = config.model_copy(update={"devices": devices}).build()
            try:
                await source.poll()  # connect
                server.set_fault(victim, ModbusFault(delay_s=delay_s) if fault == "slow"
                                 else ModbusFault(silent=True))
                start_ns = time.time_ns()
                samples = await source.poll()
                elapsed_s = (time.time_ns() - start_ns) / 1e9
            finally:
                await source.close()
        assert elapsed_s >= delay_s  # poll() waited for the victim ...
        for sample in samples:
            if sample.asset == victim:
                expected = Quality.GOOD if fault == "slow" else Quality.BAD
                assert sample.quality is expected
                assert (sample.ts_ns - start_ns) / 1e9 >= delay_s
            else:  # ... but the others were read without waiting for it
                assert sample.quality is Quality.GOOD
                assert (sample.ts_ns - start_ns) / 1e9 < own_timeout_s

    run(scenario())


def test_same_source_survives_a_simulator_restart(caplog: pytest.LogCaptureFixture) -> None:
    plant = make_plant()
    caplog.set_level("INFO", logger="edgefleet.protocols.modbus")

    async def scenario() -> ModbusSource:
        async with serving(plant) as server:
            source = server.source_config(
                timeout_s=1.0, reconnect_initial_s=0.05, reconnect_cap_s=0.5).build()
            try:
                assert_matches_plant(await source.poll(), plant, "float32")
                # One device restarts mid-run ...
                await server.restart_asset("conveyor-1")
                await poll_until(source, lambda s: qualities(s, "conveyor-1") == {Quality.GOOD},
                                 "conveyor-1 after its restart")
                # ... then the whole simulator goes away and comes back on the same ports.
                ports = server.endpoints
                await server.stop()
                samples = await source.poll()
                assert {s.quality for s in samples} == {Quality.BAD}
                await source.poll()  # still down: no new outage log line
                await server.start()
                assert server.endpoints == ports
                samples = await poll_until(
                    source, lambda s: {x.quality for x in s} == {Quality.GOOD},
                    "every device after the simulator restart")
                assert_matches_plant(samples, plant, "float32")
            finally:
                await source.close()
            return source

    source = run(scenario())
    assert source.stats.reconnects >= len(ASSETS)
    messages = [r.getMessage() for r in caplog.records if r.name == "edgefleet.protocols.modbus"]
    for asset, _ in ASSETS:
        started = [m for m in messages if f"device {asset}: outage started" in m]
        recovered = [m for m in messages if f"device {asset}: recovered" in m]
        # conveyor-1 may not notice its own quick restart; everyone notices the full stop.
        assert 1 <= len(started) <= 2 and len(recovered) == len(started), messages


# ---- mbpoll ----------------------------------------------------------------------------

# mbpoll comes from `make deps`; a missing one fails the test, it is not skipped.
_MBPOLL_LINE = re.compile(r"^\[(\d+)\]:\s+(\S+)", re.MULTILINE)  # "[ref]: value (extra)"


async def mbpoll(port: int, *args: str) -> dict[int, float]:
    process = await asyncio.create_subprocess_exec(
        "mbpoll", "-m", "tcp", "-a", "1", "-1", "-o", "5", "-p", str(port), *args, "127.0.0.1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), DEADLINE_S)
    assert process.returncode == 0, err.decode()
    return {int(ref): float(value) for ref, value in _MBPOLL_LINE.findall(out.decode())}


@pytest.mark.parametrize("word_order", ["big", "little"])
def test_mbpoll_reads_the_documented_registers(word_order: Any) -> None:
    plant = make_plant(anomaly_rate=0.5)
    while not any(plant.status(a) for a in plant.assets):
        plant.advance_to(plant.now_ns + 30 * 10**9)
    # mbpoll reads floats in little-endian word order unless -B (big-endian, ABCD).
    order_flag = ["-B"] if word_order == "big" else []

    async def scenario() -> None:
        async with serving(plant, ModbusSimConfig(word_order=word_order)) as server:
            for asset, (_, port) in server.endpoints.items():
                values = plant.values(asset)
                specs = TAGS[plant.assets[asset].kind]
                status = plant.status(asset)
                # -r is 1-based: input registers 0..11 are references 1..12.
                floats = await mbpoll(port, "-t", "3:float", *order_flag, "-r", "1", "-c", "6")
                assert sorted(floats) == [1, 3, 5, 7, 9, 11]
                for index, spec in enumerate(specs):
                    assert floats[1 + 2 * index] == pytest.approx(values[spec.name], rel=1e-5)
                # The same block in the holding table, with -0 (0-based references).
                holding = await mbpoll(port, "-0", "-t", "4:float", *order_flag, "-r", "0",
                                       "-c", "6")
                assert [holding[2 * i] for i in range(6)] == [floats[1 + 2 * i] for i in range(6)]
                # Scaled int16 at 12..17 (references 13..18), label registers 18 and 19.
                raw = await mbpoll(port, "-t", "3", "-r", "13", "-c", "8")
                for index, spec in enumerate(specs):
                    decoded = spec.low + raw[13 + index] * (spec.high - spec.low) / INT16_FULL_SCALE
                    step = (spec.high - spec.low) / INT16_FULL_SCALE
                    assert abs(decoded - values[spec.name]) <= step / 2 + 1e-9
                assert raw[19] == int(status) and raw[20] == float(status != 0)
                coil = await mbpoll(port, "-t", "0", "-r", "1", "-c", "1")
                assert coil == {1: float(status != 0)}
                # A device exposes 100 contiguous holding registers.
                assert len(await mbpoll(port, "-t", "4", "-r", "1", "-c", "100")) == 100
            assert any(plant.status(a) for a in plant.assets)
            assert not math.isnan(sum(plant.values("pump-1").values()))

    run(scenario())
