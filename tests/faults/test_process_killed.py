"""The task process dies (SIGKILL, OOM killer, node lost) between generation and storage, in both formats.

The task body runs in a child process (``tests/faults/task_process.py``: the DAG's operator, the
same connections and the same task instance identity as the ``dag.test()`` run). The retry is a
rerun of the same task instance with ``dag.test()`` (same run id, hence same keys): what Airflow
does after the scheduler finds the task's process gone.

* killed while one prompt is paid and journaled but not stored, and another is in flight:

  * ``url``: the journaled prompt is stored by the retry from its signed URL, without a new request;
  * ``b64_json``: the S3 journal holds no image data, so that prompt is generated again (what
    docs/faults.md admits);
  * the prompt whose request was in flight was billed (the ledger says: not delivered) and is
    generated again: ``billed == stored + lost``, exactly.

* killed after every image was stored but before ``records.json`` (regression, ``b64_json``): the
  retry finds each image under its key with the journaled request id and sends nothing.

A killed process writes no error message; Airflow fails the task instance itself ("the task's
process exited") and the retry's log says "finishing the storage of an earlier try's images".
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from tests.faults.conftest import FORMATS, RUN_AFTER, Pipeline, S3Gate, TaskProcesses, dag_for, wait_for

pytestmark = pytest.mark.timeout(90)

PROMPTS = ["a red fox in the snow", "a grey owl at dusk"]
RUN_ID = f"manual__{RUN_AFTER.isoformat()}"


def _journals(pipeline: Pipeline) -> list[str]:
    return [key for key in pipeline.objects() if "/_pending/" in key]


def _start(task_processes: TaskProcesses, dag_id: str, bucket: str, prompts: list[str], tmp_path: Path) -> None:
    arguments = {"dag_id": dag_id, "run_id": RUN_ID, "bucket": bucket, "prompts": prompts, "size": "1K"}
    task_processes.start(arguments, tmp_path / "task.log")


def _kill(task_processes: TaskProcesses) -> None:
    task_processes.signal(signal.SIGKILL)
    assert task_processes.wait(timeout=30) == -signal.SIGKILL


@pytest.mark.parametrize("fmt", FORMATS)
def test_task_process_killed_between_generation_and_storage(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    tmp_path: Path,
    task_processes: TaskProcesses,
    fmt: str,
) -> None:
    # The first generation answer is slow (still in flight at the kill); the first image's storage
    # hangs (its download in url mode, its upload in b64_json mode), so the other prompt is paid and
    # journaled, not stored, at the kill. The in-flight answer takes 6 s: ample for the kill, even loaded.
    if fmt == "url":
        emulator.inject(Fault("slow", delay=30, path="/tos/*"), Fault("slow", delay=6.0))
    else:
        gate.hold = "images"
        emulator.inject(Fault("slow", delay=6.0))
    dag_id = dag_for(fmt)
    _start(task_processes, dag_id, bucket, PROMPTS, tmp_path)
    storing = (lambda: emulator.pending_faults == 0) if fmt == "url" else (lambda: bool(gate.held))
    assert wait_for(lambda: bool(_journals(pipeline)) and storing() and emulator.pending_faults == 0, timeout=60), (
        tmp_path / "task.log"
    ).read_text()[-3000:]
    _kill(task_processes)

    assert emulator.billed_images == 1  # paid for one (the other is still being generated)
    assert not pipeline.account().stored  # stored nothing
    (journal,) = _journals(pipeline)
    gate.hold = None
    gate.release()

    run = pipeline.run(dag_id, prompts=PROMPTS)

    # The request in flight at the kill completes on the server meanwhile: billed, never delivered.
    requests = 3 if fmt == "url" else 4
    assert wait_for(
        lambda: len(emulator.ledger) == requests and any(not entry.delivered for entry in emulator.ledger), timeout=15
    )
    lost: Any = [entry for entry in emulator.ledger if not entry.delivered]
    assert len(lost) == 1

    assert run.state == "success"
    assert run.try_number == 1
    accounting = pipeline.account()
    assert accounting.stored == 2
    assert accounting.undelivered == 1
    billed_per_prompt = {prompt: sum(e.images for e in emulator.ledger if e.prompt == prompt) for prompt in PROMPTS}
    if fmt == "url":
        # The journaled prompt was paid exactly once; only the one lost in flight was paid twice.
        assert run.xcom["usage"]["reused_prompts"] == 1
        assert accounting.requests == 3  # two in the killed process, one in the retry
        assert accounting.billed == accounting.stored + accounting.lost_in_transit
        assert sorted(billed_per_prompt.values()) == [1, 2]
        assert billed_per_prompt[lost[0].prompt] == 2
    else:
        # b64_json: the journaled answer's data died with the process (the S3 journal never holds it),
        # so that prompt is generated again too: one admitted double payment per prompt, no more.
        assert run.xcom["usage"]["reused_prompts"] == 0
        assert accounting.requests == 4
        journaled_without_data = 1
        assert accounting.billed == accounting.stored + accounting.lost_in_transit + journaled_without_data
        assert sorted(billed_per_prompt.values()) == [2, 2]
    assert journal not in pipeline.objects()  # the journal is dropped once the record is written
    assert not _journals(pipeline)


@pytest.mark.parametrize("fmt", FORMATS)
def test_task_process_killed_after_storing_before_its_records(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    tmp_path: Path,
    task_processes: TaskProcesses,
    fmt: str,
) -> None:
    """Regression (b64_json): the retry found all images in S3 and still counted them as failed."""
    prompts = ["one", "two", "three"]
    gate.hold = "records"  # records.json, the try's last write, never arrives: the process dies waiting
    dag_id = dag_for(fmt)
    _start(task_processes, dag_id, bucket, prompts, tmp_path)
    assert wait_for(lambda: bool(gate.held), timeout=60), (tmp_path / "task.log").read_text()[-3000:]
    _kill(task_processes)
    gate.hold = None
    gate.release()
    space = TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    assert space.records_key not in pipeline.objects()
    assert _journals(pipeline)
    downloads = emulator.downloads

    run = pipeline.run(dag_id, prompts=prompts)

    assert run.state == "success", run.errors
    assert run.try_number == 1
    assert run.xcom["usage"]["reused_prompts"] == 3
    assert run.xcom["usage"]["this_try"]["requests"] == 0
    accounting = pipeline.account()
    # The killed try is counted from its last journal batch's snapshot (every answer was journaled).
    assert run.xcom["usage"]["tries"] == 2
    assert run.xcom["usage"]["requests"] == run.xcom["usage"]["generated_images"] == accounting.billed == 3
    assert len(run.xcom["images"]) == 3
    assert accounting.requests == 3  # all in the killed try: each image was checked (HEAD), not paid again
    assert accounting.billed == accounting.stored == 3
    assert emulator.downloads == downloads  # nor downloaded again
    assert space.records_key in pipeline.objects()
    assert not _journals(pipeline)
