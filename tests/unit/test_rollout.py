"""The staged rollout engine (cloud/control/rollout.py): wave parsing and planning, gates,
automatic and manual rollbacks, operator transitions, persistence and idempotency, driven
by simulated device reports on a simulated clock."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from itertools import accumulate
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.cloud.control.rollout import (
    MAX_WAVES,
    NOT_MANAGED,
    Deployment,
    DeploymentState,
    DeviceReport,
    GatePolicy,
    InvalidTransition,
    StepResult,
    WaveSpec,
    abort,
    changed_devices,
    create_deployment,
    desired_model,
    parse_waves,
    pause,
    plan_waves,
    progress,
    resume,
    rollback,
    started_devices,
    step,
)

OLD, NEW = "pump-anomaly/1", "pump-anomaly/2"
T0 = 1_000.0
GOOD: dict[str, Any] = {
    "rows": 600, "batches": 60, "errors": 0, "error_rate": 0.0, "latency_p99_us": 850.0,
    "compared_rows": 600, "anomaly_rate_current": 0.05, "anomaly_rate_candidate": 0.06,
    "anomaly_rate_shift": 0.01, "elapsed_s": 60.0,
}
S = DeploymentState


def devices(n: int) -> list[str]:
    return [f"gw-{i:04d}" for i in range(n)]


def fleet(n: int, previous: str | None = OLD) -> dict[str, str | None]:
    return dict.fromkeys(devices(n), previous)


def report(device: str, at: float, state: str = "applied", current: str | None = NEW,
           shadow: Mapping[str, Any] | None = GOOD, reason: str = "") -> DeviceReport:
    return DeviceReport(device=device, generation=2, current=current, state=state,
                        reason=reason, shadow=None if shadow is None else dict(shadow), at=at)


def applied(devs: list[str], at: float) -> dict[str, DeviceReport]:
    return {d: report(d, at) for d in devs}


def back(dep: Deployment, devs: list[str], at: float,
         state: str = "applied") -> dict[str, DeviceReport]:
    return {d: report(d, at, state=state, current=dep.previous[d], shadow=None) for d in devs}


def deploy(n: int = 40, waves: str = "4,25%,100%", **policy: Any) -> Deployment:
    return create_deployment("dep-1", NEW, fleet(n), waves, GatePolicy(**policy), "seed-1", T0)


def twice(dep: Deployment, reports: Mapping[str, DeviceReport], now: float) -> StepResult:
    """`step`, checked to be idempotent: the same inputs again change nothing."""
    result = step(dep, reports, now)
    again = step(result.deployment, reports, now)
    assert again.deployment == result.deployment
    assert again.events == () and again.changed_devices == ()
    return result


# --- parse_waves / plan_waves ---------------------------------------------------------------


def test_parse_waves_accepts_counts_and_percentages() -> None:
    assert parse_waves("1,10%,50%,100%") == (
        WaveSpec(count=1), WaveSpec(percent=10.0), WaveSpec(percent=50.0),
        WaveSpec(percent=100.0))
    assert parse_waves(" 5, 25 % ,100%") == (
        WaveSpec(count=5), WaveSpec(percent=25.0), WaveSpec(percent=100.0))
    assert parse_waves("12.5%,12.5%,100%")[0] == WaveSpec(percent=12.5)  # equal is fine
    assert parse_waves("1,10,100") == (WaveSpec(count=1), WaveSpec(count=10),
                                       WaveSpec(count=100))
    assert [str(w) for w in parse_waves("3,12.5%,100%")] == ["3", "12.5%", "100%"]


@pytest.mark.parametrize(("text", "message"), [
    ("", "no waves"),
    ("  ", "no waves"),
    ("1,,100%", "wave 2 is empty"),
    ("1,100%,", "wave 3 is empty"),
    ("0,100%", "at least 1 device"),
    ("-3,100%", "negative"),
    ("-10%,100%", "negative"),
    ("0%,100%", "more than 0"),
    ("0.0%", "more than 0"),
    ("101%", "cannot exceed 100"),
    ("50%,10%,100%", "cannot decrease"),
    ("10,5,100%", "cannot decrease"),
    ("ten,100%", "neither a device count nor a percentage"),
    ("1.5,100%", "neither a device count nor a percentage"),
    ("1e2%", "not a percentage"),
    ("%", "not a percentage"),
    ("100%,100%", "follows a 100% wave"),
    ("10%,100%,5", "follows a 100% wave"),
    (",".join(["1"] * (MAX_WAVES + 1)), f"at most {MAX_WAVES}"),
])
def test_parse_waves_refuses_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_waves(text)


def test_plan_waves_examples() -> None:
    waves = plan_waves(devices(1000), parse_waves("1,10%,50%,100%"), "s")
    assert [len(w) for w in waves] == [1, 99, 400, 500]
    # 7 % of 100 is 7 (exact arithmetic, not ceil(7.000000000000001))
    assert [len(w) for w in plan_waves(devices(100), parse_waves("7%,100%"), "s")] == [7, 93]
    # a 1-device fleet: one wave, the empty ones dropped
    assert plan_waves(["only"], parse_waves("1,10%,50%,100%"), "s") == [["only"]]
    # a count larger than the fleet is the whole fleet
    whole = plan_waves(devices(3), parse_waves("5"), "s")
    assert len(whole) == 1 and sorted(whole[0]) == devices(3)
    # a count above a later percentage's target: that wave is empty and dropped
    assert [len(w) for w in plan_waves(devices(10), parse_waves("5,10%,100%"), "s")] == [5, 5]


def test_plan_waves_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="must cover the whole fleet"):
        plan_waves(devices(10), parse_waves("1,5"), "s")
    assert len(plan_waves(devices(5), parse_waves("1,5"), "s")) == 2
    with pytest.raises(ValueError, match="no devices"):
        plan_waves([], parse_waves("100%"), "s")
    with pytest.raises(ValueError, match="more than once: a"):
        plan_waves(["a", "b", "a"], parse_waves("100%"), "s")
    with pytest.raises(ValueError, match="no waves"):
        plan_waves(["a"], (), "s")


wave_lists = st.tuples(
    st.one_of(st.none(), st.integers(1, 60)),
    st.lists(st.integers(1, 99), max_size=6).map(sorted),
).map(lambda t: ([WaveSpec(count=t[0])] if t[0] else [])
      + [WaveSpec(percent=float(p)) for p in t[1]] + [WaveSpec(percent=100.0)])


@settings(max_examples=50, deadline=None)
@given(ids=st.sets(st.integers(0, 10_000), min_size=1, max_size=150),
       waves=wave_lists, seed=st.text(max_size=10), shuffle=st.randoms(use_true_random=False))
def test_plan_waves_partitions_the_fleet(ids: set[int], waves: list[WaveSpec], seed: str,
                                         shuffle: random.Random) -> None:
    listed = sorted(f"gw-{i}" for i in ids)
    plan = plan_waves(listed, waves, seed)
    flat = [d for wave in plan for d in wave]
    assert sorted(flat) == listed  # every device exactly once
    assert all(plan)  # no empty wave
    n = len(listed)
    targets = [max(1, math.ceil(w.percent * n / 100)) if w.percent is not None
               else min(w.count or 0, n) for w in waves]
    expected = sorted(set(accumulate(targets, max)))
    assert list(accumulate(len(w) for w in plan)) == expected
    shuffle.shuffle(listed)
    assert plan_waves(listed, waves, seed) == plan  # deterministic, whatever the input order


def test_plan_waves_spreads_the_first_device_across_seeds() -> None:
    fleet_ = devices(50)
    firsts = [plan_waves(fleet_, parse_waves("1,100%"), f"dep-{i}")[0][0] for i in range(200)]
    assert len(set(firsts)) >= 30  # ~49 expected; never the same device every time
    assert plan_waves(fleet_, parse_waves("1,100%"), "dep-7") == \
        plan_waves(fleet_, parse_waves("1,100%"), "dep-7")


# --- policy, reports, creation --------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"apply_timeout_s": 0}, {"bake_s": -1}, {"max_error_rate": 1.5},
    {"max_latency_p99_us": float("nan")}, {"max_anomaly_rate_shift": -0.1},
    {"min_shadow_rows": -1}, {"min_shadow_rows": 1.5}, {"min_success_ratio": 0},
    {"min_success_ratio": 1.01}, {"bake_s": True}, {"apply_timeout_s": float("inf")},
])
def test_gate_policy_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GatePolicy(**kwargs)


def test_gate_policy_shadow_judgement() -> None:
    policy = GatePolicy()
    assert policy.shadow_failure(GOOD) is None
    assert policy.shadow_failure({**GOOD, "anomaly_rate_shift": None,
                                  "anomaly_rate_current": None}) is None  # no current model
    assert policy.shadow_failure({**GOOD, "error_rate": float("nan")}) == "error_rate nan > 0.01"
    assert policy.shadow_failure({**GOOD, "rows": 0, "latency_p99_us": None}) == "rows 0 < 1"
    assert policy.shadow_failure({**GOOD, "latency_p99_us": None}) == \
        "latency_p99_us unknown although rows were scored"
    assert policy.shadow_failure({k: v for k, v in GOOD.items() if k != "error_rate"}) == \
        "shadow statistics lack error_rate"
    assert "not a number" in (policy.shadow_failure({**GOOD, "error_rate": "0"}) or "")
    assert policy.shadow_failure(None) == "no shadow statistics"
    assert GatePolicy(min_shadow_rows=0).shadow_failure(None) is None
    # a device without a model has no live windows to shadow on: no row minimum
    nothing = {**GOOD, "rows": 0, "latency_p99_us": None, "anomaly_rate_shift": None}
    assert policy.shadow_failure(nothing, had_model=False) is None
    assert policy.shadow_failure(None, had_model=False) is None
    assert policy.shadow_failure({**GOOD, "error_rate": 0.5}, had_model=False) == \
        "error_rate 0.5 > 0.01"
    assert [GatePolicy(min_success_ratio=r).allowed_failures(10) for r in (1.0, 0.9, 0.85)] \
        == [0, 1, 1]
    assert GatePolicy(min_success_ratio=0.01).allowed_failures(1) == 0


def test_device_report_validation() -> None:
    with pytest.raises(ValueError, match="state 'done'"):
        report("gw-1", T0, state="done")
    with pytest.raises(ValueError, match="generation"):
        DeviceReport("gw-1", -1, NEW, "applied")
    with pytest.raises(ValueError, match="finite"):
        report("gw-1", float("nan"))


def test_create_deployment_rules() -> None:
    dep = create_deployment("d", NEW, {"a": OLD, "b": NEW, "c": None}, "1,100%",
                            GatePolicy(), "s", T0)
    assert dep.skipped == ["b"] and sorted(dep.planned) == ["a", "c"]
    assert desired_model(dep, "b") is NOT_MANAGED  # already on the target: never touched
    assert desired_model(dep, "nobody") is NOT_MANAGED
    assert started_devices(dep) == dep.waves[0] and desired_model(dep, dep.waves[0][0]) == NEW
    assert desired_model(dep, dep.waves[1][0]) is NOT_MANAGED
    with pytest.raises(ValueError, match="no devices"):
        create_deployment("d", NEW, {}, "100%", GatePolicy(), "s", T0)
    with pytest.raises(ValueError, match="already run"):
        create_deployment("d", NEW, {"a": NEW}, "100%", GatePolicy(), "s", T0)
    for bad in ("pump@champion", "models:/pump/2", "pump", "../x/2"):
        with pytest.raises(ValueError):
            create_deployment("d", bad, {"a": OLD}, "100%", GatePolicy(), "s", T0)
    with pytest.raises(ValueError, match="previous model of a"):
        create_deployment("d", NEW, {"a": "pump@x"}, "100%", GatePolicy(), "s", T0)


# --- a whole rollout ------------------------------------------------------------------------


def test_1000_devices_in_4_waves_converge_with_bake_honoured() -> None:
    dep = create_deployment("big", NEW, fleet(1000), "1,10%,50%,100%",
                            GatePolicy(bake_s=60.0), "seed", T0)
    assert [len(w) for w in dep.waves] == [1, 99, 400, 500]
    told = dict.fromkeys(started_devices(dep), T0)
    reports: dict[str, DeviceReport] = {}
    timeline: list[tuple[float, str]] = []
    now = T0
    while not dep.state.terminal:
        now += 5.0
        assert now < T0 + 2_000, "the rollout did not converge"
        for device, at in told.items():
            if device not in reports and now - at >= 10.0:  # every device takes 10 s
                reports[device] = report(device, now)
        result = twice(dep, reports, now)
        for device in result.changed_devices:
            assert desired_model(result.deployment, device) == NEW
            told[device] = now
        timeline += [(now, event) for event in result.events]
        dep = result.deployment
    assert dep.state is S.SUCCEEDED and dep.reasons == []
    assert set(dep.device_status.values()) == {"passed"} and len(told) == 1000
    assert all(desired_model(dep, d) == NEW for d in devices(1000))
    passed = [t for t, e in timeline if " passed: " in e]
    started = [t for t, e in timeline if " started: " in e]
    done = [t for t, e in timeline if e.startswith("succeeded")]
    assert len(passed) == 4 and len(started) == 3 and len(done) == 1
    assert [s - p for p, s in zip(passed, [*started, *done], strict=True)] == [60.0] * 4
    summary = progress(dep)
    assert summary["percent"] == 100.0 and summary["state"] == "succeeded"
    assert [w["passed"] for w in summary["per_wave"]] == [1, 99, 400, 500]


def test_bake_watches_the_wave_and_a_late_failure_rolls_back() -> None:
    dep = deploy(bake_s=300.0)
    wave1 = dep.waves[0]
    dep = twice(dep, applied(wave1, T0 + 10), T0 + 10).deployment
    assert dep.state is S.BAKING and dep.baked_since == T0 + 10
    assert twice(dep, applied(wave1, T0 + 10), T0 + 309).deployment.state is S.BAKING
    late = {**applied(wave1, T0 + 10),
            wave1[2]: report(wave1[2], T0 + 200, state="failed", reason="ONNX runtime crash")}
    result = twice(dep, late, T0 + 200)
    assert result.deployment.state is S.ROLLING_BACK
    assert f"{wave1[2]}: failed to apply {NEW} (ONNX runtime crash)" in \
        result.deployment.reasons[0]


# --- failure modes: stop in wave 1, roll back exactly the devices told the target ------------


FAILURES: dict[str, tuple[Callable[[str, float], DeviceReport | None], str]] = {
    "refused (corrupt bytes)": (
        lambda d, at: report(d, at, state="refused", current=OLD, shadow=None,
                             reason="hash_mismatch: artifact sha256 does not match"),
        f"refused {NEW} (hash_mismatch"),
    "failed": (lambda d, at: report(d, at, state="failed", current=OLD, shadow=None,
                                    reason="activation failed"),
               f"failed to apply {NEW} (activation failed)"),
    "latency gate": (lambda d, at: report(d, at, shadow={**GOOD, "latency_p99_us": 9000.0}),
                     "latency_p99_us 9000 > 5000"),
    "anomaly shift (a model that flags everything)": (
        lambda d, at: report(d, at, shadow={**GOOD, "anomaly_rate_candidate": 0.67,
                                            "anomaly_rate_shift": 0.62}),
        "anomaly_rate_shift 0.62 > 0.2"),
    "error rate": (lambda d, at: report(d, at, shadow={**GOOD, "errors": 6, "error_rate": 0.1}),
                   "error_rate 0.1 > 0.01"),
    "agent rolled back by itself": (
        lambda d, at: report(d, at, state="rolled_back", current=OLD, shadow=None),
        f"rolled {NEW} back by itself (now on {OLD})"),
    "apply timeout": (lambda d, at: None, "not applied within 120 s"),
}


@pytest.mark.parametrize("mode", list(FAILURES))
def test_a_failure_in_wave_1_rolls_back_exactly_wave_1(mode: str) -> None:
    make_bad, measure = FAILURES[mode]
    dep = deploy()
    wave1 = dep.waves[0]
    assert len(wave1) == 4
    bad = wave1[1]
    reports = applied([d for d in wave1 if d != bad], T0 + 20)
    bad_report = make_bad(bad, T0 + 30)
    if bad_report is not None:
        reports[bad] = bad_report
        now = T0 + 30
    else:
        held = twice(dep, reports, T0 + 119.9)
        assert held.deployment.state is S.ROLLING and held.changed_devices == ()
        now = T0 + 120
    result = twice(dep, reports, now)
    after = result.deployment
    assert after.state is S.ROLLING_BACK and after.wave_index == 0
    assert f"{bad}: {measure}" in after.reasons[0]
    assert after.reasons[0].startswith("wave 1 of 3 failed its gate")
    assert result.changed_devices == tuple(wave1)
    assert all(desired_model(after, d) == OLD for d in wave1)
    assert all(desired_model(after, d) is NOT_MANAGED for d in after.planned[4:])
    assert any(e.startswith(f"{bad}: ") or "not applied within" in e for e in result.events)
    # the three good devices ran the target: the rollback waits for them
    assert sorted(after.reached) == sorted(set(wave1) - {bad} | (
        {bad} if mode in ("latency gate", "anomaly shift (a model that flags everything)",
                          "error rate") else set()))
    waiting = [d for d in wave1 if d in after.reached]
    now += 10
    assert twice(after, {**reports, **back(after, waiting[:-1], now)}, now) \
        .deployment.state is S.ROLLING_BACK
    done = twice(after, {**reports, **back(after, waiting, now)}, now).deployment
    assert done.state is S.ROLLED_BACK
    assert {done.device_status[d] for d in waiting} == {"rolled_back"}
    assert step(done, {}, now + 1000).deployment is done  # terminal


def test_rollback_completes_only_when_devices_report_their_previous_model() -> None:
    previous: dict[str, str | None] = {"a": OLD, "b": None, "c": "pump-anomaly/0"}
    dep = create_deployment("d", NEW, previous, "100%", GatePolicy(), "s", T0)
    reports = applied(["a", "b", "c"], T0 + 5)
    reports["c"] = report("c", T0 + 5, shadow={**GOOD, "anomaly_rate_shift": 0.5})
    dep = twice(dep, reports, T0 + 5).deployment
    assert dep.state is S.ROLLING_BACK and dep.reached == ["a", "b", "c"]
    assert [desired_model(dep, d) for d in "abc"] == [OLD, None, "pump-anomaly/0"]
    # still on the target, in whatever state: not back
    reports["a"] = report("a", T0 + 10, state="downloading", current=NEW, shadow=None)
    reports["b"] = report("b", T0 + 10, current="pump-anomaly/0", shadow=None)  # wrong model
    dep = twice(dep, reports, T0 + 10).deployment
    assert dep.state is S.ROLLING_BACK
    reports.update(back(dep, ["a"], T0 + 20, state="rolled_back"))
    reports.update(back(dep, ["c"], T0 + 20))
    dep = twice(dep, reports, T0 + 20).deployment
    assert dep.state is S.ROLLING_BACK and progress(dep)["rollback_waiting"] == 1
    reports.update(back(dep, ["b"], T0 + 30))  # current None: the model it had (none)
    result = twice(dep, reports, T0 + 30)
    assert result.deployment.state is S.ROLLED_BACK and result.changed_devices == ()
    assert any(e.startswith("rolled back:") for e in result.events)


def test_a_first_model_on_devices_without_one() -> None:
    dep = create_deployment("d", NEW, {"fresh": None, "used": OLD}, "100%", GatePolicy(),
                            "s", T0)
    nothing = {**GOOD, "rows": 0, "latency_p99_us": None, "anomaly_rate_current": None,
               "anomaly_rate_shift": None}
    reports = {"fresh": report("fresh", T0 + 5, shadow=nothing),
               "used": report("used", T0 + 5, shadow=nothing)}
    result = twice(dep, reports, T0 + 5)
    assert result.deployment.state is S.ROLLING_BACK  # "used" had a model: 0 rows fail
    assert result.deployment.device_reasons == {"used": "rows 0 < 1"}
    reports["used"] = report("used", T0 + 5)
    assert twice(dep, reports, T0 + 5).deployment.state is S.SUCCEEDED


def test_devices_that_never_left_count_at_once() -> None:
    dep = deploy()
    wave1 = dep.waves[0]
    reports = {d: report(d, T0 + 5, state="refused", current=OLD, shadow=None,
                         reason="bad_signature") for d in wave1}
    dep = twice(dep, reports, T0 + 5).deployment
    assert dep.state is S.ROLLED_BACK and dep.reached == []
    assert all(desired_model(dep, d) == OLD for d in wave1)


def test_tolerated_failures_with_min_success_ratio() -> None:
    policy = {"min_success_ratio": 0.8}
    dep = deploy(n=10, waves="100%", **policy)
    wave = dep.waves[0]
    reports = applied(wave, T0 + 5)
    for d in wave[:2]:
        reports[d] = report(d, T0 + 5, state="refused", current=OLD, shadow=None)
    result = twice(dep, reports, T0 + 5)
    assert result.deployment.state is S.SUCCEEDED
    assert progress(result.deployment)["per_wave"][0]["failed"] == 2
    reports[wave[2]] = report(wave[2], T0 + 5, state="failed", current=OLD, shadow=None)
    failing = twice(deploy(n=10, waves="100%", **policy), reports, T0 + 5).deployment
    assert failing.state is S.ROLLING_BACK and "3 of 10 device(s) failed, 2 allowed" in \
        failing.reasons[0]


def test_stale_and_inconsistent_reports() -> None:
    dep = deploy()
    first = dep.waves[0][0]
    # received when the wave started (or before): it cannot answer the target; ignored
    stale = {first: report(first, T0, state="failed", current=OLD, shadow=None)}
    assert step(dep, stale, T0 + 1).deployment is dep
    # reports of devices in waves not started are ignored
    later = dep.waves[1][0]
    assert step(dep, {later: report(later, T0 + 1, state="failed")}, T0 + 1).deployment is dep
    with pytest.raises(ValueError, match="given as"):
        step(dep, {"other": report(first, T0 + 1)}, T0 + 2)
    with pytest.raises(ValueError, match="finite"):
        step(dep, {}, float("nan"))
    # a report received after `now` (another request's clock) is fresh, not an error
    assert step(dep, {first: report(first, T0 + 5)}, T0 + 2).deployment.device_status[
        first] == "applied"
    # a `now` before the last update (a concurrent caller's clock) counts as that time
    moved = step(dep, {first: report(first, T0 + 5)}, T0 + 5).deployment
    assert step(moved, {}, T0 + 1).deployment is moved
    assert pause(moved, T0 + 1).paused_at == T0 + 5
    # "applied" while running another model fails
    odd = {first: report(first, T0 + 3, current=OLD)}
    assert "reports applied but runs" in step(dep, odd, T0 + 3).deployment.reasons[0]


def test_a_new_wave_is_not_judged_on_reports_from_before_it_started() -> None:
    dep = deploy()
    wave1, wave2 = dep.waves[0], dep.waves[1]
    # wave 2's devices last said "failed" (an earlier deployment), received just now
    reports = {**applied(wave1, T0 + 10),
               **{d: report(d, T0 + 10, state="failed", current=OLD) for d in wave2}}
    result = twice(dep, reports, T0 + 10)
    assert result.deployment.state is S.ROLLING and result.deployment.wave_index == 1
    assert result.changed_devices == tuple(wave2)


# --- operator transitions -------------------------------------------------------------------


def test_pause_freezes_the_timer_and_resume_shifts_it() -> None:
    dep = deploy()
    wave1 = dep.waves[0]
    some = applied(wave1[:3], T0 + 10)
    dep = pause(twice(dep, some, T0 + 10).deployment, T0 + 50)
    assert dep.state is S.PAUSED and dep.paused_from_state is S.ROLLING
    assert desired_model(dep, wave1[0]) == NEW
    # no timeout while paused, and no pass even when every device applied
    assert twice(dep, some, T0 + 900).deployment.state is S.PAUSED
    everyone = applied(wave1, T0 + 900)
    held = twice(dep, everyone, T0 + 900).deployment
    assert held.state is S.PAUSED and held.device_status[wave1[3]] == "applied"
    resumed = resume(dep, T0 + 1000)
    assert changed_devices(dep, resumed) == ()
    dep = resumed
    assert dep.state is S.ROLLING and dep.wave_started_at == T0 + 950  # 950 s paused
    assert twice(dep, some, T0 + 1069).deployment.state is S.ROLLING  # 119 s of the wave
    timed_out = twice(dep, some, T0 + 1070).deployment
    assert timed_out.state is S.ROLLING_BACK
    assert f"{wave1[3]}: not applied within 120 s" in timed_out.reasons[0]


def test_failures_still_roll_back_while_paused() -> None:
    dep = pause(deploy(), T0 + 1)
    good, bad = dep.waves[0][:2]
    reports = {good: report(good, T0 + 5),
               bad: report(bad, T0 + 5, state="refused", current=OLD)}
    result = twice(dep, reports, T0 + 5)
    assert result.deployment.state is S.ROLLING_BACK  # waits for `good` to come back
    assert result.deployment.paused_from_state is None
    assert result.changed_devices == tuple(dep.waves[0])


def test_pause_during_bake_shifts_the_bake() -> None:
    dep = deploy(bake_s=100.0)
    reports = applied(dep.waves[0], T0 + 10)
    dep = twice(dep, reports, T0 + 10).deployment
    dep = pause(dep, T0 + 60)
    assert dep.paused_from_state is S.BAKING
    dep = resume(dep, T0 + 160)
    assert dep.state is S.BAKING and dep.baked_since == T0 + 110
    assert twice(dep, reports, T0 + 209).deployment.state is S.BAKING
    assert twice(dep, reports, T0 + 210).deployment.wave_index == 1


def test_abort_with_and_without_rollback() -> None:
    dep = twice(deploy(), applied(deploy().waves[0][:2], T0 + 5), T0 + 5).deployment
    wave1 = dep.waves[0]
    kept = abort(dep, T0 + 10, rollback=False)
    assert kept.state is S.ABORTED and changed_devices(dep, kept) == ()
    assert all(desired_model(kept, d) == NEW for d in wave1)
    assert kept.reasons == ["aborted by the operator"]
    reverted = abort(dep, T0 + 10, rollback=True, reason="wrong plant")
    assert reverted.state is S.ABORTED and reverted.reasons == ["wrong plant"]
    assert changed_devices(dep, reverted) == tuple(wave1)
    assert all(desired_model(reverted, d) == OLD for d in wave1)
    assert all(desired_model(reverted, d) is NOT_MANAGED for d in dep.waves[1])
    assert step(reverted, applied(wave1, T0 + 20), T0 + 20).deployment is reverted
    for op in (lambda x: pause(x, T0 + 20), lambda x: resume(x, T0 + 20),
               lambda x: abort(x, T0 + 20, rollback=True),
               lambda x: rollback(x, T0 + 20, "again")):
        with pytest.raises(InvalidTransition):
            op(reverted)


def test_manual_rollback_and_invalid_transitions() -> None:
    dep = deploy(n=5, waves="100%")
    done = twice(dep, applied(dep.waves[0], T0 + 5), T0 + 5).deployment
    assert done.state is S.SUCCEEDED
    with pytest.raises(InvalidTransition, match="only a rolling or baking"):
        pause(done, T0 + 6)
    with pytest.raises(InvalidTransition, match="not paused"):
        resume(done, T0 + 6)
    with pytest.raises(InvalidTransition, match="already ended"):
        abort(done, T0 + 6, rollback=False)
    with pytest.raises(ValueError, match="needs a reason"):
        rollback(done, T0 + 6, "  ")
    undoing = rollback(done, T0 + 6, "operators saw false alarms")
    assert undoing.state is S.ROLLING_BACK
    assert changed_devices(done, undoing) == tuple(done.waves[0])
    assert undoing.reasons == ["manual rollback: operators saw false alarms"]
    with pytest.raises(InvalidTransition, match="rolling back"):
        abort(undoing, T0 + 7, rollback=False)
    with pytest.raises(InvalidTransition):
        pause(undoing, T0 + 7)
    with pytest.raises(InvalidTransition):
        rollback(undoing, T0 + 7, "twice")
    stop = abort(undoing, T0 + 7, rollback=True)  # stop waiting for stragglers
    assert stop.state is S.ABORTED and changed_devices(undoing, stop) == ()
    assert all(desired_model(stop, d) == OLD for d in done.waves[0])
    paused = pause(deploy(), T0 + 1)
    with pytest.raises(InvalidTransition, match="paused"):
        pause(paused, T0 + 2)
    # nobody reached the target yet: rolled back at once
    early = rollback(paused, T0 + 2, "wrong version")
    assert early.state is S.ROLLED_BACK and early.paused_from_state is None


# --- persistence, idempotency, progress ------------------------------------------------------


def roundtrip(dep: Deployment) -> None:
    text = json.dumps(dep.to_dict())
    again = Deployment.from_dict(json.loads(text))
    assert again == dep
    assert json.dumps(again.to_dict()) == text


ops = st.lists(st.tuples(
    st.sampled_from(["step", "step", "step", "pause", "resume", "abort", "rollback"]),
    st.floats(0.0, 90.0), st.integers(0, 2**32 - 1)), max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 25), waves=st.sampled_from(["1,10%,50%,100%", "5,25%,100%", "100%",
                                                     "2,3,100%"]),
       bake=st.sampled_from([0.0, 30.0]), ratio=st.sampled_from([1.0, 0.5]), ops=ops)
def test_any_history_round_trips_and_steps_are_idempotent(
    n: int, waves: str, bake: float, ratio: float, ops: list[tuple[str, float, int]],
) -> None:
    dep = create_deployment("h", NEW, fleet(n), waves,
                            GatePolicy(bake_s=bake, min_success_ratio=ratio), "hyp", T0)
    roundtrip(dep)
    now = T0
    outcomes = ["applied", "applied", "applied", "refused", "slow", "back"]
    for op, dt, salt in ops:
        now += dt
        rng = random.Random(salt)
        try:
            if op == "step":
                reports: dict[str, DeviceReport] = {}
                for d in started_devices(dep):
                    kind = rng.choice(outcomes)
                    if kind == "applied":
                        reports[d] = report(d, now)
                    elif kind == "refused":
                        reports[d] = report(d, now, state="refused", current=OLD)
                    elif kind == "back":
                        reports[d] = report(d, now, current=OLD, shadow=None)
                dep = twice(dep, reports, now).deployment
            elif op == "pause":
                dep = pause(dep, now)
            elif op == "resume":
                dep = resume(dep, now)
            elif op == "abort":
                dep = abort(dep, now, rollback=bool(salt % 2))
            else:
                dep = rollback(dep, now, "hypothesis")
        except InvalidTransition:
            pass
        roundtrip(dep)
        summary = progress(dep)
        assert sum(w["devices"] for w in summary["per_wave"]) == n
        assert 0.0 <= summary["percent"] <= 100.0


def test_from_dict_refuses_damaged_documents() -> None:
    good = deploy().to_dict()
    for damage, message in [
        ({"schema": "edgefleet.rollout/0"}, "schema"),
        ({"state": "exploded"}, "is not one of"),
        ({"wave_index": 7}, "does not fit"),
        ({"wave_index": True}, "integer"),
        ({"created_at": float("inf")}, "finite"),
        ({"device_status": {}}, "same devices"),
        ({"policy": {**good["policy"], "max_error_rate": 2}}, "rates"),
        ({"paused_at": 5.0}, "paused"),
    ]:
        with pytest.raises(ValueError, match=message):
            Deployment.from_dict({**good, **damage})
    with pytest.raises(ValueError, match="missing"):
        Deployment.from_dict({k: v for k, v in good.items() if k != "reached"})


def test_progress_numbers() -> None:
    dep = deploy()  # waves of 4, 6 and 30 devices
    wave1, wave2 = dep.waves[0], dep.waves[1]
    dep = twice(dep, applied(wave1, T0 + 5), T0 + 5).deployment
    reports = {**applied(wave1, T0 + 5), **applied(wave2[:3], T0 + 10)}
    dep = twice(dep, reports, T0 + 10).deployment
    summary = progress(dep)
    assert summary["state"] == "rolling" and summary["wave"] == 2 and summary["waves"] == 3
    assert summary["devices"] == 40 and summary["started"] == 10 and summary["skipped"] == 0
    assert summary["percent"] == 17.5  # 4 passed + 3 applied of 40
    assert [(w["pending"], w["applied"], w["passed"], w["failed"], w["started"])
            for w in summary["per_wave"]] == [(0, 0, 4, 0, True), (3, 3, 0, 0, True),
                                               (30, 0, 0, 0, False)]
    assert summary["reasons"] == [] and summary["failures"] == {}
    bad = wave2[3]
    reports[bad] = report(bad, T0 + 20, shadow={**GOOD, "anomaly_rate_shift": 0.62})
    summary = progress(twice(dep, reports, T0 + 20).deployment)
    assert summary["state"] == "rolling_back" and summary["per_wave"][1]["failed"] == 1
    assert summary["failures"] == {bad: "anomaly_rate_shift 0.62 > 0.2"}
    assert summary["rollback_waiting"] == 8  # 4 + 3 applied, plus the failing device
