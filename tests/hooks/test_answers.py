"""Answers the service documents and the hook once got wrong, each from a minimal hand-written server.

The emulator cannot produce these shapes (an error event after delivered images, a 200 carrying an
error, an empty item error, usage without ``generated_images``); where it can produce a shape (a
stream cut after some images, a read timeout), the test uses the emulator as well.
"""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_jimeng.budget import SpendingCap
from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import (
    JiMengContentPolicyError,
    JiMengRateLimitError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from tests.hooks.conftest import ScriptedServer, json_answer, sse_answer, trickle_answer

pytestmark = pytest.mark.timeout(60)

PROMPT = "a kite over the dunes"
MODEL = "doubao-seedream-4-0-250828"
URL = "https://cdn.example.com/img/{}.jpeg?X-Tos-Signature=sig{}"


def _set_body(hook: JiMengHook, images: int, **kwargs: Any) -> dict[str, Any]:
    return hook.build_body(PROMPT, sequential_image_generation="auto", max_images=images, **kwargs)


def _partial(index: int) -> dict[str, Any]:
    return {
        "type": "image_generation.partial_succeeded",
        "model": MODEL,
        "created": 1,
        "image_index": index,
        "url": URL.format(index, index),
        "size": "1024x1024",
    }


def _warnings(logs: Any) -> list[str]:
    return [entry["event"] for entry in logs.hook_events if entry.get("log_level") == "warning"]


# ----------------------------------------------------------------------------- E1: error event mid-set
def test_error_event_after_delivered_images_keeps_them_and_is_not_sent_again(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook], logs: Any
) -> None:
    error = {"type": "error", "error": {"code": "InternalServiceError", "message": "Rendering failed."}}
    server = scripted_server(sse_answer(_partial(0), _partial(1), error, complete=False))
    hook = make_hook()
    cap = SpendingCap(10)

    result = hook.send(_set_body(hook, 4, stream=True), spending_cap=cap)

    assert server.request_count == 1  # three attempts and nothing kept, before
    assert [(image.index, image.ok, image.error_code) for image in result.images] == [
        (0, True, None),
        (1, True, None),
        (2, False, "InternalServiceError"),
        (3, False, "InternalServiceError"),
    ]
    assert "Rendering failed" in (result.images[3].error_message or "")
    assert (cap.billed, cap.possibly_billed, cap.reserved) == (2, 0, 0)
    assert (hook.stats["billed"], hook.stats["possibly_billed"], hook.stats["retries"]) == (2, 0, 0)
    assert any("stopped the set with InternalServiceError after 2 image(s)" in line for line in _warnings(logs))


def test_a_stream_that_breaks_off_after_some_images_keeps_them_and_counts_the_rest_as_possibly_billed(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook], logs: Any
) -> None:
    server = scripted_server(sse_answer(_partial(0), complete=False))
    hook = make_hook()
    cap = SpendingCap(10)

    result = hook.send(_set_body(hook, 3, stream=True), spending_cap=cap)

    assert server.request_count == 1
    assert [(image.ok, image.error_code) for image in result.images] == [
        (True, None),
        (False, "StreamInterrupted"),
        (False, "StreamInterrupted"),
    ]
    assert result.truncated
    assert (cap.billed, cap.possibly_billed, cap.reserved) == (1, 2, 0)
    assert (hook.stats["billed"], hook.stats["possibly_billed"]) == (1, 2)
    assert any("broke off after 1 image(s)" in line for line in _warnings(logs))


def test_a_stream_the_emulator_cuts_after_some_images_is_not_sent_again(
    jimeng_conn: JiMengEmulator, make_hook: Callable[..., JiMengHook], wait_for: Callable[..., bool]
) -> None:
    jimeng_conn.inject(Fault("truncated"))  # half the set streamed, then the stream ends early
    hook = make_hook()
    result = hook.generate_images(
        "a comic in 4 images", sequential_image_generation="auto", max_images=4, stream=True, size="1K"
    )
    assert jimeng_conn.request_count == 1
    assert [image.ok for image in result.images] == [True, True, False, False]
    assert {image.error_code for image in result.failed} == {"StreamInterrupted"}
    assert (hook.stats["billed"], hook.stats["possibly_billed"]) == (2, 2)
    assert wait_for(lambda: jimeng_conn.billed_images == 4)  # the service did finish (and bill) the set


@pytest.mark.parametrize("label", ["application/json", "application/json; charset=utf-8", "text/plain", ""])
def test_a_stream_labelled_as_json_is_read_as_a_stream_and_not_sent_again(
    jimeng_conn: JiMengEmulator, make_hook: Callable[..., JiMengHook], label: str
) -> None:
    """Regression: a gateway's stream labelled ``application/json`` was read as JSON, found malformed and
    sent again (each prompt paid twice, nothing kept). The body tells a stream from JSON."""
    jimeng_conn.stream_content_type = label
    hook = make_hook()
    result = hook.generate_images(
        "a comic in 3 images", sequential_image_generation="auto", max_images=3, stream=True, size="1K"
    )
    assert [image.ok for image in result.images] == [True, True, True]
    assert jimeng_conn.request_count == 1
    assert jimeng_conn.billed_images == 3
    assert (hook.stats["billed"], hook.stats["possibly_billed"], hook.stats["retries"]) == (3, 0, 0)


def test_a_json_answer_to_a_stream_request_is_still_read_as_json(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    """A gateway that ignores ``stream`` answers JSON, whatever its label: the body decides both ways."""
    answer = {"model": MODEL, "created": 1, "data": [{"url": URL.format(0, 0), "size": "1024x1024"}]}
    server = scripted_server(json_answer(answer, headers={"Content-Type": "text/event-stream"}))
    hook = make_hook()
    result = hook.send(hook.build_body(PROMPT, stream=True))
    assert server.request_count == 1
    assert [image.ok for image in result.images] == [True]


def test_an_error_event_before_any_image_is_raised_and_retried_when_retryable(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    busy = {"type": "error", "error": {"code": "ServerOverloaded", "message": "busy"}}
    completed = {"type": "image_generation.completed", "usage": {"generated_images": 1}}
    server = scripted_server(sse_answer(busy, complete=False), sse_answer(_partial(0), completed))
    hook = make_hook()
    result = hook.send(hook.build_body(PROMPT, stream=True))
    assert server.request_count == 2
    assert [image.ok for image in result.images] == [True]
    assert (hook.stats["billed"], hook.stats["possibly_billed"], hook.stats["retries"]) == (1, 0, 1)


# ------------------------------------------------------------------------- E2: a 200 carrying an error
@pytest.mark.parametrize("data", [None, []], ids=["no-data", "empty-data"])
def test_a_200_carrying_a_content_policy_error_raises_it_and_is_not_retried(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook], data: list[Any] | None
) -> None:
    payload: dict[str, Any] = {"error": {"code": "OutputImageSensitiveContentDetected", "message": "blocked"}}
    if data is not None:
        payload["data"] = data
    server = scripted_server(json_answer(payload))
    hook = make_hook()
    cap = SpendingCap(5)
    with pytest.raises(JiMengContentPolicyError) as caught:
        hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert caught.value.code == "OutputImageSensitiveContentDetected"
    assert server.request_count == 1
    assert (cap.billed, cap.possibly_billed, cap.reserved) == (0, 0, 0)  # refused: nothing billed


def test_a_200_carrying_a_retryable_error_is_retried(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    overloaded = {"error": {"code": "ModelAccountIpmRateLimitExceeded", "message": "slow down"}, "data": []}
    success = {"data": [{"url": URL.format(0, 0)}], "usage": {"generated_images": 1}}
    server = scripted_server(json_answer(overloaded), json_answer(overloaded), json_answer(success))
    hook = make_hook()
    assert hook.send(hook.build_body(PROMPT)).succeeded
    assert server.request_count == 3
    assert hook.stats["retries"] == 2

    server = scripted_server(json_answer(overloaded), max_retries=0)
    with pytest.raises(JiMengRateLimitError):
        make_hook().send(hook.build_body(PROMPT))


def test_a_gzip_encoded_answer_is_decoded(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    payload = {"data": [{"url": URL.format(0, 0), "size": "1024x1024"}], "usage": {"generated_images": 1}}
    scripted_server(json_answer(gzip.compress(json.dumps(payload).encode()), headers={"Content-Encoding": "gzip"}))
    result = make_hook().send({"model": MODEL, "prompt": PROMPT})
    assert [image.size for image in result.succeeded] == ["1024x1024"]


# ------------------------------------------------------------------- E3: empty error beside an image
def test_an_empty_error_object_beside_an_image_is_a_delivered_image(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    empty = {"code": "", "message": ""}
    payload = {
        "model": MODEL,
        "data": [{"url": URL.format(0, 0), "size": "1024x1024", "error": empty}, {"b64_json": "AAAA", "error": empty}],
        "usage": {"generated_images": 2},
    }
    scripted_server(json_answer(payload))
    result = make_hook().send({"model": MODEL, "prompt": PROMPT})
    assert [image.ok for image in result.images] == [True, True]
    assert not result.failed


# ------------------------------------------------------------------ E4: content-security error codes
@pytest.mark.parametrize(
    "code",
    [
        "InputTextRiskDetection",
        "InputImageRiskDetection",
        "OutputImageRiskDetection",
        "ContentSecurityDetectionError",
        "InputImageSensitiveContentDetected.PrivacyInformation",
        "SomeFutureRiskCode",
    ],
)
def test_content_security_codes_raise_content_policy_errors_and_are_not_retried(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook], code: str
) -> None:
    server = scripted_server(json_answer({"error": {"code": code, "message": "refused"}}, status=400))
    with pytest.raises(JiMengContentPolicyError) as caught:
        make_hook().send({"model": MODEL, "prompt": PROMPT})
    assert caught.value.code == code
    assert server.request_count == 1


# ----------------------------------------------------------------- E5: usage without generated_images
def test_usage_without_generated_images_bills_the_delivered_images(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    payload = {
        "data": [{"url": URL.format(0, 0)}, {"error": {"code": "OutputImageSensitiveContentDetected"}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4096, "total_tokens": 4107},
    }
    scripted_server(json_answer(payload))
    hook = make_hook()
    cap = SpendingCap(5)
    result = hook.send(_set_body(hook, 2), spending_cap=cap)
    assert result.billed_images == 1
    assert (cap.billed, cap.possibly_billed, cap.reserved) == (1, 0, 0)
    assert hook.stats["billed"] == 1


# ----------------------------------------------------------------------------- E6: read timeouts
def test_read_timeouts_are_retried_once_counted_as_possibly_billed_and_said_in_the_log(
    jimeng_conn: JiMengEmulator,
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    logs: Any,
) -> None:
    connect(jimeng_conn.base_url, timeout=1)
    jimeng_conn.inject(Fault("slow", delay=2, times=5))
    hook = make_hook()
    cap = SpendingCap(10)
    with pytest.raises(JiMengTimeoutError) as caught:
        hook.send(hook.build_body(PROMPT), spending_cap=cap)
    assert caught.value.possibly_billed
    assert "may still be billed" in str(caught.value)
    assert jimeng_conn.request_count == 2  # max_billed_retries=1, not max_retries=5
    assert (cap.possibly_billed, cap.billed, cap.reserved) == (2, 0, 0)
    assert hook.stats["possibly_billed"] == 2
    warnings = _warnings(logs)
    assert any("attempt 1 of 6 failed (Timeout" in line and "may have been billed" in line for line in warnings)
    assert any("not retried" in line and "max_billed_retries=1" in line for line in warnings)


def test_a_read_timeout_is_not_retried_with_max_billed_retries_0(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(jimeng_conn.base_url, timeout=1, max_billed_retries=0)
    jimeng_conn.inject(Fault("slow", delay=2))
    with pytest.raises(JiMengTimeoutError):
        make_hook().generate_images(PROMPT)
    assert jimeng_conn.request_count == 1


def test_reading_an_answer_is_stopped_by_close(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    server = scripted_server(trickle_answer())
    hook = make_hook()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            hook.generate_images(PROMPT)
        except BaseException as error:
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    assert server.requested.wait(10)
    hook.close()  # on_kill: the read in flight gives up at its next piece, not at the deadline
    worker.join(timeout=10)
    assert not worker.is_alive()
    [error] = outcome
    assert isinstance(error, JiMengTimeoutError)
    assert error.code == "Stopped"
    assert server.request_count == 1


# ----------------------------------------------------------------- per-image fields the SDK knows
LAYER = {
    "output_format": "png",
    "z_index": 2,
    "bounding_box": {"absolute": [0, 0, 512, 256], "normalized": [0, 0, 500, 250]},
    "name": "sky",
    "description": "the sky behind the kite",
}


def test_per_image_fields_the_sdk_knows_reach_the_result_the_journal_and_the_records(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    """Regression: ``output_format``, ``z_index``, ``bounding_box``, ``name`` and ``description`` of an
    answer's image (the official SDK's ``Image``; layer decomposition answers) were dropped."""
    from airflow_provider_jimeng.storage.records import DeliveredImage, JournalEntry, StoredImage

    item = {"url": URL.format(0, 0), "size": "1024x1024", **LAYER, "z_index_typo": 1}
    answer = {"model": MODEL, "created": 1, "data": [item], "usage": {"generated_images": 1}}
    scripted_server(json_answer(answer))
    hook = make_hook()
    result = hook.send(hook.build_body(PROMPT))
    [image] = result.images
    assert image.details == LAYER

    # A journal written for the retry keeps them, and gives them back.
    entry = JournalEntry.from_result(0, "fp", result, now=1.0)
    again = JournalEntry.from_json(json.loads(json.dumps(entry.to_json())), prompt_index=0)
    assert again is not None
    assert again.images[0].details == LAYER
    assert again.images[0].as_generated().details == LAYER

    # The per-image records (XCom "images", records.json) carry them beside size and key.
    stored = StoredImage(0, 0, image.size, "rid", MODEL, "b", "k.jpg", "s3://b/k.jpg", 10, "0", details=image.details)
    assert {name: stored.to_json()[name] for name in LAYER} == LAYER
    assert StoredImage.from_json(json.loads(json.dumps(stored.to_json()))) == stored
    delivered = DeliveredImage(0, 0, image.size, "rid", MODEL, str(image.url), details=image.details)
    assert {name: delivered.to_json()[name] for name in LAYER} == LAYER


def test_a_stream_keeps_the_per_image_fields_too(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    completed = {"type": "image_generation.completed", "usage": {"generated_images": 1}}
    scripted_server(sse_answer({**_partial(0), "output_format": "png"}, completed))
    hook = make_hook()
    [image] = hook.send(hook.build_body(PROMPT, stream=True)).images
    assert image.details == {"output_format": "png"}
