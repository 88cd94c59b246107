"""Responses, event streams and error envelopes are parsed into typed results and the right exceptions."""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_jimeng import exceptions
from airflow_provider_jimeng.api.response import (
    GeneratedImage,
    GenerationResult,
    Usage,
    api_error_from_payload,
    iter_sse_events,
    parse_event_stream,
    parse_generation,
    redact_url,
)
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengAuthenticationError,
    JiMengConfigurationError,
    JiMengContentPolicyError,
    JiMengError,
    JiMengGenerationIncompleteError,
    JiMengInvalidRequestError,
    JiMengQuotaExceededError,
    JiMengRateLimitError,
    JiMengResponseError,
    JiMengRunAbortedError,
    JiMengRunStoppedError,
    JiMengServerError,
    JiMengSpendingCapError,
    JiMengTimeoutError,
    error_class_for,
)

SIGNATURE = "5f1c0ffee0ddba11cafe5eed"
SIGNED_URL = (
    "https://ark-content-generation-cn-beijing.tos-cn-beijing.volces.com/doubao-seedream-4-0/0217.jpeg"
    f"?X-Tos-Algorithm=TOS4-HMAC-SHA256&X-Tos-Expires=86400&X-Tos-Signature={SIGNATURE}"
)
B64 = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 8
MODEL = "doubao-seedream-4-0-250828"
REQUEST_ID = "021757323224000abcdef"


def _payload(*items: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": MODEL, "created": 1757323224, "data": list(items)}
    if usage is not None:
        payload["usage"] = usage
    return payload


def _sse(*events: dict[str, Any] | str) -> list[bytes]:
    """Lines of an SSE body: each event as ``event:``/``data:`` lines and a blank line."""
    lines: list[bytes] = []
    for event in events:
        if isinstance(event, str):
            lines += [f"data: {event}".encode(), b""]
        else:
            lines += [f"event: {event.get('type', 'message')}".encode(), f"data: {json.dumps(event)}".encode(), b""]
    return lines


def _partial(index: int, **fields: Any) -> dict[str, Any]:
    return {"type": "image_generation.partial_succeeded", "model": MODEL, "created": 1, "image_index": index, **fields}


def _completed(images: int) -> dict[str, Any]:
    usage = {"generated_images": images, "output_tokens": images * 4096, "total_tokens": images * 4096}
    return {"type": "image_generation.completed", "model": MODEL, "created": 1, "usage": usage}


# ----------------------------------------------------------------------------------- plain JSON


def test_url_response_is_parsed_into_images_and_usage() -> None:
    usage = {"generated_images": 1, "output_tokens": 16384, "total_tokens": 16384}
    result = parse_generation(_payload({"url": SIGNED_URL, "size": "2048x2048"}, usage=usage), REQUEST_ID)
    assert result.model == MODEL
    assert result.created == 1757323224
    assert result.request_id == REQUEST_ID
    [image] = result.images
    assert (image.index, image.url, image.b64_json, image.size, image.ok) == (0, SIGNED_URL, None, "2048x2048", True)
    assert image.dimensions == (2048, 2048)
    assert result.usage == Usage(generated_images=1, output_tokens=16384, total_tokens=16384)
    assert result.succeeded == [image]
    assert result.failed == []


def test_b64_json_response_keeps_the_data() -> None:
    result = parse_generation(_payload({"b64_json": B64, "size": "1024x1024"}), REQUEST_ID)
    assert result.images[0].b64_json == B64
    assert result.images[0].url is None
    assert result.images[0].ok


def test_per_image_error_items_become_failed_images_not_exceptions() -> None:
    failure = {"error": {"code": "OutputImageSensitiveContentDetected", "message": "image 1 blocked"}}
    result = parse_generation(
        _payload({"url": SIGNED_URL, "size": "1K"}, failure, {"url": SIGNED_URL, "size": "1K"}), REQUEST_ID
    )
    assert [image.ok for image in result.images] == [True, False, True]
    failed = result.images[1]
    assert (failed.index, failed.error_code, failed.error_message) == (
        1,
        "OutputImageSensitiveContentDetected",
        "image 1 blocked",
    )
    assert result.failed == [failed]
    assert len(result.succeeded) == 2


def test_item_with_neither_url_nor_data_is_a_failed_image() -> None:
    result = parse_generation(_payload({"size": "1024x1024"}, "not-an-object"), REQUEST_ID)  # type: ignore[arg-type]
    assert [image.error_code for image in result.images] == ["MissingImage", "MissingImage"]
    assert not any(image.ok for image in result.images)


def test_missing_usage_gives_none_fields() -> None:
    result = parse_generation(_payload({"url": SIGNED_URL}), None)
    assert result.usage == Usage()
    assert result.usage.generated_images is None
    assert result.request_id is None


def test_extra_usage_fields_are_kept_in_extra() -> None:
    usage = {"generated_images": "2", "output_tokens": 8192.0, "prompt_tokens": 17, "cost": {"cny": 0.4}}
    result = parse_generation(_payload({"url": SIGNED_URL}, usage=usage), REQUEST_ID)
    assert result.usage.generated_images == 2
    assert result.usage.output_tokens == 8192
    assert result.usage.total_tokens is None
    assert result.usage.extra == {"prompt_tokens": 17, "cost": {"cny": 0.4}}
    assert result.usage.as_dict()["prompt_tokens"] == 17


def test_multiplication_sign_in_sizes_is_normalised_to_x() -> None:
    result = parse_generation(_payload({"url": SIGNED_URL, "size": "2048×1536"}), REQUEST_ID)
    assert result.images[0].size == "2048x1536"
    assert result.images[0].dimensions == (2048, 1536)


@pytest.mark.parametrize(
    "payload",
    [None, [], "<html>502</html>", {"data": "nope"}, {"model": MODEL}, {"error": {"code": "", "message": ""}}],
    ids=["none", "list", "html", "data-not-list", "no-data", "empty-error-no-data"],
)
def test_malformed_payload_raises_a_retryable_response_error(payload: Any) -> None:
    with pytest.raises(JiMengResponseError) as caught:
        parse_generation(payload, REQUEST_ID)
    assert caught.value.code == "MalformedResponse"
    assert caught.value.request_id == REQUEST_ID
    assert caught.value.retryable
    assert caught.value.possibly_billed  # a 200 that cannot be read was generated all the same


@pytest.mark.parametrize(
    ("error", "data", "expected", "retryable"),
    [
        pytest.param(
            {"code": "OutputImageSensitiveContentDetected", "message": "blocked"},
            None,
            JiMengContentPolicyError,
            False,
            id="content-policy-no-data",
        ),
        pytest.param(
            {"code": "InputTextRiskDetection", "message": "risky"}, [], JiMengContentPolicyError, False, id="risk-empty"
        ),
        pytest.param(
            {"code": "ServerOverloaded", "message": "busy"}, [], JiMengRateLimitError, True, id="overloaded-retried"
        ),
        pytest.param(
            {"code": "InternalServiceError", "message": "boom"}, None, JiMengServerError, True, id="internal-retried"
        ),
        pytest.param({"code": "X", "message": ""}, None, JiMengAPIError, False, id="unknown-code"),
    ],
)
def test_a_200_carrying_an_error_raises_the_class_of_its_code(
    error: dict[str, Any], data: list[Any] | None, expected: type[JiMengAPIError], retryable: bool
) -> None:
    payload: dict[str, Any] = {"model": MODEL, "created": 1, "error": error}
    if data is not None:
        payload["data"] = data
    with pytest.raises(JiMengAPIError) as caught:
        parse_generation(payload, REQUEST_ID)
    assert type(caught.value) is expected
    assert not isinstance(caught.value, JiMengResponseError)  # not a malformed answer: a refused one
    assert caught.value.code == error["code"]
    assert caught.value.status_code == 200
    assert caught.value.retryable is retryable
    assert not caught.value.possibly_billed


def test_an_empty_error_object_beside_an_image_is_a_delivered_image() -> None:
    empty = {"code": "", "message": ""}
    result = parse_generation(
        _payload({"url": SIGNED_URL, "size": "1K", "error": empty}, {"b64_json": B64, "error": empty}), REQUEST_ID
    )
    assert [image.ok for image in result.images] == [True, True]
    assert [image.error_code for image in result.images] == [None, None]
    assert result.billed_images == 2  # no usage: the delivered images


def test_billed_images_is_usage_when_given_else_the_delivered_images() -> None:
    tokens_only = {"prompt_tokens": 12, "completion_tokens": 4096, "total_tokens": 4108}
    failure = {"error": {"code": "OutputImageSensitiveContentDetected", "message": "blocked"}}
    gateway = parse_generation(_payload({"url": SIGNED_URL}, failure, {"url": SIGNED_URL}, usage=tokens_only), None)
    assert gateway.usage.generated_images is None
    assert gateway.billed_images == 2
    official = parse_generation(_payload({"url": SIGNED_URL}, usage={"generated_images": 3}), None)
    assert official.billed_images == 3


# ----------------------------------------------------------------------------------- streaming


def test_event_stream_is_folded_into_the_same_result_shape() -> None:
    failed = {
        "type": "image_generation.partial_failed",
        "model": MODEL,
        "created": 1,
        "image_index": 1,
        "error": {"code": "OutputImageSensitiveContentDetected", "message": "blocked"},
    }
    lines = _sse(
        _partial(0, url=SIGNED_URL, size="1024×1024"),
        failed,
        _partial(2, b64_json=B64, size="1024x1024"),
        _completed(2),
        "[DONE]",
    )
    result = parse_event_stream(lines, REQUEST_ID)
    assert result.model == MODEL
    assert result.request_id == REQUEST_ID
    assert [image.index for image in result.images] == [0, 1, 2]
    assert [image.ok for image in result.images] == [True, False, True]
    assert result.images[0].size == "1024x1024"
    assert result.images[1].error_code == "OutputImageSensitiveContentDetected"
    assert result.images[2].b64_json == B64
    assert result.usage.generated_images == 2
    assert result.usage.output_tokens == 8192


def test_events_after_done_are_ignored() -> None:
    lines = _sse(_partial(0, url=SIGNED_URL), _completed(1), "[DONE]", _partial(1, url=SIGNED_URL))
    assert len(parse_event_stream(lines, REQUEST_ID).images) == 1


def test_event_stream_accepts_str_lines_crlf_and_comments() -> None:
    lines = [": keep-alive\r\n", *(line.decode() + "\r\n" for line in _sse(_partial(0, url=SIGNED_URL), _completed(1)))]
    result = parse_event_stream(lines, REQUEST_ID)  # type: ignore[arg-type]
    assert result.images[0].url == SIGNED_URL


def test_sse_events_spanning_several_data_lines_are_joined() -> None:
    lines = [b"event: x", b"data: {", b'data: "a": 1}', b"", b"data: tail"]
    assert list(iter_sse_events(lines)) == [("x", '{\n"a": 1}'), (None, "tail")]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("OutputImageSensitiveContentDetected", JiMengContentPolicyError),
        ("QuotaExceeded", JiMengQuotaExceededError),
        ("InternalServiceError", JiMengServerError),
    ],
)
def test_error_event_before_any_image_raises_the_class_of_its_code(code: str, expected: type[JiMengAPIError]) -> None:
    error_event = {"type": "error", "error": {"code": code, "message": f"nope. Request id: {REQUEST_ID}"}}
    failed = {"type": "image_generation.partial_failed", "image_index": 0, "error": {"code": "OutputImageRisk"}}
    with pytest.raises(expected) as caught:
        parse_event_stream(_sse(failed, error_event), REQUEST_ID, expected_images=3)
    assert caught.value.code == code
    assert caught.value.request_id == REQUEST_ID
    assert not caught.value.possibly_billed  # the service said what happened: nothing was generated


def test_error_event_after_delivered_images_keeps_them_and_fails_the_rest_of_the_set() -> None:
    error_event = {"type": "error", "error": {"code": "InternalServiceError", "message": "Rendering failed."}}
    lines = _sse(_partial(0, url=SIGNED_URL, size="1K"), _partial(1, b64_json=B64, size="1K"), error_event)
    result = parse_event_stream(lines, REQUEST_ID, expected_images=4)
    assert [(image.index, image.ok, image.error_code) for image in result.images] == [
        (0, True, None),
        (1, True, None),
        (2, False, "InternalServiceError"),
        (3, False, "InternalServiceError"),
    ]
    assert "Rendering failed" in (result.images[2].error_message or "")
    assert result.billed_images == 2  # the delivered images are billed, and only they
    assert result.interrupted_by == "InternalServiceError"
    assert not result.truncated  # the service said it stopped: nothing more was generated


def test_error_event_after_the_only_image_adds_no_failure() -> None:
    error_event = {"type": "error", "error": {"code": "InternalServiceError", "message": "late"}}
    result = parse_event_stream(_sse(_partial(0, url=SIGNED_URL), error_event), REQUEST_ID, expected_images=1)
    assert [image.ok for image in result.images] == [True]
    assert result.interrupted_by == "InternalServiceError"


def test_a_stream_that_breaks_off_after_images_keeps_them_and_says_why_the_rest_failed() -> None:
    def lines() -> Iterator[bytes]:
        yield from _sse(_partial(0, url=SIGNED_URL, size="1K"))
        raise JiMengTimeoutError("the connection broke", code="ConnectionError", possibly_billed=True)

    result = parse_event_stream(lines(), REQUEST_ID, expected_images=3)
    assert [(image.index, image.ok, image.error_code) for image in result.images] == [
        (0, True, None),
        (1, False, "ConnectionError"),
        (2, False, "ConnectionError"),
    ]
    assert result.truncated  # the undelivered images may have been generated: possibly billed
    assert result.billed_images == 1


def test_a_stream_that_breaks_off_before_any_image_raises_what_broke_it() -> None:
    def lines() -> Iterator[bytes]:
        yield b": keep-alive"
        raise JiMengTimeoutError("deadline", code="ResponseDeadlineExceeded", possibly_billed=True)

    with pytest.raises(JiMengTimeoutError) as caught:
        parse_event_stream(lines(), REQUEST_ID, expected_images=2)
    assert caught.value.code == "ResponseDeadlineExceeded"
    assert caught.value.possibly_billed


def test_a_frame_that_is_not_json_after_images_keeps_them() -> None:
    lines = [*_sse(_partial(0, url=SIGNED_URL)), b"data: {not json", b""]
    result = parse_event_stream(lines, REQUEST_ID, expected_images=2)
    assert [(image.ok, image.error_code) for image in result.images] == [(True, None), (False, "MalformedResponse")]
    assert result.truncated


def test_untyped_event_carrying_an_error_raises() -> None:
    lines = [b'data: {"error": {"code": "InternalServiceError", "message": "boom"}}', b""]
    with pytest.raises(JiMengAPIError, match="InternalServiceError"):
        parse_event_stream(lines, REQUEST_ID)


def test_stream_cut_before_completed_keeps_received_images_and_records_the_interruption() -> None:
    lines = _sse(_partial(0, url=SIGNED_URL, size="1024x1024"), _partial(1, url=SIGNED_URL, size="1024x1024"))
    result = parse_event_stream(lines, REQUEST_ID)
    assert [image.ok for image in result.images] == [True, True, False]
    assert result.images[2].index == 2
    assert result.images[2].error_code == "StreamInterrupted"
    assert result.usage.generated_images == 2
    assert result.request_id == REQUEST_ID
    assert result.truncated
    assert result.interrupted_by == "StreamInterrupted"


def test_stream_cut_before_completed_fails_every_image_of_the_set_not_delivered() -> None:
    lines = _sse(_partial(0, url=SIGNED_URL), _partial(2, url=SIGNED_URL))
    result = parse_event_stream(lines, REQUEST_ID, expected_images=4)
    assert [(image.index, image.error_code) for image in result.images] == [
        (0, None),
        (1, "StreamInterrupted"),
        (2, None),
        (3, "StreamInterrupted"),
    ]


@pytest.mark.parametrize(
    "lines", [[], [b""], _sse("[DONE]"), [b": only a comment", b""]], ids=["empty", "blank", "done-only", "comment"]
)
def test_stream_with_nothing_in_it_raises(lines: list[bytes]) -> None:
    with pytest.raises(JiMengResponseError) as caught:
        parse_event_stream(lines, REQUEST_ID)
    assert caught.value.code == "TruncatedStream"
    assert caught.value.retryable


def test_stream_event_that_is_not_json_raises() -> None:
    with pytest.raises(JiMengResponseError, match="not JSON"):
        parse_event_stream([b"data: {not json", b""], REQUEST_ID)


# ----------------------------------------------------------------------------------- redaction


def test_redact_url_drops_the_query_and_keeps_where_it_points() -> None:
    assert redact_url(SIGNED_URL) == (
        "https://ark-content-generation-cn-beijing.tos-cn-beijing.volces.com/doubao-seedream-4-0/0217.jpeg?<redacted>"
    )
    assert redact_url("https://example.com/a.jpeg") == "https://example.com/a.jpeg"
    assert redact_url(f"data:image/jpeg;base64,{B64}") == "data:<redacted>"
    assert redact_url(None) == ""
    assert redact_url("") == ""


def test_redact_url_shortens_long_paths() -> None:
    redacted = redact_url("https://h.example/" + "p" * 200 + "?sig=1")
    assert len(redacted) < 120
    assert redacted.endswith("...?<redacted>")


def test_reprs_never_show_signed_query_or_base64() -> None:
    url_image = GeneratedImage(index=0, url=SIGNED_URL, size="2048x2048")
    b64_image = GeneratedImage(index=1, b64_json=B64, size="2048x2048")
    failed = GeneratedImage(index=2, error_code="OutputImageSensitiveContentDetected", error_message="blocked")
    result = GenerationResult(
        model=MODEL, created=1, images=[url_image, b64_image, failed], usage=Usage(generated_images=2)
    )
    for text in (repr(url_image), repr(b64_image), repr(result), str(result)):
        assert SIGNATURE not in text
        assert "X-Tos" not in text
        assert B64[:24] not in text
    assert "0217.jpeg?<redacted>" in repr(url_image)
    assert "<b64_json>" in repr(b64_image)
    assert "OutputImageSensitiveContentDetected" in repr(result)


def test_inline_image_data_echoed_in_an_error_message_is_redacted() -> None:
    payload = {"error": {"code": "InvalidParameter", "message": f"bad image data:image/png;base64,{B64} end"}}
    error = api_error_from_payload(400, payload, request_id=REQUEST_ID)
    assert B64[:24] not in str(error)
    assert "bad image data:<redacted> end" in str(error)


def test_error_envelope_becomes_an_exception_with_code_param_and_request_id() -> None:
    payload = {
        "error": {
            "code": "InvalidParameter",
            "message": f"size is invalid. Request id: {REQUEST_ID}",
            "param": "size",
            "type": "BadRequest",
        }
    }
    error = api_error_from_payload(400, payload, request_id=REQUEST_ID, retry_after=None)
    assert isinstance(error, JiMengInvalidRequestError)
    assert (error.status_code, error.code, error.param, error.request_id) == (
        400,
        "InvalidParameter",
        "size",
        REQUEST_ID,
    )
    assert str(error) == f"HTTP 400 InvalidParameter: size is invalid. Request id: {REQUEST_ID} (param: size)"


def test_error_without_an_envelope_uses_the_fallback_message_and_status_class() -> None:
    error = api_error_from_payload(502, "<html>Bad Gateway</html>", request_id="rid-1", fallback_message="Bad Gateway")
    assert isinstance(error, JiMengServerError)
    assert error.code is None
    assert str(error) == "HTTP 502: Bad Gateway [request id: rid-1]"


# ----------------------------------------------------------------------------------- error classes

ERROR_TABLE = [
    (400, "MissingParameter", JiMengInvalidRequestError),
    (400, "InvalidParameter", JiMengInvalidRequestError),
    (400, "InvalidParameter.Size", JiMengInvalidRequestError),
    (400, "InvalidImageURL.InvalidFormat", JiMengInvalidRequestError),
    (400, "InputTextSensitiveContentDetected", JiMengContentPolicyError),
    (400, "InputImageSensitiveContentDetected", JiMengContentPolicyError),
    (400, "InputImageSensitiveContentDetected.PrivacyInformation", JiMengContentPolicyError),
    (400, "OutputImageSensitiveContentDetected", JiMengContentPolicyError),
    (400, "SensitiveContentDetected.SevereViolation", JiMengContentPolicyError),
    (400, "InputTextRiskDetection", JiMengContentPolicyError),
    (400, "InputImageRiskDetection", JiMengContentPolicyError),
    (400, "OutputImageRiskDetection", JiMengContentPolicyError),
    (400, "ContentSecurityDetectionError", JiMengContentPolicyError),
    (400, "InputVideoSensitiveContentDetected", JiMengContentPolicyError),  # any code naming "Sensitive"
    (400, "PromptRiskControlRejected", JiMengContentPolicyError),  # any code naming "Risk"
    (None, "OutputImageRiskDetection", JiMengContentPolicyError),  # a stream's error event
    (200, "ContentSecurityDetectionError", JiMengContentPolicyError),  # an error envelope in a 200
    (200, "ModelAccountRpmRateLimitExceeded", JiMengRateLimitError),
    (401, "AuthenticationError", JiMengAuthenticationError),
    (401, "InvalidAccountStatus", JiMengAuthenticationError),
    (403, "AccountOverdueError", JiMengAuthenticationError),
    (403, "AccessDenied", JiMengAuthenticationError),
    (403, "OperationDenied.ServiceNotOpen", JiMengAuthenticationError),
    (403, "OperationDenied.ServiceOverdue", JiMengAuthenticationError),
    (404, "InvalidEndpointOrModel.NotFound", JiMengInvalidRequestError),
    (404, "ModelNotOpen", JiMengInvalidRequestError),
    (429, "ModelAccountIpmRateLimitExceeded", JiMengRateLimitError),
    (429, "ModelAccountRpmRateLimitExceeded", JiMengRateLimitError),
    (429, "RateLimitExceeded.EndpointRPMExceeded", JiMengRateLimitError),
    (429, "RequestBurstTooFast", JiMengRateLimitError),
    (429, "ServerOverloaded", JiMengRateLimitError),
    (429, "InflightBatchsizeExceeded", JiMengRateLimitError),
    (429, None, JiMengRateLimitError),
    (429, "QuotaExceeded", JiMengQuotaExceededError),
    (429, "SetLimitExceeded", JiMengQuotaExceededError),
    (500, "InternalServiceError", JiMengServerError),
    (502, None, JiMengServerError),
    (503, "ServiceUnavailable", JiMengServerError),
    (504, None, JiMengServerError),
    (400, None, JiMengInvalidRequestError),
    (404, None, JiMengInvalidRequestError),
]


@pytest.mark.parametrize(("status", "code", "expected"), ERROR_TABLE)
def test_error_class_follows_the_fact_sheet_table(
    status: int | None, code: str | None, expected: type[JiMengAPIError]
) -> None:
    assert error_class_for(status, code) is expected


@pytest.mark.parametrize(
    ("error_class", "retryable"),
    [
        (JiMengRateLimitError, True),
        (JiMengServerError, True),
        (JiMengTimeoutError, True),
        (JiMengResponseError, True),
        (JiMengQuotaExceededError, False),
        (JiMengAuthenticationError, False),
        (JiMengInvalidRequestError, False),
        (JiMengContentPolicyError, False),
        (JiMengAPIError, False),
    ],
)
def test_only_transient_errors_are_retryable(error_class: type[JiMengAPIError], retryable: bool) -> None:
    assert error_class("x").retryable is retryable


def test_every_error_is_an_airflow_exception() -> None:
    from airflow.exceptions import AirflowException

    assert issubclass(JiMengError, AirflowException)
    assert issubclass(JiMengConfigurationError, ValueError)
    assert issubclass(JiMengContentPolicyError, JiMengInvalidRequestError)


@pytest.mark.parametrize("error_class", [cls for _, _, cls in ERROR_TABLE] + [JiMengTimeoutError, JiMengResponseError])
def test_api_errors_survive_a_pickle_round_trip(error_class: type[JiMengAPIError]) -> None:
    error = error_class(
        f"boom. Request id: {REQUEST_ID}",
        status_code=429,
        code="SomeCode",
        request_id=REQUEST_ID,
        param="size",
        retry_after=1.5,
        possibly_billed=True,
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is error_class
    assert (copy.status_code, copy.code, copy.request_id, copy.param, copy.retry_after, copy.possibly_billed) == (
        429,
        "SomeCode",
        REQUEST_ID,
        "size",
        1.5,
        True,
    )
    assert str(copy) == str(error)


def _every_error_class() -> list[type[JiMengError]]:
    classes = [JiMengError]
    for cls in classes:
        classes.extend(sorted(cls.__subclasses__(), key=lambda sub: sub.__name__))
    return [cls for cls in classes if cls.__module__ == exceptions.__name__]


#: Instances of the classes whose constructor takes more than a message.
_SPECIAL_ERRORS: dict[type[JiMengError], JiMengError] = {
    JiMengConfigurationError: JiMengConfigurationError("size", "'3K' is not allowed"),
    JiMengGenerationIncompleteError: JiMengGenerationIncompleteError(
        ["image 1: OutputImageSensitiveContentDetected"], stored=2
    ),
    JiMengRunAbortedError: JiMengRunAbortedError(["prompt 0: InvalidEndpointOrModel.NotFound"], stored=0),
    JiMengSpendingCapError: JiMengSpendingCapError(limit=5, billed=3, possibly_billed=1, in_flight=1, requested=2),
    JiMengRunStoppedError: JiMengRunStoppedError("on_kill"),
}


@pytest.mark.parametrize("error_class", _every_error_class(), ids=lambda cls: cls.__name__)
def test_every_error_survives_a_pickle_round_trip(error_class: type[JiMengError]) -> None:
    if error_class in _SPECIAL_ERRORS:
        error = _SPECIAL_ERRORS[error_class]
    elif issubclass(error_class, JiMengAPIError):
        error = error_class("boom", status_code=500, code="InternalServiceError", request_id=REQUEST_ID)
    else:
        error = error_class("download of image https://h/x.jpeg?<redacted> failed")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is error_class
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
