"""Airflow's own API first: the gallery's reads wait while an Airflow request is served (:mod:`.priority`)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from airflow_provider_jimeng.plugins import priority
from airflow_provider_jimeng.plugins.gallery import JiMengGalleryPlugin
from airflow_provider_jimeng.plugins.priority import AirflowFirst, AirflowRequestsInFlight
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS
from tests.gallery.conftest import Gallery

pytestmark = pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="the gallery needs Airflow 3.1 or later")

#: Long enough never to run out on a busy machine: these tests end the wait themselves.
LONG_S = 60.0


def waiting(target: Any) -> tuple[threading.Thread, threading.Event]:
    """Run ``target`` on a thread; returns it and an event set once it returned."""
    done = threading.Event()

    def run() -> None:
        target()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_a_read_waits_for_airflow_s_request_to_end_and_no_longer() -> None:
    requests = AirflowRequestsInFlight()
    requests.wait_quiet(LONG_S)  # nothing in flight: returns at once
    token = requests.begin()
    thread, done = waiting(lambda: requests.wait_quiet(LONG_S))
    assert not done.wait(0.2), "a gallery read waits while Airflow's request is served"
    requests.end(token)
    assert done.wait(LONG_S), "and goes on as soon as it ends"
    thread.join()
    assert requests.outwaited == 0


def test_a_wait_is_bounded_and_a_long_request_does_not_count() -> None:
    requests = AirflowRequestsInFlight()
    requests.begin()  # never ends: the gallery still goes on
    requests.wait_quiet(0.05)
    assert requests.outwaited == 1

    stream = AirflowRequestsInFlight()
    token = stream.begin()
    stream._started[token] -= priority.LONG_REQUEST_S + 1  # a log stream, served for a while
    assert stream.busy_for() == 0
    stream.wait_quiet(LONG_S)
    assert stream.outwaited == 0

    off = AirflowRequestsInFlight()
    off.enabled = False  # [jimeng] gallery_tiles_at_once = 0
    off.begin()
    off.wait_quiet(LONG_S)
    asyncio.run(off.await_quiet(LONG_S))
    assert off.outwaited == 0


def test_a_coroutine_awaits_without_blocking_the_event_loop() -> None:
    requests = AirflowRequestsInFlight()
    token = requests.begin()

    async def main() -> list[str]:
        order: list[str] = []

        async def tile() -> None:
            await requests.await_quiet(LONG_S)
            order.append("tile")

        async def airflow_request() -> None:
            await asyncio.sleep(0)  # the tile is waiting by now
            order.append("airflow")
            requests.end(token)

        await asyncio.gather(tile(), airflow_request())
        return order

    assert asyncio.run(main()) == ["airflow", "tile"]
    assert requests.outwaited == 0


def test_the_middleware_counts_airflow_s_requests_not_the_gallery_s() -> None:
    requests = AirflowRequestsInFlight()
    seen: dict[str, float] = {}

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen[scope["path"]] = requests.busy_for()
        if scope["path"] == "/api/v2/broken":
            raise RuntimeError("a failing route")

    middleware = AirflowFirst(inner, requests=requests)

    async def call(path: str, kind: str = "http") -> None:
        await middleware({"type": kind, "path": path}, None, None)

    asyncio.run(call("/api/v2/dags"))
    asyncio.run(call("/jimeng/sheet"))
    asyncio.run(call("/jimeng/thumbnail"))
    asyncio.run(call("/lifespan", kind="lifespan"))
    with pytest.raises(RuntimeError):
        asyncio.run(call("/api/v2/broken"))
    assert seen["/api/v2/dags"] > 0, "Airflow's request counts while it is served"
    assert seen["/jimeng/sheet"] == seen["/jimeng/thumbnail"] == 0, "the gallery's own do not"
    assert seen["/api/v2/broken"] > 0
    assert seen["/lifespan"] == 0, "only HTTP requests count"
    assert requests.busy_for() == 0, "every request is uncounted when it ends, a failed one too"


def test_the_plugin_puts_airflow_s_requests_first_in_the_api_server(gallery: Gallery) -> None:
    assert [entry["middleware"] for entry in JiMengGalleryPlugin.fastapi_root_middlewares] == [AirflowFirst]
    assert any(middleware.cls is AirflowFirst for middleware in gallery.client.app.user_middleware)
