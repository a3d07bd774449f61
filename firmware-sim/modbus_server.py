"""Simulated Modbus PLCs: every asset of the plant is its own Modbus device.

Over TCP (`ModbusSimServer`) each asset listens on its own port, like a PLC with its own IP
address, and answers unit id `unit_id` (also 0 and 255, which TCP gateways use for "the
device itself"). Over RTU (`ModbusRtuSimServer`) one asset answers on a pseudo-terminal, so
a serial client needs no hardware: open `slave_path` as the serial port.

Register map (identical for every asset kind; `tags` are `TAGS[kind]` in order: speed, flow,
pressure, current, temperature, vibration; `register_map()` is the machine-readable form,
`format_register_map()` prints it):

| table | address | type | content |
|---|---|---|---|
| input (FC4) | 0-11 | float32 ×6 | tag *i* at 2*i*, in the configured byte/word order |
| input | 12-17 | int16 ×6 | tag *i* at 12+*i*, scaled (see below) |
| input | 18 | uint16 | AnomalyKind code of the running episode (0 = normal) |
| input | 19 | uint16 | anomaly active (1) or not (0) |
| input | 20-21 | uint32 | update counter (wraps), in the configured byte/word order |
| holding (FC3/6/16) | 0-21 | | the same 22 registers as the input table |
| holding | 22..`holding_registers`-1 | uint16 | zero padding (100 registers by default) |
| coil (FC1/5/15) | 0 | bool | anomaly active (the ground-truth label) |
| coil | 1-15 | bool | always 0 |
| discrete input (FC2) | 0 | bool | anomaly active |
| discrete input | 1-15 | bool | always 0 |

Scaled int16: raw = round((v - low) / (high - low) × 32767) with the tag's engineering range
from `TAGS`, clamped to 0..32767, so v = low + raw × (high - low) / 32767 (`int16_scale`).
The resolution is (high - low) / 32767, e.g. 0.11 rpm on 0..3600 rpm. A device exposes at least
100 contiguous holding registers (`holding_registers`, default 100).

Writes (FC5, 6, 15, 16) to valid addresses are acknowledged and discarded: the model owns
every value. Reads beyond a table answer exception 0x02 (illegal data address); counts
outside 1..125 registers or 1..2000 bits answer 0x03; other function codes answer 0x01.

Fault injection (tests and demos), per asset, at run time: `set_fault(asset, ModbusFault(…))`
delays responses, drops connections, answers reads with an exception code, or swallows
requests; `stop_asset` / `start_asset` / `restart_asset` stop and restart one device on the
same port. The server is a small asyncio implementation rather than pymodbus's server so that
faults act on the wire exactly as described and a read costs one slice of a prepared image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import struct
import sys
import termios
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .model import TAGS, AnomalyKind, AssetKind, Plant, TagSpec

if TYPE_CHECKING:
    from edgefleet.protocols.modbus import ModbusSourceConfig

__all__ = [
    "HOLDING_ANOMALY_ACTIVE",
    "HOLDING_ANOMALY_KIND",
    "INPUT_ANOMALY_ACTIVE",
    "INPUT_ANOMALY_KIND",
    "INPUT_COUNTER",
    "INT16_BASE",
    "INT16_FULL_SCALE",
    "MODEL_REGISTERS",
    "ModbusFault",
    "ModbusRtuSimServer",
    "ModbusSimConfig",
    "ModbusSimServer",
    "RegisterEntry",
    "format_register_map",
    "int16_scale",
    "register_map",
    "sim_points",
]

log = logging.getLogger(__name__)

ByteOrder = Literal["big", "little"]

TAG_COUNT = 6
FLOAT_BASE = 0  # float32 block: tag i at 2*i
INT16_BASE = 12  # scaled int16 block: tag i at 12 + i
INT16_FULL_SCALE = 32767
INPUT_ANOMALY_KIND = HOLDING_ANOMALY_KIND = 18
INPUT_ANOMALY_ACTIVE = HOLDING_ANOMALY_ACTIVE = 19
INPUT_COUNTER = 20
MODEL_REGISTERS = 22  # registers 0..21 carry the model; the same in both tables
BIT_COUNT = 16  # coils and discrete inputs 0..15

# Exception codes (Modbus application protocol v1.1b3, section 7).
ILLEGAL_FUNCTION = 0x01
ILLEGAL_ADDRESS = 0x02
ILLEGAL_VALUE = 0x03
GATEWAY_TARGET_FAILED = 0x0B


class ModbusSimConfig(BaseModel):
    """How the simulated devices are served (the register map itself is fixed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    # Asset i (in the order given to the server) listens on base_port + i; 0 = any free port
    # per asset (kept across restarts of that asset).
    base_port: int = Field(default=0, ge=0, le=65535)
    unit_id: int = Field(default=1, ge=1, le=247)
    # float32 and uint32 layout: byte order inside a register, order of the two registers.
    byte_order: ByteOrder = "big"
    word_order: ByteOrder = "big"
    holding_registers: int = Field(default=100, ge=MODEL_REGISTERS, le=10_000)


@dataclass(frozen=True)
class ModbusFault:
    """A fault injected into one simulated device.

    `delay_s`: every response is sent this late. `drop`: connections are closed as soon as a
    request arrives (over RTU: the request is swallowed). `exception_code`: reads (FC1-4) are
    answered with this Modbus exception. `silent`: requests are read and never answered.
    """

    delay_s: float = 0.0
    drop: bool = False
    exception_code: int | None = None
    silent: bool = False


@dataclass(frozen=True)
class RegisterEntry:
    """One row of the documented register map."""

    table: Literal["input", "holding", "coil", "discrete"]
    address: int
    count: int  # registers (or bits) it spans
    data_type: str  # float32, int16, uint16, uint32, bool
    name: str  # tag name, or anomaly_kind / anomaly_active / update_counter / padding
    description: str
    tag_index: int | None = None  # index into TAGS[kind] for tag entries


def int16_scale(spec: TagSpec) -> tuple[float, float]:
    """(scale, offset) that turn the scaled int16 of `spec` back into engineering units."""
    return (spec.high - spec.low) / INT16_FULL_SCALE, spec.low


def sim_points(
    asset: str,
    kind: AssetKind,
    config: ModbusSimConfig | None = None,
    *,
    table: Literal["input", "holding"] = "input",
    encoding: Literal["float32", "int16"] = "float32",
    label: bool = True,
) -> list[dict[str, Any]]:
    """Source point definitions (`ModbusPointConfig` fields) for one asset of this map:
    its six tags from `table` in `encoding`, plus `anomaly_active` (coil 0) and
    `anomaly_kind` (register 18 of `table`) when `label` is set."""
    config = config or ModbusSimConfig()
    points: list[dict[str, Any]] = []
    for index, spec in enumerate(TAGS[kind]):
        if encoding == "float32":
            points.append({"asset": asset, "tag": spec.name, "register_type": table,
                           "address": FLOAT_BASE + 2 * index, "data_type": "float32",
                           "byte_order": config.byte_order, "word_order": config.word_order})
        else:
            scale, offset = int16_scale(spec)
            points.append({"asset": asset, "tag": spec.name, "register_type": table,
                           "address": INT16_BASE + index, "data_type": "int16",
                           "scale": scale, "offset": offset})
    if label:
        points.append({"asset": asset, "tag": "anomaly_active", "register_type": "coil",
                       "address": 0})
        points.append({"asset": asset, "tag": "anomaly_kind", "register_type": table,
                       "address": INPUT_ANOMALY_KIND, "data_type": "uint16"})
    return points


def _model_entries(table: Literal["input", "holding"]) -> list[RegisterEntry]:
    tag_names = [spec.name for spec in TAGS[AssetKind.PUMP]]
    entries = [
        RegisterEntry(table, FLOAT_BASE + 2 * i, 2, "float32", name,
                      f"{name} in engineering units, configured byte/word order", i)
        for i, name in enumerate(tag_names)
    ]
    entries += [
        RegisterEntry(table, INT16_BASE + i, 1, "int16", name,
                      f"{name} scaled: low..high -> 0..{INT16_FULL_SCALE}", i)
        for i, name in enumerate(tag_names)
    ]
    entries += [
        RegisterEntry(table, INPUT_ANOMALY_KIND, 1, "uint16", "anomaly_kind",
                      "AnomalyKind code of the running episode, 0 = normal"),
        RegisterEntry(table, INPUT_ANOMALY_ACTIVE, 1, "uint16", "anomaly_active",
                      "1 while an anomaly episode runs, else 0"),
        RegisterEntry(table, INPUT_COUNTER, 2, "uint32", "update_counter",
                      "model updates served (wraps), configured byte/word order"),
    ]
    return entries


def register_map(holding_registers: int = 100) -> list[RegisterEntry]:
    """The documented register map, the same for every asset kind (see the module doc)."""
    entries = _model_entries("input") + _model_entries("holding")
    entries.append(RegisterEntry("holding", MODEL_REGISTERS, holding_registers - MODEL_REGISTERS,
                                 "uint16", "padding", "always 0; writes are discarded"))
    entries.append(RegisterEntry("coil", 0, 1, "bool", "anomaly_active",
                                 "ground-truth label: an anomaly episode is running"))
    entries.append(RegisterEntry("coil", 1, BIT_COUNT - 1, "bool", "padding", "always 0"))
    entries.append(RegisterEntry("discrete", 0, 1, "bool", "anomaly_active",
                                 "same as coil 0"))
    entries.append(RegisterEntry("discrete", 1, BIT_COUNT - 1, "bool", "padding", "always 0"))
    return entries


def format_register_map(
    kind: AssetKind | None = None, config: ModbusSimConfig | None = None
) -> str:
    """The register map as a text table; with `kind`, units and int16 scaling per tag."""
    config = config or ModbusSimConfig()
    specs = TAGS[kind] if kind is not None else None
    header = (f"Modbus register map (unit id {config.unit_id}; 32-bit values: byte order "
              f"{config.byte_order}, word order {config.word_order}; addresses 0-based, "
              f"add 1 for mbpoll -r without -0)")
    if kind is not None:
        header += f"\nasset kind: {kind.value}"
    rows = [("table", "address", "type", "name", "description")]
    for entry in register_map(config.holding_registers):
        last = entry.address + entry.count - 1
        address = str(entry.address) if last == entry.address else f"{entry.address}-{last}"
        description = entry.description
        if specs is not None and entry.tag_index is not None:
            spec = specs[entry.tag_index]
            if entry.data_type == "int16":
                scale, offset = int16_scale(spec)
                description = (f"{spec.name} [{spec.unit}] = raw × {scale:.6g} + {offset:g} "
                               f"(range {spec.low:g}..{spec.high:g})")
            else:
                description = f"{spec.name} [{spec.unit}]"
        rows.append((entry.table, address, entry.data_type, entry.name, description))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [header]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4]))
                     + "  " + row[4])
    return "\n".join(lines)


# ---- encoding --------------------------------------------------------------------------


def _order_words(big_endian: bytes, byte_order: ByteOrder, word_order: ByteOrder) -> bytes:
    """Lay out a big-endian multi-register value as transmitted (register by register)."""
    words = [big_endian[i:i + 2] for i in range(0, len(big_endian), 2)]
    if word_order == "little":
        words.reverse()
    if byte_order == "little":
        words = [w[::-1] for w in words]
    return b"".join(words)


def _scaled_int16(value: float, spec: TagSpec) -> int:
    if not math.isfinite(value):
        return 0
    raw = round((value - spec.low) / (spec.high - spec.low) * INT16_FULL_SCALE)
    return min(INT16_FULL_SCALE, max(0, raw))


class _Device:
    """One simulated device's data: a prepared register image and its fault state."""

    def __init__(self, asset: str, kind: AssetKind, config: ModbusSimConfig) -> None:
        self.asset = asset
        self.kind = kind
        self.config = config
        self.specs = TAGS[kind]
        self.fault = ModbusFault()
        self.counter = 0
        # Registers as transmitted: 2 bytes each, big-endian on the wire.
        self.model = bytes(2 * MODEL_REGISTERS)
        self.padding = bytes(2 * (config.holding_registers - MODEL_REGISTERS))
        self.holding = self.model + self.padding
        self.bits = bytes(BIT_COUNT)  # one 0/1 byte per coil (= discrete input)
        self.requests = 0

    def update(self, values: dict[str, float], status: AnomalyKind) -> None:
        order = (self.config.byte_order, self.config.word_order)
        parts = [_order_words(struct.pack(">f", values[spec.name]), *order)
                 for spec in self.specs]
        parts.append(struct.pack(">6H", *(_scaled_int16(values[spec.name], spec)
                                          for spec in self.specs)))
        active = int(status != AnomalyKind.NONE)
        parts.append(struct.pack(">HH", int(status), active))
        self.counter = (self.counter + 1) & 0xFFFFFFFF
        parts.append(_order_words(struct.pack(">I", self.counter), *order))
        self.model = b"".join(parts)
        self.holding = self.model + self.padding
        self.bits = bytes((active,)) + bytes(BIT_COUNT - 1)

    def handle(self, pdu: bytes) -> bytes:
        """Answer one request PDU (function code + data) with a response PDU."""
        self.requests += 1
        if not pdu:
            return bytes((0x80, ILLEGAL_FUNCTION))
        function = pdu[0]
        if function in (1, 2, 3, 4):
            if len(pdu) != 5:
                return bytes((function | 0x80, ILLEGAL_VALUE))
            if self.fault.exception_code is not None:
                return bytes((function | 0x80, self.fault.exception_code))
            address, count = struct.unpack_from(">HH", pdu, 1)
            if function in (1, 2):
                return self._read_bits(function, address, count)
            image = self.holding if function == 3 else self.model
            if not 1 <= count <= 125:
                return bytes((function | 0x80, ILLEGAL_VALUE))
            if address + count > len(image) // 2:
                return bytes((function | 0x80, ILLEGAL_ADDRESS))
            return bytes((function, 2 * count)) + image[2 * address:2 * (address + count)]
        if function in (5, 6):
            if len(pdu) != 5:
                return bytes((function | 0x80, ILLEGAL_VALUE))
            address = struct.unpack_from(">H", pdu, 1)[0]
            limit = BIT_COUNT if function == 5 else len(self.holding) // 2
            if address >= limit:
                return bytes((function | 0x80, ILLEGAL_ADDRESS))
            return pdu  # echo: acknowledged, discarded
        if function in (15, 16):
            if len(pdu) < 6:
                return bytes((function | 0x80, ILLEGAL_VALUE))
            address, count = struct.unpack_from(">HH", pdu, 1)
            limit = BIT_COUNT if function == 15 else len(self.holding) // 2
            if count < 1 or address + count > limit:
                return bytes((function | 0x80, ILLEGAL_ADDRESS))
            return pdu[:5]
        return bytes((function | 0x80, ILLEGAL_FUNCTION))

    def _read_bits(self, function: int, address: int, count: int) -> bytes:
        if not 1 <= count <= 2000:
            return bytes((function | 0x80, ILLEGAL_VALUE))
        if address + count > BIT_COUNT:
            return bytes((function | 0x80, ILLEGAL_ADDRESS))
        bits = self.bits[address:address + count]
        packed = bytearray((count + 7) // 8)
        for i, bit in enumerate(bits):
            if bit:
                packed[i // 8] |= 1 << (i % 8)
        return bytes((function, len(packed))) + bytes(packed)


# ---- TCP -------------------------------------------------------------------------------


class _TcpConnection(asyncio.Protocol):
    """One client connection to one device: MBAP framing around `_Device.handle`."""

    def __init__(self, endpoint: _TcpEndpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.endpoint.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 7 and self.transport is not None:
            tid, pid, length, unit = struct.unpack_from(">HHHB", self.buffer)
            if pid != 0 or not 2 <= length <= 254:  # not Modbus: drop the connection
                self.transport.abort()
                return
            if len(self.buffer) < 6 + length:
                return
            pdu = self.buffer[7:6 + length]
            self.buffer = self.buffer[6 + length:]
            self._answer(tid, unit, pdu)

    def _answer(self, tid: int, unit: int, pdu: bytes) -> None:
        device = self.endpoint.device
        fault = device.fault
        assert self.transport is not None
        if fault.drop:
            self.buffer = b""
            self.transport.abort()
            return
        if fault.silent:
            return
        if unit in (device.config.unit_id, 0, 255):
            response = device.handle(pdu)
        else:
            response = bytes(((pdu[0] if pdu else 0) | 0x80, GATEWAY_TARGET_FAILED))
        frame = struct.pack(">HHHB", tid, 0, len(response) + 1, unit) + response
        if fault.delay_s > 0:
            asyncio.get_running_loop().call_later(fault.delay_s, self._write, frame)
        else:
            self.transport.write(frame)

    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)


class _TcpEndpoint:
    def __init__(self, device: _Device, host: str, port: int) -> None:
        self.device = device
        self.host = host
        self.port = port
        self.server: asyncio.Server | None = None
        self.connections: set[_TcpConnection] = set()

    async def start(self) -> None:
        if self.server is not None:
            return
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _TcpConnection(self), self.host, self.port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        self.connections.clear()
        await server.wait_closed()


class ModbusSimServer:
    """Serves each of `assets` as its own Modbus TCP device (ProtocolServer)."""

    name = "modbus"

    def __init__(
        self, config: ModbusSimConfig, plant: Plant, assets: Sequence[str] | None = None
    ) -> None:
        self.config = config
        names = list(assets) if assets is not None else list(plant.assets)
        unknown = [name for name in names if name not in plant.assets]
        if unknown:
            raise ValueError(f"unknown assets for the Modbus simulator: {unknown}")
        self._endpoints: dict[str, _TcpEndpoint] = {}
        for index, name in enumerate(names):
            device = _Device(name, plant.assets[name].kind, config)
            device.update(plant.values(name), plant.status(name))
            port = config.base_port + index if config.base_port else 0
            self._endpoints[name] = _TcpEndpoint(device, config.host, port)

    @property
    def assets(self) -> list[str]:
        return list(self._endpoints)

    @property
    def endpoints(self) -> dict[str, tuple[str, int]]:
        """(host, port) of every asset; ports are known once `start()` has returned."""
        return {name: (ep.host, ep.port) for name, ep in self._endpoints.items()}

    def kind(self, asset: str) -> AssetKind:
        return self._endpoints[asset].device.kind

    def requests(self, asset: str) -> int:
        """Requests the asset's device has answered (or swallowed) so far."""
        return self._endpoints[asset].device.requests

    def source_config(
        self,
        *,
        timeout_s: float = 1.0,
        table: Literal["input", "holding"] = "input",
        encoding: Literal["float32", "int16"] = "float32",
        **source: Any,
    ) -> ModbusSourceConfig:
        """A `ModbusSourceConfig` that reads every asset of this server by the documented
        map (after `start()`, when the ports are known). Extra keywords go to the config."""
        from edgefleet.protocols.modbus import ModbusSourceConfig

        devices = [{"name": name, "host": ep.host, "port": ep.port,
                    "unit_id": self.config.unit_id, "timeout_s": timeout_s}
                   for name, ep in self._endpoints.items()]
        points = [point for name, ep in self._endpoints.items()
                  for point in sim_points(name, ep.device.kind, self.config, table=table,
                                          encoding=encoding)]
        return ModbusSourceConfig.model_validate(
            {"devices": devices, "points": points, **source})

    async def start(self) -> None:
        try:
            for endpoint in self._endpoints.values():
                await endpoint.start()
        except BaseException:
            await self.stop()
            raise

    def update(self, plant: Plant) -> None:
        for name, endpoint in self._endpoints.items():
            endpoint.device.update(plant.values(name), plant.status(name))

    async def stop(self) -> None:
        for endpoint in self._endpoints.values():
            await endpoint.stop()

    # ---- fault injection ----------------------------------------------------------------

    def set_fault(self, asset: str, fault: ModbusFault) -> None:
        self._endpoints[asset].device.fault = fault

    def clear_fault(self, asset: str | None = None) -> None:
        for name, endpoint in self._endpoints.items():
            if asset is None or name == asset:
                endpoint.device.fault = ModbusFault()

    async def stop_asset(self, asset: str) -> None:
        """Close the asset's listening socket and its connections (the PLC goes away)."""
        await self._endpoints[asset].stop()

    async def start_asset(self, asset: str) -> None:
        """Listen again, on the same port as before."""
        await self._endpoints[asset].start()

    async def restart_asset(self, asset: str) -> None:
        await self.stop_asset(asset)
        await self.start_asset(asset)


# ---- RTU over a pseudo-terminal --------------------------------------------------------


def crc16(frame: bytes) -> int:
    """Modbus RTU CRC-16 (poly 0xA001, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for byte in frame:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def _rtu_request_length(buffer: bytes) -> int | None:
    """Length of the request frame at the start of `buffer`, None if not yet known."""
    if len(buffer) < 2:
        return None
    function = buffer[1]
    if function in (1, 2, 3, 4, 5, 6):
        return 8
    if function in (15, 16):
        return None if len(buffer) < 7 else 9 + buffer[6]
    return 0  # unknown function: resynchronise


class ModbusRtuSimServer:
    """Serves one asset as a Modbus RTU slave on a pseudo-terminal (ProtocolServer).

    After `start()`, `slave_path` is the serial port a client opens (any baud rate works on
    a pty). Faults: `delay_s`, `exception_code` and `silent` act as over TCP; `drop` swallows
    the request, since a serial line has no connection to close.
    """

    name = "modbus-rtu"

    def __init__(self, config: ModbusSimConfig, plant: Plant, asset: str) -> None:
        if asset not in plant.assets:
            raise ValueError(f"unknown asset for the Modbus RTU simulator: {asset!r}")
        self.config = config
        self.asset = asset
        self.device = _Device(asset, plant.assets[asset].kind, config)
        self.device.update(plant.values(asset), plant.status(asset))
        self.slave_path = ""
        self._master: int | None = None
        self._slave: int | None = None
        self._buffer = b""
        self._last_byte = 0.0

    async def start(self) -> None:
        if self._master is not None:
            return
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)  # no echo, no line editing, 8-bit clean
        os.set_blocking(master, False)
        # Holding the slave end open keeps the master readable (no EIO) between clients.
        self._master, self._slave = master, slave
        self.slave_path = os.ttyname(slave)
        asyncio.get_running_loop().add_reader(master, self._readable)

    def update(self, plant: Plant) -> None:
        self.device.update(plant.values(self.asset), plant.status(self.asset))

    async def stop(self) -> None:
        master, slave = self._master, self._slave
        self._master = self._slave = None
        if master is not None:
            asyncio.get_running_loop().remove_reader(master)
            os.close(master)
        if slave is not None:
            os.close(slave)

    def set_fault(self, fault: ModbusFault) -> None:
        self.device.fault = fault

    def clear_fault(self) -> None:
        self.device.fault = ModbusFault()

    def _readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError:  # the pty went away
            return
        now = time.monotonic()
        if now - self._last_byte > 0.05:  # a silence longer than t3.5 starts a new frame
            self._buffer = b""
        self._last_byte = now
        self._buffer += data
        while True:
            length = _rtu_request_length(self._buffer)
            if length is None or len(self._buffer) < length:
                return
            if length == 0:
                self._buffer = b""
                return
            frame, self._buffer = self._buffer[:length], self._buffer[length:]
            if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                self._buffer = b""  # corrupted: drop everything, resync on silence
                return
            self._answer(frame[0], frame[1:-2])

    def _answer(self, unit: int, pdu: bytes) -> None:
        fault = self.device.fault
        if unit != self.config.unit_id or fault.drop or fault.silent:
            return  # other slaves' traffic, broadcasts and swallowed requests get no answer
        body = bytes((unit,)) + self.device.handle(pdu)
        frame = body + crc16(body).to_bytes(2, "little")
        if fault.delay_s > 0:
            asyncio.get_running_loop().call_later(fault.delay_s, self._write, frame)
        else:
            self._write(frame)

    def _write(self, frame: bytes) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.write(self._master, frame)


# ---- standalone: `python -m edgefleet.firmware_sim.modbus_server` ----------------------


async def _serve(args: argparse.Namespace) -> None:
    kinds = list(AssetKind)
    assets = [(f"{args.prefix}{i:03d}", kinds[i % len(kinds)]) for i in range(args.assets)]
    plant = Plant(assets, seed=args.seed, start_ns=time.time_ns(), anomaly_rate=0.05)
    config = ModbusSimConfig(host=args.host, base_port=args.base_port,
                             byte_order=args.byte_order, word_order=args.word_order)
    server = ModbusSimServer(config, plant)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ready = {"endpoints": {name: [host, port] for name, (host, port) in server.endpoints.items()},
             "kinds": {name: kind.value for name, kind in assets}}
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    try:
        while not stop.is_set():
            plant.advance_to(time.time_ns())
            server.update(plant)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=args.update_period)
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve `--assets` simulated devices until SIGTERM; print their endpoints as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--assets", type=int, default=3)
    parser.add_argument("--prefix", default="asset")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=0)
    parser.add_argument("--byte-order", choices=("big", "little"), default="big")
    parser.add_argument("--word-order", choices=("big", "little"), default="big")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--update-period", type=float, default=0.1)
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
