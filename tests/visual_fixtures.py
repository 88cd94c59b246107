"""Fixtures for the Visual API client and trigger tests: an emulator on a hand-moved clock, a distinctive
key pair (so that leak checks can search for the secret), and ``jimeng`` connections with ``api: visual``.

Import the fixtures into a test module (``from tests.visual_fixtures import clock, ...``).
"""

# ruff: noqa: F811  (fixtures imported from tests.visual_fixtures are parameters here)

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import SUBMIT_FAULT_PATH, JiMengEmulator
from airflow_provider_jimeng.emulator.pytest_plugin import make_jimeng_emulator  # noqa: F401  (a fixture)
from airflow_provider_jimeng.hooks.visual import VisualClient

ACCESS_KEY_ID = "AKLTvisualtestaccesskey"
SECRET = "visual-test-secret-7f3a9c1e5b2d4f60"
CONN_ID = "jimeng_visual"
#: Retry settings that keep retry tests fast while still exercising real waits.
FAST = {"retry_backoff": 0.01, "retry_max_wait": 0.05}
SMALL = {"width": 1024, "height": 1024}


class Clock:
    """The emulator's clock, moved by hand (no sleeps)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def visual_connection_json(
    root_url: str, *, access_key_id: str = ACCESS_KEY_ID, secret: str = SECRET, **extra: Any
) -> str:
    return json.dumps(
        {
            "conn_type": "jimeng",
            "host": root_url,
            "login": access_key_id,
            "password": secret,
            "extra": {"api": "visual", "allow_http": True, **FAST, **extra},
        }
    )


def submits(emulator: JiMengEmulator) -> int:
    """Submit requests the emulator received (whatever became of them)."""
    return sum(1 for record in emulator.requests if record["path"] == SUBMIT_FAULT_PATH)


@pytest.fixture(autouse=True)
def no_resume_hold_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autouse where imported (a conftest, a DAG-running module): in-process runs have no worker supervisor
    to wait out (``triggers/visual.py``, ``resume_hold_off``), so a deferred Visual API task's trigger fires
    at once. ``make e2e`` runs the real hold-off."""
    monkeypatch.setattr("airflow_provider_jimeng.operators.jimeng.resume_hold_off", lambda: 0.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_visual_emulator(
    make_jimeng_emulator: Callable[..., JiMengEmulator], clock: Clock
) -> Callable[..., JiMengEmulator]:
    """``make_visual_emulator(**knobs)``: an emulator on the test's clock, knowing the test's key pair."""

    def make(**knobs: Any) -> JiMengEmulator:
        return make_jimeng_emulator(clock=clock, access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET, **knobs)

    return make


@pytest.fixture
def emulator(make_visual_emulator: Callable[..., JiMengEmulator]) -> JiMengEmulator:
    return make_visual_emulator()


@pytest.fixture
def connect_visual(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``connect_visual(emulator, conn_id=CONN_ID, **fields_or_extras)``: a ``jimeng`` connection (Visual API)."""

    def connect(emulator: JiMengEmulator, *, conn_id: str = CONN_ID, **kwargs: Any) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", visual_connection_json(emulator.root_url, **kwargs))

    return connect


@pytest.fixture
def make_client() -> Iterator[Callable[..., VisualClient]]:
    """``make_client(conn_id=CONN_ID)``: a client on that connection, closed after the test."""
    clients: list[VisualClient] = []

    def make(conn_id: str = CONN_ID, **overrides: Any) -> VisualClient:
        client = VisualClient.from_conn_id(conn_id, **overrides)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(
    emulator: JiMengEmulator, connect_visual: Callable[..., None], make_client: Callable[..., VisualClient]
) -> VisualClient:
    """A client on the test's emulator, with fast retries."""
    connect_visual(emulator)
    return make_client()
