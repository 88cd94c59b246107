"""Bounded concurrency, prompt order, and stopping a running task with ``on_kill``.

Nothing here measures wall-clock speed-ups: the emulator counts how many generation requests it
was working on at once (``peak_in_flight``), which is what concurrency means.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from airflow_provider_jimeng.emulator import Fault
from airflow_provider_jimeng.exceptions import JiMengGenerationIncompleteError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from tests.dags import jimeng_test_generate
from tests.operators.conftest import (
    Bucket,
    RecordingTaskInstance,
    RunDag,
    TrackingEmulator,
    task_prefix,
    wait_until,
)

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
