"""`data_quality`: is the fog store's history complete enough to train on?

Hourly: per-device completeness from the fog gateway's seq accounting (received against
expected; a gap is a seq never received). Any device below `min_ratio` fails the task,
and the error names every such device with its gap count.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk import DAG, Param, task

with DAG(
    dag_id="data_quality",
    description="fail loudly when the fog store's completeness is below the threshold",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 0},
    params={
        "min_ratio": Param(0.999, type="number", exclusiveMinimum=0, maximum=1,
                           description="the lowest completeness a device may have"),
    },
    tags=["edgefleet", "data-quality"],
    doc_md=__doc__,
) as dag:

    @task
    def completeness(**context: Any) -> dict[str, Any]:
        from edgefleet.cloud.training.quality import check_completeness
        from edgefleet.cloud.training.tasks import TrainingConfig

        config = TrainingConfig.from_env()
        report = check_completeness(config.store_url, context["params"]["min_ratio"])
        print(f"completeness {report.ratio:.4%} over {len(report.devices)} device(s); "
              f"every device at or above {report.min_ratio:.2%}")
        return report.as_dict()

    completeness()
