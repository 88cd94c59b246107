"""End to end: a DAG run with the OpenLineage provider's own listener writes the events a backend gets.

The run happens in a child process (``dag.test()`` of ``tests/dags/jimeng_test_generate.py``) because
the provider decides whether to listen when Airflow loads its plugin, once per process; the events go
to OpenLineage's file transport, the way the provider's guide suggests system-testing lineage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.storage.keys import safe_key_part
from tests.conftest import REPO_ROOT
from tests.operators.conftest import Bucket, TrackingEmulator

pytestmark = pytest.mark.integration

RUN = """
import json, sys
from tests.compat import install_dag_test_shims
install_dag_test_shims()
from tests.dags.jimeng_test_generate import PARAMS, dag
run = dag.test(run_conf={**PARAMS, "prompts": ["a fox in snow", "a cat on a box"], "bucket": sys.argv[1]})
print("RUN", json.dumps({"run_id": run.run_id, "state": str(run.state)}))
"""


def test_the_listener_emits_the_stored_prefix_and_the_facets(
    emulator: TrackingEmulator, bucket: Bucket, tmp_path: Path, child_airflow_db: str
) -> None:
    events_file = tmp_path / "events.jsonl"
    env = {
        **os.environ,
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "jimeng-tests",
        # A metadata DB of its own: the child never shares SQLite with this process.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": child_airflow_db,
        # Emit from a thread rather than a forked child: the child's output would be lost to the test.
        "AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD": "True",
    }
    for name in [name for name in env if name.startswith("PYTEST_")]:
        env.pop(name)
    done = subprocess.run(
        [sys.executable, "-c", RUN, bucket.name],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.rsplit("RUN ", 1)[1].splitlines()[0])
    assert run["state"] == "success"

    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    gen = [event for event in events if event["job"]["name"] == "jimeng_test_generate.gen"]
    by_type: dict[str, dict[str, Any]] = {event["eventType"]: event for event in gen}
    assert set(by_type) == {"START", "COMPLETE"}

    (output,) = by_type["COMPLETE"]["outputs"]
    prefix = f"jimeng/jimeng_test_generate/{safe_key_part(run['run_id'])}/gen"
    assert (output["namespace"], output["name"]) == (f"s3://{bucket.name}", prefix)
    assert len(bucket.images(prefix + "/")) == 2, "the dataset is where the images are"
    assert output["outputFacets"]["outputStatistics"]["fileCount"] == 2
    images = output["outputFacets"]["jimeng_images"]
    assert images["imageCount"] == 2
    assert images["format"] == "jpeg"
    assert images["_schemaURL"].endswith("facets.json#/$defs/JiMengImagesOutputDatasetFacet")
    generation = by_type["COMPLETE"]["run"]["facets"]["jimeng_generation"]
    assert (generation["promptSource"], generation["promptCount"], generation["billedImages"]) == ("xcom", 2, 2)
    assert by_type["START"]["outputs"] == []
