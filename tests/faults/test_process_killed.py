"""The task process dies (SIGKILL, OOM killer, node lost) between generation and storage.

The task body runs in a child process (``tests/faults/task_process.py``: the DAG's operator, the
same connections and the same task instance identity as the ``dag.test()`` run). It is killed once
one prompt's images are journaled in S3 while their download hangs and while the other prompt is
still being generated. The retry is a rerun of the same task instance with ``dag.test()`` (same run
id, hence same keys): what Airflow does after the scheduler finds the task's process gone.

* the journaled prompt is stored by the retry without a new request (paid once);
* the prompt whose request was in flight was billed (the ledger says: not delivered) and must be
  generated again: ``billed == stored + lost_in_transit``, exactly.

A killed process writes no error message; Airflow fails the task instance itself ("the task's
process exited") and the retry's log says "finishing the storage of an earlier try's images".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from tests.faults.conftest import RUN_AFTER, Pipeline, wait_for

pytestmark = pytest.mark.timeout(90)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red fox in the snow", "a grey owl at dusk"]


def test_task_process_killed_between_generation_and_storage(
    pipeline: Pipeline, emulator: JiMengEmulator, bucket: str, tmp_path: Path
) -> None:
    # The first generation answer is slow (still in flight at the kill); the first image download
    # hangs (the other prompt is paid and journaled, not stored, at the kill).
    # The in-flight answer takes 6 s: ample time for the kill, even on a loaded machine.
    emulator.inject(Fault("slow", delay=30, path="/tos/*"), Fault("slow", delay=6.0))
    arguments = {
        "dag_id": "faults_pipeline",
        "run_id": f"manual__{RUN_AFTER.isoformat()}",
        "bucket": bucket,
        "prompts": PROMPTS,
        "size": "1K",
    }
    with (tmp_path / "task.log").open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.task_process", json.dumps(arguments)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            journaled = lambda: [key for key in pipeline.objects() if "/_pending/" in key]  # noqa: E731
            assert wait_for(lambda: bool(journaled()) and emulator.pending_faults == 0, timeout=60), (
                tmp_path / "task.log"
            ).read_text()[-3000:]
            child.kill()
        finally:
            child.kill()
            child.wait(timeout=10)

    assert emulator.billed_images == 1  # paid for one (the other is still being generated)
    assert not pipeline.account().stored  # stored nothing
    (journal,) = journaled()

    run = pipeline.run("faults_pipeline", prompts=PROMPTS)

    # The request in flight at the kill completes on the server meanwhile: billed, never delivered.
    assert wait_for(
        lambda: len(emulator.ledger) == 3 and any(not entry.delivered for entry in emulator.ledger), timeout=15
    )
    lost: Any = [entry for entry in emulator.ledger if not entry.delivered]
    assert len(lost) == 1

    assert run.state == "success"
    assert run.try_number == 1
    assert run.xcom["usage"]["reused_prompts"] == 1
    accounting = pipeline.account()
    assert accounting.requests == 3  # two in the killed process, one in the retry
    assert accounting.stored == 2
    assert accounting.undelivered == 1
    assert accounting.billed == accounting.stored + accounting.lost_in_transit
    # The journaled prompt was paid exactly once; only the one lost in flight was paid twice.
    billed_per_prompt = {prompt: sum(e.images for e in emulator.ledger if e.prompt == prompt) for prompt in PROMPTS}
    assert sorted(billed_per_prompt.values()) == [1, 2]
    assert billed_per_prompt[lost[0].prompt] == 2
    assert journal not in pipeline.objects()  # the journal is dropped once the record is written
