"""A scenario: which assets the plant has, how each is served, and how the plant behaves.

Written as YAML (`edgefleet sim --scenario plant.yaml`) or generated from the command line
(`edgefleet sim --assets 20 --protocols modbus,opcua,mqtt`). Example:

```yaml
seed: 7
anomaly_rate: 0.05        # share of each asset's time spent in an anomaly episode
tick_s: 0.1               # simulated seconds per model step
time_scale: 1.0           # simulated seconds per wall second
labels: labels.jsonl      # ground-truth episode starts and ends
assets:
  - {name: pump-01, kind: pump, protocol: modbus}
  - {name: compressor-01, kind: compressor, protocol: opcua}
  - {name: conveyor-01, kind: conveyor, protocol: mqtt}
modbus: {byte_order: big, word_order: big}
mqtt: {broker: "mqtt://user:password@127.0.0.1:1883"}
```
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .modbus_server import ModbusSimConfig
from .model import AssetKind, LabelEvent, Plant
from .mqtt_publisher import MqttSimConfig
from .opcua_server import OpcUaSimConfig

__all__ = ["PROTOCOLS", "AssetConfig", "Scenario", "ScenarioError"]

Protocol = Literal["modbus", "opcua", "mqtt"]
PROTOCOLS: tuple[Protocol, ...] = ("modbus", "opcua", "mqtt")
AssetName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ScenarioError(ValueError):
    """A scenario that cannot be loaded; the message names the file and the field."""


class AssetConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: AssetName
    kind: AssetKind
    protocol: Protocol


class Scenario(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 7
    anomaly_rate: float = Field(0.05, ge=0, lt=1)
    tick_s: float = Field(0.1, gt=0, le=60)
    time_scale: float = Field(1.0, gt=0, le=100_000)
    start_ns: int | None = Field(None, ge=0, description="simulated start; default: now")
    labels: Path | None = None
    assets: list[AssetConfig] = Field(min_length=1, max_length=1000)
    modbus: ModbusSimConfig = ModbusSimConfig()
    opcua: OpcUaSimConfig = OpcUaSimConfig()
    mqtt: MqttSimConfig | None = None  # needs a broker; see `edgefleet sim --mqtt-url`

    @model_validator(mode="after")
    def _unique_names(self) -> Scenario:
        names = [asset.name for asset in self.assets]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"asset names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @classmethod
    def generate(
        cls,
        assets: int,
        protocols: list[str],
        *,
        anomaly_rate: float = 0.05,
        seed: int = 7,
        **options: object,
    ) -> Scenario:
        """`assets` machines, kinds and protocols assigned round-robin."""
        unknown = sorted(set(protocols) - set(PROTOCOLS))
        if unknown or not protocols:
            raise ScenarioError(
                f"unknown protocol(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(PROTOCOLS)}"
            )
        kinds = list(AssetKind)
        members = [
            {"name": f"{kinds[i % len(kinds)].value}-{i + 1:02d}", "kind": kinds[i % len(kinds)],
             "protocol": protocols[i % len(protocols)]}
            for i in range(assets)
        ]
        return cls.parse({"assets": members, "anomaly_rate": anomaly_rate, "seed": seed,
                          **options}, "command line")

    @classmethod
    def parse(cls, data: object, origin: str) -> Scenario:
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or '(top)'}: {error['msg']}"
                for error in err.errors()
            )
            raise ScenarioError(f"{origin}: {problems}") from err

    @classmethod
    def from_yaml(cls, path: Path) -> Scenario:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ScenarioError(f"{path}: {err}") from err
        return cls.parse(data, str(path))

    def assets_on(self, protocol: str) -> list[str]:
        return [asset.name for asset in self.assets if asset.protocol == protocol]

    def build_plant(self, label_sink: Callable[[LabelEvent], None] | None = None) -> Plant:
        return Plant(
            [(asset.name, asset.kind) for asset in self.assets],
            seed=self.seed,
            anomaly_rate=self.anomaly_rate,
            start_ns=self.start_ns if self.start_ns is not None else time.time_ns(),
            tick_s=self.tick_s,
            label_sink=label_sink,
        )
