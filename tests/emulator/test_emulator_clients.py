"""Fidelity: the official Ark SDK and the OpenAI client parse every non-error answer of the emulator,
streamed or not; CLI and Pillow-less import work."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, Fault, JiMengEmulator
from airflow_provider_jimeng.emulator.images import ImageKey, render_jpeg
from airflow_provider_jimeng.emulator.protocol import set_size

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_openai_client_parses_url_and_b64(jimeng_emulator: JiMengEmulator) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(api_key=DEFAULT_API_KEY, base_url=jimeng_emulator.openai_base_url, max_retries=0)
    result = client.images.generate(
        model="doubao-seedream-4-0-250828",
        prompt="a lighthouse at dawn",
        size="1024x1024",
        response_format="url",
        extra_body={"watermark": False},
    )
    assert result.data
    assert result.data[0].url
    assert "X-Tos-Signature=" in result.data[0].url
    assert requests.get(result.data[0].url, timeout=5).status_code == 200
    encoded = client.images.generate(
        model="doubao-seedream-4-0-250828",
        prompt="a lighthouse at dawn",
        size="1024x1024",
        response_format="b64_json",
        extra_body={"watermark": False},
    )
    assert encoded.data
    assert base64.b64decode(encoded.data[0].b64_json or "")[:2] == b"\xff\xd8"
    assert jimeng_emulator.requests[0]["body"]["watermark"] is False
    assert jimeng_emulator.requests[0]["path"] == "/v1/images/generations"


def test_openai_client_sees_typed_errors(jimeng_emulator: JiMengEmulator) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(api_key="wrong", base_url=jimeng_emulator.openai_base_url, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(model="doubao-seedream-4-0-250828", prompt="x", size="1024x1024")


MODEL_4_0 = "doubao-seedream-4-0-250828"
MODEL_5_0 = "doubao-seedream-5-0-260128"
SET = {"sequential_image_generation": "auto", "sequential_image_generation_options": {"max_images": 3}}

# (fault or None, extra body fields, images delivered): every non-error answer the emulator gives.
ANSWERS = [
    pytest.param(None, {}, 1, id="url"),
    pytest.param(None, {"response_format": "b64_json"}, 1, id="b64"),
    pytest.param(None, {"prompt": "3 images", **SET}, 3, id="set"),
    pytest.param(None, {"model": MODEL_5_0, "size": "2K", "output_format": "png"}, 1, id="png"),
    pytest.param(None, {"model": MODEL_5_0, "size": "2K", "tools": [{"type": "web_search"}]}, 1, id="web-search"),
    pytest.param(Fault("gateway_usage"), {"prompt": "3 images", **SET}, 3, id="gateway-usage"),
]
# Answers with an error object inside (a failed image of a set, empty error objects): parsed from
# JSON; as events, the Ark SDK raises on any event that carries "error" (its limit, docs/emulator.md).
ANSWERS_WITH_ITEM_ERRORS = [
    pytest.param(None, {"prompt": "3 images FAIL_IMAGE_1", **SET}, 2, id="moderated-image"),
    pytest.param(Fault("image_internal_error", after=1), {"prompt": "3 images", **SET}, 1, id="internal-error-image"),
    pytest.param(Fault("empty_item_errors"), {}, 1, id="empty-error-objects"),
]


def _body(fields: dict[str, object]) -> dict[str, object]:
    return {"model": MODEL_4_0, "prompt": "a lighthouse", "size": "1K", "watermark": False, **fields}


def _ark(emulator: JiMengEmulator):  # type: ignore[no-untyped-def]
    ark = pytest.importorskip("volcenginesdkarkruntime")
    return ark.Ark(base_url=emulator.base_url, api_key=DEFAULT_API_KEY, max_retries=0)


def _ark_kwargs(body: dict[str, object]) -> dict[str, object]:
    """The Ark SDK takes its option objects typed (it calls ``model_dump`` on them)."""
    types = pytest.importorskip("volcenginesdkarkruntime.types.images.images")
    kwargs = dict(body)
    if isinstance(options := kwargs.get("sequential_image_generation_options"), dict):
        kwargs["sequential_image_generation_options"] = types.SequentialImageGenerationOptions(**options)
    if isinstance(tools := kwargs.get("tools"), list):
        kwargs["tools"] = [types.ContentGenerationTool(**tool) for tool in tools]
    return kwargs


def _openai(emulator: JiMengEmulator):  # type: ignore[no-untyped-def]
    openai = pytest.importorskip("openai")
    return openai.OpenAI(api_key=DEFAULT_API_KEY, base_url=emulator.openai_base_url, max_retries=0)


def _openai_kwargs(body: dict[str, object]) -> dict[str, object]:
    """The openai client takes model/prompt/size/response_format/stream; the rest goes in extra_body."""
    named = {key: body[key] for key in ("model", "prompt", "size", "response_format", "stream") if key in body}
    return {**named, "extra_body": {key: value for key, value in body.items() if key not in named}}


@pytest.mark.parametrize(("fault", "fields", "delivered"), ANSWERS + ANSWERS_WITH_ITEM_ERRORS)
def test_ark_sdk_parses_json_answers(
    jimeng_emulator: JiMengEmulator, fault: Fault | None, fields: dict[str, object], delivered: int
) -> None:
    client = _ark(jimeng_emulator)
    if fault:
        jimeng_emulator.inject(fault)
    result = client.images.generate(**_ark_kwargs(_body(fields)))
    images = [item for item in result.data if item.url or item.b64_json]
    assert len(images) == delivered
    assert result.model == _body(fields)["model"]
    if "tools" in fields:
        assert result.usage.tool_usage.web_search == 1


@pytest.mark.parametrize(("fault", "fields", "delivered"), ANSWERS)
def test_ark_sdk_parses_streams(
    jimeng_emulator: JiMengEmulator, fault: Fault | None, fields: dict[str, object], delivered: int
) -> None:
    client = _ark(jimeng_emulator)
    if fault:
        jimeng_emulator.inject(fault)
    events = list(client.images.generate(**_ark_kwargs(_body(fields)), stream=True))
    assert [event.type for event in events] == ["image_generation.partial_succeeded"] * delivered + [
        "image_generation.completed"
    ]
    assert all(event.url or event.b64_json for event in events[:-1])


@pytest.mark.parametrize(("fault", "fields", "delivered"), ANSWERS_WITH_ITEM_ERRORS)
@pytest.mark.parametrize("sdk", ["ark", "openai"])
def test_sdks_raise_on_stream_events_carrying_an_error(
    jimeng_emulator: JiMengEmulator,
    wait_for: Callable[..., bool],
    sdk: str,
    fault: Fault | None,
    fields: dict[str, object],
    delivered: int,
) -> None:
    # Both SDKs' Stream raise on any event whose "error" is truthy: partial_failed, and an empty
    # {"code": "", "message": ""} beside a delivered image too. Documented events: the SDKs' limit.
    if fault:
        jimeng_emulator.inject(fault)
    if sdk == "ark":
        errors = pytest.importorskip("volcenginesdkarkruntime._exceptions")
        with pytest.raises(errors.ArkAPIError):
            list(_ark(jimeng_emulator).images.generate(**_ark_kwargs(_body(fields)), stream=True))
    else:
        openai = pytest.importorskip("openai")
        with pytest.raises(openai.APIError):
            list(_openai(jimeng_emulator).images.generate(**_openai_kwargs({**_body(fields), "stream": True})))
    # Billed all the same, once the emulator finishes the set the client walked away from.
    assert wait_for(lambda: jimeng_emulator.billed_images == delivered)


def test_ark_sdk_reads_its_request_id_from_the_echoed_header(jimeng_emulator: JiMengEmulator) -> None:
    result = _ark(jimeng_emulator).images.generate(**_body({}))
    sent = jimeng_emulator.requests[-1]["client_request_id"]
    assert sent
    assert result._request_id == sent


@pytest.mark.parametrize(("fault", "fields", "delivered"), ANSWERS + ANSWERS_WITH_ITEM_ERRORS)
def test_openai_client_parses_json_answers(
    jimeng_emulator: JiMengEmulator, fault: Fault | None, fields: dict[str, object], delivered: int
) -> None:
    client = _openai(jimeng_emulator)
    if fault:
        jimeng_emulator.inject(fault)
    result = client.images.generate(**_openai_kwargs(_body(fields)))
    assert result.data is not None
    assert len([item for item in result.data if item.url or item.b64_json]) == delivered


@pytest.mark.parametrize(("fault", "fields", "delivered"), ANSWERS)
def test_openai_client_parses_streams(
    jimeng_emulator: JiMengEmulator, fault: Fault | None, fields: dict[str, object], delivered: int
) -> None:
    client = _openai(jimeng_emulator)
    if fault:
        jimeng_emulator.inject(fault)
    events = list(client.images.generate(**_openai_kwargs({**_body(fields), "stream": True})))
    types = [event.type for event in events]
    assert types.count("image_generation.partial_succeeded") == delivered
    assert types[-1] == "image_generation.completed"


def test_set_size_parsing() -> None:
    assert set_size("make 6 pictures", 15) == 6
    assert set_size("a Set Of 2 mugs", 15) == 2
    assert set_size("三张海报", 15) == 3
    assert set_size("12 images", 4) == 4
    assert set_size("FAIL_IMAGE_1 storyboard", 15) == 3


def test_rendering_without_pillow_explains_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(RuntimeError, match=r"airflow-provider-jimeng\[emulator\]"):
        render_jpeg(ImageKey("x", -1, 0, 64, 64, True))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}


def test_cli_serves_until_terminated() -> None:
    # Without Pillow the command refuses to start instead (test_emulator_without_pillow.py).
    code = (
        "import runpy, sys; "
        "sys.argv = ['emulator', '--port', '0', '--api-key', 'k']; "
        "runpy.run_module('airflow_provider_jimeng.emulator', run_name='__main__')"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env()
    )
    try:
        assert process.stdout is not None
        # Airflow may log its own lines to stdout first.
        lines = iter(process.stdout.readline, "")
        first = next((line for line in lines if line.startswith("JiMeng emulator listening on ")), "")
        assert first.startswith("JiMeng emulator listening on http://127.0.0.1:"), first
        root = first.split()[-1]
        assert requests.get(f"{root}/healthz", timeout=5).json() == {"status": "ok"}
        models = requests.get(f"{root}/api/v3/models", headers={"Authorization": "Bearer k"}, timeout=5)
        assert models.status_code == 200
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
