"""Without the OpenLineage provider installed, nothing changes: the operator imports and runs."""

from __future__ import annotations

import importlib
import sys
from datetime import datetime

import pytest
from airflow.sdk import DAG

from tests.operators.conftest import Bucket, RecordingTaskInstance, TrackingEmulator

#: What `pip uninstall apache-airflow-providers-openlineage openlineage-python` takes away.
OPENLINEAGE_MODULES = ("airflow.providers.openlineage", "openlineage")


def test_the_operator_imports_and_runs_without_the_openlineage_provider(
    monkeypatch: pytest.MonkeyPatch, emulator: TrackingEmulator, bucket: Bucket
) -> None:
    # Forget the provider's modules (restored after the test) and make importing OpenLineage fail.
    for name in list(sys.modules):
        if name.startswith(("airflow_provider_jimeng", "openlineage", "airflow.providers.openlineage")):
            monkeypatch.delitem(sys.modules, name)
    for name in OPENLINEAGE_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError

    module = importlib.import_module("airflow_provider_jimeng.operators.jimeng")

    with DAG("jimeng_no_lineage", schedule=None, start_date=datetime(2025, 1, 1)):
        operator = module.JiMengGenerateOperator(task_id="gen", prompt="a fox in snow", s3_bucket=bucket.name)
    ti = RecordingTaskInstance(dag_id="jimeng_no_lineage")
    uris = operator.execute({"ti": ti})

    assert len(uris) == 1
    assert uris[0].startswith(f"s3://{bucket.name}/")
    assert ti.pushed["storage"]["prefix"].startswith(f"s3://{bucket.name}/")
    # Only the OpenLineage provider calls these methods; without it they are never reached.
    with pytest.raises(ImportError):
        operator.get_openlineage_facets_on_complete(ti)
