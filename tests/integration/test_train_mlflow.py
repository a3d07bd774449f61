"""The training pipeline against the launcher's real services: history in PostgreSQL (the
fog store), the run and the model in the MLflow server (PostgreSQL backend, S3 artifacts)."""

from __future__ import annotations

import hashlib
import pickle
import secrets
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cloud.training.data import DEFAULT_SPEC, simulate_history
from edgefleet.cloud.training.tasks import TrainingConfig, run_inline
from edgefleet.edge_agent.inference import ModelBundle, OnnxScorer

pytestmark = pytest.mark.integration

# A day no other test writes readings for: the window isolates this test's history.
START_NS = 1_614_556_800 * 1_000_000_000  # 2021-03-01T00:00:00Z


def test_pipeline_registers_a_champion_in_the_mlflow_server(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    import mlflow.artifacts
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    tracking_uri = stack_env["MLFLOW_TRACKING_URI"]
    model_name = f"edgefleet-it-{secrets.token_hex(4)}"
    history = simulate_history(
        stack_env["EDGEFLEET_PG_URL"], tmp_path / "labels.jsonl", hours=1.5, assets=3,
        seed=3, anomaly_rate=0.3, start_ns=START_NS,
        device=f"train-it-{secrets.token_hex(4)}",
    )
    config = TrainingConfig(
        store_url=history.store_url, labels=str(history.labels_path),
        start_ns=history.start_ns, end_ns=history.end_ns, workdir=str(tmp_path),
        tracking_uri=tracking_uri, model_name=model_name, hop=3,
        families=("random_forest", "isolation_forest"),
    )
    result = run_inline(config)
    registered, promotion = result["registered"], result["promotion"]
    assert promotion["promoted"] and promotion["reason"] == "no champion yet"
    assert registered["version"] == "1" and promotion["champion_version"] == "1"
    # Read from PostgreSQL: every aligned second of every asset made it into a window.
    assert sum(result["windows"].values()) \
        == 3 * ((int(1.5 * 3600) - DEFAULT_SPEC.window) // 3 + 1)

    client = MlflowClient(tracking_uri=tracking_uri)
    version = client.get_model_version(model_name, registered["version"])
    assert set(version.aliases) == {"champion", "challenger"}
    assert version.tags["feature_schema_hash"] == DEFAULT_SPEC.schema_hash()
    assert version.tags["data_window"] == "2021-03-01T00:00:00Z/2021-03-01T01:30:00Z"
    assert version.tags["git_sha"]
    run = client.get_run(registered["run_id"])
    assert run.data.metrics["parity_max_abs_diff"] <= 1e-4
    assert "test_f1" in run.data.metrics and "onnx_p99_us_batch1" in run.data.metrics
    assert run.data.params["family"] in ("random_forest", "isolation_forest")
    artifacts = {a.path for folder in ("plots", "reference", "evaluation")
                 for a in client.list_artifacts(registered["run_id"], folder)}
    assert artifacts == {"plots/confusion_matrix.png", "plots/pr_curve.png",
                         "reference/feature_reference.json", "evaluation/evaluation.json"}

    # The recorded checksum is that of the file the server stores.
    stored = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(model_name, registered["version"]),
        dst_path=str(tmp_path / "download"), tracking_uri=tracking_uri))
    [onnx_file] = list(stored.rglob("*.onnx"))
    assert hashlib.sha256(onnx_file.read_bytes()).hexdigest() == version.tags["onnx_sha256"]

    # The champion, fetched back from the server, serves in the edge agent's scorer.
    model = mlflow.onnx.load_model(f"models:/{model_name}@champion")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "champion.onnx"
        onnx.save(model, path)
        scorer = OnnxScorer(ModelBundle.load(path))
    with open(Path(result["run_dir"]) / "split.pkl", "rb") as handle:
        test = pickle.load(handle).test  # noqa: S301 - written by this test's run
    with open(Path(result["run_dir"]) / "exported.pkl", "rb") as handle:
        exported = pickle.load(handle)  # noqa: S301
    np.testing.assert_allclose(scorer.score(test.X), exported.onnx_scores, atol=1e-6)

    # A second run on the same window does not beat the champion: it stays challenger.
    again = run_inline(config)
    assert again["registered"]["version"] == "2" and not again["promotion"]["promoted"]
    assert again["promotion"]["champion_version"] == "1"
    assert again["rollout"]["requested"] is False
    assert str(client.get_model_version_by_alias(model_name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(model_name, "challenger").version) == "2"
