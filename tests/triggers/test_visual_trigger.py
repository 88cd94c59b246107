"""The Visual API trigger (``triggers/visual.py``) driven with asyncio against the emulator: one event when
every task is finished or past its deadline, backoff on rate limits, a restart, and no secret anywhere."""

# ruff: noqa: F811  (fixtures imported from tests.visual_fixtures are parameters here)

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from airflow.triggers.base import TriggerEvent

from airflow_provider_jimeng.emulator import POLL_FAULT_PATH, SUBMIT_FAULT_PATH, Fault, JiMengEmulator
from airflow_provider_jimeng.hooks.visual import TASK_TTL_SECONDS, VisualClient
from airflow_provider_jimeng.triggers.visual import DEADLINE, JiMengVisualTrigger, resume_hold_off, task_deadline
from tests.visual_fixtures import (  # noqa: F401  (fixtures)
    CONN_ID,
    SECRET,
    SMALL,
    Clock,
    client,
    clock,
    connect_visual,
    emulator,
    make_client,
    make_jimeng_emulator,
    make_visual_emulator,
    submits,
)

ONE = {"prompt": "a red fox in the snow", "force_single": True, **SMALL}
FAST = {"poll_interval": 0.01, "max_poll_interval": 0.05}


def far() -> float:
    return time.time() + 600


def first_event(trigger: JiMengVisualTrigger, timeout: float = 20.0) -> TriggerEvent:
    async def run() -> TriggerEvent:
        async for event in trigger.run():
            return event
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(run(), timeout))


def trigger_for(task_ids: list[str], deadlines: Any = None, **kwargs: Any) -> JiMengVisualTrigger:
    return JiMengVisualTrigger(
        task_ids=task_ids,
        deadlines=far() if deadlines is None else deadlines,
        jimeng_conn_id=CONN_ID,
        **{**FAST, **kwargs},
    )


def test_the_trigger_fires_once_every_task_is_done(client: VisualClient, emulator: JiMengEmulator) -> None:
    task_ids = [client.submit(ONE), client.submit({"prompt": "a set of 3 kites", **SMALL})]
    event = first_event(trigger_for(task_ids, req_json={"logo_info": {"add_logo": False, "position": 2}}))
    payload = event.payload
    assert payload["status"] == "success"
    assert list(payload["tasks"]) == task_ids
    assert [payload["tasks"][task_id]["status"] for task_id in task_ids] == ["done", "done"]
    assert [payload["tasks"][task_id]["images"] for task_id in task_ids] == [1, 3]
    # States only: no image data and no URL in the event (it is stored in the metadata database).
    assert "http" not in json.dumps(payload)
    assert submits(emulator) == 2
    assert emulator.billed_images == 4
    # Every poll carried the run's logo choice, asking for URLs it never fetches (no image data held).
    choices = [
        json.loads(record["body"]["req_json"]) for record in emulator.requests if record["path"] == POLL_FAULT_PATH
    ]
    assert choices
    assert all(choice == {"logo_info": {"add_logo": False, "position": 2}, "return_url": True} for choice in choices)
    assert emulator.downloads == 0


def test_every_way_a_task_ends_is_in_the_one_event(
    make_visual_emulator: Callable[..., JiMengEmulator],
    connect_visual: Callable[..., None],
    make_client: Callable[..., VisualClient],
    clock: Clock,
) -> None:
    emulator = make_visual_emulator(latency=3600.0)
    connect_visual(emulator)
    client = make_client()
    expired = client.submit(ONE)
    clock.advance(TASK_TTL_SECONDS + 1)
    done = client.submit(ONE)
    emulator.inject(Fault("visual_error", code="50512", path=SUBMIT_FAULT_PATH))
    refused = client.submit(ONE)
    clock.advance(3601)
    never = client.submit(ONE)  # generating for an hour on a clock that no longer moves
    deadlines = {expired: far(), done: far(), refused: far(), "no-such-task": far(), never: time.time() + 0.3}
    started = time.monotonic()
    event = first_event(trigger_for(list(deadlines), deadlines))
    assert time.monotonic() - started < 5
    tasks = event.payload["tasks"]
    assert event.payload["status"] == "success"
    assert {task_id: tasks[task_id]["status"] for task_id in deadlines} == {
        expired: "expired",
        done: "done",
        refused: "failed",
        "no-such-task": "not_found",
        never: DEADLINE,
    }
    assert tasks[refused]["error_code"] == "50512"
    assert tasks[refused]["retryable"] is False


def test_a_burst_of_rate_limits_on_polls_is_absorbed_with_backoff(
    client: VisualClient, emulator: JiMengEmulator
) -> None:
    task_id = client.submit(ONE)
    emulator.inject(Fault("visual_error", code="50429", path=POLL_FAULT_PATH, times=3))
    trigger = trigger_for([task_id], poll_interval=0.02, max_poll_interval=0.1)
    started = time.monotonic()
    event = first_event(trigger)
    elapsed = time.monotonic() - started
    assert event.payload["status"] == "success"
    assert event.payload["tasks"][task_id]["status"] == "done"
    assert event.payload["polls"] == 4
    assert emulator.pending_faults == 0
    # Three backoff waits of at least half their ceiling (0.02, 0.04, 0.08 with equal jitter).
    assert elapsed >= (0.02 + 0.04 + 0.08) / 2


def test_a_rate_limit_stops_the_round_instead_of_hammering(client: VisualClient, emulator: JiMengEmulator) -> None:
    task_ids = [client.submit(ONE) for _ in range(4)]
    emulator.inject(Fault("visual_error", code="50430", path=POLL_FAULT_PATH))
    event = first_event(trigger_for(task_ids, concurrency=1))
    assert all(outcome["status"] == "done" for outcome in event.payload["tasks"].values())
    assert event.payload["polls"] == 5  # the limited poll, then the four: none skipped, none doubled


def test_transient_poll_failures_are_polled_again(client: VisualClient, emulator: JiMengEmulator) -> None:
    task_id = client.submit(ONE)
    emulator.inject(
        Fault("visual_error", code="50500", path=POLL_FAULT_PATH),
        Fault("malformed", path=POLL_FAULT_PATH),
        Fault("reset", path=POLL_FAULT_PATH),
    )
    event = first_event(trigger_for([task_id]))
    assert event.payload["tasks"][task_id]["status"] == "done"
    assert event.payload["polls"] == 4


def test_a_rejected_key_pair_fires_an_error_event_with_the_tasks_still_pending(
    emulator: JiMengEmulator,
    connect_visual: Callable[..., None],
    make_client: Callable[..., VisualClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    connect_visual(emulator)
    task_id = make_client().submit(ONE)
    wrong = "not-the-secret-5e6f7a8b"
    connect_visual(emulator, secret=wrong)
    caplog.set_level(logging.DEBUG)
    event = first_event(trigger_for([task_id]))
    payload = event.payload
    assert payload["status"] == "error"
    assert "SignatureDoesNotMatch" in payload["message"]
    assert payload["tasks"][task_id]["status"] == "pending"
    assert wrong not in json.dumps(payload)
    assert wrong not in caplog.text


def test_a_connection_that_cannot_work_fires_an_error_event(
    emulator: JiMengEmulator, connect_visual: Callable[..., None]
) -> None:
    connect_visual(emulator, secret="")
    event = first_event(trigger_for(["some-task"]))
    assert event.payload["status"] == "error"
    assert "password" in event.payload["message"]


def test_a_restarted_triggerer_polls_the_same_ids_and_never_submits(
    make_visual_emulator: Callable[..., JiMengEmulator],
    connect_visual: Callable[..., None],
    make_client: Callable[..., VisualClient],
    clock: Clock,
) -> None:
    emulator = make_visual_emulator(latency=10.0)
    connect_visual(emulator)
    client = make_client()
    task_ids = [client.submit(ONE), client.submit(ONE)]
    trigger = trigger_for(task_ids)

    async def run_until_cancelled() -> None:
        runner = asyncio.ensure_future(first_event_async(trigger))
        while trigger.polls < 4:  # two rounds seen the tasks generating
            await asyncio.sleep(0.005)
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner

    asyncio.run(run_until_cancelled())
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    restarted = getattr(importlib.import_module(module), name)(**kwargs)
    clock.advance(10)
    event = first_event(restarted)
    assert [outcome["status"] for outcome in event.payload["tasks"].values()] == ["done", "done"]
    assert submits(emulator) == 2
    assert emulator.billed_images == 2


async def first_event_async(trigger: JiMengVisualTrigger) -> TriggerEvent:
    async for event in trigger.run():
        return event
    raise AssertionError("the trigger ended without an event")


def test_serialize_round_trips_and_holds_no_secret(client: VisualClient) -> None:
    trigger = JiMengVisualTrigger(
        task_ids=["a", "b"],
        deadlines={"a": 100.0, "b": 200.0},
        jimeng_conn_id=CONN_ID,
        req_json={"logo_info": {"add_logo": False}},
        poll_interval=3,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_jimeng.triggers.visual.JiMengVisualTrigger"
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**json.loads(json.dumps(kwargs)))
    assert rebuilt.serialize() == (classpath, kwargs)
    assert set(kwargs) == {
        "task_ids",
        "deadlines",
        "jimeng_conn_id",
        "req_json",
        "poll_interval",
        "max_poll_interval",
        "concurrency",
        "poll_anchor",
        "fire_after",
    }
    assert SECRET not in json.dumps(kwargs)
    assert SECRET not in repr(trigger)
    # As the scheduler stores it (the trigger row's encrypted kwargs) and the triggerer reads it back.
    from airflow.models.trigger import Trigger

    stored = Trigger.from_object(trigger)
    assert JiMengVisualTrigger(**stored.kwargs).serialize() == (classpath, kwargs)


def test_the_trigger_runs_with_a_logged_run_and_no_secret_in_its_logs(
    client: VisualClient, emulator: JiMengEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    task_id = client.submit(ONE)
    emulator.inject(Fault("visual_error", code="50429", path=POLL_FAULT_PATH))
    event = first_event(trigger_for([task_id]))
    assert event.payload["status"] == "success"
    assert "rate-limited" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"task_ids": []}, "task_ids"),
        ({"task_ids": ["a", "a"]}, "task_ids"),
        ({"task_ids": ["a", "b"], "deadlines": {"a": 1.0}}, "deadlines"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"concurrency": 0}, "concurrency"),
    ],
)
def test_bad_trigger_arguments_are_refused_at_defer_time(kwargs: dict[str, Any], word: str) -> None:
    arguments: dict[str, Any] = {"task_ids": ["a"], "deadlines": 1.0, **kwargs}
    with pytest.raises(ValueError, match=word):
        JiMengVisualTrigger(**arguments)


@pytest.mark.parametrize(
    ("now", "wait"),
    [(102.3, 2.7), (105.0, 5.0), (117.9, 2.1), (99.0, 1.0), (80.0, 5.0)],
    ids=["late-pick-up", "on-a-tick", "an-overrun-round", "clock-skew", "far-skew-capped"],
)
def test_rounds_fall_on_the_anchors_ticks(now: float, wait: float) -> None:
    trigger = JiMengVisualTrigger(task_ids=["a"], deadlines=1e12, poll_interval=5, poll_anchor=100.0)
    assert trigger._until_next_round(100.0, now) == pytest.approx(wait)


def test_a_trigger_picked_up_late_polls_on_the_submits_clock_not_its_own(
    make_visual_emulator: Callable[..., JiMengEmulator],
    connect_visual: Callable[..., None],
    make_client: Callable[..., VisualClient],
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Submitted 2.3 s before the triggerer picked the trigger up: the second round comes 2.7 s later, on the
    5 s tick a worker polling since the submit would use, not 5 s after the pick-up."""
    emulator = make_visual_emulator(latency=10.0)
    connect_visual(emulator)
    task_id = make_client().submit(ONE)
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(10.0)  # the task is done by the next round
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    trigger = trigger_for([task_id], poll_interval=5, poll_anchor=time.time() - 2.3)
    event = first_event(trigger)
    assert event.payload["tasks"][task_id]["status"] == "done"
    assert trigger.polls == 2
    assert waits[0] == pytest.approx(2.7, abs=0.3)


def test_the_event_is_held_until_fire_after(
    client: VisualClient, emulator: JiMengEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run done at once still fires only after the deferring worker has surely let go (resume_hold_off)."""
    task_id = client.submit(ONE)
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    event = first_event(trigger_for([task_id], fire_after=time.time() + 6.0))
    assert event.payload["tasks"][task_id]["status"] == "done"
    assert waits == [pytest.approx(6.0, abs=0.5)]  # the hold, and no poll round in between


def test_the_hold_off_covers_the_workers_exit_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "3")
    assert resume_hold_off() == 4.0


def test_a_tasks_deadline_is_its_expiry() -> None:
    assert task_deadline(1000.0) == 1000.0 + 12 * 3600
