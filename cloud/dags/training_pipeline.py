"""`training_pipeline`: retrain, gate, register, promote, and ask for a fleet rollout.

extract → train → evaluate → export → register → promote → request_rollout, one task each
(`edgefleet.cloud.training.tasks`). Runs weekly (Sunday 03:00 UTC) and whenever
`drift_monitor` emits the retrain-request asset event. Params override the environment's
configuration for one run (`start_ns`/`end_ns` pin the window; else the last `hours`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Asset, Param, task
from airflow.timetables.assets import AssetOrTimeSchedule
from airflow.timetables.trigger import CronTriggerTimetable

from edgefleet.cloud.dags import RETRAIN_REQUEST_URI

RETRAIN_REQUEST = Asset(RETRAIN_REQUEST_URI)
# Data, fitting and gates are deterministic: retrying them cannot help. Talking to MLflow
# and the control plane can fail for a moment, so those tasks retry.
NETWORK_RETRY_DELAY = timedelta(minutes=1)


def _config(context: dict[str, Any]) -> Any:
    from edgefleet.cloud.training.tasks import TrainingConfig

    return TrainingConfig.from_env(overrides=context["params"])


with DAG(
    dag_id="training_pipeline",
    description="retrain the anomaly model and roll a better champion out to the fleet",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 3 * * 0", timezone="UTC"),
        assets=[RETRAIN_REQUEST],  # type: ignore[list-item]  # stubs want the serialized form
    ),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 0},
    params={
        "hours": Param(12.0, type="number", exclusiveMinimum=0,
                       description="training window: the last H hours of readings"),
        "start_ns": Param(None, type=["null", "integer"], description="pin the window start"),
        "end_ns": Param(None, type=["null", "integer"], description="pin the window end"),
        "model_name": Param("edgefleet-anomaly", type="string", minLength=1),
        "families": Param("", type="string",
                          description="comma-separated candidate families (empty: all)"),
        "rollout_target": Param("", type="string",
                                description="label selector of the rollout, e.g. site=plant-a"),
        "rollout_waves": Param("1,10%,50%,100%", type="string"),
    },
    tags=["edgefleet", "training"],
    doc_md=__doc__,
) as dag:

    @task
    def extract(**context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.tasks import extract_task

        return extract_task(_config(context), context["run_id"])

    @task
    def train(state: dict[str, Any], **context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.tasks import train_task

        return train_task(_config(context), state)

    @task
    def evaluate(state: dict[str, Any], **context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.tasks import evaluate_task

        return evaluate_task(_config(context), state)

    @task
    def export(state: dict[str, Any], **context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.tasks import export_task

        return export_task(_config(context), state)

    @task(retries=2, retry_delay=NETWORK_RETRY_DELAY)
    def register(state: dict[str, Any], **context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.tasks import register_task

        return register_task(_config(context), state)

    @task(retries=2, retry_delay=NETWORK_RETRY_DELAY)
    def promote(state: dict[str, Any], **context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.tasks import promote_task

        return promote_task(_config(context), state)

    @task(retries=2, retry_delay=NETWORK_RETRY_DELAY)
    def request_rollout(state: dict[str, Any], **context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.tasks import request_rollout_task

        return request_rollout_task(_config(context), state)

    # TaskFlow hands each task the previous one's XComArg; the stubs cannot see that.
    request_rollout(promote(register(export(evaluate(train(extract()))))))  # type: ignore[arg-type]
