"""The plant model: coupled tags in range, labelled episodes at the configured rate,
and the same plant for the same seed."""

from __future__ import annotations

import pytest

from edgefleet.firmware_sim.model import TAGS, AnomalyKind, AssetKind, Plant, load_factor

START = 1_795_000_000 * 10**9
ASSETS = [(f"{kind.value}-{i}", kind) for i, kind in enumerate(list(AssetKind) * 3)]


def plant(**kwargs: object) -> Plant:
    options: dict[str, object] = {"seed": 7, "anomaly_rate": 0.05, "start_ns": START,
                                  "tick_s": 1.0}
    options.update(kwargs)
    return Plant(ASSETS, **options)  # type: ignore[arg-type]


def test_same_seed_same_plant_however_it_is_read() -> None:
    one, other = plant(), plant()
    one.advance_to(START + 7200 * 10**9)
    for second in range(0, 7201, 13):  # read at irregular moments
        other.advance_to(START + second * 10**9)
    other.advance_to(START + 7200 * 10**9)
    assert all(one.values(a) == other.values(a) for a, _ in ASSETS)
    assert list(one.labels) == list(other.labels)
    different = plant(seed=8)
    different.advance_to(START + 7200 * 10**9)
    assert one.values("pump-0") != different.values("pump-0")


def test_values_stay_in_engineering_range() -> None:
    model = plant(anomaly_rate=0.2, tick_s=10.0)
    for hour in range(1, 25):
        model.advance_to(START + hour * 3600 * 10**9)
        for name, asset in model.assets.items():
            for spec in TAGS[asset.kind]:
                value = model.values(name)[spec.name]
                assert spec.low <= value <= spec.high, (name, spec.name, value)


def test_episodes_cover_about_the_anomaly_rate_and_are_labelled() -> None:
    model = plant(anomaly_rate=0.05, tick_s=10.0)
    model.advance_to(START + 2 * 86_400 * 10**9)
    starts = [e for e in model.labels if e.event == "start"]
    ends = {e.episode: e for e in model.labels if e.event == "end"}
    covered = sum(ends[e.episode].ts_ns - e.ts_ns for e in starts if e.episode in ends)
    fraction = covered / (2 * 86_400 * 10**9 * len(ASSETS))
    assert 0.025 < fraction < 0.09, fraction
    assert {e.kind for e in starts} >= {"bearing_wear", "overload", "stuck_sensor"}
    assert all((e.tag is not None) == AnomalyKind[e.kind.upper()].is_sensor_fault
               for e in starts)
    assert plant(anomaly_rate=0.0).status("pump-0") == AnomalyKind.NONE


def test_physics_couples_the_tags() -> None:
    model = plant(anomaly_rate=0.0, noise=0.0, tick_s=30.0)
    low_load = START + (3 * 86_400 + 2 * 3600) * 10**9  # a Sunday night
    high_load = START + (5 * 86_400 + 12 * 3600) * 10**9  # a Tuesday noon
    assert load_factor(high_load) > load_factor(low_load)
    model.advance_to(low_load)
    quiet = model.values("pump-0")
    model.advance_to(high_load)
    busy = model.values("pump-0")
    for tag in ("speed", "flow", "pressure", "current", "temperature"):
        assert busy[tag] > quiet[tag], tag


def test_bearing_wear_raises_vibration_and_temperature() -> None:
    healthy, worn = plant(anomaly_rate=0.0, noise=0.0), plant(anomaly_rate=0.0, noise=0.0)
    asset = worn.assets["pump-0"]
    from edgefleet.firmware_sim.model import _Episode

    asset.episode = _Episode(1, AnomalyKind.BEARING_WEAR, START, START + 1800 * 10**9)
    for model in (healthy, worn):
        model.advance_to(START + 1700 * 10**9)
    assert worn.values("pump-0")["vibration"] > 2 * healthy.values("pump-0")["vibration"]
    assert worn.values("pump-0")["temperature"] > healthy.values("pump-0")["temperature"] + 5


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="anomaly_rate"):
        plant(anomaly_rate=1.5)
    with pytest.raises(ValueError, match="unique"):
        Plant([("a", AssetKind.PUMP), ("a", AssetKind.PUMP)], start_ns=START)
