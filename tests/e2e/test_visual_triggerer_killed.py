"""A real ``airflow triggerer`` SIGKILLed while it polls a deferred Visual API task, then restarted.

Under the real scheduler and LocalExecutor of ``make e2e`` (the stack of conftest.py), against an
emulator in this process whose tasks take long enough to kill the triggerer mid-poll. The restarted
triggerer takes the orphaned trigger over (its health threshold is set short, so it need not wait
the default 30 s for the dead one's heartbeat to age) and polls the same task ids from the trigger's
kwargs: the task resumes and stores every image, and the emulator's ledger shows each prompt
submitted (and billed) exactly once. About 40 s on top of the stack's start.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator

import pytest

from airflow_provider_jimeng.emulator import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, JiMengEmulator
from tests.e2e.stack import STARTUP_TIMEOUT, AirflowStack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

DAG_ID = "jimeng_e2e_visual_triggerer_killed"
CONN_ID = "jimeng_visual_kill"
BUCKET = "jimeng-e2e-visual-kill"
PROMPTS = ["a kite over a dune", "a teapot on a windowsill", "a lantern in the fog"]
#: Seconds each task generates: the triggerer is killed after its first poll, well before.
LATENCY = 20.0
SUBMIT = "/?Action=CVSync2AsyncSubmitTask"
POLL = "/?Action=CVSync2AsyncGetResult"

DAG_FILE = f"""
from airflow.sdk import DAG
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

with DAG(dag_id={DAG_ID!r}, schedule=None, catchup=False):
    JiMengGenerateOperator(
        task_id="generate",
        prompt={PROMPTS!r},
        jimeng_conn_id={CONN_ID!r},
        s3_bucket={BUCKET!r},
        size="1024x1024",
        deferrable=True,
        poll_interval=1,
    )
"""


@pytest.fixture
def slow_emulator() -> Iterator[JiMengEmulator]:
    with JiMengEmulator(latency=LATENCY) as emulator:
        yield emulator


@pytest.fixture
def visual_connection(airflow_stack: AirflowStack, slow_emulator: JiMengEmulator) -> Iterator[str]:
    """A Visual API connection on the slow emulator, in the metadata DB (the triggerer reads it there)."""
    airflow_stack.post(
        "connections",
        {
            "connection_id": CONN_ID,
            "conn_type": "jimeng",
            "host": slow_emulator.root_url,
            "login": DEFAULT_ACCESS_KEY_ID,
            "password": DEFAULT_SECRET_ACCESS_KEY,
            "extra": json.dumps({"api": "visual", "allow_http": True}),
        },
    )
    try:
        yield CONN_ID
    finally:
        airflow_stack.delete(f"connections/{CONN_ID}")


def _requests(emulator: JiMengEmulator, path: str, since: float = 0.0) -> list[dict[str, object]]:
    return [
        record
        for record in emulator.requests
        if record["path"] == path and float(record["received_at"] or 0) >= since  # type: ignore[arg-type]
    ]


def test_a_triggerer_killed_mid_poll_and_restarted_collects_every_image_submitting_nothing_twice(
    airflow_stack: AirflowStack, slow_emulator: JiMengEmulator, visual_connection: str
) -> None:
    stack, emulator = airflow_stack, slow_emulator
    s3 = stack.s3_client(BUCKET)
    (stack.home / "dags" / f"{DAG_ID}.py").write_text(DAG_FILE)
    stack.wait_for(f"DAG {DAG_ID} parsed", lambda: stack.api(f"dags/{DAG_ID}")["dag_id"], STARTUP_TIMEOUT)
    run_id = stack.post(f"dags/{DAG_ID}/dagRuns", {"logical_date": None})["dag_run_id"]

    # Deferred, and the triggerer has polled: kill it (its supervisor and trigger runner) mid-poll.
    stack.wait_for(
        "the task deferred", lambda: stack.task_api(DAG_ID, run_id, "generate")["state"] == "deferred", 120, 0.5
    )
    stack.wait_for("the triggerer polling", lambda: _requests(emulator, POLL), 60, 0.2)
    triggerer = stack.processes["triggerer"]
    os.killpg(triggerer.pid, signal.SIGKILL)
    triggerer.wait(timeout=10)
    killed_at = time.monotonic()
    assert len(_requests(emulator, SUBMIT)) == len(PROMPTS)
    assert emulator.billed_images == len(PROMPTS)

    # A new triggerer; it adopts the dead one's trigger once that one's heartbeat is 3 s old.
    stack.start("triggerer", "airflow", "triggerer", env={"AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "3"})
    path = f"dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}"

    def finished() -> dict[str, object] | None:
        run: dict[str, object] = stack.api(path)
        return run if run["state"] in ("success", "failed") else None

    run = stack.wait_for("the run finished", finished, 180, 1.0)
    assert run["state"] == "success", stack.diagnostics()

    assert _requests(emulator, POLL, since=killed_at), "the restarted triggerer never polled"
    # Every prompt submitted and billed exactly once, every image handed out (delivered) and stored.
    assert len(_requests(emulator, SUBMIT)) == len(PROMPTS)
    assert Counter(entry.prompt for entry in emulator.ledger) == Counter(PROMPTS)
    assert all(entry.delivered for entry in emulator.ledger)
    images = stack.task_api(DAG_ID, run_id, "generate", "/xcomEntries/images")["value"]
    images = json.loads(images) if isinstance(images, str) else images
    assert sorted(record["prompt_index"] for record in images) == list(range(len(PROMPTS)))
    stored = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}
    assert {record["key"] for record in images} <= stored
