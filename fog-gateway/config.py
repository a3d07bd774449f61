"""The fog gateway's configuration file, `fog.yaml`, validated whole at load.

```yaml
listen: {host: 0.0.0.0, port: 8080}
tokens_file: tokens.json                 # `edgefleet fog add-device NAME` writes it
store: sqlite:///var/lib/edgefleet/fog.db  # or postgresql://user@host/db (password: env)
kafka:                                   # absent: embedded mode, ingest writes the store
  bootstrap: 127.0.0.1:9092
  partitions: 6
sink: {workers: 2}                       # consumer threads in this process (0: none)
mqtt:                                    # optional bridge from the broker the agents use
  url: mqtt://127.0.0.1:1883
  username: fog
  password_file: mqtt-password           # or $EDGEFLEET_FOG_MQTT_PASSWORD
```

Relative paths (and `sqlite:` store paths) are resolved against the folder holding the
file. Secrets are never in the defaults: the database password comes with the URL from
the environment (`EDGEFLEET_FOG_STORE`, used when the file sets no `store`), the MQTT
password from a file or `EDGEFLEET_FOG_MQTT_PASSWORD`. Every fault is reported as
`<dotted.path>: <message>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

__all__ = [
    "FogConfig",
    "FogConfigError",
    "KafkaSection",
    "LimitsSection",
    "ListenSection",
    "MqttBridgeSection",
    "SinkSection",
    "load_fog_config",
]

Port = Annotated[int, Field(ge=0, le=65535)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenSection(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080


class KafkaSection(_Section):
    bootstrap: Annotated[str, Field(min_length=1)]
    partitions: Annotated[int, Field(ge=1, le=1024)] = 6
    queue_max_messages: Annotated[int, Field(ge=1000)] = 100_000
    message_timeout_ms: Annotated[int, Field(ge=1000, le=300_000)] = 10_000


class SinkSection(_Section):
    workers: Annotated[int, Field(ge=0, le=64)] = 1
    group_id: str = "edgefleet-sink"


class MqttBridgeSection(_Section):
    url: Annotated[str, Field(pattern=r"^mqtts?://")]
    prefix: str = "edgefleet/devices"  # where device accounts may publish
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    shared_group: str = "edgefleet-fog"

    def read_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return os.environ.get("EDGEFLEET_FOG_MQTT_PASSWORD")


class LimitsSection(_Section):
    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024**2
    max_decoded_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024**2
    max_in_flight: Annotated[int, Field(ge=1, le=10_000)] = 64
    max_pending_rows: Annotated[int, Field(ge=10_000)] = 500_000  # embedded mode's queue
    # Seq ranges remembered per device to answer replays 409 (0: off, the store dedupes).
    replay_ranges_per_device: Annotated[int, Field(ge=0, le=1_000_000)] = 4096


class FogConfig(_Section):
    listen: ListenSection = ListenSection()
    tokens_file: Path = Path("tokens.json")
    store: Annotated[str, Field(pattern=r"^(sqlite:|postgres(ql)?://)")] = "sqlite:fog.db"
    kafka: KafkaSection | None = None
    sink: SinkSection = SinkSection()
    mqtt: MqttBridgeSection | None = None
    limits: LimitsSection = LimitsSection()
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def describe(self) -> str:
        mode = (f"Kafka {self.kafka.bootstrap} ({self.kafka.partitions} partitions), "
                f"{self.sink.workers} sink worker(s)" if self.kafka else
                "embedded (no Kafka: ingest writes the store)")
        bridge = f"; MQTT bridge from {self.mqtt.url}" if self.mqtt else ""
        store = self.store.split("@")[-1] if "@" in self.store else self.store
        return (f"listening on http://{self.listen.host}:{self.listen.port}/v1/ingest; "
                f"{mode}; store {store}; tokens {self.tokens_file}{bridge}")


class FogConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _resolve(config: FogConfig, base: Path) -> FogConfig:
    updates: dict[str, Any] = {}
    if not config.tokens_file.is_absolute():
        updates["tokens_file"] = base / config.tokens_file
    store = config.store
    if store.startswith("sqlite:") and not store.startswith("sqlite:///"):
        store = "sqlite:///" + str(base / store.removeprefix("sqlite:"))
    updates["store"] = store
    if config.mqtt is not None and config.mqtt.password_file is not None:
        path = config.mqtt.password_file
        if not path.is_absolute():
            updates["mqtt"] = config.mqtt.model_copy(update={"password_file": base / path})
    return config.model_copy(update=updates)


def load_fog_config(path: Path | None, overrides: dict[str, Any] | None = None) -> FogConfig:
    """Load `path` (None: all defaults, relative to the working directory), apply
    `overrides` (top-level keys, e.g. from the command line) and validate."""
    document: Any = {}
    base = Path.cwd()
    if path is not None:
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise FogConfigError([f"{path}: {err.strerror or err}"]) from None
        except yaml.YAMLError as err:
            raise FogConfigError([f"{path}: invalid YAML: {err}"]) from None
        if not isinstance(document, dict):
            raise FogConfigError([f"{path}: expected a mapping at the top"])
        base = path.resolve().parent
    if "store" not in document and os.environ.get("EDGEFLEET_FOG_STORE"):
        document["store"] = os.environ["EDGEFLEET_FOG_STORE"]
    document = {**document, **(overrides or {})}
    try:
        config = FogConfig.model_validate(document)
    except ValidationError as err:
        raise FogConfigError([
            f"{'.'.join(str(part) for part in e['loc']) or '(top)'}: {e['msg']}"
            for e in err.errors()
        ]) from None
    return _resolve(config, base)
