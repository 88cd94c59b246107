"""``dag.test()`` for the suite: the DAGs folder is synced to the metadata DB once per process, not per run.

Airflow 3.3's ``dag.test()`` re-parses and re-serialises every DAG of the folder on each call (1-2 s
here, mostly Param schema checks, for 36 DAGs), although the DAGs do not change during a session.
After the first real sync of the process the DAG versions in the database are current, so later
calls skip it. Everything else ``dag.test()`` does (scheduling, tries, XComs, the task runner) runs
as it is; releases whose ``dag.test()`` only writes the DAG it is given are left alone.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any
from unittest import mock

_SYNCED = {"done": False}


class _NoDagBag:
    def __init__(self, **kwargs: Any) -> None:
        self.dags: dict[str, Any] = {}


def _dag_test_resyncs_the_folder() -> bool:
    """Whether this Airflow's ``dag.test()`` re-syncs the DAGs folder (3.3 does; 3.0 runs the DAG it is given)."""
    try:
        from airflow.dag_processing import dagbag
    except ImportError:
        return False
    return hasattr(dagbag, "BundleDagBag") and hasattr(dagbag, "sync_bag_to_db")


def run_dag_test(dag: Any, **kwargs: Any) -> Any:
    """``dag.test(**kwargs)``, skipping the DAGs folder re-sync after the first of the process."""
    with ExitStack() as stack:
        if _SYNCED["done"] and _dag_test_resyncs_the_folder():
            stack.enter_context(mock.patch("airflow.dag_processing.dagbag.BundleDagBag", _NoDagBag))
            stack.enter_context(mock.patch("airflow.dag_processing.dagbag.sync_bag_to_db", return_value=None))
        dag_run = dag.test(**kwargs)
    _SYNCED["done"] = True
    return dag_run


def read_xcom(dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """One XCom of a run, as Airflow deserializes it (``None`` when there is none)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        query = XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=task_id, key=key, map_indexes=map_index)
        row = session.scalars(query).first()
        return None if row is None else XComModel.deserialize_value(row)
