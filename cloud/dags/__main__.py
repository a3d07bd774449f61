"""Run one DAG in this process with `dag.test()` and print what happened as JSON:

    python -m edgefleet.cloud.dags training_pipeline --conf '{"hours": 6}'
    python -m edgefleet.cloud.dags --folder        # print the DAGs folder for Airflow

Prints `{"dag_id", "run_id", "state", "tasks": {task: state}, "returns": {task: value},
"asset_events": [{"uri", "extra"}], "queued_dags": [DAGs queued on those events]}` as
the last line of stdout; Airflow's own log goes
before it. Exit status 0 when the run succeeded, 1 when it failed, 2 on usage errors.
Airflow's configuration (AIRFLOW_HOME, its metadata database, already migrated) comes from
the environment as usual.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any

from edgefleet.cloud.dags import DAG_IDS, FOLDER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgefleet.cloud.dags")
    parser.add_argument("dag_id", nargs="?", choices=DAG_IDS)
    parser.add_argument("--folder", action="store_true", help="print the DAGs folder and exit")
    parser.add_argument("--conf", default="{}", help="the run's conf (JSON object)")
    args = parser.parse_args(argv)
    if args.folder:
        print(FOLDER)
        return 0
    if args.dag_id is None:
        parser.error("name a DAG to run: " + ", ".join(DAG_IDS))
    try:
        conf = json.loads(args.conf)
    except ValueError as err:
        parser.error(f"--conf is not JSON: {err}")
    if not isinstance(conf, dict):
        parser.error("--conf must be a JSON object")
    dag = importlib.import_module(f"edgefleet.cloud.dags.{args.dag_id}").dag
    run = dag.test(run_conf=conf)
    outcome = _outcome(run)
    print(json.dumps(outcome, default=str))
    return 0 if outcome["state"] == "success" else 1


def _outcome(run: Any) -> dict[str, Any]:
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tasks = {ti.task_id: str(ti.state) for ti in run.get_task_instances(session=session)}
        returns = {
            task_id: XComModel.deserialize_value(row)
            for row in session.scalars(
                select(XComModel).where(XComModel.dag_id == run.dag_id,
                                        XComModel.run_id == run.run_id,
                                        XComModel.key == "return_value")
            )
            for task_id in [row.task_id]
        }
        events = [
            {"uri": uri, "extra": event.extra}
            for event, uri in session.execute(
                select(AssetEvent, AssetModel.uri)
                .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
                .where(AssetEvent.source_dag_id == run.dag_id,
                       AssetEvent.source_run_id == run.run_id)
            )
        ]
        queued = sorted(session.scalars(
            select(AssetDagRunQueue.target_dag_id)
            .join(AssetModel, AssetModel.id == AssetDagRunQueue.asset_id)
            .where(AssetModel.uri.in_([e["uri"] for e in events]))
        )) if events else []
    return {"dag_id": run.dag_id, "run_id": run.run_id, "state": str(run.state),
            "tasks": tasks, "returns": returns, "asset_events": events, "queued_dags": queued}


if __name__ == "__main__":
    sys.exit(main())
