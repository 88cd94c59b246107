"""Every example DAG, triggered by hand under a real scheduler, succeeds.

As a user does it from the UI: the REST API's trigger with no logical date (``dag.test()`` in the
suite sets none either, but runs no scheduler, ignores pools and runs no task in a worker process).
The ``jimeng`` pool is created first, as docs/getting-started.md says; without it the mapped
example's tasks stay scheduled for ever. No browser: ``make e2e PYTEST_ARGS="-k examples"`` runs this
alone. The review example waits for a person: the test answers it through the HITL REST API, as a
reviewer in *Required actions* would.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.e2e.conftest import EXAMPLE_FILES
from tests.e2e.stack import EMULATOR_API_KEY, STARTUP_TIMEOUT, AirflowStack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CONN_ID = "jimeng_default"
BUCKET = "jimeng-e2e-examples"
RUN_TIMEOUT = 420.0


@pytest.fixture
def jimeng_default(airflow_stack: AirflowStack) -> Iterator[None]:
    """``jimeng_default`` on the emulator, through the REST API; removed again if this test made it
    (test_ui_browser.py makes it through the connection form, which refuses an existing id)."""
    stack = airflow_stack
    try:
        stack.api(f"connections/{CONN_ID}")
        made = False
    except urllib.error.HTTPError:
        stack.post(
            "connections",
            {
                "connection_id": CONN_ID,
                "conn_type": "jimeng",
                "host": stack.emulator_base_url,
                "password": EMULATOR_API_KEY,
                "extra": json.dumps({"allow_http": True}),
            },
        )
        made = True
    try:
        yield
    finally:
        if made:
            stack.delete(f"connections/{CONN_ID}")


def _create_pool(stack: AirflowStack) -> None:
    """``airflow pools set jimeng 4 "JiMeng API calls"``, through the REST API."""
    with contextlib.suppress(urllib.error.HTTPError):  # 409: the pool exists
        stack.post("pools", {"name": "jimeng", "slots": 4, "description": "JiMeng API calls"})
    assert stack.api("pools/jimeng")["slots"] >= 1


#: A review is answered once its question is this old. Airflow 3.3's LocalExecutor fails a task resumed
#: before the scheduler has processed the executor's event for the process that parked it ("finished with
#: state success, but the task instance's state attribute is queued"); a person never answers that fast.
ANSWER_AFTER = timedelta(seconds=10)


def _answer_reviews(stack: AirflowStack) -> None:
    """A reviewer answers every waiting review (jimeng_review_before_publishing): the first two images."""
    for detail in stack.api("dags/~/dagRuns/~/hitlDetails?response_received=false")["hitl_details"]:
        asked = datetime.fromisoformat(detail["created_at"].replace("Z", "+00:00"))  # Python 3.10 reads no "Z"
        if datetime.now(timezone.utc) - asked < ANSWER_AFTER:
            continue
        ti = detail["task_instance"]
        images = [option for option in detail["options"] if option.startswith("#")]
        path = (
            f"dags/{ti['dag_id']}/dagRuns/{urllib.parse.quote(ti['dag_run_id'], safe='')}"
            f"/taskInstances/{ti['task_id']}/{ti['map_index']}/hitlDetails"
        )
        stack.post(path, {"chosen_options": images[:2] or detail["options"][:1]}, method="PATCH")


def test_every_example_dag_succeeds_when_triggered_by_hand(airflow_stack: AirflowStack, jimeng_default: None) -> None:
    stack = airflow_stack
    _create_pool(stack)
    s3 = stack.s3_client(BUCKET)
    dag_ids = [Path(path).stem for path in EXAMPLE_FILES]
    for dag_id in dag_ids:
        stack.wait_for(f"DAG {dag_id} parsed", lambda d=dag_id: stack.api(f"dags/{d}")["dag_id"], STARTUP_TIMEOUT)

    started = time.monotonic()
    runs = {}
    for dag_id in dag_ids:
        params = stack.api(f"dags/{dag_id}/details")["params"]
        conf = {"bucket": BUCKET} if "bucket" in params else {}
        runs[dag_id] = stack.post(f"dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def finished() -> dict[str, str] | None:
        _answer_reviews(stack)
        states = {
            dag_id: stack.api(f"dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")["state"]
            for dag_id, run_id in runs.items()
        }
        return states if all(state in ("success", "failed") for state in states.values()) else None

    states = stack.wait_for("every example run", finished, RUN_TIMEOUT, interval=3.0)
    print(f"e2e: {len(runs)} example runs finished in {time.monotonic() - started:.0f} s: {states}")
    failed = {}
    for dag_id, state in states.items():
        if state != "success":
            path = f"dags/{dag_id}/dagRuns/{urllib.parse.quote(runs[dag_id], safe='')}/taskInstances"
            failed[dag_id] = {ti["task_id"]: ti["state"] for ti in stack.api(path)["task_instances"]}
    assert failed == {}, f"{failed}\n{stack.diagnostics()}"
    stored = s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
    assert stored > 0, "the examples that store in S3 stored nothing"
    review_run = runs["jimeng_review_before_publishing"]
    published = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"published/{review_run}/").get("Contents", [])
    assert sorted(item["Key"].rsplit(".", 1)[-1] for item in published) == ["jpeg", "jpeg", "json"]  # 2 chosen
