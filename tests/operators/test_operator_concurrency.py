"""Bounded concurrency, prompt order, and stopping a running task with ``on_kill``.

Nothing here measures wall-clock speed-ups: the emulator counts how many generation requests it
was working on at once (``peak_in_flight``), which is what concurrency means.
"""

from __future__ import annotations

import queue
import threading
import time
import types
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import Fault
from airflow_provider_jimeng.exceptions import JiMengGenerationIncompleteError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.run import engine
from tests.dags import jimeng_test_generate
from tests.operators.conftest import (
    Bucket,
    RecordingTaskInstance,
    RunDag,
    TrackingEmulator,
    task_prefix,
    wait_until,
)

try:
    from airflow.sdk.exceptions import AirflowTaskTimeout
except ImportError:  # Airflow 3.0
    from airflow.exceptions import AirflowTaskTimeout  # type: ignore[no-redef]

ANIMALS = ["fox", "owl", "cat", "dog", "elk", "yak", "emu", "ant"]
PROMPTS = [f"picture {index}: a {animal}" for index, animal in enumerate(ANIMALS)]


def test_requests_overlap_up_to_max_concurrency_and_results_keep_prompt_order(
    emulator: TrackingEmulator, run_dag: RunDag
) -> None:
    emulator.latency = 0.3
    # The first request to arrive is held back, so completion order differs from prompt order.
    emulator.inject(Fault("slow", delay=1.0))

    run = run_dag(jimeng_test_generate.url_dag, {"prompts": PROMPTS})

    assert run.state == "success"
    assert 2 <= emulator.peak_in_flight <= 4, "max_concurrency=4 bounds the requests in flight"
    assert emulator.request_count == 8
    prompt_of = {entry.request_id: entry.prompt for entry in emulator.ledger}
    images = run.xcom("gen", "images")
    assert [record["prompt_index"] for record in images] == list(range(8))
    assert [prompt_of[record["request_id"]] for record in images] == PROMPTS
    urls = run.xcom("gen")
    assert [url.split("?")[0] for url in urls] == [record["url"].split("?")[0] for record in images]


def test_stored_outputs_keep_prompt_order(emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag) -> None:
    emulator.latency = 0.1
    emulator.inject(Fault("slow", delay=0.5))

    run = run_dag(jimeng_test_generate.dag, {"prompts": PROMPTS, "bucket": bucket.name})

    assert run.state == "success"
    prefix = task_prefix(run)
    assert run.xcom("gen") == [f"s3://{bucket.name}/{prefix}/p{index:04d}_i00.jpeg" for index in range(8)]
    assert [bucket.record(prefix, index)["prompt"] for index in range(8)] == PROMPTS


def test_max_concurrency_one_sends_one_request_at_a_time(emulator: TrackingEmulator, run_dag: RunDag) -> None:
    emulator.latency = 0.05

    run = run_dag(jimeng_test_generate.url_retry_dag, {"prompts": PROMPTS[:3]})

    assert run.state == "success"
    assert emulator.peak_in_flight == 1
    assert emulator.prompts_billed() == PROMPTS[:3]


def test_on_kill_stops_quickly_and_prompts_not_sent_are_not_billed(emulator: TrackingEmulator) -> None:
    """``execute()`` runs in a thread, as in a worker; ``on_kill()`` is what Airflow calls on SIGTERM.

    Called directly (no DAG run): the task instance only needs to receive the XComs.
    """
    emulator.latency = 2.0
    prompts = [f"a slow picture number {index}" for index in range(12)]
    operator = JiMengGenerateOperator(task_id="gen", prompt=prompts, size="1K", max_concurrency=2)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = operator.execute({"ti": RecordingTaskInstance()})  # type: ignore[typeddict-item]
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=work, name="execute", daemon=True)
    worker.start()
    assert wait_until(lambda: emulator.in_flight == 2), "two requests in flight"
    killed = time.monotonic()
    operator.on_kill()
    worker.join(timeout=10)

    assert not worker.is_alive()
    # A full run would take 6 rounds of 2 s; stopping waits at most for the requests already sent.
    assert time.monotonic() - killed < 6.0
    assert emulator.request_count == 2, "nothing was sent after on_kill()"
    assert emulator.billed_images <= 2
    error = outcome.get("error")
    assert isinstance(error, JiMengGenerationIncompleteError)
    not_sent = [failure for failure in error.failures if "stop" in failure.lower()]
    assert len(not_sent) == 10


class _TimeoutAfterTakingAnAnswer:
    """The run loop's completion queue, with an ``execution_timeout`` arriving just after ``get()``
    handed over the first finished future: the one moment where the interruption consumes a
    completion the drain would otherwise wait for."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.taken: Any = None

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def get(self, timeout: float | None = None) -> Any:
        item = self._queue.get(timeout=timeout)
        if self.taken is None:
            self.taken = item
            raise AirflowTaskTimeout("Timeout, PID: 1")
        return item


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_a_timeout_that_takes_a_finished_answer_from_the_queue_still_ends_the_try_and_keeps_it(
    emulator: TrackingEmulator, bucket: Bucket, monkeypatch: pytest.MonkeyPatch, response_format: str
) -> None:
    """Regression: the drain waited forever for the completion the interruption had consumed (seen as
    a task hung in ``_drain`` after its ``execution_timeout`` on a busy machine)."""
    prompts = PROMPTS[:6]
    completions = _TimeoutAfterTakingAnAnswer()
    monkeypatch.setattr(engine, "queue", types.SimpleNamespace(SimpleQueue=lambda: completions, Empty=queue.Empty))

    def the_task() -> JiMengGenerateOperator:
        return JiMengGenerateOperator(
            task_id="gen",
            prompt=prompts,
            size="1K",
            max_concurrency=2,
            response_format=response_format,
            s3_bucket=bucket.name,
        )

    outcome: dict[str, Any] = {}

    def first_try() -> None:
        try:
            the_task().execute({"ti": RecordingTaskInstance()})  # type: ignore[typeddict-item]
        except BaseException as error:
            outcome["error"] = error

    worker = threading.Thread(target=first_try, name="execute", daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the try hung after its timeout"
    assert isinstance(outcome.get("error"), AirflowTaskTimeout)
    assert completions.taken is not None
    billed_first = emulator.billed_images
    assert 1 <= billed_first <= 4  # what was sent before the timeout stopped sending (two rounds at most)

    monkeypatch.setattr(engine, "queue", queue)  # the retry runs undisturbed
    retry = RecordingTaskInstance()
    the_task().execute({"ti": retry})  # type: ignore[typeddict-item]
    # Every answer of the timed-out try, the consumed one included, was kept: nothing is paid twice.
    assert emulator.billed_images == len(prompts)
    assert len(bucket.images("jimeng/")) == len(prompts)
    assert retry.pushed["usage"]["reused_prompts"] == billed_first
