"""Helpers for the emulator tests: an authenticated session and a tiny polling helper."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, JiMengEmulator
from airflow_provider_jimeng.emulator.pytest_plugin import (  # noqa: F401
    jimeng_emulator,
    make_jimeng_emulator,
)

MODEL = "doubao-seedream-4-0-250828"


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {DEFAULT_API_KEY}"
        yield http


@pytest.fixture
def generate(
    jimeng_emulator: JiMengEmulator,  # noqa: F811 - the fixture imported above
    session: requests.Session,
) -> Callable[..., requests.Response]:
    """POST a generation request to the default emulator: ``generate(prompt="...", size="1K")``."""

    def post(path: str = "/api/v3", timeout: float = 10, **fields: Any) -> requests.Response:
        body = {"model": MODEL, "prompt": "a red fox in the snow", "size": "1K", **fields}
        return session.post(f"{jimeng_emulator.root_url}{path}/images/generations", json=body, timeout=timeout)

    return post


def _wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def wait_for() -> Callable[..., bool]:
    """Poll a condition: server-side bookkeeping may finish just after the client saw the answer."""
    return _wait_for
