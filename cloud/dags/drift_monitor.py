"""`drift_monitor`: are the fleet's inputs still what the champion was trained on?

Hourly: the last `hours` of readings in the fog store, featurized with the champion's own
spec, against the feature reference logged with the champion (PSI and KS per feature; see
`edgefleet.cloud.training.drift`). On drift, `request_retraining` emits an event on the
retrain-request asset, which triggers `training_pipeline`; otherwise it is skipped and no
event is emitted. With no champion registered yet there is nothing to compare: both tasks
are skipped.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG, Asset, Param, task
from airflow.sdk.exceptions import AirflowSkipException

from edgefleet.cloud.dags import RETRAIN_REQUEST_URI

RETRAIN_REQUEST = Asset(RETRAIN_REQUEST_URI)

with DAG(
    dag_id="drift_monitor",
    description="PSI/KS of recent features against the champion; drift requests retraining",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 0},
    params={
        "hours": Param(1.0, type="number", exclusiveMinimum=0,
                       description="recent window: the last H hours of readings"),
        "end_ns": Param(None, type=["null", "integer"], description="pin the window end"),
        "model_name": Param("edgefleet-anomaly", type="string", minLength=1),
        "psi_threshold": Param(0.25, type="number", exclusiveMinimum=0),
        "ks_threshold": Param(0.2, type="number", exclusiveMinimum=0, maximum=1),
        "min_features": Param(3, type="integer", minimum=1,
                              description="drifting features needed to request retraining"),
    },
    tags=["edgefleet", "training", "drift"],
    doc_md=__doc__,
) as dag:

    @task
    def measure(**context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.drift import NoChampionError, detect_drift
        from edgefleet.cloud.training.tasks import TrainingConfig

        params = context["params"]
        config = TrainingConfig.from_env(overrides={"model_name": params["model_name"]})
        if config.tracking_uri is None:
            raise AirflowSkipException("no MLflow tracking URI: no champion to compare with")
        try:
            report = detect_drift(
                store_url=config.store_url, tracking_uri=config.tracking_uri,
                model_name=config.model_name, hours=params["hours"],
                end_ns=params["end_ns"], psi_threshold=params["psi_threshold"],
                ks_threshold=params["ks_threshold"], min_features=params["min_features"],
            )
        except NoChampionError as err:
            raise AirflowSkipException(str(err)) from err
        print(report.summary())
        return report.as_dict()

    @task(outlets=[RETRAIN_REQUEST])
    def request_retraining(report: dict[str, Any], **context: Any) -> dict[str, Any]:
        if not report["drifted"]:
            raise AirflowSkipException("no drift: the champion's inputs look like its "
                                       "training data; no retraining requested")
        worst = sorted(report["features"], key=lambda f: f["psi"], reverse=True)[:5]
        request = {
            "model_name": report["model_name"],
            "champion_version": report["champion_version"],
            "drifted_features": report["drifted_features"],
            "worst": {f["name"]: {"psi": f["psi"], "ks": f["ks"]} for f in worst},
            "window": report["window"],
        }
        context["outlet_events"][RETRAIN_REQUEST].extra = request
        print(f"retraining requested: {len(report['drifted_features'])} feature(s) drifted")
        return request

    request_retraining(measure())  # type: ignore[arg-type]  # an XComArg at parse time
