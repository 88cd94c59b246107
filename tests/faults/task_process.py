"""The body of a task instance of the faults DAGs, run in its own process so a test can SIGKILL it.

``python -m tests.faults.task_process '<json>'`` with ``dag_id``, ``run_id``, ``bucket``, ``prompts``
and ``size``: it calls the DAG's task's ``execute()`` as Airflow's task runner would (same
connections from the environment, same task instance identity and hence the same S3 keys as the
``dag.test()`` run that retries it), minus the Airflow database.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class TaskInstanceIdentity:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def main(arguments: dict[str, Any]) -> None:
    from tests.dags import faults_pipeline

    task = getattr(faults_pipeline, arguments["dag_id"]).get_task("generate")
    # What rendering the templates would give: the values of run_conf.
    task.prompt = arguments["prompts"]
    task.s3_bucket = arguments["bucket"]
    task.size = arguments["size"]
    ti = TaskInstanceIdentity(arguments["dag_id"], arguments["run_id"], task.task_id)
    task.execute({"ti": ti})  # type: ignore[arg-type]


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
