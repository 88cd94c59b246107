"""Invalid input is refused before any HTTP request, naming the parameter and what is allowed.

Three entry points: the hook (``generate_images``), the operator (``execute`` with rendered values,
as a prompt pulled from XCom arrives) and ``@task.jimeng`` (what the function returns); plus the
connection and Jinja templates. Every case asserts the error type, that the message starts with the
parameter's name and says what is allowed, and that the emulator received no request.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from airflow_provider_jimeng.decorators.jimeng import jimeng_task
from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from tests.bad_input.conftest import PNG_DATA_URI, assert_refused, png, resolve

SIZES_4_0 = "allowed: '1K' / '2K' / '4K' or 'WxH' with W*H >= 921600, W*H <= 16777216, W/H in [1/16, 16]"
IMAGE_FORMATS = "allowed: image/jpeg, image/png, image/webp, image/bmp, image/tiff, image/gif"
MODEL_4_5 = "doubao-seedream-4-5-251128"
AUTO = {"sequential_image_generation": "auto"}
VISIBLE = "must be a non-empty string with a visible character"


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


NESTED_5000 = _nested(5000)

HOOK_CASES = [
    pytest.param({"prompt": ""}, "prompt", "must be a non-empty string", id="empty-prompt"),
    pytest.param({"prompt": " \n\t "}, "prompt", "must be a non-empty string", id="whitespace-prompt"),
    pytest.param({"size": "3K"}, "size", SIZES_4_0, id="size-3K"),
    pytest.param({"size": "100x100"}, "size", "W*H = 10000 is below 921600", id="size-100x100"),
    pytest.param({"size": "5000x100"}, "size", "aspect ratio 5000/100 is outside [1/16, 16]", id="size-5000x100"),
    pytest.param({"size": "4800x192"}, "size", "aspect ratio 4800/192 is outside [1/16, 16]", id="aspect-ratio-25"),
    pytest.param({"size": "1K", "model": MODEL_4_5}, "size", "allowed: '2K' / '4K'", id="size-1K-on-4.5"),
    pytest.param({**AUTO, "max_images": 0}, "max_images", "allowed: an integer in [1, 15]", id="max-images-0"),
    pytest.param({**AUTO, "max_images": 16}, "max_images", "allowed: an integer in [1, 15]", id="max-images-16"),
    pytest.param({"max_images": 3}, "max_images", "set sequential_image_generation='auto'", id="max-images-no-set"),
    pytest.param({"image": [PNG_DATA_URI] * 15}, "image", "allows at most 14", id="too-many-references"),
    pytest.param({"image": "@missing"}, "image", "does not exist; expected a URL, a data URI", id="reference-missing"),
    pytest.param({"image": "@not_image"}, "image", "allowed formats: jpeg, png", id="reference-not-an-image"),
    pytest.param({"image": "@huge"}, "image", "may be at most 10485760 bytes", id="reference-over-10MB"),
    pytest.param(
        {"image": PNG_DATA_URI.replace("image/png", "image/PNG")}, "image", IMAGE_FORMATS, id="data-uri-upper-case"
    ),
    pytest.param(
        {"image": PNG_DATA_URI.replace("image/png", "image/heic")}, "image", IMAGE_FORMATS, id="data-uri-unknown"
    ),
    pytest.param({"image": png(10, 10)}, "image", "sides must be > 14 px", id="reference-too-small"),
    pytest.param({"image": "ftp://example.com/a.png"}, "image", "use http(s), a data URI", id="reference-ftp-url"),
    pytest.param({"response_format": "png"}, "response_format", "allowed: 'url' or 'b64_json'", id="format-png"),
    pytest.param({"seed": 2**31}, "seed", "allowed: an integer in [-1, 2147483647]", id="seed-too-big"),
    pytest.param(
        {"sequential_image_generation": "sometimes"},
        "sequential_image_generation",
        "allowed: 'auto' or 'disabled'",
        id="sequential-unknown",
    ),
    pytest.param(
        {"model": MODEL_4_5, "optimize_prompt_mode": "fast"},
        "optimize_prompt_mode",
        "allowed: 'standard'",
        id="optimize-fast-on-4.5",
    ),
    pytest.param({"guidance_scale": 5.0}, "guidance_scale", "Seedream 3.0 only", id="guidance-scale-on-4.0"),
    pytest.param({"extra_body": {"model": "x"}}, "extra_body", "pass them as named parameters", id="extra-body-clash"),
    # Tracebacks and prompts paid for, before (issue 20, break 15).
    pytest.param({"prompt": "\ufeff"}, "prompt", VISIBLE, id="prompt-only-a-BOM"),
    pytest.param({"prompt": "\x00\x00\x00"}, "prompt", VISIBLE, id="prompt-only-NULs"),
    pytest.param({"prompt": "\u0301\u0308\u20dd"}, "prompt", VISIBLE, id="prompt-only-combining-marks"),
    pytest.param({"prompt": "\x07\x1b\x7f"}, "prompt", VISIBLE, id="prompt-only-control-characters"),
    pytest.param({"prompt": "\u200b\u2060 \ufeff"}, "prompt", VISIBLE, id="prompt-only-zero-width"),
    pytest.param({"sizes": "2K"}, "sizes", "is not a generation parameter; allowed: model, size", id="unknown-keyword"),
]


@pytest.mark.parametrize(("arguments", "parameter", "allowed"), HOOK_CASES)
def test_hook_refuses(
    jimeng_conn: JiMengEmulator,
    reference_files: dict[str, str],
    arguments: dict[str, Any],
    parameter: str,
    allowed: str,
) -> None:
    arguments = {"prompt": "a red fox", **resolve(arguments, reference_files)}
    with pytest.raises(JiMengConfigurationError) as raised:
        JiMengHook().generate_images(**arguments)
    assert_refused(raised.value, parameter, allowed, jimeng_conn)


CONNECTION_CASES = [
    pytest.param("no_key", "password", "put the key in the password field", id="connection-without-key"),
    pytest.param("blank_key", "password", "put the key in the password field", id="connection-blank-key"),
    pytest.param("no_scheme", "host", "write it in full, e.g. https://ark.example.com/api/v3", id="base-url-no-scheme"),
    pytest.param("plain_http", "host", "use https, or set the extra allow_http=true", id="base-url-plain-http"),
    pytest.param("ftp_url", "host", "must be an http(s) URL such as https://", id="base-url-ftp"),
    pytest.param("bad_timeout", "timeout", "allowed: a number >= 1", id="timeout-not-a-number"),
    pytest.param("bad_retries", "max_retries", "below the minimum of 0", id="max-retries-negative"),
    pytest.param("bad_watermark", "watermark", "allowed: true or false", id="watermark-not-boolean"),
    pytest.param("key_zero_width", "password", "U+200B (ZERO WIDTH SPACE) at position 9", id="key-zero-width-space"),
    pytest.param("key_cyrillic", "password", "U+0430 (CYRILLIC SMALL LETTER A)", id="key-cyrillic-letter"),
    pytest.param("key_newline", "password", "U+000A (a control character)", id="key-with-a-line-break"),
]


@pytest.mark.parametrize(("conn_id", "parameter", "allowed"), CONNECTION_CASES)
def test_connection_refused(bad_connections: JiMengEmulator, conn_id: str, parameter: str, allowed: str) -> None:
    with pytest.raises(JiMengConfigurationError) as raised:
        JiMengHook(f"jimeng_{conn_id}").generate_images("a red fox")
    assert_refused(raised.value, parameter, allowed, bad_connections)
    assert "sk-valid-looking" not in str(raised.value)
    assert "valid" not in str(raised.value)  # not even a part of the key


OPERATOR_CASES = [
    pytest.param(
        {"prompt": None}, "prompt", "allowed: a non-empty string or a list of non-empty strings", id="xcom-prompt-none"
    ),
    pytest.param(
        {"prompt": {"topic": "fox"}}, "prompt", "got a dict; allowed: a non-empty string", id="xcom-prompt-dict"
    ),
    pytest.param({"prompt": ["a fox", 42]}, "prompt[1]", "must be a string, got int", id="xcom-prompt-non-strings"),
    pytest.param({"prompt": []}, "prompt", "is an empty list; allowed:", id="xcom-prompt-empty-list"),
    pytest.param({"prompt": ["a fox", "  "]}, "prompt[1]", "must be a non-empty string", id="blank-prompt-in-list"),
    pytest.param({"size": "3K"}, "size", SIZES_4_0, id="operator-size-3K"),
    pytest.param({"response_format": "png"}, "response_format", "allowed: 'url' or 'b64_json'", id="operator-format"),
    pytest.param({"response_format": "b64_json"}, "response_format", "needs s3_bucket", id="b64-without-bucket"),
    pytest.param({"s3_bucket": "My_Bucket"}, "s3_bucket", "allowed: 3-63 characters of lower-case", id="bucket-case"),
    pytest.param({"s3_bucket": "ab"}, "s3_bucket", "allowed: 3-63 characters", id="bucket-too-short"),
    pytest.param({"s3_bucket": "10.0.0.1"}, "s3_bucket", "not an IP address", id="bucket-ip-address"),
    pytest.param(
        {"s3_bucket": "good-bucket", "s3_key": "{date}/{prompt_index}_{image_index}.jpeg"},
        "s3_key",
        "allowed fields: {dag_id}, {run_id}",
        id="s3-key-unknown-field",
    ),
    pytest.param({"max_concurrency": 0}, "max_concurrency", "allowed: an integer in [1, 64]", id="concurrency-0"),
    pytest.param(
        {"on_partial_failure": "ignore"}, "on_partial_failure", "allowed: 'fail' or 'continue'", id="partial-unknown"
    ),
    pytest.param({"seed": "abc"}, "seed", "allowed: an integer in [-1, 2147483647]", id="seed-not-a-number"),
    pytest.param(
        {"prompt": ["a", "b"], **AUTO, "max_images": 10, "max_images_per_task": 5},
        "max_images_per_task",
        "above the limit of 5",
        id="over-budget",
    ),
]


@pytest.mark.parametrize(("arguments", "parameter", "allowed"), OPERATOR_CASES)
def test_operator_refuses(
    jimeng_conn: JiMengEmulator, context: dict[str, Any], arguments: dict[str, Any], parameter: str, allowed: str
) -> None:
    operator = JiMengGenerateOperator(task_id="generate", **{"prompt": "a red fox", **arguments})
    with pytest.raises(JiMengConfigurationError) as raised:
        operator.execute(context)  # type: ignore[arg-type]
    assert_refused(raised.value, parameter, allowed, jimeng_conn)


TEMPLATE_CASES = [
    pytest.param({"prompt": "{{ topic }}"}, "prompt", id="undefined-variable"),
    pytest.param({"prompt": "A {{ params.topic "}, "prompt", id="syntax-error"),
    pytest.param({"prompt": "fox", "size": "{{ params.size | nosuchfilter }}"}, "size", id="unknown-filter"),
    pytest.param({"prompt": "prompts/missing.j2"}, "prompt", id="missing-prompt-file"),
]


@pytest.mark.parametrize(("arguments", "parameter"), TEMPLATE_CASES)
def test_template_error_names_the_field(
    jimeng_conn: JiMengEmulator, context: dict[str, Any], arguments: dict[str, Any], parameter: str
) -> None:
    from airflow.sdk import DAG

    with DAG("bad_templates", schedule=None, start_date=datetime.datetime(2024, 1, 1)):
        operator = JiMengGenerateOperator(task_id="generate", **arguments)
    with pytest.raises(JiMengConfigurationError) as raised:
        operator.render_template_fields(context)  # type: ignore[arg-type]
    assert_refused(raised.value, parameter, "allowed: a valid template over the task's context", jimeng_conn)


DECORATOR_CASES = [
    pytest.param(None, "return value", "allowed: a prompt string, a list of prompt strings", id="returns-none"),
    pytest.param("", "prompt", "must be a non-empty string", id="returns-empty-prompt"),
    pytest.param([1, 2], "prompt[0]", "must be a string, got int", id="returns-list-of-ints"),
    pytest.param({"size": "2K"}, "return value", "the dict must include 'prompt'", id="returns-dict-without-prompt"),
    pytest.param({"prompt": "x", "colour": "red"}, "return value", "allowed: dry_run", id="returns-unknown-parameter"),
    pytest.param({"prompt": "x", "size": "3K"}, "size", SIZES_4_0, id="returns-bad-size"),
    pytest.param({"prompt": "x", "max_images": 16, **AUTO}, "max_images", "[1, 15]", id="returns-max-images-16"),
]


@pytest.mark.parametrize(("returned", "parameter", "allowed"), DECORATOR_CASES)
def test_decorator_refuses(
    jimeng_conn: JiMengEmulator, context: dict[str, Any], returned: Any, parameter: str, allowed: str
) -> None:
    from airflow.sdk import DAG

    with DAG("bad_decorated", schedule=None, start_date=datetime.datetime(2024, 1, 1)):

        @jimeng_task(task_id="generate")
        def build_prompt() -> Any:
            return returned

        output = build_prompt()
    with pytest.raises(JiMengConfigurationError) as raised:
        output.operator.execute(context)
    assert_refused(raised.value, parameter, allowed, jimeng_conn)


def test_extra_body_nested_5000_levels_is_refused_by_the_hook_and_the_decorator(
    jimeng_conn: JiMengEmulator, context: dict[str, Any]
) -> None:
    """Regression: 5,000 levels of ``extra_body`` crashed the JSON encoder (RecursionError)."""
    from airflow.sdk import DAG

    allowed = "is nested deeper than 32 levels; allowed: a JSON object"
    with pytest.raises(JiMengConfigurationError) as raised:
        JiMengHook().generate_images("a red fox", extra_body=NESTED_5000)
    assert_refused(raised.value, "extra_body", allowed, jimeng_conn)

    with DAG("bad_decorated_nested", schedule=None, start_date=datetime.datetime(2024, 1, 1)):

        @jimeng_task(task_id="generate")
        def build_prompt() -> Any:
            return {"prompt": "a red fox", "extra_body": NESTED_5000}

        output = build_prompt()
    with pytest.raises(JiMengConfigurationError) as raised:
        output.operator.execute(context)
    assert_refused(raised.value, "extra_body", allowed, jimeng_conn)


def test_a_decorated_task_returning_max_images_per_task_none_keeps_its_cap(
    jimeng_conn: JiMengEmulator, context: dict[str, Any]
) -> None:
    """Regression: ``{"max_images_per_task": None}`` from the function removed the task's cap.
    None in the returned dict means the parameter as the task was declared."""
    from airflow.sdk import DAG

    with DAG("bad_decorated_cap", schedule=None, start_date=datetime.datetime(2024, 1, 1)):

        @jimeng_task(task_id="generate", max_images_per_task=1)
        def build_prompt() -> Any:
            return {"prompt": ["a red fox", "a blue whale"], "max_images_per_task": None}

        output = build_prompt()
    with pytest.raises(JiMengConfigurationError) as raised:
        output.operator.execute(context)
    assert_refused(raised.value, "max_images_per_task", "above the limit of 1", jimeng_conn)
