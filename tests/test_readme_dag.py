"""The README's DAG runs as a user would run it: triggered by hand, so without a logical date.

``tests/conftest.py`` copies the README's ``## Use`` block verbatim into the DAGs folder. A DAG that
reads ``ds`` passes under ``airflow dags test`` (which sets a logical date) and fails when triggered
from the UI, where Airflow 3 gives manual runs no logical date.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from airflow_provider_jimeng.emulator import JiMengEmulator
from tests.dag_runs import run_dag_test
from tests.test_example_dags import dag_test


def _readme_dag() -> Any:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.1
        from airflow.models.dagbag import DagBag  # type: ignore[attr-defined,no-redef]

    bag = DagBag(dag_folder=str(Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / "readme_dag.py"))
    assert bag.import_errors == {}
    return bag.dags["jimeng_products"]


@dag_test
def test_the_readme_dag_runs_when_triggered_by_hand(jimeng_conn: JiMengEmulator, s3_bucket: str) -> None:
    dag = _readme_dag()

    dag_run = run_dag_test(dag, logical_date=None, run_conf={"bucket": s3_bucket})

    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == "success", states
    assert jimeng_conn.billed_images == 3  # two mugs and one banner, each paid once
