"""Source configuration: one list of sources, each discriminated by its `type:`.

```yaml
sources:
  - type: modbus
    name: line-1-plcs
    devices: [...]
    points: [...]
  - type: opcua
    endpoint: opc.tcp://10.0.0.5:4840
    nodes: [...]
  - type: mqtt
    broker_url: mqtts://gateway:8883
    subscriptions: [...]
  - type: synthetic        # no device: a fixed-rate generator for smoke tests and benches
    assets: 4
    rows_per_s: 10
```

Every config class is frozen and forbids unknown keys, so a typo is an error at load, not
a silently ignored setting. `load_sources` reports every problem with the source's position
and name and the field's path.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from .modbus import ModbusSourceConfig
from .mqtt import MqttSourceConfig
from .opcua import OpcUaSourceConfig
from .synthetic import SyntheticSourceConfig

__all__ = ["SourceConfig", "SourceConfigError", "load_sources"]

SourceConfig = Annotated[
    ModbusSourceConfig | OpcUaSourceConfig | MqttSourceConfig | SyntheticSourceConfig,
    Field(discriminator="type"),
]
_SOURCES: TypeAdapter[list[SourceConfig]] = TypeAdapter(list[SourceConfig])


class SourceConfigError(ValueError):
    """Invalid source configuration; the message names each source and field at fault."""


def load_sources(data: Any) -> list[SourceConfig]:
    """Validate a list of source configs (parsed YAML/JSON) and check names are unique."""
    try:
        sources = _SOURCES.validate_python(data)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            loc = list(error["loc"])
            where = f"sources[{loc[0]}]" if loc and isinstance(loc[0], int) else "sources"
            if loc and isinstance(loc[0], int) and isinstance(data, list):
                entry = data[loc[0]] if loc[0] < len(data) else None
                if isinstance(entry, dict) and "name" in entry:
                    where += f" ({entry['name']!r})"
            # loc[1] is the discriminator's tag (e.g. "modbus"); the rest is the field path.
            # A config's own validator reports at the model level with a message that
            # already names the field, so there is no path to add then.
            message = error["msg"].removeprefix("Value error, ")
            if len(loc) > 2:
                message = f"{'.'.join(str(part) for part in loc[2:])}: {message}"
            elif len(loc) < 2:
                message = f"type: {message}"
            problems.append(f"{where}: {message}")
        raise SourceConfigError("; ".join(problems)) from err
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceConfigError(f"source names must be unique; repeated: {', '.join(repeated)}")
    return sources
