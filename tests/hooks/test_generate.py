"""Generation through the hook against the emulator: what reaches the wire and what comes back."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from airflow_provider_jimeng.api.capabilities import DEFAULT_MODEL
from airflow_provider_jimeng.api.response import GenerationResult
from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.hooks.jimeng import JiMengHook

PROMPT = "a red fox in the snow"
MODEL_4_5 = "doubao-seedream-4-5-251128"
MODEL_3_0 = "doubao-seedream-3-0-t2i-250415"


def _wire_body(emulator: JiMengEmulator) -> dict[str, Any]:
    """The body of the last generation request as the emulator received it (images shown as lengths)."""
    body = emulator.requests[-1]["body"]
    assert isinstance(body, dict)
    return body


def _shape(result: GenerationResult) -> list[tuple[int, bool, str | None, str | None]]:
    return [(image.index, image.ok, image.size, image.error_code) for image in result.images]


def test_minimal_call_sends_model_prompt_format_and_explicit_watermark(
    hook: JiMengHook, jimeng_conn: JiMengEmulator
) -> None:
    hook.generate_images(PROMPT)
    assert _wire_body(jimeng_conn) == {
        "model": DEFAULT_MODEL,
        "prompt": PROMPT,
        "response_format": "url",
        "watermark": True,
    }
    record = jimeng_conn.requests[-1]
    assert record["path"] == "/api/v3/images/generations"
    assert re.fullmatch(r"[0-9a-f]{32}", record["client_request_id"])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param({"model": MODEL_4_5, "size": "2K"}, {"model": MODEL_4_5, "size": "2K"}, id="model-and-size"),
        pytest.param({"size": "1280x720"}, {"size": "1280x720"}, id="size-WxH"),
        pytest.param({"model": MODEL_3_0, "seed": 1234}, {"model": MODEL_3_0, "seed": 1234}, id="seed-on-3.0"),
        pytest.param({"watermark": False}, {"watermark": False}, id="watermark"),
        pytest.param(
            {"optimize_prompt_thinking": "enabled"}, {"optimize_prompt_options": {"thinking": "enabled"}}, id="thinking"
        ),
        pytest.param(
            {"optimize_prompt_mode": "fast", "optimize_prompt_thinking": "disabled"},
            {"optimize_prompt_options": {"mode": "fast", "thinking": "disabled"}},
            id="thinking-with-a-mode",
        ),
        pytest.param({"response_format": "b64_json"}, {"response_format": "b64_json"}, id="b64_json"),
        pytest.param(
            {"sequential_image_generation": "auto", "max_images": 2},
            {"sequential_image_generation": "auto", "sequential_image_generation_options": {"max_images": 2}},
            id="set-with-max-images",
        ),
        pytest.param(
            {"sequential_image_generation": "auto"},
            {"sequential_image_generation": "auto", "sequential_image_generation_options": {"max_images": 15}},
            id="set-without-max-images",
        ),
        pytest.param(
            {"sequential_image_generation": "disabled"},
            {"sequential_image_generation": "disabled"},
            id="sequential-disabled",
        ),
        pytest.param({"optimize_prompt_mode": "fast"}, {"optimize_prompt_options": {"mode": "fast"}}, id="optimize"),
        pytest.param({"stream": True}, {"stream": True}, id="stream"),
        pytest.param({"extra_body": {"user": "dag-7", "n": 1}}, {"user": "dag-7", "n": 1}, id="extra-body"),
    ],
)
def test_every_parameter_reaches_the_wire(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    result = hook.generate_images(PROMPT, **kwargs)
    body = _wire_body(jimeng_conn)
    for field_name, value in expected.items():
        assert body[field_name] == value, field_name
    assert result.succeeded


def test_watermark_and_model_defaults_come_from_the_connection(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(jimeng_conn.base_url, watermark=False, model=MODEL_4_5)
    hook = make_hook()
    hook.generate_images(PROMPT, size="2K")
    assert _wire_body(jimeng_conn)["watermark"] is False
    assert _wire_body(jimeng_conn)["model"] == MODEL_4_5
    hook.generate_images(PROMPT, size="2K", watermark=True, model=DEFAULT_MODEL)
    assert _wire_body(jimeng_conn)["watermark"] is True
    assert _wire_body(jimeng_conn)["model"] == DEFAULT_MODEL


def test_reference_images_are_sent_as_url_or_data_uri(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, make_image: Callable[..., bytes], tmp_path: Path
) -> None:
    url = "https://example.com/ref.png"
    png = make_image("PNG")
    jpeg_path = tmp_path / "ref.jpg"
    jpeg_path.write_bytes(make_image("JPEG"))
    png_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    jpeg_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg_path.read_bytes()).decode()

    hook.generate_images(PROMPT, image=url)
    assert _wire_body(jimeng_conn)["image"] == f"<{len(url)} chars>"  # the emulator records lengths only
    hook.generate_images(PROMPT, image=[url, png, jpeg_path, str(jpeg_path)])
    assert _wire_body(jimeng_conn)["image"] == [f"<{len(item)} chars>" for item in (url, png_uri, jpeg_uri, jpeg_uri)]
    assert [record["status"] for record in jimeng_conn.requests] == [200, 200]


def test_result_carries_model_created_sizes_usage_and_server_request_id(
    hook: JiMengHook, jimeng_conn: JiMengEmulator
) -> None:
    result = hook.generate_images(PROMPT, size="1280x720")
    record = jimeng_conn.requests[-1]
    assert result.model == DEFAULT_MODEL
    assert result.created is not None
    assert abs(result.created - time.time()) < 60
    [image] = result.images
    assert image.ok
    assert image.size == "1280x720"
    assert image.url is not None
    assert image.url.startswith(jimeng_conn.root_url)
    assert result.usage.generated_images == 1
    assert result.usage.output_tokens == 1280 * 720 // 256
    assert result.request_id == record["request_id"]
    assert result.request_id != record["client_request_id"]
    assert jimeng_conn.billed_images == 1


def test_b64_json_returns_a_decodable_jpeg_of_the_requested_size(hook: JiMengHook) -> None:
    result = hook.generate_images(PROMPT, size="1248x832", response_format="b64_json")
    [image] = result.images
    assert image.url is None
    assert image.b64_json is not None
    with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as decoded:
        assert decoded.format == "JPEG"
        assert decoded.size == (1248, 832)


def test_a_set_returns_the_requested_number_of_images(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    result = hook.generate_images(
        "a four-panel comic in 4 images", sequential_image_generation="auto", max_images=4, size="1K"
    )
    assert [image.index for image in result.images] == [0, 1, 2, 3]
    assert all(image.ok for image in result.images)
    assert result.usage.generated_images == 4
    assert jimeng_conn.billed_images == 4


def test_max_images_caps_a_set(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    result = hook.generate_images("a story in 6 images", sequential_image_generation="auto", max_images=2)
    assert len(result.images) == 2
    assert jimeng_conn.billed_images == 2


def test_partial_failure_in_a_set_is_returned_not_raised(hook: JiMengHook, jimeng_conn: JiMengEmulator) -> None:
    result = hook.generate_images("three seasons FAIL_IMAGE_1", sequential_image_generation="auto", max_images=3)
    assert [image.ok for image in result.images] == [True, False, True]
    failed = result.images[1]
    assert failed.error_code == "OutputImageSensitiveContentDetected"
    assert failed.url is None
    assert result.failed == [failed]
    assert result.usage.generated_images == 2
    assert jimeng_conn.billed_images == 2


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_streaming_gives_the_same_result_shape_as_a_plain_request(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, response_format: str
) -> None:
    arguments: dict[str, Any] = {
        "sequential_image_generation": "auto",
        "max_images": 3,
        "size": "1K",
        "response_format": response_format,
    }
    prompt = "three birds FAIL_IMAGE_2"
    plain = hook.generate_images(prompt, **arguments)
    streamed = hook.generate_images(prompt, stream=True, **arguments)
    assert _wire_body(jimeng_conn)["stream"] is True
    assert (
        _shape(streamed)
        == _shape(plain)
        == [
            (0, True, "1024x1024", None),
            (1, True, "1024x1024", None),
            (2, False, None, "OutputImageSensitiveContentDetected"),
        ]
    )
    assert streamed.usage.generated_images == plain.usage.generated_images == 2
    assert streamed.usage.output_tokens == plain.usage.output_tokens
    assert streamed.model == plain.model
    assert streamed.request_id == jimeng_conn.requests[-1]["request_id"]
    if response_format == "b64_json":
        assert [image.b64_json for image in streamed.succeeded] == [image.b64_json for image in plain.succeeded]


def test_openai_compatible_base_url_works(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(jimeng_conn.openai_base_url)
    result = make_hook().generate_images(PROMPT, size="1K")
    assert result.succeeded
    assert jimeng_conn.requests[-1]["path"] == "/v1/images/generations"


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"size": "3K"}, id="size"),
        pytest.param({"seed": -7}, id="seed"),
        pytest.param({"max_images": 3}, id="max-images-without-auto"),
        pytest.param({"image": b"not an image"}, id="reference-image"),
        pytest.param({"prompt": "   "}, id="blank-prompt"),
        pytest.param({"model": "doubao-seedream-3-0-t2i-250415", "stream": True}, id="stream-on-3.0"),
    ],
)
def test_invalid_input_is_refused_without_sending_a_request(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, kwargs: dict[str, Any]
) -> None:
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises(JiMengConfigurationError):
        hook.generate_images(prompt, **kwargs)
    assert jimeng_conn.request_count == 0
    assert hook.stats["attempts"] == 0


def test_one_hook_serves_16_threads_at_once_with_one_session(
    hook: JiMengHook, jimeng_conn: JiMengEmulator, logs: Any
) -> None:
    jimeng_conn.latency = 0.05  # long enough for the requests to overlap
    sessions: set[int] = set()
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def work(index: int) -> GenerationResult:
        barrier.wait(timeout=10)
        result = hook.generate_images(f"{PROMPT} #{index}", size="1K")
        with lock:
            sessions.add(id(hook.get_conn()))
        return result

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(work, range(16)))

    assert all(result.succeeded for result in results)
    assert len({result.request_id for result in results}) == 16
    assert len(sessions) == 1
    assert jimeng_conn.request_count == 16
    assert jimeng_conn.billed_images == 16
    assert (hook.stats["attempts"], hook.stats["rate_limited"], hook.stats["retries"]) == (16, 0, 0)
    assert "Connection pool is full" not in logs.text
