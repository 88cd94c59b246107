"""Issue 11 item 5: the budget guard is a cap on what can be billed, retries and gateways' ``n`` included."""

from __future__ import annotations

import threading

import pytest

from airflow_provider_jimeng.budget import SpendingCap
from airflow_provider_jimeng.emulator import Fault
from airflow_provider_jimeng.exceptions import (
    JiMengConfigurationError,
    JiMengGenerationIncompleteError,
    JiMengRunAbortedError,
    JiMengSpendingCapError,
)
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from tests.operators.conftest import Bucket, RecordingTaskInstance, TrackingEmulator


def test_reservations_settle_release_or_stay_possible() -> None:
    cap = SpendingCap(5)
    first = cap.reserve(2)
    first.settle(1)  # a set of two delivered one image
    second = cap.reserve(2)
    second.keep_as_possible()  # timed out: it may have been billed
    third = cap.reserve(2)
    third.release()  # a 429: nothing generated
    assert (cap.billed, cap.possibly_billed, cap.reserved) == (1, 2, 0)
    with pytest.raises(JiMengSpendingCapError) as raised:
        cap.reserve(3)
    assert raised.value.parameter == "max_images_per_task"
    assert "1 billed, 2 possibly billed" in str(raised.value)
    cap.reserve(2).settle(2)
    assert cap.committed == 5


def test_a_reservation_is_settled_once() -> None:
    cap = SpendingCap(None)
    reservation = cap.reserve(3)
    reservation.settle(3)
    reservation.keep_as_possible()
    reservation.release()
    assert (cap.billed, cap.possibly_billed, cap.reserved) == (3, 0, 0)


def test_concurrent_reservations_never_exceed_the_limit() -> None:
    cap = SpendingCap(50)
    granted: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(20):
            try:
                cap.reserve(1).keep_as_possible()
            except JiMengSpendingCapError:
                return
            with lock:
                granted.append(1)

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == cap.possibly_billed == 50


def test_extra_body_n_counts_in_the_guard_before_any_request(emulator: TrackingEmulator) -> None:
    """``extra_body={"n": 4}`` billed 20 under ``max_images_per_task=5`` before the fix."""
    operator = JiMengGenerateOperator(
        task_id="gen",
        prompt=["a", "b", "c", "d", "e"],
        extra_body={"n": 4},
        max_images_per_task=5,
    )
    with pytest.raises(JiMengConfigurationError) as raised:
        operator.execute({"ti": RecordingTaskInstance()})  # type: ignore[typeddict-item]
    assert raised.value.parameter == "max_images_per_task"
    assert "up to 20 images" in str(raised.value)
    assert emulator.request_count == 0


def test_images_per_request_counts_in_the_guard_before_any_request(
    emulator: TrackingEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway that answers every request with 4 images: 2 prompts could bill 8, above a cap of 4."""
    from airflow_provider_jimeng.testing import jimeng_connection_json

    emulator.images_per_request = 4
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIMENG_DEFAULT",
        jimeng_connection_json(emulator.base_url, emulator.api_key, max_retries=0, images_per_request=4),
    )
    operator = JiMengGenerateOperator(task_id="gen", prompt=["a", "b"], max_images_per_task=4)
    with pytest.raises(JiMengConfigurationError) as raised:
        operator.execute({"ti": RecordingTaskInstance()})  # type: ignore[typeddict-item]
    assert raised.value.parameter == "max_images_per_task"
    assert "up to 8 images" in str(raised.value)
    assert emulator.request_count == 0


def test_retries_of_possibly_billed_requests_stop_at_the_cap(
    emulator: TrackingEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow server, ``timeout=1``, hook retries: each timed-out attempt may be billed (6 were, under a cap of 1)."""
    from airflow_provider_jimeng.emulator import Fault
    from airflow_provider_jimeng.testing import jimeng_connection_json

    monkeypatch.setenv(
        "AIRFLOW_CONN_JIMENG_DEFAULT",
        jimeng_connection_json(emulator.base_url, emulator.api_key, max_retries=5, timeout=1, retry_backoff=0.01),
    )
    emulator.inject(Fault("slow", delay=1.5, times=6))
    operator = JiMengGenerateOperator(task_id="gen", prompt="a fox", max_images_per_task=1)
    ti = RecordingTaskInstance()
    with pytest.raises(JiMengRunAbortedError, match="max_images_per_task"):
        operator.execute({"ti": ti})  # type: ignore[typeddict-item]
    assert emulator.request_count == 1, "the retry of a possibly-billed attempt would exceed the cap: not sent"
    assert ti.pushed["usage"]["possibly_billed_images"] == 1


# ------------------------------------------------------------------- one budget per task instance
class TryOfTask(RecordingTaskInstance):
    """A task instance on its ``try_number``; ``max_tries`` as Airflow keeps it (raised by a clear)."""

    def __init__(self, try_number: int, max_tries: int) -> None:
        super().__init__(run_id="budget_run")
        self.try_number = try_number
        self.max_tries = max_tries


def _tries_of_broken_answers(
    emulator: TrackingEmulator, bucket: Bucket, tries: list[TryOfTask]
) -> list[type[BaseException]]:
    """Every answer breaks off (possibly billed); one operator, run once per try in ``tries``."""
    emulator.inject(Fault("truncated", times=1000))
    operator = JiMengGenerateOperator(
        task_id="gen", prompt=["a red fox", "a grey owl"], s3_bucket=bucket.name, max_images_per_task=4, retries=3
    )
    failed = []
    for ti in tries:
        with pytest.raises((JiMengRunAbortedError, JiMengGenerationIncompleteError)) as raised:
            operator.execute({"ti": ti})  # type: ignore[typeddict-item]
        failed.append(type(raised.value))
    return failed


def test_the_cap_holds_over_every_try_of_the_task_instance(emulator: TrackingEmulator, bucket: Bucket) -> None:
    """Regression (issue 20, break 4): with each try its own budget, 4 tries of 2 possibly-billed
    answers under ``max_images_per_task=4`` sent (and the service billed) 8 images."""
    failed = _tries_of_broken_answers(emulator, bucket, [TryOfTask(number, max_tries=3) for number in (1, 2, 3, 4)])

    assert emulator.billed_images == 4, "two tries of two possibly billed images reach the cap of 4"
    assert emulator.request_count == 4
    # Tries 3 and 4 send nothing: the cap refuses their first request, and the task is not retried.
    assert failed == [JiMengGenerationIncompleteError] * 2 + [JiMengRunAbortedError] * 2


def test_a_cleared_task_starts_a_new_budget(emulator: TrackingEmulator, bucket: Bucket) -> None:
    """A clear (Airflow raises ``max_tries`` to the last try plus ``retries``) is a person's decision to
    spend again: its tries get the whole cap, while the automatic retries before it shared one."""
    tries = [TryOfTask(1, 3), TryOfTask(2, 3), TryOfTask(3, 3)]
    cleared = [TryOfTask(4, 3 + 3), TryOfTask(5, 3 + 3), TryOfTask(6, 3 + 3)]
    failed = _tries_of_broken_answers(emulator, bucket, tries + cleared)

    assert emulator.billed_images == 8, "4 before the clear, 4 after it"
    assert failed[2] is failed[5] is JiMengRunAbortedError
