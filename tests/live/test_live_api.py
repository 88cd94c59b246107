"""Against the real JiMeng API: runs only when ``JIMENG_API_KEY`` is set, and costs one 1K image.

    JIMENG_API_KEY=... [JIMENG_LIVE_BASE_URL=https://ark.ap-southeast.bytepluses.com/api/v3] \\
        .venv/bin/python -m pytest tests/live -m live

The base URL defaults to the China endpoint. ``tests/conftest.py`` removes ``JIMENG_BASE_URL`` from the
environment so offline runs never reach out, hence ``JIMENG_LIVE_BASE_URL`` (``JIMENG_BASE_URL`` is
still honoured if it survives). ``JIMENG_MODEL`` overrides the model (e.g. an endpoint id ``ep-...``).
"""

from __future__ import annotations

import json
import os

import pytest

from airflow_provider_jimeng.hooks.connection_form import CHINA_BASE_URL
from airflow_provider_jimeng.hooks.jimeng import JiMengHook

API_KEY = os.environ.get("JIMENG_API_KEY", "")

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not API_KEY, reason="set JIMENG_API_KEY to run tests against the real JiMeng API"),
]


@pytest.fixture
def live_hook(monkeypatch: pytest.MonkeyPatch) -> JiMengHook:
    base_url = os.environ.get("JIMENG_LIVE_BASE_URL") or os.environ.get("JIMENG_BASE_URL") or CHINA_BASE_URL
    extra = {"timeout": 300, "max_retries": 2}
    if model := os.environ.get("JIMENG_MODEL"):
        extra["model"] = model
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIMENG_LIVE",
        json.dumps({"conn_type": "jimeng", "host": base_url, "password": API_KEY, "extra": extra}),
    )
    return JiMengHook("jimeng_live")


def test_live_connection_test_passes(live_hook: JiMengHook) -> None:
    ok, message = live_hook.test_connection()
    assert ok, message
    assert API_KEY not in message


def test_live_1k_generation_returns_one_downloadable_jpeg(live_hook: JiMengHook) -> None:
    result = live_hook.generate_images("a watercolour lighthouse on a cliff at dawn", size="1K", watermark=True)
    assert result.request_id
    [image] = result.images
    assert image.ok, image
    assert image.dimensions is not None
    width, height = image.dimensions
    assert 900_000 <= width * height <= 1_200_000
    assert result.usage.generated_images in (1, None)  # gateways may leave usage out
    assert image.url is not None
    with live_hook.open_image(image.url) as download:
        head = download.read(2)
        while download.read(1 << 16):
            pass
    assert head == b"\xff\xd8"  # JPEG
    assert download.bytes_read > 10_000
    assert API_KEY not in repr(result)
