"""Interruptions that Airflow delivers to a running task: ``execution_timeout`` and SIGTERM (``on_kill``).

Both must stop spending at once: no prompt is sent after the interruption, the requests already in
flight (paid for) are waited for and journaled, finished prompts are recorded, and the try fails.
The retry then stores what was journaled without a new request and generates only the rest, so
that over both tries ``billed == stored``, in both response formats.

* ``execution_timeout``: Airflow's task runner raises ``AirflowTaskTimeout`` in the task's main
  thread (SIGALRM); ``dag.test()`` runs the same code. Regression: the run went on in its threads
  after the timeout, paying for all 24 prompts and storing 6.
* SIGTERM: Airflow's task runner calls ``on_kill()``; the task process must stop sending and exit.
"""

from __future__ import annotations

import datetime
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.s3 import LocalJournal
from airflow_provider_jimeng.testing import jimeng_connection_json
from tests.dags import faults_pipeline
from tests.faults.conftest import (
    FAST_RETRIES,
    FORMATS,
    RUN_AFTER,
    Pipeline,
    TaskProcesses,
    dag_for,
    image_keys,
    object_keys,
    wait_for,
)

# The thread method: Airflow's execution_timeout takes SIGALRM, which the signal method relies on, so
# a try hung after its timeout would hang the suite instead of failing the test.
pytestmark = pytest.mark.timeout(90, method="thread")

RUN_ID = f"manual__{RUN_AFTER.isoformat()}"
CONCURRENCY = 4


@pytest.fixture(autouse=True)
def _patient_reads(emulator: JiMengEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers take 1 s here: a read timeout of 10 s (not the suite's 1 s), so nothing times out but the task."""
    extras = {**FAST_RETRIES, "timeout": 10}
    monkeypatch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(emulator.base_url, **extras))


def _state(s3_client: Any, bucket: str, space: TaskKeyspace, prompts: int) -> dict[str, Any]:
    """What a try left behind: stored images, journaled prompts (S3, and local files with their data)."""
    keys = object_keys(s3_client, bucket)
    journaled: set[int] = set()
    for key in keys:
        if key.startswith(space.journal_prefix):
            batch = json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())
            journaled |= {int(index) for index in batch["prompts"]}
    local = LocalJournal(space).read_many(range(prompts))
    stored = {index for index in range(prompts) if space.image_key(index, 0) in keys}
    return {
        "stored": stored,
        "journaled": journaled,
        "local_with_data": {index for index, entry in local.items() if entry.holds_data},
        "records": space.records_key in keys,
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_execution_timeout_stops_spending_and_the_retry_pays_nothing_twice(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    bucket: str,
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    # 24 prompts, 4 at a time, 1 s each: 6 s of work against a 3 s execution_timeout.
    emulator.latency = 1.0
    prompts = [f"a lighthouse, variation {index}" for index in range(24)]
    dag_id = dag_for(fmt, "timeout")
    space = TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    after_try_1: dict[str, Any] = {}

    def between_tries() -> None:
        after_try_1.update(
            billed=emulator.billed_images,
            requests=emulator.request_count,
            ledger=emulator.ledger,
            **_state(s3_client, bucket, space, len(prompts)),
        )
        emulator.latency = 0.0
        # The retry has what try 1 left to do, which a busy machine may not finish in 3 s (both tries
        # timed out on a loaded 2-core run): its own timeout is not what this test is about.
        task = getattr(faults_pipeline, dag_id).get_task("generate")
        monkeypatch.setattr(task, "execution_timeout", datetime.timedelta(seconds=60))

    pipeline.before_retry(between_tries)

    run = pipeline.run(dag_id, prompts=prompts)

    assert run.state == "success", run.errors
    assert run.try_number == 2
    assert run.error_types == ["AirflowTaskTimeout"]
    # Try 1 stopped sending at the timeout: each of the 4 threads starts at most one request a
    # second, so 3 s allow 3 rounds, the last of them in flight at the timeout (bound: one more round).
    billed_1 = after_try_1["billed"]
    # (A machine busy enough to spend the 3 s in set-up sends nothing: still within the bound.)
    assert billed_1 <= CONCURRENCY * (3 + 1), after_try_1
    assert billed_1 < len(prompts)
    assert after_try_1["requests"] == billed_1
    # The engine waited for the answers in flight before failing: every one was delivered and kept,
    # stored or journaled (b64_json: journaled with its data, on this machine, the S3 journal has none).
    assert all(entry.delivered for entry in after_try_1["ledger"])
    kept = after_try_1["stored"] | after_try_1["journaled"]
    assert len(kept) == billed_1, after_try_1
    if fmt == "b64_json":
        unstored = after_try_1["journaled"] - after_try_1["stored"]
        assert unstored <= after_try_1["local_with_data"], after_try_1
    # The finished prompts are recorded (a try that timed out in set-up, on a busy machine, finished none).
    assert after_try_1["records"] or billed_1 == 0, after_try_1
    # The retry paid only for the prompts try 1 never sent.
    accounting = pipeline.account()
    assert accounting.requests == len(prompts)
    assert accounting.billed == accounting.stored == len(prompts)
    assert run.xcom["usage"]["reused_prompts"] == billed_1
    assert run.xcom["usage"]["this_try"]["generated_images"] == len(prompts) - billed_1
    # Both tries: the timed-out try wrote its counts into records.json before failing.
    assert run.xcom["usage"]["tries"] == 2
    assert run.xcom["usage"]["generated_images"] == accounting.billed == len(prompts)
    after = _state(s3_client, bucket, space, len(prompts))
    assert not after["journaled"], "no journal outlives a successful try"
    assert not after["local_with_data"]
    assert after["records"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigterm_stops_sending_at_once_and_the_process_exits(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    bucket: str,
    s3_client: Any,
    task_processes: TaskProcesses,
    tmp_path: Path,
    fmt: str,
) -> None:
    emulator.latency = 1.0
    prompts = [f"a harbour at dawn, variation {index}" for index in range(12)]
    dag_id = dag_for(fmt, "wide")
    space = TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    result = tmp_path / "result.json"
    arguments = {"dag_id": dag_id, "run_id": RUN_ID, "bucket": bucket, "prompts": prompts, "result": str(result)}
    task_processes.start(arguments, tmp_path / "task.log")
    # The second round is sent: four answers are in, four requests in flight, four prompts waiting.
    assert wait_for(lambda: emulator.request_count >= 2 * CONCURRENCY, timeout=60), (tmp_path / "task.log").read_text()[
        -3000:
    ]
    sent = emulator.request_count
    terminated = time.monotonic()
    task_processes.signal(signal.SIGTERM)
    status = task_processes.wait(timeout=60)
    exited_after = time.monotonic() - terminated

    assert status == 1, (tmp_path / "task.log").read_text()[-3000:]
    outcome = json.loads(result.read_text())
    assert outcome["error_type"] == "JiMengGenerationIncompleteError"
    assert "not sent (the run stopped)" in outcome["error"]
    # Nothing was sent after SIGTERM; what was in flight was answered, delivered and kept.
    assert emulator.request_count == sent == 2 * CONCURRENCY
    assert wait_for(lambda: len(emulator.ledger) == sent)
    assert all(entry.delivered for entry in emulator.ledger)
    state = _state(s3_client, bucket, space, len(prompts))
    assert len(state["stored"] | state["journaled"]) == sent, state
    # It exits once the answers in flight (under a second away) are kept: it does not run on.
    assert exited_after < 15, exited_after

    emulator.latency = 0.0
    run = pipeline.run(dag_id, prompts=prompts)

    assert run.state == "success", run.errors
    assert run.try_number == 1
    accounting = pipeline.account()
    assert accounting.requests == len(prompts)
    assert accounting.billed == accounting.stored == len(prompts)
    assert run.xcom["usage"]["reused_prompts"] == sent
    after = _state(s3_client, bucket, space, len(prompts))
    assert not after["journaled"], "no journal outlives a successful try"
    assert not after["local_with_data"]
    assert after["records"]
    assert len(image_keys(s3_client, bucket)) == len(prompts)
