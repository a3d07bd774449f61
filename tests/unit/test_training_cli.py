"""`edgefleet train` on the embedded defaults: a local sqlite MLflow store in the state
folder, champion/challenger promotion, and bad input leaving the champion untouched."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.cloud.training.data import DEFAULT_SPEC, Episode, load_episodes
from edgefleet.cloud.training.errors import FeatureSchemaError, TrainingDataError
from edgefleet.cloud.training.pipeline import extract_step
from edgefleet.deploy.cli import main
from edgefleet.protocols.features import FeatureSpec

NS = 1_000_000_000
FAST = ["--hours", "1.5", "--assets", "3", "--anomaly-rate", "0.3", "--seed", "3",
        "--hop", "3", "--families", "random_forest,isolation_forest", "--json"]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-state")


def _champion(state: Path) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    return str(client.get_model_version_by_alias("edgefleet-anomaly", "champion").version)


@pytest.fixture(scope="module")
def first_run(state: Path, monkeypatch_module: pytest.MonkeyPatch) -> dict[str, object]:
    code = main(["train", "--state-dir", str(state), *FAST])
    assert code == 0
    return {"code": code}


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    """No MLFLOW_TRACKING_URI from the environment: the embedded default is under test."""
    patch = pytest.MonkeyPatch()
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield patch
    patch.undo()


def test_train_registers_a_champion_on_a_fresh_state_folder(
    state: Path, first_run: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (state / "mlflow.db").exists() and (state / "fog.db").exists()
    assert list((state / "mlruns").rglob("*.onnx")), "artifacts in the local folder"
    assert _champion(state) == "1"


def test_a_retrain_that_does_not_beat_the_champion_stays_challenger(
    state: Path, first_run: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    capsys.readouterr()
    assert main(["train", "--state-dir", str(state), *FAST]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Same data, same seed: the same F1, which is not strictly better.
    assert summary["version"] == "2" and summary["promoted"] is False
    assert "does not beat champion v1" in summary["promotion"]
    assert summary["champion_version"] == "1" and _champion(state) == "1"
    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    challenger = client.get_model_version_by_alias("edgefleet-anomaly", "challenger")
    assert str(challenger.version) == "2"
    assert challenger.tags["feature_schema_hash"] == DEFAULT_SPEC.schema_hash()
    assert float(challenger.tags["champion_f1_same_window"]) >= summary["test"]["overall"]["f1"]


def _history_window(state: Path) -> tuple[int, int, tuple[Episode, ...]]:
    episodes = load_episodes(state / "labels.jsonl")
    start = 1_767_571_200 * NS  # the simulation's default start
    return start, start + int(1.5 * 3600) * NS, episodes


@pytest.mark.parametrize("bad", ["empty", "too_small", "one_class", "schema"])
def test_bad_input_fails_clearly_and_leaves_the_champion(
    state: Path, first_run: dict[str, object], bad: str
) -> None:
    start, end, episodes = _history_window(state)
    labels: tuple[Episode, ...] = episodes
    spec = DEFAULT_SPEC
    error: type[Exception] = TrainingDataError
    match = {"empty": "is empty", "too_small": "too small", "one_class": "one class only",
             "schema": "needs tags oil_level"}[bad]
    if bad == "empty":
        start, end = end + 3600 * NS, end + 7200 * NS
    elif bad == "too_small":
        end = start + 300 * NS
    elif bad == "one_class":
        labels = ()
    else:
        spec, error = FeatureSpec(tags=("speed", "oil_level"), window=30), FeatureSchemaError
    with pytest.raises(error, match=match):
        # The first task raises: nothing after it runs, in the DAG or inline.
        extract_step(f"sqlite://{state / 'fog.db'}", labels, start_ns=start, end_ns=end,
                     spec=spec)
    assert _champion(state) == "1"


def test_train_reports_a_failure_on_stderr(
    state: Path, first_run: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--state-dir", str(state), "--hours", "0.01", "--hop", "3"])
    assert code == 1
    assert "is empty: no feature windows" in capsys.readouterr().err
    assert _champion(state) == "1"
