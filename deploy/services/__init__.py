"""The local real-services launcher behind `edgefleet services`.

PostgreSQL, Mosquitto, a Kafka-protocol broker, S3, MLflow and Prometheus, each on a
free loopback port with its data under one folder. Tests use it through fixtures, so
integration tests talk to the same real servers a user starts by hand.
"""

from .base import APT_PACKAGES, LauncherError, MissingBinary, NotReady
from .launcher import DEFAULT_DIR, STACK, Launcher, ServiceStatus, format_exports
from .prometheus import register_target

__all__ = [
    "APT_PACKAGES",
    "DEFAULT_DIR",
    "STACK",
    "Launcher",
    "LauncherError",
    "MissingBinary",
    "NotReady",
    "ServiceStatus",
    "format_exports",
    "register_target",
]
