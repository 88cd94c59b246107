"""Test-harness shims for Airflow 3.0 and 3.1, where ``dag.test()`` differs from a real task run.

Production code bridges Airflow versions in ``airflow_provider_jimeng/version_compat.py`` only.
What is here changes no provider behaviour: it makes the older releases' in-process ``dag.test()``
(the test harness) behave like their real task runner does, so one suite proves the provider on
every supported release. ``tests/conftest.py`` installs these once, before any test runs.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from airflow_provider_jimeng.testing import activate_dag_assets
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS


def install_dag_test_shims() -> None:
    """Apply what the running Airflow release needs; nothing on releases whose ``dag.test()`` is faithful."""
    _callbacks_see_the_exception()  # 3.0 and 3.1; where Airflow already sets the key, this sets it again
    if AIRFLOW_V_3_1_PLUS:
        return
    _tracebacks_keep_messages_on_one_line()
    _task_logs_printed_once()
    _no_debug_chatter()
    _dag_test_registers_assets()


def _callbacks_see_the_exception() -> None:
    """Airflow 3.0's and 3.1's real task runner puts the error into the callback context
    (``task_runner.main``); their in-process ``dag.test()`` path calls ``finalize`` without it, so
    ``on_retry_callback`` and ``on_failure_callback`` saw ``context["exception"] is None`` only there.
    """
    from airflow.sdk.execution_time import task_runner

    original = task_runner.finalize

    @functools.wraps(original)
    def finalize(ti: Any, state: Any, context: Any, log: Any, error: BaseException | None = None) -> Any:
        if error is not None:
            context["exception"] = error
        return original(ti, state, context, log, error)

    task_runner.finalize = finalize  # type: ignore[assignment]


def _tracebacks_keep_messages_on_one_line() -> None:
    """Airflow 3.0 renders a failed task's exception with rich at the terminal width, 80 columns under
    pytest, which wraps the message mid-sentence; tests look for whole messages in the task log.
    """
    from structlog.dev import RichTracebackFormatter

    original = RichTracebackFormatter.__call__

    @functools.wraps(original)
    def render(self: RichTracebackFormatter, sio: Any, exc_info: Any) -> None:
        if self.width is None:  # the formatter may be built before this runs: patch the call, not __init__
            self.width = 400
        original(self, sio, exc_info)

    RichTracebackFormatter.__call__ = render  # type: ignore[method-assign]


class _AlreadyPrinted(logging.StreamHandler):  # type: ignore[type-arg]
    """Stands in for ``dag.test()``'s extra stdout handler, which only checks that one is present."""

    def emit(self, record: logging.LogRecord) -> None:
        pass


def _task_logs_printed_once() -> None:
    """Airflow 3.0's ``dag.test()`` adds a stdout handler to ``airflow.task`` although the root console
    handler prints the same records: every task log line appeared twice, and tests count lines.
    """
    logging.getLogger("airflow.task").addHandler(_AlreadyPrinted())


def _no_debug_chatter() -> None:
    """Airflow 3.0's ``dag.test()`` leaves structlog unconfigured, so the in-process supervisor prints
    every message it passes at DEBUG, including the secrets it is asked to mask and the rendered
    fields, which a real task run (log level INFO) never prints. Filter below INFO, as a run does.
    """
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))


def _dag_test_registers_assets() -> None:
    """Airflow 3.0's ``dag.test()`` never registers the DAG's assets (the DAG processor does that for a
    real run), so a task with an asset outlet failed as "inactive" (apache/airflow#51644). Register and
    activate them first, as later releases' ``dag.test()`` does by syncing the DAG.
    """
    from airflow.sdk.definitions.dag import DAG

    original = DAG.test

    @functools.wraps(original)
    def test(self: DAG, *args: Any, **kwargs: Any) -> Any:
        activate_dag_assets(self)
        return original(self, *args, **kwargs)

    DAG.test = test  # type: ignore[method-assign]
