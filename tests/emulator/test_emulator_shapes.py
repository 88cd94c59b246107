"""Documented answers a client must understand, produced on demand (issue 12): broken streams, 200s that
carry an error, internal errors inside a set, empty error objects, gateway usage; Seedream 5.0's PNG
output and web search; keyword sizes from the documentation's table; request ids and MissingParameter."""

from __future__ import annotations

import base64
import io
import json

import pytest
import requests

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator

MODEL_5_0 = "doubao-seedream-5-0-260128"
SET_OF_4 = {
    "prompt": "4 images",
    "sequential_image_generation": "auto",
    "sequential_image_generation_options": {"max_images": 4},
}


def _events(response: requests.Response) -> list[dict[str, object] | str]:
    out: list[dict[str, object] | str] = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _types(events: list[dict[str, object] | str]) -> list[object]:
    return [event if isinstance(event, str) else event.get("type") for event in events]


def test_stream_error_after_some_images_bills_those(generate, jimeng_emulator: JiMengEmulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("stream_error", after=2))
    events = _events(generate(stream=True, **SET_OF_4))
    assert _types(events) == ["image_generation.partial_succeeded"] * 2 + ["error"]
    error = events[-1]
    assert isinstance(error, dict)
    assert error["error"]["code"] == "InternalServiceError"  # type: ignore[index]
    assert jimeng_emulator.billed_images == 2


def test_stream_error_on_a_json_request_is_the_internal_error_item(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("stream_error", after=1, code="InternalServiceError"))
    payload = generate(**SET_OF_4).json()
    assert ["url" in item for item in payload["data"]] == [True, False]
    assert payload["data"][1]["error"]["code"] == "InternalServiceError"
    assert payload["usage"]["generated_images"] == 1


@pytest.mark.parametrize(("kind", "has_data"), [("error_envelope", False), ("error_envelope_empty_data", True)])
def test_200_with_an_error_envelope_bills_nothing(generate, jimeng_emulator, kind: str, has_data: bool) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault(kind, code="OutputImageSensitiveContentDetected"))
    for stream in (False, True):
        if stream:
            jimeng_emulator.inject(Fault(kind, code="OutputImageSensitiveContentDetected"))
        response = generate(stream=stream)
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        payload = response.json()
        assert payload["error"]["code"] == "OutputImageSensitiveContentDetected"
        assert payload["error"]["message"].endswith(f"Request id: {response.headers['x-request-id']}")
        assert ("data" in payload) is has_data
        if has_data:
            assert payload["data"] == []
    assert jimeng_emulator.ledger == []


def test_internal_error_inside_a_set_stops_it(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    # "若失败原因为内部服务异常（500）：不会继续请求下一个图片生成任务": no image after the failed one.
    jimeng_emulator.inject(Fault("image_internal_error", after=1))
    payload = generate(**SET_OF_4).json()
    assert len(payload["data"]) == 2
    assert "url" in payload["data"][0]
    assert payload["data"][1]["error"]["code"] == "InternalServiceError"
    assert payload["usage"]["generated_images"] == 1
    jimeng_emulator.inject(Fault("image_internal_error", after=2))
    events = _events(generate(stream=True, **SET_OF_4))
    assert _types(events) == [
        "image_generation.partial_succeeded",
        "image_generation.partial_succeeded",
        "image_generation.partial_failed",
        "image_generation.completed",
        "[DONE]",
    ]
    failed = events[2]
    assert isinstance(failed, dict)
    assert failed["image_index"] == 2
    assert failed["error"]["code"] == "InternalServiceError"  # type: ignore[index]
    assert jimeng_emulator.billed_images == 3


def test_internal_error_on_a_single_image(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("image_internal_error"))
    payload = generate().json()
    assert [item["error"]["code"] for item in payload["data"]] == ["InternalServiceError"]
    assert jimeng_emulator.billed_images == 0


def test_empty_error_objects_beside_delivered_images(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("empty_item_errors"), Fault("empty_item_errors"))
    item = generate().json()["data"][0]
    assert item["url"]
    assert item["error"] == {"code": "", "message": ""}
    succeeded = _events(generate(stream=True))[0]
    assert isinstance(succeeded, dict)
    assert succeeded["error"] == {"code": "", "message": ""}
    assert jimeng_emulator.billed_images == 2


def test_gateway_usage_has_no_generated_images(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("gateway_usage"), Fault("gateway_usage"))
    usage = generate(**SET_OF_4).json()["usage"]
    assert "generated_images" not in usage
    assert usage["prompt_tokens"] == 0
    assert usage["total_tokens"] == 4 * 4096
    completed = _events(generate(stream=True))[-2]
    assert isinstance(completed, dict)
    assert "generated_images" not in completed["usage"]  # type: ignore[operator]


def test_fault_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="after"):
        Fault("stream_error", after=-1)


# -- Seedream 5.0 ------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[str, tuple[int, int]]:
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(io.BytesIO(data)) as image:
        return str(image.format), image.size


def test_png_output_is_named_and_typed_png(generate, session) -> None:  # type: ignore[no-untyped-def]
    item = generate(model=MODEL_5_0, size="2K", output_format="png").json()["data"][0]
    assert ".png?" in item["url"]
    download = session.get(item["url"], timeout=10)
    assert download.headers["Content-Type"] == "image/png"
    assert _png_size(download.content) == ("PNG", (2048, 2048))
    encoded = generate(model=MODEL_5_0, size="2K", output_format="png", response_format="b64_json").json()
    assert base64.b64decode(encoded["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
    jpeg = generate(model=MODEL_5_0, size="2K", response_format="b64_json").json()["data"][0]["b64_json"]
    assert base64.b64decode(jpeg)[:2] == b"\xff\xd8"  # jpeg stays the default


def test_web_search_is_reported_in_usage_and_billed_apart(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    tools = [{"type": "web_search"}]
    payload = generate(model=MODEL_5_0, size="2K", tools=tools, prompt="weather poster WEB_SEARCH_3").json()
    assert payload["usage"]["tool_usage"] == {"web_search": 3}
    assert payload["tools"] == tools
    assert jimeng_emulator.billed_web_searches == 3
    assert jimeng_emulator.ledger[0].web_searches == 3
    unsearched = generate(model=MODEL_5_0, size="2K", tools=tools, prompt="a cat WEB_SEARCH_0").json()
    assert unsearched["usage"]["tool_usage"] == {"web_search": 0}  # "0 表示未搜索"
    plain = generate(model=MODEL_5_0, size="2K").json()
    assert "tool_usage" not in plain["usage"]
    assert "tools" not in plain
    completed = _events(generate(model=MODEL_5_0, size="2K", tools=tools, stream=True))[-2]
    assert isinstance(completed, dict)
    assert completed["usage"]["tool_usage"] == {"web_search": 1}  # type: ignore[index]
    assert jimeng_emulator.billed_web_searches == 4


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"output_format": "png"}, "output_format"),
        ({"tools": [{"type": "web_search"}]}, "web_search"),
        ({"model": MODEL_5_0, "size": "4K"}, "size"),
    ],
)
def test_seedream_5_fields_are_refused_elsewhere(generate, fields, param) -> None:  # type: ignore[no-untyped-def]
    response = generate(**fields)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("model", "size", "prompt", "expected"),
    [
        ("doubao-seedream-4-0-250828", "1K", "a poster", "1024x1024"),
        ("doubao-seedream-4-0-250828", "2K", "a 16:9 banner", "2848x1600"),
        ("doubao-seedream-4-5-251128", "2K", "a 21:9 strip", "3136x1344"),
        (MODEL_5_0, "3K", "a 4:3 photo", "3456x2592"),
        (MODEL_5_0, "2K", "a 9:16 story", "1600x2848"),
        ("doubao-seedream-3-0-t2i-250415", None, "a cat", "1024x1024"),
    ],
)
def test_keywords_render_at_the_documented_sizes(generate, model, size, prompt, expected) -> None:  # type: ignore[no-untyped-def]
    payload = generate(model=model, size=size, prompt=prompt).json()
    assert payload["data"][0]["size"] == expected


def test_reference_images_cap_a_set(generate) -> None:  # type: ignore[no-untyped-def]
    refs = ["https://example.com/a.png"] * 13
    body = {**SET_OF_4, "prompt": "5 images", "image": refs}
    assert len(generate(**body).json()["data"]) == 2  # 15 - 13


# -- wire details ------------------------------------------------------------------------------


def test_client_request_id_is_echoed(jimeng_emulator: JiMengEmulator, session: requests.Session) -> None:
    url = f"{jimeng_emulator.base_url}/images/generations"
    body = {"model": "doubao-seedream-4-0-250828", "prompt": "x", "size": "1K"}
    answered = session.post(url, json=body, headers={"X-Client-Request-Id": "req-42"}, timeout=10)
    assert answered.headers["X-Client-Request-Id"] == "req-42"
    refused = session.post(url, json={**body, "size": "9K"}, headers={"X-Client-Request-Id": "req-43"}, timeout=10)
    assert refused.headers["X-Client-Request-Id"] == "req-43"
    assert "X-Client-Request-Id" not in session.post(url, json=body, timeout=10).headers


@pytest.mark.parametrize(("fields", "param"), [({"model": None}, "model"), ({"prompt": None}, "prompt")])
def test_missing_required_field_is_missing_parameter(jimeng_emulator, session, fields, param) -> None:  # type: ignore[no-untyped-def]
    full = {"model": "doubao-seedream-4-0-250828", "prompt": "x", **fields}
    body = {key: value for key, value in full.items() if value}
    response = session.post(f"{jimeng_emulator.base_url}/images/generations", json=body, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "MissingParameter"
    assert response.json()["error"]["param"] == param
