"""Fidelity: the official OpenAI client parses the emulator's answers; CLI and Pillow-less import work."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, JiMengEmulator
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
