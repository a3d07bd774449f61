"""The training pipeline against the launcher's real services: history in PostgreSQL (the
fog store), the run and the model in the MLflow server (PostgreSQL backend, S3 artifacts)."""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cloud.training.data import DEFAULT_SPEC, simulate_history
from edgefleet.cloud.training.pipeline import run_pipeline
from edgefleet.edge_agent.inference import ModelBundle, OnnxScorer

pytestmark = pytest.mark.integration

# A day no other test writes readings for: the window isolates this test's history.
START_NS = 1_614_556_800 * 1_000_000_000  # 2021-03-01T00:00:00Z


def test_pipeline_registers_a_champion_in_the_mlflow_server(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
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
    result = run_pipeline(
        store_url=history.store_url, labels=history.labels_path, start_ns=history.start_ns,
        end_ns=history.end_ns, workdir=tmp_path / "models", tracking_uri=tracking_uri,
        model_name=model_name, hop=3, families=("random_forest", "isolation_forest"),
    )
    registration = result.registration
    assert registration is not None and registration.promoted
    assert registration.version == "1" and registration.reason == "no champion yet"
    # Read from PostgreSQL: every aligned second of every asset made it into a window.
    assert result.split.train.dropped_rows == 0
    assert len(result.split.train) + len(result.split.validation) + len(result.split.test) \
        == 3 * ((int(1.5 * 3600) - DEFAULT_SPEC.window) // 3 + 1)

    client = MlflowClient(tracking_uri=tracking_uri)
    version = client.get_model_version(model_name, registration.version)
    assert set(version.aliases) == {"champion", "challenger"}
    assert version.tags["feature_schema_hash"] == DEFAULT_SPEC.schema_hash()
    assert version.tags["data_window"] == "2021-03-01T00:00:00Z/2021-03-01T01:30:00Z"
    assert version.tags["git_sha"]
    run = client.get_run(registration.run_id)
    assert run.data.metrics["parity_max_abs_diff"] <= 1e-4
    assert "test_f1" in run.data.metrics and "onnx_p99_us_batch1" in run.data.metrics
    assert run.data.params["family"] in ("random_forest", "isolation_forest")
    artifacts = {a.path for folder in ("plots", "reference", "evaluation")
                 for a in client.list_artifacts(registration.run_id, folder)}
    assert artifacts == {"plots/confusion_matrix.png", "plots/pr_curve.png",
                         "reference/feature_reference.json", "evaluation/evaluation.json"}

    # The champion, fetched back from the server, serves in the edge agent's scorer.
    model = mlflow.onnx.load_model(f"models:/{model_name}@champion")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "champion.onnx"
        onnx.save(model, path)
        scorer = OnnxScorer(ModelBundle.load(path))
    scores = scorer.score(result.split.test.X)
    np.testing.assert_allclose(scores, result.exported.onnx_scores, atol=1e-6)

    # A second run on the same window does not beat the champion: it stays challenger.
    again = run_pipeline(
        store_url=history.store_url, labels=history.labels_path, start_ns=history.start_ns,
        end_ns=history.end_ns, workdir=tmp_path / "models", tracking_uri=tracking_uri,
        model_name=model_name, hop=3, families=("random_forest", "isolation_forest"),
    )
    assert again.registration is not None and not again.registration.promoted
    assert str(client.get_model_version_by_alias(model_name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(model_name, "challenger").version) == "2"
