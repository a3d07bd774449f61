"""Staged rollouts: a signed model version goes to the fleet in waves, each wave gated on
how the new model behaves on live data, with an automatic rollback.

```
create_deployment ─► wave 1 started (its devices are told the target)
step(reports, now) ─► every device of the wave applied it with good shadow stats? ─► bake
    ─► next wave … ─► last wave passed and baked ─► succeeded
    any refusal, failure, bad shadow stats or apply timeout ─► rolling_back
    ─► every device that ran the target reports its previous model again ─► rolled_back
pause / resume / abort / rollback: the operator's transitions (they return the new
    Deployment; `changed_devices(before, after)` names the devices to tell)
```

Contracts
---------
* **Pure and deterministic.** No I/O, no clock: every function takes `now` (seconds, the
  control plane's clock, a finite float; one before the deployment's last update counts
  as that time) and returns new values; nothing it is given is mutated. The control plane
  persists a `Deployment` with `to_dict()` (plain JSON types) and reads it back with
  `Deployment.from_dict()`; the round trip is exact (`==`).
* **Immutable deployments.** `Deployment` is a frozen dataclass; its dict and list fields
  are never mutated by this module (treat them as read-only): each transition returns a
  new `Deployment` with fresh containers (`dataclasses.replace`).
* **Who is managed.** Devices already running the target when the deployment is created
  are `skipped`: not planned, never told anything (`desired_model` → `NOT_MANAGED`), never
  rolled back. Wave percentages are of the devices that need the change. A deployment
  where every device already runs the target is a ValueError, as is one with no devices.
* **Waves.** Wave 1 starts at creation (tell `started_devices(dep)` the target). A wave
  passes when every one of its devices has decided — reported "applied" with the target as
  its current model and shadow stats within the `GatePolicy`, or failed — and at most
  `allowed_failures` of them failed (`min_success_ratio`; 1.0 allows none). Its devices
  are then "passed"; after `bake_s` (state "baking"; also after the last wave) the next
  wave starts, and after the last one the deployment has "succeeded".
* **Failing the gate.** A device of any started wave fails when it reports "refused",
  "failed" or "rolled_back", "applied" while running another model, or "applied" with
  shadow stats outside the policy (missing, malformed or NaN stats fail too; a device that
  ran no model has no `min_shadow_rows`: it has no live windows to shadow on); a device of
  the current wave that has not decided `apply_timeout_s` after the wave started fails as
  "not applied within N s". A failure is final for that device in this deployment. As soon
  as a started wave has more failures than it allows, the deployment rolls back: every
  device of every started wave is told its `previous` model (`changed_devices`).
* **Rolling back** ends ("rolled_back") when every device seen running the target (in any
  report since its wave started) has reported its previous model as `current`, whatever
  the report's state; devices never seen on the target count at once (they never left).
  A rollback never times out: `abort(rollback=True)` stops waiting (the devices are still
  told their previous model).
* **Paused** deployments still fail (a bad model is rolled back even when paused) but
  never time out, pass, bake or advance. `resume` shifts the wave's apply timer and bake
  start by the paused time.
* **Reports are trusted.** `step` takes the latest report of each device; the caller must
  drop any report answering an older generation than the one the device was last told
  (`DeviceReport.generation`), which is how a report about the previous desired state is
  kept out. As a second guard, a report whose `at` (when the control plane received it,
  on the clock of `now`) is not after the start of the device's wave is ignored: it cannot
  answer the target (a report received after `now` is fine: it is fresh).
* **Idempotent.** `step` with the same reports and `now` again changes nothing and emits
  no event; `updated_at` moves only when something else changed.
* **Errors.** Malformed input raises ValueError naming the field; a transition the state
  does not allow raises `InvalidTransition` (a ValueError) saying why.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from functools import cached_property
from typing import Any, Final, Literal, TypeGuard

from .publish import parse_model_ref

__all__ = [
    "DEVICE_STATUSES",
    "MAX_WAVES",
    "NOT_MANAGED",
    "REPORT_STATES",
    "SCHEMA",
    "Deployment",
    "DeploymentState",
    "DesiredModel",
    "DeviceReport",
    "GatePolicy",
    "InvalidTransition",
    "NotManaged",
    "StepResult",
    "WaveSpec",
    "abort",
    "changed_devices",
    "create_deployment",
    "desired_model",
    "parse_waves",
    "pause",
    "plan_waves",
    "progress",
    "resume",
    "rollback",
    "started_devices",
    "step",
]

SCHEMA: Final = "edgefleet.rollout/1"
MAX_WAVES: Final = 20
REPORT_STATES: Final = frozenset(
    {"downloading", "shadowing", "applied", "refused", "rolled_back", "failed"}
)
DEVICE_STATUSES: Final = ("pending", "applied", "passed", "failed", "rolled_back")
SHADOW_FIELDS: Final = ("rows", "errors", "error_rate", "latency_p99_us",
                        "anomaly_rate_current", "anomaly_rate_candidate", "anomaly_rate_shift")
_LISTED: Final = 10  # device names listed in one event or reason before "… and N more"
_COUNT = re.compile(r"^[0-9]+$")
_PERCENT = re.compile(r"^[0-9]+(\.[0-9]+)?$")


class InvalidTransition(ValueError):
    """The deployment's state does not allow this operation; the message says why."""


class NotManaged(enum.Enum):
    """The type of `NOT_MANAGED`."""

    NOT_MANAGED = "not-managed"


NOT_MANAGED: Final = NotManaged.NOT_MANAGED
DesiredModel = str | None | Literal[NotManaged.NOT_MANAGED]


class DeploymentState(enum.StrEnum):
    ROLLING = "rolling"
    BAKING = "baking"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL: Final = frozenset(
    {DeploymentState.SUCCEEDED, DeploymentState.ROLLED_BACK, DeploymentState.ABORTED}
)
_ADVANCING: Final = frozenset(
    {DeploymentState.ROLLING, DeploymentState.BAKING, DeploymentState.PAUSED}
)


# --- waves --------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaveSpec:
    """One wave's CUMULATIVE target: an absolute device count or a percentage of the fleet
    (exactly one is set)."""

    count: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.percent is None):
            raise ValueError("a wave is either a device count or a percentage, not both/none")
        if self.count is not None and (not _is_int(self.count) or self.count < 1):
            raise ValueError(f"a wave's device count must be an integer ≥ 1, not {self.count!r}")
        if self.percent is not None and (
            not _is_number(self.percent) or not 0 < self.percent <= 100
        ):
            raise ValueError(f"a wave's percentage must be in (0, 100], not {self.percent!r}")

    def target(self, fleet: int) -> int:
        """The cumulative number of devices this wave reaches in a fleet of `fleet`."""
        if self.count is not None:
            return min(self.count, fleet)
        assert self.percent is not None
        # Exact decimal arithmetic: 7 % of 100 is 7, not ceil(7.000000000000001) = 8.
        return max(1, math.ceil(Fraction(str(self.percent)) * fleet / 100))

    @property
    def covers_all(self) -> bool:
        return self.percent is not None and self.percent >= 100

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """Waves from text like "1,10%,50%,100%": comma-separated device counts (integers ≥ 1)
    and percentages (in (0, 100]), CUMULATIVE targets. Counts must not decrease among
    counts, nor percentages among percentages (a count against a percentage is settled by
    `plan_waves` for a given fleet); nothing may follow "100%"; at most `MAX_WAVES` waves.
    Raises ValueError with the reason."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        raise ValueError("no waves given (expected e.g. '1,10%,50%,100%')")
    if len(items) > MAX_WAVES:
        raise ValueError(f"{len(items)} waves given; at most {MAX_WAVES} are allowed")
    specs: list[WaveSpec] = []
    for number, item in enumerate(items, start=1):
        where = f"wave {number} ({item!r})"
        if not item:
            raise ValueError(f"wave {number} is empty (two commas, or a trailing comma?)")
        if item.startswith("-"):
            raise ValueError(f"{where} is negative")
        if item.endswith("%"):
            number_text = item[:-1].strip()
            if not _PERCENT.fullmatch(number_text):
                raise ValueError(f"{where} is not a percentage like 10% or 12.5%")
            percent = float(number_text)
            if percent <= 0:
                raise ValueError(f"{where}: a percentage must be more than 0 %")
            if percent > 100:
                raise ValueError(f"{where}: a percentage cannot exceed 100 %")
            spec = WaveSpec(percent=percent)
        else:
            if not _COUNT.fullmatch(item):
                raise ValueError(f"{where} is neither a device count nor a percentage")
            if int(item) == 0:
                raise ValueError(f"{where}: a wave needs at least 1 device")
            spec = WaveSpec(count=int(item))
        if specs and specs[-1].covers_all:
            raise ValueError(f"{where} follows a 100% wave, which already covers the fleet")
        for earlier in reversed(specs):
            if (earlier.count is None) == (spec.count is None):
                if (spec.count or 0) < (earlier.count or 0) or \
                        (spec.percent or 0) < (earlier.percent or 0):
                    raise ValueError(f"{where} is smaller than the earlier wave {earlier}: "
                                     "wave targets are cumulative and cannot decrease")
                break
        specs.append(spec)
    return tuple(specs)


def plan_waves(devices: Sequence[str], waves: Sequence[WaveSpec], seed: str) -> list[list[str]]:
    """The devices NEW in each wave. The cumulative size of wave k is `waves[k].target(N)`
    (never less than the wave before); the devices are ordered by sha256(seed, device), so
    a different seed picks different early devices; empty waves are dropped, so every list
    is non-empty and every device appears exactly once. Raises ValueError for no devices,
    duplicate or empty names, no waves, or a last wave that does not cover the fleet."""
    if not devices:
        raise ValueError("no devices to plan waves for")
    if not waves:
        raise ValueError("no waves to plan")
    if len(waves) > MAX_WAVES:
        raise ValueError(f"{len(waves)} waves given; at most {MAX_WAVES} are allowed")
    for device in devices:
        if not isinstance(device, str) or not device:
            raise ValueError(f"device names must be non-empty strings, not {device!r}")
    if len(set(devices)) != len(devices):
        dupes = sorted(d for d, n in Counter(devices).items() if n > 1)
        raise ValueError(f"devices listed more than once: {_names(dupes)}")
    fleet = len(devices)
    last = waves[-1]
    if not last.covers_all and last.target(fleet) < fleet:
        raise ValueError(f"the last wave ({last}) reaches {last.target(fleet)} of {fleet} "
                         "devices; it must cover the whole fleet (end with 100%)")
    ordered = sorted(devices, key=lambda d: (_spread_key(seed, d), d))
    planned: list[list[str]] = []
    done = 0
    for spec in waves:
        reach = max(done, spec.target(fleet))
        if reach > done:
            planned.append(ordered[done:reach])
            done = reach
    return planned


def _spread_key(seed: str, device: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{device}".encode()).digest()


# --- policy and reports -------------------------------------------------------------------


@dataclass(frozen=True)
class GatePolicy:
    """What a wave must show to pass. A device passes when its "applied" report carries
    shadow stats with `error_rate` ≤ `max_error_rate`, `latency_p99_us` ≤
    `max_latency_p99_us` (None passes only when no row was scored), `anomaly_rate_shift` ≤
    `max_anomaly_rate_shift` (None — no current model to compare with — passes) and `rows`
    ≥ `min_shadow_rows` (0 also accepts a report without shadow stats; not applied to a
    device that ran no model, which has no live windows to shadow on); a wave passes when
    at least `min_success_ratio` of its devices pass. `apply_timeout_s` counts from the
    wave's start; `bake_s` is how long a passed wave is watched before the next starts."""

    apply_timeout_s: float = 120.0
    bake_s: float = 0.0
    max_error_rate: float = 0.01
    max_latency_p99_us: float = 5000.0
    max_anomaly_rate_shift: float = 0.2
    min_shadow_rows: int = 1
    min_success_ratio: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "min_shadow_rows":
                if not _is_int(value) or value < 0:
                    raise ValueError(f"min_shadow_rows must be an integer ≥ 0, not {value!r}")
                continue
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, not {value!r}")
            object.__setattr__(self, f.name, float(value))
        if self.apply_timeout_s <= 0:
            raise ValueError(f"apply_timeout_s must be > 0, not {self.apply_timeout_s}")
        for name in ("bake_s", "max_error_rate", "max_latency_p99_us",
                     "max_anomaly_rate_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, not {getattr(self, name)}")
        if self.max_error_rate > 1 or self.max_anomaly_rate_shift > 1:
            raise ValueError("max_error_rate and max_anomaly_rate_shift are rates in [0, 1]")
        if not 0 < self.min_success_ratio <= 1:
            raise ValueError(f"min_success_ratio must be in (0, 1], not {self.min_success_ratio}")

    def allowed_failures(self, wave_size: int) -> int:
        """How many of a wave of `wave_size` devices may fail with the wave still passing."""
        required = math.ceil(Fraction(str(self.min_success_ratio)) * wave_size)
        return wave_size - max(1, required) if wave_size else 0

    def shadow_failure(self, shadow: Mapping[str, Any] | None, *,
                       had_model: bool = True) -> str | None:
        """Why these shadow stats fail the policy ("error_rate 0.05 > 0.01"), None if they
        pass. Missing, mistyped and NaN values fail. A device that ran no model before
        (`had_model` False) observes no windows to shadow on (the agent applies and reports
        `rows: 0`), so `min_shadow_rows` does not apply to it."""
        min_rows = self.min_shadow_rows if had_model else 0
        if shadow is None:
            return None if min_rows == 0 else "no shadow statistics"
        problems: list[str] = []
        rows = shadow.get("rows")
        if not _is_int(rows):
            return f"shadow statistics: rows is {rows!r}, not a row count"
        for name, nullable in (("error_rate", False), ("latency_p99_us", True),
                               ("anomaly_rate_shift", True)):
            if name not in shadow:
                return f"shadow statistics lack {name}"
            value = shadow[name]
            if not (_is_number(value) or (nullable and value is None)):
                return f"shadow statistics: {name} is {value!r}, not a number"
        if rows < min_rows:
            problems.append(f"rows {rows} < {min_rows}")
        error_rate = shadow["error_rate"]
        if not error_rate <= self.max_error_rate:  # `not <=`: NaN fails
            problems.append(f"error_rate {error_rate:g} > {self.max_error_rate:g}")
        latency = shadow["latency_p99_us"]
        if latency is None:
            if rows > 0:
                problems.append("latency_p99_us unknown although rows were scored")
        elif not latency <= self.max_latency_p99_us:
            problems.append(f"latency_p99_us {latency:g} > {self.max_latency_p99_us:g}")
        shift = shadow["anomaly_rate_shift"]
        if shift is not None and not abs(shift) <= self.max_anomaly_rate_shift:
            problems.append(f"anomaly_rate_shift {shift:g} > {self.max_anomaly_rate_shift:g}")
        return "; ".join(problems) or None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GatePolicy:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown gate policy field(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class DeviceReport:
    """What a device said about its desired state: the `generation` it answers, the model
    it runs (`current`, "name/version" or None), its `state` (one of `REPORT_STATES`), a
    free-text `reason`, its shadow stats (`SHADOW_FIELDS`, as the agent's ShadowReport)
    and `at`, when the control plane received it (the clock of `now`)."""

    device: str
    generation: int
    current: str | None
    state: str
    reason: str = ""
    shadow: Mapping[str, Any] | None = None
    at: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"report: device must be a non-empty string, not {self.device!r}")
        where = f"report from {self.device}"
        if not _is_int(self.generation) or self.generation < 0:
            raise ValueError(f"{where}: generation must be an integer ≥ 0, "
                             f"not {self.generation!r}")
        if self.current is not None and not isinstance(self.current, str):
            raise ValueError(f"{where}: current must be 'name/version' or None")
        if self.state not in REPORT_STATES:
            raise ValueError(f"{where}: state {self.state!r} is not one of "
                             f"{', '.join(sorted(REPORT_STATES))}")
        if not isinstance(self.reason, str):
            raise ValueError(f"{where}: reason must be a string")
        if self.shadow is not None and not isinstance(self.shadow, Mapping):
            raise ValueError(f"{where}: shadow must be a mapping of shadow statistics or None")
        if not _is_number(self.at) or not math.isfinite(self.at):
            raise ValueError(f"{where}: at must be a finite time, not {self.at!r}")


# --- deployments --------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """One rollout of `model` ("name/version"). Fields:

    * `previous`: what every device given at creation ran then (None: no model);
      `skipped`: those already running `model` (not planned, never touched);
    * `waves`: the devices new in each wave; `wave_index` (0-based) is the last started
      wave, `wave_starts` the time each started wave started (for the stale-report guard),
      `wave_started_at` the current wave's apply-timer origin (shifted by pauses);
    * `baked_since`: when the current wave passed, while baking; `paused_from_state` and
      `paused_at` while paused; `aborted_with_rollback` for an abort that sent devices back;
    * `device_status`: per planned device, one of `DEVICE_STATUSES`; `device_reasons`: why
      a device failed; `reached`: the devices seen running `model` (sorted);
    * `reasons`: why the deployment stopped (gate failures, manual rollback, abort).
    """

    id: str
    model: str
    previous: dict[str, str | None]
    skipped: list[str]
    waves: list[list[str]]
    policy: GatePolicy
    seed: str
    state: DeploymentState
    wave_index: int
    wave_starts: list[float]
    wave_started_at: float
    baked_since: float | None
    paused_from_state: DeploymentState | None
    paused_at: float | None
    aborted_with_rollback: bool
    device_status: dict[str, str]
    device_reasons: dict[str, str]
    reached: list[str]
    reasons: list[str]
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; `Deployment.from_dict(dep.to_dict()) == dep`."""
        return {
            "schema": SCHEMA,
            "id": self.id,
            "model": self.model,
            "previous": dict(self.previous),
            "skipped": list(self.skipped),
            "waves": [list(w) for w in self.waves],
            "policy": self.policy.to_dict(),
            "seed": self.seed,
            "state": self.state.value,
            "wave_index": self.wave_index,
            "wave_starts": list(self.wave_starts),
            "wave_started_at": self.wave_started_at,
            "baked_since": self.baked_since,
            "paused_from_state": (None if self.paused_from_state is None
                                  else self.paused_from_state.value),
            "paused_at": self.paused_at,
            "aborted_with_rollback": self.aborted_with_rollback,
            "device_status": dict(self.device_status),
            "device_reasons": dict(self.device_reasons),
            "reached": list(self.reached),
            "reasons": list(self.reasons),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Deployment:
        """The deployment `to_dict` wrote; ValueError names the first bad field."""
        if not isinstance(data, Mapping):
            raise ValueError("a deployment must be a JSON object")
        if data.get("schema") != SCHEMA:
            raise ValueError(f"deployment schema {data.get('schema')!r} is not {SCHEMA!r}")
        expected = {f.name for f in fields(cls)} | {"schema"}
        if set(data) != expected:
            missing, extra = expected - set(data), set(data) - expected
            raise ValueError(f"deployment fields: missing {sorted(missing)}, "
                             f"unknown {sorted(extra)}")
        d = _Reader(data)
        paused_from = d.read_optional_str("paused_from_state")
        dep = cls(
            id=d.read_str("id"),
            model=d.read_str("model"),
            previous={k: _opt_str(v, f"previous[{k!r}]")
                      for k, v in d.read_mapping("previous").items()},
            skipped=d.read_str_list("skipped"),
            waves=[_str_list(w, "waves[]") for w in d.read_list("waves")],
            policy=GatePolicy.from_dict(d.read_mapping("policy")),
            seed=d.read_str("seed"),
            state=_state(d.read_str("state"), "state"),
            wave_index=d.read_int("wave_index"),
            wave_starts=[_float(t, "wave_starts[]") for t in d.read_list("wave_starts")],
            wave_started_at=d.read_float("wave_started_at"),
            baked_since=d.read_optional_float("baked_since"),
            paused_from_state=(None if paused_from is None
                               else _state(paused_from, "paused_from_state")),
            paused_at=d.read_optional_float("paused_at"),
            aborted_with_rollback=d.read_bool("aborted_with_rollback"),
            device_status={k: _str(v, f"device_status[{k!r}]")
                           for k, v in d.read_mapping("device_status").items()},
            device_reasons={k: _str(v, f"device_reasons[{k!r}]")
                            for k, v in d.read_mapping("device_reasons").items()},
            reached=d.read_str_list("reached"),
            reasons=d.read_str_list("reasons"),
            created_at=d.read_float("created_at"),
            updated_at=d.read_float("updated_at"),
        )
        _check_consistent(dep)
        return dep

    @property
    def planned(self) -> list[str]:
        """Every planned device, wave after wave."""
        return [d for wave in self.waves for d in wave]

    def wave_of(self, device: str) -> int | None:
        """The 0-based wave of `device`, None if it is not planned."""
        return self._waves_by_device.get(device)

    @cached_property
    def _waves_by_device(self) -> dict[str, int]:
        return {d: index for index, wave in enumerate(self.waves) for d in wave}

    @property
    def reverting(self) -> bool:
        """True when the started devices are told their previous model."""
        return self.state in (DeploymentState.ROLLING_BACK, DeploymentState.ROLLED_BACK) or (
            self.state is DeploymentState.ABORTED and self.aborted_with_rollback)


@dataclass(frozen=True)
class StepResult:
    """A step's outcome: the new deployment, events for the audit log (empty when
    nothing changed) and the devices whose `desired_model` changed (bump their generation),
    in wave order."""

    deployment: Deployment
    events: tuple[str, ...] = ()
    changed_devices: tuple[str, ...] = ()


def create_deployment(
    id: str,
    model: str,
    devices_previous: Mapping[str, str | None],
    waves_text: str,
    policy: GatePolicy,
    seed: str,
    now: float,
) -> Deployment:
    """A deployment of `model` ("name/version") to the devices of `devices_previous` (device
    → the model it runs now, or None), planned with `parse_waves(waves_text)` and
    `plan_waves(…, seed)` over the devices not already running `model`, with wave 1
    started at `now`: tell `started_devices(dep)` the target. Raises ValueError for an
    unsafe id, a model that is not "name/version", no devices, every device already
    running `model`, or bad waves."""
    if not isinstance(id, str) or not id.strip():
        raise ValueError("a deployment id must be a non-empty string")
    _check_ref(model, "model")
    now = _time(now, "now")
    if not devices_previous:
        raise ValueError(f"deployment {id}: no devices to deploy {model} to")
    previous: dict[str, str | None] = {}
    for device, ref in devices_previous.items():
        if not isinstance(device, str) or not device:
            raise ValueError(f"deployment {id}: device names must be non-empty strings, "
                             f"not {device!r}")
        if ref is not None:
            _check_ref(ref, f"previous model of {device}")
        previous[device] = ref
    skipped = sorted(d for d, ref in previous.items() if ref == model)
    targets = sorted(d for d, ref in previous.items() if ref != model)
    if not targets:
        raise ValueError(f"deployment {id}: all {len(previous)} device(s) already run "
                         f"{model}; nothing to deploy")
    waves = plan_waves(targets, parse_waves(waves_text), seed)
    return Deployment(
        id=id, model=model, previous=previous, skipped=skipped, waves=waves, policy=policy,
        seed=seed, state=DeploymentState.ROLLING, wave_index=0, wave_starts=[now],
        wave_started_at=now, baked_since=None, paused_from_state=None, paused_at=None,
        aborted_with_rollback=False, device_status=dict.fromkeys(targets, "pending"),
        device_reasons={}, reached=[], reasons=[], created_at=now, updated_at=now,
    )


def started_devices(dep: Deployment) -> list[str]:
    """The devices of the started waves (told the target, or their previous model when the
    deployment reverts), in wave order."""
    return [d for wave in dep.waves[: dep.wave_index + 1] for d in wave]


def desired_model(dep: Deployment, device: str) -> DesiredModel:
    """What `dep` wants `device` to run: the target for a device of a started wave (also
    after success, and after an abort without rollback: the fleet stays where it is); its
    `previous` model (None: no model) while rolling back, rolled back, or aborted with
    rollback; `NOT_MANAGED` for a device of a wave not started, a skipped device or an
    unknown one (the caller falls back to the device's pin or other state)."""
    index = dep.wave_of(device)
    if index is None or index > dep.wave_index:
        return NOT_MANAGED
    return dep.previous[device] if dep.reverting else dep.model


def changed_devices(before: Deployment, after: Deployment) -> tuple[str, ...]:
    """The devices whose `desired_model` differs between two versions of a deployment, in
    wave order: after an operator transition, the devices whose generation to bump."""
    return tuple(d for d in after.planned if desired_model(before, d) != desired_model(after, d))


# --- step ---------------------------------------------------------------------------------


class _Work:
    """Mutable working copies of a deployment's changing fields during one transition."""

    def __init__(self, dep: Deployment, now: float) -> None:
        self.dep = dep
        self.now = now
        self.state = dep.state
        self.wave_index = dep.wave_index
        self.wave_starts = list(dep.wave_starts)
        self.wave_started_at = dep.wave_started_at
        self.baked_since = dep.baked_since
        self.paused_from_state = dep.paused_from_state
        self.paused_at = dep.paused_at
        self.aborted_with_rollback = dep.aborted_with_rollback
        self.status = dict(dep.device_status)
        self.device_reasons = dict(dep.device_reasons)
        self.reached = set(dep.reached)
        self.reasons = list(dep.reasons)
        self.events: list[str] = []
        self.changed: list[str] = []

    def wave_label(self, index: int | None = None) -> str:
        i = self.wave_index if index is None else index
        return f"wave {i + 1} of {len(self.dep.waves)}"

    def started(self) -> list[str]:
        return [d for wave in self.dep.waves[: self.wave_index + 1] for d in wave]

    def fail(self, device: str, reason: str) -> None:
        self.status[device] = "failed"
        self.device_reasons[device] = reason
        self.events.append(f"{device}: {reason}")

    def start_rollback(self, reason: str) -> None:
        was_reverting = self.dep.reverting
        self.state = DeploymentState.ROLLING_BACK
        self.baked_since = self.paused_from_state = self.paused_at = None
        self.reasons.append(reason)
        started = self.started()
        self.events.append(f"rolling back {self.dep.model}: {reason}; {len(started)} "
                           "device(s) told their previous model")
        if not was_reverting:
            self.changed.extend(started)

    def finish(self) -> StepResult:
        dep = self.dep
        new = replace(
            dep, state=self.state, wave_index=self.wave_index, wave_starts=self.wave_starts,
            wave_started_at=self.wave_started_at, baked_since=self.baked_since,
            paused_from_state=self.paused_from_state, paused_at=self.paused_at,
            aborted_with_rollback=self.aborted_with_rollback, device_status=self.status,
            device_reasons=self.device_reasons, reached=sorted(self.reached),
            reasons=self.reasons,
        )
        if new == dep:
            return StepResult(dep)
        return StepResult(replace(new, updated_at=self.now), tuple(self.events),
                          tuple(self.changed))


def step(dep: Deployment, reports: Mapping[str, DeviceReport], now: float) -> StepResult:
    """Advance `dep` with the latest report of each device (`reports[device]`, already
    filtered by generation: see the module's contracts) at `now`. Terminal deployments
    (succeeded, rolled back, aborted) do not change. A `now` before the deployment's last
    update is taken as that time. Raises ValueError for a non-finite `now` or a report filed
    under another device's name."""
    now = _check_now(dep, now)
    _check_reports(reports)
    work = _Work(dep, now)
    if dep.state.terminal:
        return StepResult(dep)
    if dep.state is DeploymentState.ROLLING_BACK:
        _track_rollback(work, reports)
        return work.finish()
    _judge_reports(work, reports)
    if not _gate_failed(work):
        if work.state is DeploymentState.ROLLING:
            _check_current_wave(work)
        elif work.state is DeploymentState.BAKING:
            assert work.baked_since is not None
            if now - work.baked_since >= dep.policy.bake_s:
                _advance(work)
    if work.state is DeploymentState.ROLLING_BACK:
        _track_rollback(work, reports)
    return work.finish()


def _fresh(work: _Work, reports: Mapping[str, DeviceReport], device: str,
           wave: int) -> DeviceReport | None:
    """The device's report if it came after its wave started (else it cannot answer)."""
    report = reports.get(device)
    if report is None or report.at <= work.wave_starts[wave]:
        return None
    return report


def _judge_reports(work: _Work, reports: Mapping[str, DeviceReport]) -> None:
    """Record what the reports of the started waves' devices say: on the target with good
    shadow stats ("applied"), or failed (final)."""
    dep = work.dep
    applied: list[str] = []
    for wave in range(work.wave_index + 1):
        for device in dep.waves[wave]:
            report = _fresh(work, reports, device, wave)
            if report is None:
                continue
            if report.current == dep.model:
                work.reached.add(device)
            if work.status[device] == "failed":
                continue
            reason = _report_failure(dep, report)
            if reason is not None:
                work.fail(device, reason)
            elif report.state == "applied" and work.status[device] == "pending":
                work.status[device] = "applied"
                applied.append(device)
    if applied:
        work.events.append(f"{len(applied)} device(s) applied {dep.model} with passing "
                           f"shadow stats: {_names(applied)}")


def _report_failure(dep: Deployment, report: DeviceReport) -> str | None:
    """Why this report fails the gate, None when it passes or is still in progress."""
    why = f" ({report.reason})" if report.reason else ""
    if report.state in ("downloading", "shadowing"):
        return None
    if report.state == "refused":
        return f"refused {dep.model}{why}"
    if report.state == "failed":
        return f"failed to apply {dep.model}{why}"
    if report.state == "rolled_back":
        return f"rolled {dep.model} back by itself (now on {report.current}){why}"
    if report.current != dep.model:
        return f"reports applied but runs {report.current}, not {dep.model}{why}"
    return dep.policy.shadow_failure(report.shadow,
                                     had_model=dep.previous[report.device] is not None)


def _gate_failed(work: _Work) -> bool:
    """Start the rollback (and return True) when a started wave has more failures than its
    policy allows."""
    policy = work.dep.policy
    for wave in range(work.wave_index + 1):
        devices = work.dep.waves[wave]
        failed = [d for d in devices if work.status[d] == "failed"]
        allowed = policy.allowed_failures(len(devices))
        if len(failed) > allowed:
            listed = "; ".join(f"{d}: {work.device_reasons[d]}" for d in failed[:3])
            more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
            work.start_rollback(
                f"{work.wave_label(wave)} failed its gate ({len(failed)} of {len(devices)} "
                f"device(s) failed, {allowed} allowed): {listed}{more}"
            )
            return True
    return False


def _check_current_wave(work: _Work) -> None:
    """Time out the current wave's undecided devices, and pass the wave when every device
    has decided (the failures are then within the allowance, see `_gate_failed`)."""
    dep, now = work.dep, work.now
    devices = dep.waves[work.wave_index]
    timeout = dep.policy.apply_timeout_s
    if now - work.wave_started_at >= timeout:
        late = [d for d in devices if work.status[d] == "pending"]
        for device in late:
            work.status[device] = "failed"
            work.device_reasons[device] = f"not applied within {timeout:g} s"
        if late:
            work.events.append(f"{work.wave_label()}: {len(late)} device(s) not applied "
                               f"within {timeout:g} s: {_names(late)}")
        if _gate_failed(work):
            return
    if any(work.status[d] == "pending" for d in devices):
        return
    passed = [d for d in devices if work.status[d] == "applied"]
    for device in passed:
        work.status[device] = "passed"
    work.events.append(f"{work.wave_label()} passed: {len(passed)} of {len(devices)} "
                       f"device(s) run {dep.model}")
    if dep.policy.bake_s > 0:
        work.state = DeploymentState.BAKING
        work.baked_since = now
        work.events.append(f"{work.wave_label()} baking for {dep.policy.bake_s:g} s")
    else:
        _advance(work)


def _advance(work: _Work) -> None:
    """After a passed (and baked) wave: the next wave, or success after the last."""
    dep, now = work.dep, work.now
    work.baked_since = None
    if work.wave_index + 1 >= len(dep.waves):
        work.state = DeploymentState.SUCCEEDED
        failed = sum(s == "failed" for s in work.status.values())
        work.events.append(f"succeeded: {len(dep.planned) - failed} of {len(dep.planned)} "
                           f"planned device(s) run {dep.model}"
                           + (f" ({failed} failed within the allowance)" if failed else ""))
        return
    work.state = DeploymentState.ROLLING
    work.wave_index += 1
    work.wave_starts.append(now)
    work.wave_started_at = now
    new = dep.waves[work.wave_index]
    work.changed.extend(new)
    work.events.append(f"{work.wave_label()} started: {len(new)} device(s) told {dep.model}")


def _track_rollback(work: _Work, reports: Mapping[str, DeviceReport]) -> None:
    """Mark the devices back on their previous model; finish the rollback when every
    device seen on the target is back."""
    dep = work.dep
    back: list[str] = []
    for wave in range(work.wave_index + 1):
        for device in dep.waves[wave]:
            report = _fresh(work, reports, device, wave)
            if report is None or work.status[device] == "rolled_back":
                continue
            if report.current == dep.model:
                work.reached.add(device)
            elif device in work.reached and report.current == dep.previous[device]:
                work.status[device] = "rolled_back"
                back.append(device)
    if back:
        work.events.append(f"{len(back)} device(s) back on their previous model: "
                           f"{_names(back)}")
    _finish_rollback(work)


def _finish_rollback(work: _Work) -> None:
    if work.state is not DeploymentState.ROLLING_BACK:
        return
    waiting = [d for d in work.started()
               if d in work.reached and work.status[d] != "rolled_back"]
    if not waiting:
        work.state = DeploymentState.ROLLED_BACK
        work.events.append(f"rolled back: every device that ran {work.dep.model} is on its "
                           "previous model again")


# --- operator transitions -----------------------------------------------------------------


def pause(dep: Deployment, now: float) -> Deployment:
    """The deployment paused (rolling or baking only): no timeouts, passes, bakes or new
    waves until `resume`; failures still roll back. No device's desired model changes."""
    now = _check_now(dep, now)
    if dep.state not in (DeploymentState.ROLLING, DeploymentState.BAKING):
        raise InvalidTransition(f"deployment {dep.id} is {dep.state.value}; only a rolling or "
                                "baking deployment can be paused")
    work = _Work(dep, now)
    work.paused_from_state, work.paused_at = dep.state, now
    work.state = DeploymentState.PAUSED
    return work.finish().deployment


def resume(dep: Deployment, now: float) -> Deployment:
    """The paused deployment continued where it was; the apply timer and the bake restart
    where they stopped (shifted by the paused time). Call `step` next (or let the timer)."""
    now = _check_now(dep, now)
    if dep.state is not DeploymentState.PAUSED:
        raise InvalidTransition(f"deployment {dep.id} is {dep.state.value}, not paused")
    assert dep.paused_from_state is not None and dep.paused_at is not None
    work = _Work(dep, now)
    paused_for = now - dep.paused_at
    work.state = dep.paused_from_state
    work.wave_started_at = dep.wave_started_at + paused_for
    if dep.baked_since is not None:
        work.baked_since = dep.baked_since + paused_for
    work.paused_from_state = work.paused_at = None
    return work.finish().deployment


def abort(dep: Deployment, now: float, rollback: bool,
          reason: str = "aborted by the operator") -> Deployment:
    """The deployment ended now ("aborted", terminal; `reason` is recorded). With
    `rollback`, the started devices are told their previous model (see `changed_devices`),
    without waiting for them; without, they keep the target. A deployment rolling back can
    only be aborted with `rollback` (its devices were already told their previous model):
    that stops waiting for stragglers."""
    now = _check_now(dep, now)
    if dep.state.terminal:
        raise InvalidTransition(f"deployment {dep.id} already ended ({dep.state.value})")
    if dep.state is DeploymentState.ROLLING_BACK and not rollback:
        raise InvalidTransition(f"deployment {dep.id} is rolling back; it can only be aborted "
                                "with rollback (its devices were told their previous model)")
    work = _Work(dep, now)
    work.state = DeploymentState.ABORTED
    work.aborted_with_rollback = rollback
    work.baked_since = work.paused_from_state = work.paused_at = None
    work.reasons.append(reason)
    return work.finish().deployment


def rollback(dep: Deployment, now: float, reason: str) -> Deployment:
    """The deployment rolling back by hand (from rolling, baking, paused or succeeded; the
    reason is recorded): every started device is told its previous model (see
    `changed_devices`); `step` then tracks them back. When no device was seen on the
    target, the deployment is rolled back at once."""
    now = _check_now(dep, now)
    if not reason.strip():
        raise ValueError("a manual rollback needs a reason (for the audit log)")
    if dep.state not in _ADVANCING and dep.state is not DeploymentState.SUCCEEDED:
        raise InvalidTransition(f"deployment {dep.id} is {dep.state.value}; only a rolling, "
                                "baking, paused or succeeded deployment can be rolled back")
    work = _Work(dep, now)
    work.start_rollback(f"manual rollback: {reason.strip()}")
    _finish_rollback(work)
    return work.finish().deployment


# --- status -------------------------------------------------------------------------------


def progress(dep: Deployment) -> dict[str, Any]:
    """Numbers for a status table: per wave, its devices by status and whether it started;
    overall, the share of planned devices on the target and passing (`percent`, 0–100, one
    decimal), the state, the current wave (1-based) and the reasons."""
    per_wave = []
    for index, wave in enumerate(dep.waves):
        counts = dict.fromkeys(DEVICE_STATUSES, 0)
        for device in wave:
            counts[dep.device_status[device]] += 1
        per_wave.append({"wave": index + 1, "devices": len(wave),
                         "started": index <= dep.wave_index, **counts})
    total = len(dep.device_status)
    good = sum(s in ("applied", "passed") for s in dep.device_status.values())
    waiting = [d for d in started_devices(dep)
               if d in dep.reached and dep.device_status[d] != "rolled_back"]
    return {
        "id": dep.id,
        "model": dep.model,
        "state": dep.state.value,
        "wave": dep.wave_index + 1,
        "waves": len(dep.waves),
        "devices": total,
        "skipped": len(dep.skipped),
        "started": len(started_devices(dep)),
        "percent": round(100.0 * good / total, 1),
        "per_wave": per_wave,
        "rollback_waiting": len(waiting) if dep.reverting else 0,
        "reasons": list(dep.reasons),
        "failures": dict(dep.device_reasons),
    }


# --- checks -------------------------------------------------------------------------------


def _names(devices: Sequence[str]) -> str:
    listed = ", ".join(devices[:_LISTED])
    return listed + (f", … and {len(devices) - _LISTED} more" if len(devices) > _LISTED
                     else "")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _time(value: object, label: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{label} must be a finite time in seconds, not {value!r}")
    return float(value)


def _check_now(dep: Deployment, now: float) -> float:
    """`now`, never before the deployment's last update: concurrent callers' clocks can
    disagree by a little, and the deployment's time never runs backwards."""
    return max(_time(now, "now"), dep.updated_at)


def _check_reports(reports: Mapping[str, DeviceReport]) -> None:
    for device, report in reports.items():
        if report.device != device:
            raise ValueError(f"the report of {report.device} was given as {device}'s")


def _check_ref(ref: object, label: str) -> None:
    if not isinstance(ref, str):
        raise ValueError(f"{label} must be 'name/version', not {ref!r}")
    name, version, _ = parse_model_ref(ref)
    if version is None or ref != f"{name}/{version}":
        raise ValueError(f"{label} {ref!r} must be a fixed 'name/version' (no alias, no "
                         "models:/ prefix): devices report what they run in that form")


def _check_consistent(dep: Deployment) -> None:
    """The invariants `from_dict` enforces on what it reads."""
    planned = dep.planned
    if not planned or any(not wave for wave in dep.waves):
        raise ValueError("deployment waves: empty")
    if len(set(planned)) != len(planned) or set(planned) != set(dep.device_status):
        raise ValueError("deployment waves and device_status do not name the same devices")
    if not set(planned) | set(dep.skipped) <= set(dep.previous):
        raise ValueError("deployment previous lacks some planned or skipped devices")
    if not 0 <= dep.wave_index < len(dep.waves) or len(dep.wave_starts) != dep.wave_index + 1:
        raise ValueError(f"deployment wave_index {dep.wave_index} does not fit its waves")
    bad = {s for s in dep.device_status.values() if s not in DEVICE_STATUSES}
    if bad:
        raise ValueError(f"deployment device_status: unknown status(es) {sorted(bad)}")
    if not set(dep.reached) <= set(planned) or set(dep.device_reasons) - set(planned):
        raise ValueError("deployment reached/device_reasons name unplanned devices")
    if (dep.state is DeploymentState.PAUSED) != (dep.paused_from_state is not None) or \
            (dep.paused_from_state is None) != (dep.paused_at is None):
        raise ValueError("deployment paused_from_state/paused_at do not match its state")
    _check_ref(dep.model, "model")


class _Reader:
    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def read_str(self, key: str) -> str:
        return _str(self.data[key], key)

    def read_optional_str(self, key: str) -> str | None:
        return _opt_str(self.data[key], key)

    def read_int(self, key: str) -> int:
        value = self.data[key]
        if not _is_int(value):
            raise ValueError(f"deployment {key} must be an integer, not {value!r}")
        return int(value)

    def read_bool(self, key: str) -> bool:
        value = self.data[key]
        if not isinstance(value, bool):
            raise ValueError(f"deployment {key} must be true or false, not {value!r}")
        return value

    def read_float(self, key: str) -> float:
        return _float(self.data[key], key)

    def read_optional_float(self, key: str) -> float | None:
        value = self.data[key]
        return None if value is None else _float(value, key)

    def read_mapping(self, key: str) -> Mapping[str, Any]:
        value = self.data[key]
        if not isinstance(value, Mapping):
            raise ValueError(f"deployment {key} must be an object")
        return value

    def read_list(self, key: str) -> list[Any]:
        value = self.data[key]
        if not isinstance(value, list):
            raise ValueError(f"deployment {key} must be a list")
        return value

    def read_str_list(self, key: str) -> list[str]:
        return _str_list(self.data[key], key)


def _str(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"deployment {key} must be a string, not {value!r}")
    return value


def _opt_str(value: object, key: str) -> str | None:
    return None if value is None else _str(value, key)


def _str_list(value: object, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"deployment {key} must be a list of strings")
    return [_str(v, key) for v in value]


def _float(value: object, key: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"deployment {key} must be a finite number, not {value!r}")
    return float(value)


def _state(value: str, key: str) -> DeploymentState:
    try:
        return DeploymentState(value)
    except ValueError:
        raise ValueError(f"deployment {key} {value!r} is not one of "
                         f"{', '.join(s.value for s in DeploymentState)}") from None
