"""The agent's one configuration file: `agent.yaml`, validated whole at load.

```yaml
device: edge-01                    # this gateway's name on the wire (an identifier)
sources:                           # protocols.config.load_sources: one or more
  - type: modbus
    name: line-1
    devices: [{name: pump-01, host: 127.0.0.1, port: 5020}]
    points: [{asset: pump-01, tag: flow, register_type: input, address: 2,
              data_type: float32}]
buffer: {path: buffer.db, max_bytes: 1073741824, when_full: block}
fog: {url: "http://127.0.0.1:8080/v1/ingest"}   # token: $EDGEFLEET_FOG_TOKEN
# optional, one of: fleet: {...} (the control plane pushes models) or
# model_source: {mlflow: {tracking_uri: "https://mlflow:5000", model: "models:/NAME@champion"}}
```

docs/agent.md is the full reference; deploy/agent.example.yaml a complete, valid example.

Contracts
---------
* Every config class is frozen and forbids unknown keys: a typo is an error at load,
  never a silently ignored setting.
* `load_agent_config(path)` returns an `AgentConfig` or raises `AgentConfigError`, whose
  `problems` list every fault found, each as `<path>: <message>` where the path is dotted
  from the top of the file (`buffer.max_bytes`, `model.assets[0]`, `fog.url`), and source
  problems carry `load_sources`' own location (`sources[0] ('line-1'): device 'pump-01':
  points[2] (pump-01.flow): address: …`). YAML syntax errors name the line and column;
  a missing, unreadable or empty file is one problem naming the file.
* Relative file paths (the buffer file, the model, `state_dir`, and every path-typed
  setting of the fog, alerts, fleet, model_source and source sections) are resolved
  against the folder holding the config file, so an agent reads the same files whatever
  its working directory.
* Where models come from: `model` alone (a fixed file), `fleet` (the control plane's
  rollouts, signed) or `model_source` (standalone: an MLflow alias, checksum-verified);
  `fleet` and `model_source` exclude each other.
* Secrets: the fog token may be left out of the file and given in the environment as
  `EDGEFLEET_FOG_TOKEN` (used only when the file sets neither `fog.token` nor
  `fog.token_file`). There are no default tokens or passwords.
* No I/O in the models themselves; `load_agent_config` does the file reading and the
  checks that need the filesystem (the model file must exist).
"""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edgefleet.protocols.config import SourceConfig, SourceConfigError, load_sources
from edgefleet.protocols.mqtt import parse_broker_url
from edgefleet.protocols.source import NAME_PATTERN

from .buffer import BufferConfig
from .fleet import FleetConfig
from .forwarder import FogConfig
from .standalone import MlflowSourceConfig, ModelSourceConfig

__all__ = [
    "FOG_TOKEN_ENV",
    "AgentConfig",
    "AgentConfigError",
    "AlertsConfig",
    "HeartbeatConfig",
    "MetricsConfig",
    "ModelConfig",
    "load_agent_config",
]

FOG_TOKEN_ENV: Final = "EDGEFLEET_FOG_TOKEN"  # noqa: S105 - the variable's name
# wire.IDENTIFIER_PATTERN spelled for pydantic's regex engine (see protocols.source).
Identifier = Annotated[str, Field(pattern=NAME_PATTERN)]


class ModelConfig(BaseModel):
    """A local ONNX model to run on the collected windows (see edge-agent/inference.py).

    `threshold` overrides the bundle's own (the score above which a window is an
    anomaly); `assets` restricts inference to these assets (default: every asset whose
    tags the model's feature spec needs).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None
    assets: Annotated[tuple[Identifier, ...], Field(min_length=1)] | None = None

    @field_validator("path")
    @classmethod
    def _onnx_file(cls, value: Path) -> Path:
        if value.suffix != ".onnx":
            raise ValueError(f"must name an .onnx file, not {value.name!r}")
        return value


class HeartbeatConfig(BaseModel):
    """How often the agent reports on itself. Each heartbeat is stored in the buffer as
    readings of asset `asset` (durable, forwarded like data) and sent as a wire
    `Heartbeat` (see edge-agent/heartbeat.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: Annotated[float, Field(ge=1, le=3600)] = 10.0
    asset: Identifier = "agent"


class MetricsConfig(BaseModel):
    """The local `/metrics` (Prometheus) and `/healthz` endpoint. Port 0 picks a free
    port (logged, and reported by `MetricsServer.port`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9108


class AlertsConfig(BaseModel):
    """Where anomaly alerts go, besides the inference readings that always travel to the
    fog: an MQTT topic on a local broker (QoS 1) and/or a webhook (HTTP POST of JSON).
    Neither set: no alerts. `topic` may contain `{device}`. The MQTT URL may hold a login
    (`mqtt://user:password@host:1883`, or `mqtt_username`/`mqtt_password`), so it is a
    secret and never printed. Each target has a queue of `queue_max` alerts; when it is
    full the newest alert is dropped and counted (`alerts_dropped`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mqtt_url: SecretStr | None = None
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    ca_file: Path | None = None  # mqtts:// only: the broker's CA (default: the system's)
    topic: Annotated[str, Field(min_length=1, max_length=1024)] = "edgefleet/{device}/alerts"
    mqtt_ack_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    webhook_url: str | None = None
    webhook_timeout_s: Annotated[float, Field(gt=0, le=300)] = 5.0
    webhook_max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    backoff_initial_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    backoff_cap_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    queue_max: Annotated[int, Field(ge=1, le=1_000_000)] = 1000

    @model_validator(mode="after")
    def _check(self) -> AlertsConfig:
        problems = []
        if self.mqtt_url is not None:
            try:
                address = parse_broker_url(self.mqtt_url.get_secret_value())
            except ValueError as err:
                problems.append(f"mqtt_url: {err}")
            else:
                if self.ca_file is not None and not address.tls:
                    problems.append("ca_file: set for a plain mqtt:// broker (use mqtts://)")
        if self.mqtt_password is not None and self.mqtt_username is None:
            problems.append("mqtt_password: set without mqtt_username")
        try:
            topic = self.topic.format(device="device")
        except (KeyError, IndexError, ValueError):
            problems.append("topic: the only placeholder allowed is {device}")
        else:
            if "+" in topic or "#" in topic or "\0" in topic:
                problems.append("topic: a topic to publish to has no wildcards (+, #)")
        if self.webhook_url is not None and not self.webhook_url.startswith(
            ("http://", "https://")
        ):
            problems.append("webhook_url: must start with http:// or https://")
        if self.backoff_cap_s < self.backoff_initial_s:
            problems.append("backoff_cap_s: must be >= backoff_initial_s")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def enabled(self) -> bool:
        return self.mqtt_url is not None or self.webhook_url is not None

    def topic_for(self, device: str) -> str:
        return self.topic.format(device=device)


class AgentConfig(BaseModel):
    """Everything one agent process runs with; see the module docstring and docs/agent.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Identifier
    sources: Annotated[tuple[SourceConfig, ...], Field(min_length=1)]
    buffer: BufferConfig
    model: ModelConfig | None = None
    fog: FogConfig
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    metrics: MetricsConfig = MetricsConfig()
    alerts: AlertsConfig = AlertsConfig()
    # The control plane's device API (edge-agent/fleet.py): models pushed to the fleet,
    # verified, shadowed and swapped in. None: run `model` only.
    fleet: FleetConfig | None = None
    # Standalone mode (edge-agent/standalone.py): follow models:/NAME@ALIAS on an MLflow
    # tracking server, checksum-verified, shadowed and swapped in. Excludes `fleet`.
    model_source: ModelSourceConfig | None = None
    # Where the agent keeps state other than the buffer (models it was sent, the applied
    # desired-state generation). None: the buffer file's folder.
    state_dir: Path | None = None
    # On SIGTERM: how long to keep forwarding what is buffered before exiting.
    drain_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("sources", mode="before")
    @classmethod
    def _load_sources(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and value and all(
            isinstance(item, BaseModel) for item in value
        ):
            return value  # already validated (built in Python)
        if not isinstance(value, list | tuple):
            raise PydanticCustomError(
                "list_type", "must be a list of sources, got {kind}", {"kind": _kind(value)}
            )
        try:
            return load_sources(value)
        except SourceConfigError as err:
            # A custom error type, so the loader can split it back into one problem each.
            raise PydanticCustomError("source_config", "{detail}", {"detail": str(err)}) from None

    @model_validator(mode="after")
    def _one_model_source(self) -> AgentConfig:
        if self.fleet is not None and self.model_source is not None:
            # One line: the loader splits a validator's message on "; ".
            raise ValueError("model_source: set together with fleet (an agent gets its models "
                             "from the control plane or from MLflow by itself: choose one)")
        return self

    @property
    def effective_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.buffer.path.parent


def _kind(value: Any) -> str:
    names = {dict: "a mapping", str: "a string", type(None): "nothing"}
    return names.get(type(value), f"a {type(value).__name__}")


class AgentConfigError(ValueError):
    """An agent config that cannot be used. `problems` holds one `<path>: <message>` per
    fault; the message lists them under the file's name."""

    def __init__(self, origin: str, problems: Sequence[str]) -> None:
        self.origin = origin
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{origin}: invalid agent config ({count} problem{'s' if count != 1 else ''})"
        super().__init__(head + "".join(f"\n  {problem}" for problem in self.problems))


# ---- loading ---------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last
    one silently, which would hide a typo-level mistake)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            repeated = key in seen
        except TypeError:  # an unhashable key: let the constructor report it
            continue
        if repeated:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{context}: {problem}" if context and "duplicate key" not in problem else problem
    if mark is not None:
        return f"YAML syntax, line {mark.line + 1}, column {mark.column + 1}: {text}"
    return f"YAML syntax: {text}"


def load_agent_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Read, resolve and validate an agent config file (see the module docstring).

    `environ` (default `os.environ`) supplies `EDGEFLEET_FOG_TOKEN`."""
    file = Path(path)
    origin = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AgentConfigError(origin, ["(file): no such file"]) from None
    except IsADirectoryError:
        raise AgentConfigError(origin, ["(file): is a folder, not a config file"]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise AgentConfigError(origin, [f"(file): cannot read: {err}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise AgentConfigError(origin, [_yaml_problem(err)]) from None
    if data is None:
        raise AgentConfigError(origin, ["(file): the file is empty"])
    if not isinstance(data, dict):
        raise AgentConfigError(
            origin, [f"(top): expected a mapping of settings, got a {type(data).__name__}"]
        )
    base = file.resolve().parent
    data = _prepare(data, base, os.environ if environ is None else environ)
    return _validate(data, origin)


def parse_agent_config(
    data: Any,
    *,
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    origin: str = "agent config",
) -> AgentConfig:
    """Validate already-parsed settings (a dict, as YAML gives it) like `load_agent_config`
    does, with relative paths resolved against `base_dir` (default: left as they are)."""
    if not isinstance(data, dict):
        raise AgentConfigError(
            origin, [f"(top): expected a mapping of settings, got a {type(data).__name__}"]
        )
    if base_dir is not None:
        data = _prepare(data, base_dir, os.environ if environ is None else environ)
    elif environ is not None:
        data = _with_fog_token(data, environ)
    return _validate(data, origin)


def _validate(data: dict[str, Any], origin: str) -> AgentConfig:
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as err:
        raise AgentConfigError(origin, _problems(err)) from None
    problems = []
    if config.model is not None and not config.model.path.is_file():
        problems.append(f"model.path: no such file: {config.model.path}")
    if problems:
        raise AgentConfigError(origin, problems)
    return config


def _prepare(data: dict[str, Any], base: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    data = dict(data)
    for section, model in (
        ("buffer", BufferConfig),
        ("model", ModelConfig),
        ("fog", FogConfig),
        ("alerts", AlertsConfig),
        ("fleet", FleetConfig),
    ):
        if isinstance(data.get(section), dict):
            data[section] = _resolve(data[section], _path_fields(model), base)
    source = data.get("model_source")
    if isinstance(source, dict) and isinstance(source.get("mlflow"), dict):
        data["model_source"] = {**source, "mlflow": _resolve(
            source["mlflow"], _path_fields(MlflowSourceConfig), base)}
    if "state_dir" in data:
        data["state_dir"] = _resolve_one(data["state_dir"], base)
    sources = data.get("sources")
    if isinstance(sources, list):
        classes = _source_classes()
        data["sources"] = [
            _resolve(entry, _path_fields(classes[entry["type"]]), base)
            if isinstance(entry, dict) and entry.get("type") in classes
            else entry
            for entry in sources
        ]
    return _with_fog_token(data, environ)


def _with_fog_token(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    fog = data.get("fog")
    token = environ.get(FOG_TOKEN_ENV)
    if (
        token
        and isinstance(fog, dict)
        and "token" in FogConfig.model_fields
        and fog.get("token") is None
        and fog.get("token_file") is None
    ):
        data = {**data, "fog": {**fog, "token": token}}
    return data


def _resolve(section: dict[str, Any], keys: set[str], base: Path) -> dict[str, Any]:
    return {key: _resolve_one(value, base) if key in keys else value
            for key, value in section.items()}


def _resolve_one(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else base / path)
    return value


def _mentions_path(annotation: Any) -> bool:
    if annotation is Path:
        return True
    return any(_mentions_path(arg) for arg in get_args(annotation))


def _path_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, field in model.model_fields.items() if _mentions_path(field.annotation)}


def _source_classes() -> dict[str, type[BaseModel]]:
    union = get_args(SourceConfig)[0]
    classes: dict[str, type[BaseModel]] = {}
    for cls in get_args(union):
        kind = cls.model_fields["type"].default
        classes[str(kind)] = cls
    return classes


# ---- error messages --------------------------------------------------------------------


def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (through Optional/Annotated), if one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated):
        models = [m for m in map(_unwrap_model, get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _fields_at(loc: Sequence[int | str]) -> list[str] | None:
    """The keys allowed in the mapping at `loc` (its parent of the unknown key)."""
    model: type[BaseModel] | None = AgentConfig
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _unwrap_model(model.model_fields[part].annotation)
    return sorted(model.model_fields) if model is not None else None


def _split_source_problems(detail: str) -> list[str]:
    """`load_sources` joins its problems with "; ": one problem per line again, each with
    its source's location."""
    problems: list[str] = []
    where = "sources"
    for part in detail.split("; "):
        if part.startswith("sources"):
            head, sep, _ = part.partition(": ")
            where = head if sep else where
            problems.append(part)
        elif problems and (part.startswith("repeated:") or part == ""):
            problems[-1] += f"; {part}"
        else:
            problems.append(f"{where}: {part}")
    return problems


def _problems(err: ValidationError) -> list[str]:
    problems: list[str] = []
    for error in err.errors():
        loc = error["loc"]
        kind = error["type"]
        if kind == "source_config":
            problems.extend(_split_source_problems(str(error["ctx"]["detail"])))
            continue
        where = _format_loc(loc) or "(top)"
        message = str(error["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            allowed = _fields_at(loc[:-1])
            message = "unknown key"
            if allowed:
                close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                message += f" (did you mean {close[0]!r}?)" if close else ""
                message += f"; allowed: {', '.join(allowed)}"
        elif kind == "missing":
            message = "required, not set"
        elif kind == "too_short":  # pydantic says "Tuple" for what the YAML wrote as a list
            ctx = error.get("ctx", {})
            message = (f"needs at least {ctx.get('min_length')} item(s), "
                       f"has {ctx.get('actual_length')}")
        if loc and loc[0] == "fog" and kind == "missing" and loc[-1] == "token":
            message += f" (or set {FOG_TOKEN_ENV} in the environment)"
        if kind == "value_error":
            # A model-level validator: its problems are joined with "; ", each starting
            # with the field it is about; give each the full path.
            problems.extend(_qualify(loc, part) for part in message.split("; "))
            continue
        problems.append(f"{where}: {message}")
    return problems


def _qualify(loc: Sequence[int | str], message: str) -> str:
    fields = _fields_at(loc) or []
    name, sep, rest = message.partition(": ")
    if sep and name in fields:
        return f"{_format_loc([*loc, name])}: {rest}"
    return f"{_format_loc(loc) or '(top)'}: {message}"
