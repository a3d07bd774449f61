"""The Airflow 3 DAGs of the model path. Point Airflow at this folder:

    export AIRFLOW__CORE__DAGS_FOLDER="$(python -m edgefleet.cloud.dags --folder)"

* `training_pipeline`: extract → train → evaluate → export → register → promote →
  request_rollout; weekly, and whenever `drift_monitor` requests a retraining.
* `drift_monitor`: hourly PSI and KS of recent features against the champion's reference;
  on drift it emits the `RETRAIN_REQUEST` asset event that triggers `training_pipeline`.
* `data_quality`: hourly; fails, naming the devices, when the fog store's completeness is
  below the threshold.

The task callables live in `edgefleet.cloud.training` and take plain arguments, so
`edgefleet train` runs the same functions inline and unit tests call them directly.
Configuration comes from the environment of the Airflow workers (see docs/training.md),
overridden by each DAG's params. `python -m edgefleet.cloud.dags DAG_ID` runs one DAG in
process with `dag.test()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["DAG_IDS", "FOLDER", "RETRAIN_REQUEST_URI"]

FOLDER: Final = Path(__file__).parent
DAG_IDS: Final = ("training_pipeline", "drift_monitor", "data_quality")
RETRAIN_REQUEST_URI: Final = "edgefleet://training/retrain-request"
