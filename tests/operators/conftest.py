"""Helpers for the operator and ``@task.jimeng`` tests.

Everything runs for real over loopback: the JiMeng emulator (in this process), moto's S3 server
(a child process) and whole DAG runs with ``dag.test()`` against a throwaway SQLite metadata DB.
The helpers only make results easy to read back: XComs, task states, rendered fields, asset events
and each task's own log lines.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.storage.keys import safe_key_part
from airflow_provider_jimeng.testing import AWS_REGION, jimeng_connection_json
from tests.dag_runs import run_dag_test
from tests.visual_fixtures import no_resume_hold_off  # noqa: F401  (autouse)

if TYPE_CHECKING:
    from airflow.sdk import DAG

    from airflow_provider_jimeng.testing import S3Server

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ------------------------------------------------------------------------------------ the API side
class TrackingEmulator(JiMengEmulator):
    """The emulator, also counting how many generation requests were being worked on at once.

    A generation request spends its ``latency`` in ``_sleep``; counting the threads inside it gives
    the peak number of requests the server was processing simultaneously, without timing anything.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._flight_lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0
        #: When set to an event, answers wait for it (after their latency): a test decides when they leave.
        self.hold: threading.Event | None = None

    def _sleep(self, seconds: float) -> None:
        with self._flight_lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            super()._sleep(seconds)
            if self.hold is not None:
                self.hold.wait(30)
        finally:
            with self._flight_lock:
                self.in_flight -= 1

    def prompts_billed(self) -> list[str]:
        """The prompt of every billed request, in billing order."""
        return [entry.prompt for entry in self.ledger]


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[TrackingEmulator]:
    """A fresh emulator behind ``jimeng_default``, with a unique API key and no hook-level retries.

    ``max_retries=0`` makes an injected server fault fail its request at once (no backoff sleeps),
    so a test decides precisely which prompt of which try fails.
    """
    api_key = f"sk-jimeng-test-{uuid.uuid4().hex}"
    server = TrackingEmulator(api_key=api_key)
    server.start()
    try:
        monkeypatch.setenv(
            "AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(server.base_url, api_key, max_retries=0)
        )
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------------- the S3 side
@dataclass
class Bucket:
    """A bucket on the moto server, with ``aws_default`` pointing at it."""

    name: str
    client: Any
    endpoint_url: str

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return sorted(
            item["Key"]
            for page in paginator.paginate(Bucket=self.name, Prefix=prefix)
            for item in page.get("Contents", [])
        )

    def read(self, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return data

    def json(self, key: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.read(key))
        return data

    def record(self, task_prefix: str, prompt_index: int) -> dict[str, Any]:
        """A prompt's record, from the task's ``records.json``."""
        (record,) = [
            entry
            for entry in self.json(f"{task_prefix}/records.json")["prompts"]
            if entry["prompt_index"] == prompt_index
        ]
        return record

    def head(self, key: str) -> dict[str, Any]:
        return dict(self.client.head_object(Bucket=self.name, Key=key))

    def images(self, prefix: str = "") -> list[str]:
        return [key for key in self.keys(prefix) if key.endswith(".jpeg")]


@pytest.fixture
def bucket(s3_bucket: str, s3_client: Any, s3_server: S3Server) -> Bucket:
    return Bucket(name=s3_bucket, client=s3_client, endpoint_url=s3_server.endpoint_url)


def use_s3_server(server: S3Server, bucket_name: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """Point ``aws_default`` at ``server`` (botocore retries off: an outage fails at once) with a bucket."""
    extra = {
        "endpoint_url": server.endpoint_url,
        "region_name": AWS_REGION,
        "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": 2},
    }
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps({"conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}),
    )
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=AWS_REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket_name)
    return Bucket(name=bucket_name, client=client, endpoint_url=server.endpoint_url)


def task_prefix(run: DagRunResult, task_id: str = "gen", *, prefix: str = "jimeng", map_index: int = -1) -> str:
    """The default key prefix of a task instance, computed independently of the production code."""
    parts = [prefix, safe_key_part(run.dag_id), safe_key_part(run.run_id), safe_key_part(task_id)]
    if map_index >= 0:
        parts.append(f"map_{map_index}")
    return "/".join(parts)


# ------------------------------------------------------------------------------------- DAG runs
@dataclass
class DagRunResult:
    """A finished ``dag.test()`` run, read back from the metadata DB and the captured task logs."""

    dag_id: str
    run_id: str
    state: str
    logical_date: datetime | None
    run_after: datetime
    output: str = field(repr=False)

    def _task_instances(self) -> list[Any]:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            rows = session.scalars(
                select(TaskInstance).where(TaskInstance.dag_id == self.dag_id, TaskInstance.run_id == self.run_id)
            ).all()
            session.expunge_all()
            return list(rows)

    def states(self) -> dict[tuple[str, int], str]:
        return {(ti.task_id, ti.map_index): str(ti.state) for ti in self._task_instances()}

    def task_state(self, task_id: str, map_index: int = -1) -> str:
        return self.states()[(task_id, map_index)]

    def try_number(self, task_id: str, map_index: int = -1) -> int:
        for ti in self._task_instances():
            if ti.task_id == task_id and ti.map_index == map_index:
                return int(ti.try_number)
        raise KeyError((task_id, map_index))

    def xcoms(self) -> list[tuple[str, str, int, Any]]:
        """Every XCom of the run as ``(task_id, key, map_index, value)``."""
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            rows = session.scalars(
                select(XComModel).where(XComModel.dag_id == self.dag_id, XComModel.run_id == self.run_id)
            ).all()
            return [(row.task_id, row.key, row.map_index, XComModel.deserialize_value(row)) for row in rows]

    def xcom(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        for row_task, row_key, row_map, value in self.xcoms():
            if (row_task, row_key, row_map) == (task_id, key, map_index):
                return value
        return None

    def rendered_fields(self, task_id: str, map_index: int = -1) -> dict[str, Any]:
        from airflow.models.renderedtifields import RenderedTaskInstanceFields
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            row = session.scalars(
                select(RenderedTaskInstanceFields).where(
                    RenderedTaskInstanceFields.dag_id == self.dag_id,
                    RenderedTaskInstanceFields.run_id == self.run_id,
                    RenderedTaskInstanceFields.task_id == task_id,
                    RenderedTaskInstanceFields.map_index == map_index,
                )
            ).one()
            return dict(row.rendered_fields)

    def asset_events(self) -> list[dict[str, Any]]:
        """Asset events this run emitted: asset name and URI, source task and ``extra``."""
        from airflow.models.asset import AssetEvent
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            events = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == self.run_id)).all()
            return [
                {
                    "name": event.asset.name,
                    "uri": event.asset.uri,
                    "task_id": event.source_task_id,
                    "extra": dict(event.extra or {}),
                    "aliases": sorted(alias.name for alias in event.source_aliases),
                }
                for event in events
            ]

    def log(self, task_id: str, map_index: int = -1) -> str:
        """The log lines of one task instance (every try), cut out of the run's captured output."""
        start = f"[DAG TEST] starting task_id={task_id} map_index={map_index}"
        end = f"[DAG TEST] end task task_id={task_id} map_index={map_index}"
        parts, inside = [], False
        for line in self.output.splitlines():
            if start in line:
                inside = True
            if inside:
                parts.append(line)
            if end in line:
                inside = False
        return "\n".join(parts)


RunDag = Callable[..., DagRunResult]
#: Param defaults of each DAG as declared, taken before the DAG first runs in this process.
_DECLARED_PARAMS: dict[str, dict[str, Any]] = {}


@pytest.fixture
def run_dag(airflow_db: None, capsys: pytest.CaptureFixture[str]) -> RunDag:
    """Run a DAG with ``dag.test()`` and return a :class:`DagRunResult`.

    ``again=<earlier result>`` re-runs the same DAG run (same logical date and ``run_after``, hence
    the same run id): ``dag.test()`` first clears the run's task instances, exactly as a user
    clearing the run in the UI would, then runs every task again as a new try.
    """

    def run(dag: DAG, conf: dict[str, Any] | None = None, *, again: DagRunResult | None = None) -> DagRunResult:
        # In-process runs resolve ``run_conf`` into the DAG's own Param objects, so a value would leak
        # into the next run's defaults: always pass every param, starting from the declared defaults.
        declared = _DECLARED_PARAMS.setdefault(dag.dag_id, dag.params.dump())
        kwargs: dict[str, Any] = {"run_conf": {**declared, **(conf or {})}}
        if again is not None:
            assert again.dag_id == dag.dag_id
            kwargs.update(logical_date=again.logical_date, run_after=again.run_after)
        before = capsys.readouterr()
        sys.stdout.write(before.out)
        # dag.test() marks where each task starts and ends through stdlib logging, while task logs go to
        # stdout: send the markers to stdout too, so each task's lines can be cut out in order.
        markers = logging.StreamHandler(sys.stdout)
        dag_logger = logging.getLogger("airflow.sdk.definitions.dag")
        dag_logger.addHandler(markers)
        try:
            dagrun = run_dag_test(dag, **kwargs)
        finally:
            dag_logger.removeHandler(markers)
        captured = capsys.readouterr()
        # Put the output back, so pytest still shows it when the test fails.
        sys.stdout.write(captured.out)
        sys.stderr.write(captured.err)
        return DagRunResult(
            dag_id=dag.dag_id,
            run_id=dagrun.run_id,
            state=str(dagrun.state),
            logical_date=dagrun.logical_date,
            run_after=dagrun.run_after,
            output=_ANSI.sub("", captured.out + captured.err),
        )

    return run


# ------------------------------------------------------------------------------------ waiting
def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def when(condition: Callable[[], bool], action: Callable[[], None], timeout: float = 30.0) -> threading.Thread:
    """In a background thread, run ``action`` as soon as ``condition`` holds (e.g. stop a server mid-run)."""

    def watch() -> None:
        if wait_until(condition, timeout):
            action()

    watcher = threading.Thread(target=watch, name="when", daemon=True)
    watcher.start()
    return watcher


# ------------------------------------------------------------------------------ direct execution
class RecordingTaskInstance:
    """Stands in for the task instance when a test calls ``execute()`` directly: records pushed XComs."""

    def __init__(self, dag_id: str = "jimeng_direct", run_id: str = "direct_run", task_id: str = "gen") -> None:
        self.dag_id = dag_id
        self.run_id = run_id
        self.task_id = task_id
        self.map_index = -1
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value
