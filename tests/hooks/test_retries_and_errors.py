"""Transient failures are retried with backoff; everything else fails at once with the right class."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengAuthenticationError,
    JiMengContentPolicyError,
    JiMengInvalidRequestError,
    JiMengQuotaExceededError,
    JiMengRateLimitError,
    JiMengResponseError,
    JiMengServerError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.jimeng import JiMengHook

PROMPT = "a lighthouse at dusk"


def _warnings(logs: Any) -> list[str]:
    return [entry["event"] for entry in logs.hook_events if entry.get("log_level") == "warning"]


def test_rate_limit_burst_is_retried_until_success_and_logged(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, logs: Any
) -> None:
    jimeng_conn.inject(Fault("rate_limit", times=3))
    result = hook.generate_images(PROMPT, size="1K")
    assert result.succeeded
    assert hook.stats["rate_limited"] == 3
    assert hook.stats["retries"] == 3
    assert hook.stats["attempts"] == 4
    assert jimeng_conn.request_count == 4
    assert jimeng_conn.billed_images == 1
    assert result.request_id == jimeng_conn.requests[-1]["request_id"]
    warnings = _warnings(logs)
    assert len(warnings) == 3
    for attempt, (warning, record) in enumerate(zip(warnings, jimeng_conn.requests[:3], strict=True), start=1):
        assert f"attempt {attempt} of 6 failed" in warning
        assert "ModelAccountIpmRateLimitExceeded" in warning
        assert record["request_id"] in warning
    attempts_logged = [entry["event"] for entry in logs.hook_events if "request attempt" in entry["event"]]
    # A first attempt is said by its result line alone; each retry gets a line of its own.
    assert [line.split(":")[0] for line in attempts_logged] == [f"JiMeng request attempt {n}" for n in (2, 3, 4)]


def test_retry_after_header_is_honoured(
    jimeng_conn: JiMengEmulator, make_hook: Callable[..., JiMengHook], logs: Any
) -> None:
    hook = make_hook(retry_backoff=0.01, retry_max_wait=5)
    jimeng_conn.inject(Fault("rate_limit", retry_after=0.3))
    started = time.monotonic()
    assert hook.generate_images(PROMPT).succeeded
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2  # the header's 0.3 s, not the 0.01 s backoff nor the 5 s cap
    assert "retrying in 0.30s" in _warnings(logs)[0]


def test_retry_after_longer_than_the_cap_is_capped(jimeng_conn: JiMengEmulator, hook: JiMengHook) -> None:
    jimeng_conn.inject(Fault("unavailable", retry_after=60))
    started = time.monotonic()
    assert hook.generate_images(PROMPT).succeeded
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("kind", ["server_error", "unavailable"])
def test_server_errors_are_retried(hook: JiMengHook, jimeng_conn: JiMengEmulator, kind: str) -> None:
    jimeng_conn.inject(Fault(kind, times=2))
    assert hook.generate_images(PROMPT).succeeded
    assert jimeng_conn.request_count == 3
    assert hook.stats["retries"] == 2
    assert jimeng_conn.billed_images == 1


@pytest.mark.parametrize(
    ("kind", "error_class", "status", "code"),
    [
        ("server_error", JiMengServerError, 500, "InternalServiceError"),
        ("unavailable", JiMengServerError, 503, "ServiceUnavailable"),
        ("rate_limit", JiMengRateLimitError, 429, "ModelAccountIpmRateLimitExceeded"),
    ],
)
def test_exhausted_retries_raise_the_right_class_with_status_code_and_request_id(
    jimeng_conn: JiMengEmulator,
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    kind: str,
    error_class: type[JiMengAPIError],
    status: int,
    code: str,
) -> None:
    connect(jimeng_conn.base_url, max_retries=2)
    jimeng_conn.inject(Fault(kind, times=3))
    with pytest.raises(error_class) as caught:
        make_hook().generate_images(PROMPT)
    error = caught.value
    last_request_id = jimeng_conn.requests[-1]["request_id"]
    assert (error.status_code, error.code, error.request_id) == (status, code, last_request_id)
    message = str(error)
    assert f"HTTP {status}" in message
    assert code in message
    assert last_request_id in message
    assert jimeng_conn.request_count == 3
    assert jimeng_conn.billed_images == 0


def test_quota_exceeded_is_not_retried(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    jimeng_conn.inject(Fault("quota", times=5))
    with pytest.raises(JiMengQuotaExceededError) as caught:
        hook.generate_images(PROMPT)
    assert caught.value.status_code == 429
    assert caught.value.code == "QuotaExceeded"
    assert not caught.value.retryable
    assert jimeng_conn.request_count == 1
    assert hook.stats["retries"] == 0


def test_wrong_api_key_is_not_retried(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(jimeng_conn.base_url, api_key="sk-wrong-key-000000")
    with pytest.raises(JiMengAuthenticationError) as caught:
        make_hook().generate_images(PROMPT)
    assert (caught.value.status_code, caught.value.code) == (401, "AuthenticationError")
    assert caught.value.request_id == jimeng_conn.requests[-1]["request_id"]
    assert jimeng_conn.request_count == 1


def test_content_policy_refusal_is_not_retried(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    with pytest.raises(JiMengContentPolicyError) as caught:
        hook.generate_images("something FORBIDDEN")
    assert (caught.value.status_code, caught.value.code) == (400, "InputTextSensitiveContentDetected")
    assert jimeng_conn.request_count == 1
    assert jimeng_conn.billed_images == 0


def test_unknown_model_404_is_not_retried(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    with pytest.raises(JiMengInvalidRequestError) as caught:
        hook.generate_images(PROMPT, model="doubao-seedream-9-9-990101")
    assert type(caught.value) is JiMengInvalidRequestError
    assert (caught.value.status_code, caught.value.code, caught.value.param) == (
        404,
        "InvalidEndpointOrModel.NotFound",
        "model",
    )
    assert jimeng_conn.request_count == 1


def test_read_timeout_is_retried_and_the_timed_out_request_is_still_billed(
    jimeng_conn: JiMengEmulator,
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    logs: Any,
    wait_for: Callable[..., bool],
) -> None:
    connect(jimeng_conn.base_url, timeout=1)
    jimeng_conn.inject(Fault("slow", delay=2))
    hook = make_hook()
    started = time.monotonic()
    result = hook.generate_images(PROMPT, size="1K")
    assert result.succeeded
    assert time.monotonic() - started >= 1  # the 1 s read timeout fired; the retry answered at once
    assert jimeng_conn.request_count == 2
    assert "(Timeout, request id" in _warnings(logs)[0]
    # Like the real API (no idempotency key), the service finishes the abandoned request and bills it:
    # the retry paid a second time. Only storing results durably can avoid paying again on task retry.
    # (the abandoned answer is billed, undelivered, when the emulator finishes it)
    assert wait_for(
        lambda: (
            jimeng_conn.billed_images == 2 and sorted(entry.delivered for entry in jimeng_conn.ledger) == [False, True]
        )
    )


@pytest.mark.parametrize(
    ("kind", "error_class", "code", "billed"),
    [
        ("reset", JiMengTimeoutError, "ConnectionError", 0),
        ("reset_mid_body", JiMengTimeoutError, "ConnectionError", 1),
        ("malformed", JiMengResponseError, "MalformedResponse", 1),
        ("truncated", JiMengResponseError, "MalformedResponse", 1),
    ],
)
def test_broken_answers_raise_a_retryable_error(
    jimeng_conn: JiMengEmulator,
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    wait_for: Callable[..., bool],
    kind: str,
    error_class: type[JiMengAPIError],
    code: str,
    billed: int,
) -> None:
    connect(jimeng_conn.base_url, max_retries=0)
    jimeng_conn.inject(Fault(kind))
    with pytest.raises(error_class) as caught:
        make_hook().generate_images(PROMPT)
    assert caught.value.code == code
    assert caught.value.retryable
    assert jimeng_conn.request_count == 1
    assert wait_for(lambda: jimeng_conn.billed_images == billed)


@pytest.mark.parametrize("kind", ["reset", "reset_mid_body", "malformed", "truncated"])
def test_broken_answers_are_retried_until_success(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, logs: Any, kind: str
) -> None:
    jimeng_conn.inject(Fault(kind))
    result = hook.generate_images(PROMPT)
    assert result.succeeded
    assert jimeng_conn.request_count == 2
    assert hook.stats["retries"] == 1
    assert len(_warnings(logs)) == 1


def test_max_retries_zero_extra_disables_retries(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(jimeng_conn.base_url, max_retries=0)
    jimeng_conn.inject(Fault("rate_limit"))
    with pytest.raises(JiMengRateLimitError):
        make_hook().generate_images(PROMPT)
    assert jimeng_conn.request_count == 1


def test_close_from_another_thread_stops_a_retry_wait_promptly(
    jimeng_conn: JiMengEmulator, make_hook: Callable[..., JiMengHook], wait_for: Callable[..., bool]
) -> None:
    hook = make_hook(retry_backoff=60, retry_max_wait=60)
    jimeng_conn.inject(Fault("server_error"))
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            hook.generate_images(PROMPT)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert wait_for(lambda: hook.stats["retries"] == 1)  # the hook is now waiting ~30-60 s to retry
    closed_at = time.monotonic()
    hook.close()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert time.monotonic() - closed_at < 2  # instead of the 30-60 s backoff
    assert len(outcome) == 1
    assert isinstance(outcome[0], JiMengServerError)
    assert jimeng_conn.request_count == 1
    with pytest.raises(JiMengTimeoutError, match="stopped"):
        hook.generate_images(PROMPT)
    assert jimeng_conn.request_count == 1


# The thread method: Airflow's execution_timeout takes SIGALRM, which pytest-timeout's signal method uses.
@pytest.mark.timeout(60, method="thread")
def test_an_execution_timeout_during_a_retry_after_wait_sends_nothing_more(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], wait_for: Callable[..., bool]
) -> None:
    """The task's ``execution_timeout`` lands while a generation thread waits out a 429's ``Retry-After``.

    Regression (a mutation the suite let through): the run stopped, but the thread went on waiting
    and then sent the retry, which was billed after the task had timed out.
    """
    import signal

    from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
    from tests.operators.conftest import RecordingTaskInstance

    try:
        from airflow.sdk.exceptions import AirflowTaskTimeout
        from airflow.sdk.execution_time.timeout import timeout
    except ImportError:  # Airflow 3.0
        from airflow.exceptions import AirflowTaskTimeout  # type: ignore[no-redef]
        from airflow.utils.timeout import timeout  # type: ignore[no-redef]

    connect(jimeng_conn.base_url, max_retries=2, retry_max_wait=30)
    jimeng_conn.inject(Fault("rate_limit", retry_after=20))
    operator = JiMengGenerateOperator(task_id="gen", prompt=PROMPT, size="1K")

    def in_backoff() -> bool:
        run = operator._active_run
        return run is not None and run.hook.stats["retries"] == 1

    def land_the_timeout() -> None:
        # The 429 was answered and the hook counted its retry: it is now in the 20 s wait.
        if wait_for(in_backoff, timeout=30):
            signal.setitimer(signal.ITIMER_REAL, 0.01)  # the task's alarm goes off now

    timer = threading.Thread(target=land_the_timeout, daemon=True)
    timer.start()
    started = time.monotonic()
    with pytest.raises(AirflowTaskTimeout), timeout(45):
        operator.execute({"ti": RecordingTaskInstance()})  # type: ignore[arg-type]
    timer.join(timeout=5)
    assert time.monotonic() - started < 10, "the Retry-After wait ended with the timeout"
    assert jimeng_conn.request_count == 1, "the retry was not sent after the timeout"
    assert jimeng_conn.billed_images == 0


def test_a_set_slower_than_the_read_timeout_is_waited_for_and_paid_once(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    """Regression: a non-streamed set answers only when every image is made; slower than one read
    timeout, it was abandoned after it was billed and sent again (4 paid twice, nothing kept)."""
    connect(jimeng_conn.base_url, timeout=1)
    jimeng_conn.latency = 0.4  # 1.6 s for the set: more than one read timeout, within one per image
    hook = make_hook()
    result = hook.generate_images("a comic in 4 images", size="1K", sequential_image_generation="auto", max_images=4)
    assert [image.ok for image in result.images] == [True] * 4
    assert jimeng_conn.request_count == 1
    assert jimeng_conn.billed_images == 4
    assert (hook.stats["billed"], hook.stats["possibly_billed"], hook.stats["retries"]) == (4, 0, 0)


def test_a_set_that_times_out_all_the_same_is_not_sent_again_blind(
    jimeng_conn: JiMengEmulator,
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    logs: Any,
    wait_for: Callable[..., bool],
) -> None:
    """Beyond a read timeout per image the set is given up, and not sent again: it may have billed
    every image, and a repeat would pay for all of them again (a single image keeps max_billed_retries)."""
    connect(jimeng_conn.base_url, timeout=1, max_billed_retries=3)
    jimeng_conn.latency = 1.3  # 2.6 s for the set, against 2 s (1 s per image)
    hook = make_hook()
    with pytest.raises(JiMengTimeoutError, match=r"no answer within 2s") as caught:
        hook.generate_images("a comic in 2 images", size="1K", sequential_image_generation="auto", max_images=2)
    assert caught.value.possibly_billed
    assert jimeng_conn.request_count == 1
    assert (hook.stats["possibly_billed"], hook.stats["retries"]) == (2, 0)
    assert any("never sent again blind" in line for line in _warnings(logs))
    assert wait_for(lambda: jimeng_conn.billed_images == 2)  # the service finished (and billed) it once
