"""Pytest fixtures for the emulator; load with ``pytest_plugins = [...]`` or import the fixtures.

Not registered as a ``pytest11`` entry point on purpose: installing the provider must not add
fixtures to unrelated test suites.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airflow_provider_jimeng.emulator.server import JiMengEmulator


@pytest.fixture
def jimeng_emulator() -> Iterator[JiMengEmulator]:
    """A started emulator with default settings, stopped after the test."""
    with JiMengEmulator() as emulator:
        yield emulator


@pytest.fixture
def make_jimeng_emulator() -> Iterator[Callable[..., JiMengEmulator]]:
    """A factory for started emulators with custom settings (``JiMengEmulator`` keyword arguments)."""
    started: list[JiMengEmulator] = []

    def make(**kwargs: Any) -> JiMengEmulator:
        emulator = JiMengEmulator(**kwargs).start()
        started.append(emulator)
        return emulator

    yield make
    for emulator in started:
        emulator.stop()
