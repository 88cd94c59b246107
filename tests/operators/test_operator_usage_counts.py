"""What ``usage`` counts: a request is one that left (issue 20, break 8)."""

from __future__ import annotations

import threading

import pytest

from airflow_provider_jimeng.exceptions import JiMengGenerationIncompleteError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from tests.operators.conftest import RecordingTaskInstance, TrackingEmulator, wait_until

pytestmark = pytest.mark.timeout(60)


def test_a_prompt_stopped_before_its_request_was_sent_is_no_request(emulator: TrackingEmulator) -> None:
    """Regression: a prompt waiting for its turn (the task's pace) when ``on_kill`` came counted in
    ``usage.requests`` although nothing was sent."""
    operator = JiMengGenerateOperator(
        task_id="gen", prompt=["a red fox", "a grey owl"], max_concurrency=2, max_images_per_minute=1
    )
    ti = RecordingTaskInstance()
    raised: list[BaseException] = []

    def execute() -> None:
        try:
            operator.execute({"ti": ti})  # type: ignore[typeddict-item]
        except BaseException as error:
            raised.append(error)

    task = threading.Thread(target=execute)
    task.start()
    # One image a minute: the first prompt is answered, the second waits ~60 s for its turn.
    assert wait_until(lambda: emulator.billed_images == 1 and operator._active_run is not None)
    assert wait_until(lambda: operator._active_run is not None and operator._active_run.hook.stats["attempts"] == 1)
    operator.on_kill()
    task.join(timeout=30)

    assert not task.is_alive()
    assert [type(error) for error in raised] == [JiMengGenerationIncompleteError]
    assert emulator.request_count == 1
    usage = ti.pushed["usage"]
    assert (usage["requests"], usage["attempts"], usage["generated_images"]) == (1, 1, 1)
