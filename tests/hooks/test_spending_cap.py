"""The spending cap inside the hook: every attempt reserves its images first, and is settled by its fate.

Billed (the answer said so), nothing (the service answered with an error, or nothing reached it) or
possibly billed (timed out, broke off, malformed 200: the service may have generated the images).
Retries of possibly billed attempts are bounded by ``max_billed_retries``; rate limits and server
errors keep ``max_retries``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_jimeng.budget import SpendingCap
from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengResponseError,
    JiMengSpendingCapError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.jimeng import JiMengHook

pytestmark = pytest.mark.timeout(60)

PROMPT = "a lantern festival"
STATS_KEYS = {
    "attempts",
    "rate_limited",
    "retries",
    "download_retries",
    "rate_limit_wait_ms",
    "billed",
    "possibly_billed",
}


def _warnings(logs: Any) -> list[str]:
    return [entry["event"] for entry in logs.hook_events if entry.get("log_level") == "warning"]


def _cap_state(cap: SpendingCap) -> tuple[int, int, int]:
    return cap.billed, cap.possibly_billed, cap.reserved


def test_a_refused_reservation_sends_nothing(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    body = hook.build_body("a story in 3 images", sequential_image_generation="auto", max_images=3)
    with pytest.raises(JiMengSpendingCapError) as caught:
        hook.send(body, spending_cap=SpendingCap(2))
    assert (caught.value.limit, caught.value.requested) == (2, 3)
    assert jimeng_conn.request_count == 0
    assert hook.stats["attempts"] == 0


def test_success_settles_what_the_answer_billed_on_the_cap_and_in_stats(
    hook: JiMengHook, jimeng_conn: JiMengEmulator
) -> None:
    cap = SpendingCap(10)
    body = hook.build_body("three panels FAIL_IMAGE_1", sequential_image_generation="auto", max_images=3)
    result = hook.send(body, spending_cap=cap)
    assert [image.ok for image in result.images] == [True, False, True]
    assert _cap_state(cap) == (2, 0, 0)  # reserved 3, billed 2, the third returned
    hook.generate_images(PROMPT)  # without a cap, the hook still counts
    assert set(hook.stats) == STATS_KEYS
    assert (hook.stats["billed"], hook.stats["possibly_billed"]) == (3, 0)
    assert jimeng_conn.billed_images == 3


def test_error_answers_release_their_reservation(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    jimeng_conn.inject(Fault("rate_limit", times=2), Fault("server_error"))
    cap = SpendingCap(1)  # room for one image: three error answers did not use it up
    assert hook.send(hook.build_body(PROMPT), spending_cap=cap).succeeded
    assert _cap_state(cap) == (1, 0, 0)
    assert hook.stats["attempts"] == 4
    assert (hook.stats["billed"], hook.stats["possibly_billed"]) == (1, 0)


@pytest.mark.parametrize(
    ("kind", "error_class"),
    [
        ("malformed", JiMengResponseError),
        ("truncated", JiMengResponseError),
        ("reset_mid_body", JiMengTimeoutError),
        ("reset", JiMengTimeoutError),  # the connection broke after the request was sent
    ],
)
def test_attempts_whose_fate_is_unknown_count_as_possibly_billed(
    jimeng_conn: JiMengEmulator,
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    kind: str,
    error_class: type[JiMengAPIError],
) -> None:
    connect(jimeng_conn.base_url, max_retries=0)
    jimeng_conn.inject(Fault(kind))
    hook = make_hook()
    cap = SpendingCap(5)
    with pytest.raises(error_class) as caught:
        hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert caught.value.possibly_billed
    assert _cap_state(cap) == (0, 1, 0)
    assert hook.stats["possibly_billed"] == 1


def test_a_retry_that_could_pass_the_cap_is_not_sent(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(jimeng_conn.base_url, timeout=1)
    jimeng_conn.inject(Fault("slow", delay=2))
    cap = SpendingCap(1)
    hook = make_hook()
    with pytest.raises(JiMengSpendingCapError) as caught:
        hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert (caught.value.possibly_billed, caught.value.requested) == (1, 1)
    assert jimeng_conn.request_count == 1  # the timed-out attempt may have been billed: no second one
    assert _cap_state(cap) == (0, 1, 0)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_refused_connection_is_released_and_retried_max_retries_times(
    connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(f"http://127.0.0.1:{_closed_port()}/api/v3", max_retries=3, max_billed_retries=0)
    hook = make_hook()
    cap = SpendingCap(1)
    with pytest.raises(JiMengTimeoutError) as caught:
        hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert caught.value.code == "ConnectionError"
    assert not caught.value.possibly_billed
    assert "nothing was sent" in str(caught.value)
    assert hook.stats["attempts"] == 4  # nothing reached the service: not bounded by max_billed_retries
    assert _cap_state(cap) == (0, 0, 0)


@pytest.mark.parametrize(("max_billed_retries", "attempts", "succeeds"), [(0, 1, False), (1, 2, False), (2, 3, True)])
def test_possibly_billed_attempts_are_retried_at_most_max_billed_retries_times(
    jimeng_conn: JiMengEmulator,
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    logs: Any,
    max_billed_retries: int,
    attempts: int,
    succeeds: bool,
) -> None:
    connect(jimeng_conn.base_url, max_billed_retries=max_billed_retries)
    jimeng_conn.inject(Fault("malformed", times=2))
    hook = make_hook()
    cap = SpendingCap(None)
    if succeeds:
        assert hook.send(hook.build_body(PROMPT), spending_cap=cap).succeeded
    else:
        with pytest.raises(JiMengResponseError):
            hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert jimeng_conn.request_count == attempts
    assert cap.possibly_billed == min(attempts, 2)
    billed_retry_warnings = [line for line in _warnings(logs) if "may have been billed; retrying" in line]
    assert len(billed_retry_warnings) == attempts - 1
    for number, line in enumerate(billed_retry_warnings, start=1):
        assert f"attempt {number} of 6 failed (MalformedResponse" in line
        assert f"retry {number} of at most {max_billed_retries}" in line


def test_rate_limits_keep_max_retries_after_a_possibly_billed_attempt(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(jimeng_conn.base_url, max_billed_retries=1)
    jimeng_conn.inject(Fault("malformed"), Fault("rate_limit", times=3))
    hook = make_hook()
    assert hook.generate_images(PROMPT).succeeded
    assert jimeng_conn.request_count == 5
    assert (hook.stats["retries"], hook.stats["rate_limited"], hook.stats["possibly_billed"]) == (4, 3, 1)


def test_downloads_are_retried_by_the_same_loop_and_counted_apart(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, logs: Any
) -> None:
    url = hook.generate_images(PROMPT).images[0].url or ""
    jimeng_conn.inject(Fault("unavailable", path="/tos/*", times=2))
    with hook.open_image(url) as download:
        assert download.read()
    assert (hook.stats["download_retries"], hook.stats["retries"]) == (2, 0)
    assert sum("Download of" in line and "retrying" in line for line in _warnings(logs)) == 2


# ---------------------------------------------------------- a gateway that answers more than asked
def _gateway_of_four(jimeng_conn: JiMengEmulator, monkeypatch: pytest.MonkeyPatch, **extras: Any) -> None:
    from airflow_provider_jimeng.testing import jimeng_connection_json

    jimeng_conn.images_per_request = 4  # every answer carries (and bills) 4 images
    monkeypatch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(jimeng_conn.base_url, **extras))


def test_images_per_request_makes_the_reservation_match_what_the_gateway_bills(
    jimeng_conn: JiMengEmulator, make_hook: Callable[..., JiMengHook], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 20, break 6): the cap reserved 1 per request, so a cap of 2 let 4 be billed."""
    _gateway_of_four(jimeng_conn, monkeypatch, images_per_request=4)
    hook = make_hook()
    cap = SpendingCap(2)
    with pytest.raises(JiMengSpendingCapError) as caught:
        hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert caught.value.requested == 4
    assert jimeng_conn.request_count == jimeng_conn.billed_images == 0

    cap = SpendingCap(4)
    result = hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert len(result.succeeded) == jimeng_conn.billed_images == 4, "every image the gateway sent is kept"
    assert _cap_state(cap) == (4, 0, 0)
    with pytest.raises(JiMengSpendingCapError):
        hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert jimeng_conn.billed_images == 4


def test_without_images_per_request_such_a_gateway_is_found_out_after_paying(
    jimeng_conn: JiMengEmulator, make_hook: Callable[..., JiMengHook], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the extra is for: without it the cap learns the gateway's habit from the first answer."""
    _gateway_of_four(jimeng_conn, monkeypatch)
    hook = make_hook()
    cap = SpendingCap(2)
    hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert (jimeng_conn.billed_images, cap.billed) == (4, 4)
