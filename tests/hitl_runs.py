"""``dag.test()`` runs with human-in-the-loop tasks: wait for what it waits for, answer from another thread.

Airflow 3.3's ``dag.test()`` keeps a run alive while HITL tasks are parked in ``awaiting_input`` and
logs "Waiting for Human-in-the-loop input for tasks: [...]" once a second while nothing else can run.
:class:`WaitingTasks` turns that line into an event; the test's reviewer thread answers (through the
REST API, or as the REST API does), and ``dag.test()`` stays on the main thread (the task runner
installs signal handlers there).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from unittest import mock

WAIT_SECONDS = 90


def dag_test_awaits_input() -> bool:
    """Whether ``dag.test()`` parks HITL tasks and waits for answers from outside (Airflow 3.3+).

    Before 3.3 a HITL task defers to ``HITLTrigger``, which ``dag.test()`` runs in line, and whose
    request for the answer its in-process supervisor does not handle (3.1.8: "Unhandled request
    GetHITLDetailResponse"): the task fails. A deployment's triggerer runs it; ``dag.test()`` cannot.
    """
    from airflow.utils.state import TaskInstanceState

    return hasattr(TaskInstanceState, "AWAITING_INPUT")


#: For tests that answer reviews while ``dag.test()`` runs.
AWAITS_INPUT_REASON = "dag.test() runs a HITL task from Airflow 3.3 (before, its in-line HITLTrigger is unhandled)"
DAG_LOGGER = "airflow.sdk.definitions.dag"
#: How long ``dag.test()`` pauses between its looks at the run (Airflow's 1 s, shortened: answers are events).
POLL_SECONDS = 0.05
DAG_TEST_FILE = "/sdk/definitions/dag.py"


_real_sleep = time.sleep


def _fast_poll_sleep(seconds: float) -> None:
    """``time.sleep`` that shortens ``dag.test()``'s own one-second pauses only (not the emulator's, not boto's)."""
    caller = sys._getframe(1).f_code
    if caller.co_name == "test" and caller.co_filename.endswith(DAG_TEST_FILE):
        seconds = min(seconds, POLL_SECONDS)
    _real_sleep(seconds)


class WaitingTasks(logging.Handler):
    """What ``dag.test()`` says it waits for: the HITL tasks parked when nothing else can run."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.changed = threading.Condition()
        self.tasks: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "Waiting for Human-in-the-loop input" in str(record.msg):
            with self.changed:
                self.tasks = set(record.args[0] if isinstance(record.args, tuple) else [])
                self.changed.notify_all()

    def wait_for(self, tasks: set[str]) -> None:
        """Wait until exactly ``tasks`` are parked."""
        with self.changed:
            reached = self.changed.wait_for(lambda: self.tasks == tasks, WAIT_SECONDS)
        assert reached, f"waiting for {sorted(tasks)}, dag.test() waits for {sorted(self.tasks)}"


@contextmanager
def waiting_tasks() -> Iterator[WaitingTasks]:
    handler = WaitingTasks()
    logger = logging.getLogger(DAG_LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_with_reviewer(dag: Any, reviewer: Callable[[WaitingTasks], None], **kwargs: Any) -> Any:
    """``dag.test(**kwargs)`` on this thread while ``reviewer`` answers on another; its failure is raised."""
    from tests.dag_runs import run_dag_test

    failure: list[BaseException] = []
    done = threading.Event()

    def review(waiting: WaitingTasks) -> None:
        try:
            reviewer(waiting)
        except BaseException as error:
            failure.append(error)
            fail_unfinished(dag.dag_id)  # so that dag.test() ends instead of waiting on
        finally:
            done.set()

    with waiting_tasks() as waiting:
        thread = threading.Thread(target=review, args=(waiting,), name="reviewer", daemon=True)
        thread.start()
        with mock.patch("time.sleep", _fast_poll_sleep):
            dag_run = run_dag_test(dag, **kwargs)
        done.wait(WAIT_SECONDS)
    if failure:
        raise failure[0]
    assert done.is_set(), "the reviewer did not finish"
    return dag_run


def latest_run_id(dag_id: str) -> str:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run_id = session.scalars(
            select(DagRun.run_id).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc())
        ).first()
    assert run_id is not None
    return str(run_id)


def fail_unfinished(dag_id: str) -> None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import State
    from sqlalchemy import update

    with create_session() as session:
        session.execute(
            update(TaskInstance)
            .where(TaskInstance.dag_id == dag_id, TaskInstance.state.not_in(list(State.finished)))
            .values(state=State.FAILED)
        )


def answer_as_the_api_does(dag_id: str, run_id: str, task_id: str, choose: Callable[[list[str]], list[str]]) -> None:
    """Record a reviewer's answer and resume the task, as ``PATCH .../hitlDetails`` does (no API app needed)."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import handle_event_submit
    from airflow.triggers.base import TriggerEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id
            )
        ).one()
        detail = session.scalars(select(HITLDetail).where(HITLDetail.ti_id == ti.id)).one()
        detail.chosen_options = choose(list(detail.options))
        detail.params_input = {}
        detail.responded_by = {"id": "editor", "name": "editor"}
        detail.responded_at = datetime.now(timezone.utc)
        handle_event_submit(TriggerEvent(detail.as_resume_event_payload()), task_instance=ti, session=session)
