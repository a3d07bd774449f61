"""What a simulated protocol server is, as the simulator runner drives it.

The runner owns the clock and the `Plant`: every tick it advances the model and then calls
`update(plant)` on each server, which copies the values of the assets it serves into its
protocol's data model (Modbus registers, OPC UA nodes, MQTT publications). Servers own
their sockets and nothing else; they never advance the plant themselves.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .model import Plant

__all__ = ["ProtocolServer"]


@runtime_checkable
class ProtocolServer(Protocol):
    name: str

    async def start(self) -> None:
        """Bind and start serving; return once clients can connect."""
        ...

    def update(self, plant: Plant) -> None:
        """Copy the current values and status of this server's assets. Must be quick
        (it runs on the event loop every tick) and must not block on clients."""
        ...

    async def stop(self) -> None:
        """Stop serving and release every socket and task."""
        ...
