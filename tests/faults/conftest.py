"""Fixtures of the fault-injection suite: the emulator, an S3 "gate" that can fail, and the pipeline runner.

* ``emulator``: a fresh JiMeng emulator; ``jimeng_default`` points at it with quick retry settings
  (connection extras ``max_retries=1``, ``retry_backoff=0.01``, ``timeout=1``).
* ``gate``: an HTTP proxy in front of the session's moto S3 server; ``aws_default`` points at it. It
  can stop listening (``stop()``/``start()``: "connection refused", like a stopped server), refuse
  writes with ``403 AccessDenied`` or answer ``404 NoSuchBucket``. Stopping moto itself would not do:
  moto keeps everything in memory, so a stopped moto forgets every object, which a real S3 outage
  does not.
* ``pipeline``: runs a DAG of ``tests/dags/faults_pipeline.py`` with ``dag.test()`` and reports the
  run, the failed tries' exceptions, what is stored and what was billed.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.testing import AWS_REGION, S3Server, jimeng_connection_json
from tests import dag_runs

#: Every run of a test uses this date, hence one run id: a second ``dag.test()`` is a rerun of the
#: same task instance (what clearing it in the UI does) and finds what the first one stored.
RUN_AFTER = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
#: Connection extras of ``jimeng_default``: one retry inside the hook, waits of milliseconds.
FAST_RETRIES = {"max_retries": 1, "retry_backoff": 0.01, "retry_max_wait": 0.5, "timeout": 1}
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


# ------------------------------------------------------------------------------------------- S3 gate
class S3Gate:
    """A proxy in front of moto that fails on demand: stopped, denying writes, or without the bucket."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        #: "pass" | "deny_writes" | "deny_all" | "no_bucket" | "deny_records" | "deny_images"
        self.mode = "pass"
        #: How many journal writes (``_pending/`` PUTs) to refuse with ``403 AccessDenied``, whatever the mode.
        self.refuse_journals = 0
        #: Writes to hold (not answered until ``release()``): "images" (``.jpeg`` PUTs), "records", "journals" or None.
        self.hold: str | None = None
        #: Paths of the writes held so far.
        self.held: list[str] = []
        self._released = threading.Event()
        self._busy = 0
        self.port = 0
        self.requests: list[tuple[str, str, int]] = []
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Gate:
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with gate._lock:
                    gate._connections.add(self.connection)

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()
                with gate._lock:
                    gate._connections.discard(self.connection)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                gate._forward(self)

            do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self.port = int(server.server_address[1])
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def release(self) -> None:
        """Let held writes through (they then fail: their client is usually gone by then)."""
        self._released.set()

    def stop(self) -> None:
        """Stop listening and break open connections: new requests are refused, like a stopped server."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    @property
    def running(self) -> bool:
        return self._server is not None

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        request_id = f"GATE{uuid.uuid4().hex[:12].upper()}"
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{request_id}</RequestId><HostId>s3-gate</HostId></Error>"
        ).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("x-amz-request-id", request_id)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def _read_body(self, handler: BaseHTTPRequestHandler) -> bytes:
        """The request's body; a body cut short (the gate stopped mid-upload) raises, as S3 would refuse it.

        Forwarding a truncated body stored a truncated object in moto under a checksum for the whole one,
        which a later read then failed on (``FlexibleChecksumError``): no real S3 keeps such an object.
        """
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = handler.rfile.readline()
                if not line:
                    raise ConnectionError("the request body was cut short")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                part = handler.rfile.read(size)
                if len(part) < size:
                    raise ConnectionError("the request body was cut short")
                parts.append(part)
                handler.rfile.readline()
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        if len(body) < length:
            raise ConnectionError("the request body was cut short")
        return bytes(body)

    @property
    def busy(self) -> int:
        """Requests the gate is handling now (a killed client's last write may still be on its way to moto)."""
        with self._lock:
            return self._busy

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self._busy += 1
        try:
            self._forward_one(handler)
        finally:
            with self._lock:
                self._busy -= 1

    def _forward_one(self, handler: BaseHTTPRequestHandler) -> None:
        try:
            body = self._read_body(handler)
        except (ConnectionError, OSError):
            handler.close_connection = True
            return  # nothing reaches moto, as S3 stores nothing of an upload cut short
        method = handler.command
        self.requests.append((method, handler.path.split("?")[0], len(body)))
        if self.mode == "no_bucket":
            self._error(handler, 404, "NoSuchBucket", "The specified bucket does not exist")
            return
        writing = method in ("PUT", "POST", "DELETE")
        path = handler.path.split("?")[0]
        if writing and (
            (self.hold == "images" and path.endswith(".jpeg"))
            or (self.hold == "records" and path.endswith("/records.json"))
            or (self.hold == "journals" and "/_pending/" in path)
        ):
            self.held.append(path)
            self._released.wait(timeout=60)
            self._error(handler, 503, "SlowDown", "Held by the test")
            return
        if writing and "/_pending/" in path and self.refuse_journals > 0:
            self.refuse_journals -= 1
            self._error(handler, 403, "AccessDenied", "Access Denied")
            return
        if (
            self.mode == "deny_all"
            or (self.mode == "deny_writes" and writing)
            or (self.mode == "deny_records" and writing and path.endswith("/records.json"))
            or (self.mode == "deny_images" and writing and path.endswith(".jpeg"))
        ):
            self._error(handler, 403, "AccessDenied", "Access Denied")
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            upstream.request(method, handler.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            handler.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    handler.send_header(name, value)
            length = response.getheader("Content-Length") if method == "HEAD" else str(len(data))
            handler.send_header("Content-Length", length or "0")
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(data)
        finally:
            upstream.close()


# ------------------------------------------------------------------------------------ response formats
#: Every recovery path that exists in both response formats runs in both.
FORMATS = ("url", "b64_json")


def dag_for(response_format: str, variant: str = "default") -> str:
    """The faults DAG of ``variant`` (default, serial, set, wide, timeout) in ``response_format``."""
    from tests.dags.faults_pipeline import VARIANTS

    return VARIANTS[variant][response_format]


# ----------------------------------------------------------------------------------------- accounting
@dataclass
class Accounting:
    """What the emulator billed against what reached the bucket.

    ``lost_in_transit`` counts images that were paid for but could never reach us, by cause:
    ``undelivered`` (the ledger says the answer was not delivered: timeout, reset, killed client),
    ``unreadable`` (a 200 answer whose body was malformed or truncated) and ``dead_urls`` (images
    whose signed URL had expired or 404'd at download).
    """

    billed: int
    stored: int
    requests: int
    undelivered: int
    unreadable: int
    dead_urls: int

    @property
    def lost_in_transit(self) -> int:
        return self.undelivered + self.unreadable + self.dead_urls


def account(emulator: JiMengEmulator, s3_client: Any, bucket: str, *, stored: int | None = None) -> Accounting:
    records = {record["request_id"]: record for record in emulator.requests}
    undelivered = unreadable = dead_urls = 0
    for entry in emulator.ledger:
        fault = (records.get(entry.request_id) or {}).get("fault")
        if not entry.delivered:
            undelivered += entry.images
        elif fault in ("malformed", "truncated"):
            unreadable += entry.images
        elif fault in ("expired_url", "missing_url"):
            dead_urls += entry.images
    return Accounting(
        billed=emulator.billed_images,
        stored=len(image_keys(s3_client, bucket)) if stored is None else stored,
        requests=emulator.request_count,
        undelivered=undelivered,
        unreadable=unreadable,
        dead_urls=dead_urls,
    )


def object_keys(s3_client: Any, bucket: str) -> list[str]:
    keys: list[str] = []
    with contextlib.suppress(s3_client.exceptions.NoSuchBucket):
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def image_keys(s3_client: Any, bucket: str) -> list[str]:
    return [key for key in object_keys(s3_client, bucket) if key.endswith(".jpeg")]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


_REQUEST_ID = re.compile(r"request id ([0-9A-Za-z]+)")


def assert_names_code_and_request_id(message: str, code: str, emulator: JiMengEmulator) -> None:
    """The message quotes ``code`` and the id of a request the API really received."""
    assert code in message, message
    known = {record["request_id"] for record in emulator.requests}
    known |= {record["client_request_id"] for record in emulator.requests if record.get("client_request_id")}
    quoted = set(_REQUEST_ID.findall(message))
    assert quoted & known, f"no known request id in: {message}"


# ------------------------------------------------------------------------------------------- pipeline
@dataclass
class PipelineRun:
    state: str
    try_number: int
    errors: list[str] = field(default_factory=list)
    #: The class name of each failed try's exception, in order.
    error_types: list[str] = field(default_factory=list)
    xcom: dict[str, Any] = field(default_factory=dict)
    duration: float = 0.0


def run_dag_test(dag: Any, run_conf: dict[str, Any], run_after: datetime.datetime = RUN_AFTER) -> Any:
    """``dag.test()`` with a fixed run date, hence one run id: a second call is a rerun of the same run."""
    return dag_runs.run_dag_test(dag, run_conf=run_conf, logical_date=run_after, run_after=run_after)


def xcoms_of(dag_run: Any) -> list[tuple[str, int, str, Any]]:
    """Every XCom of a run: ``(task_id, map_index, key, value)``."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter(XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id)
        return [(row.task_id, row.map_index, row.key, row.value) for row in rows]


class Pipeline:
    """Runs the faults DAGs with ``dag.test()`` against the test's emulator and bucket."""

    def __init__(self, emulator: JiMengEmulator, bucket: str, s3_client: Any) -> None:
        self.emulator = emulator
        self.bucket = bucket
        self.s3 = s3_client

    @staticmethod
    def module() -> Any:
        from tests.dags import faults_pipeline

        return faults_pipeline

    def run(self, dag_id: str = "faults_pipeline", *, prompts: list[str] | None = None, **conf: Any) -> PipelineRun:
        module = self.module()
        module.CALLBACKS.clear()
        started = time.monotonic()
        run_conf = {"bucket": self.bucket, "prompts": prompts or ["a red fox in the snow"], **conf}
        dag_run = run_dag_test(getattr(module, dag_id), run_conf)
        duration = time.monotonic() - started
        (ti,) = dag_run.get_task_instances()
        return PipelineRun(
            state=str(ti.state),
            try_number=ti.try_number,
            errors=[str(error) for _, error in module.CALLBACKS if error is not None],
            error_types=[type(error).__name__ for _, error in module.CALLBACKS if error is not None],
            xcom={key: value for _, _, key, value in xcoms_of(dag_run)},
            duration=duration,
        )

    def before_retry(self, hook: Callable[[], None]) -> None:
        self.module().BEFORE_RETRY.append(hook)

    def account(self) -> Accounting:
        return account(self.emulator, self.s3, self.bucket)

    def objects(self) -> list[str]:
        return object_keys(self.s3, self.bucket)


# ------------------------------------------------------------------------------------- task processes
REPO_ROOT = Path(__file__).resolve().parents[2]


class TaskProcesses:
    """Starts tries of a faults DAG's task in child processes (``task_process.py --serve``) that a test can kill.

    Each try is a fork of one server that imported Airflow and the provider once, so a try starts in
    milliseconds; its environment is the test's at the time of :meth:`start` (the emulator's and the
    S3 gate's connections).
    """

    def __init__(self) -> None:
        #: What the server itself logs (each try logs to the file :meth:`start` names).
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  # closed in close()
        self._server = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.task_process", "--serve"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self._lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()
        self.pid: int | None = None

    def _read(self) -> None:
        assert self._server.stdout is not None
        for line in self._server.stdout:
            self._lines.put(line)

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            return dict(json.loads(self._lines.get(timeout=timeout)))
        except queue.Empty:
            raise TimeoutError(f"no answer from the task process server within {timeout} s") from None

    def start(self, arguments: dict[str, Any], log: Path) -> int:
        """Start a try; returns its pid at once."""
        assert self.pid is None, "one try at a time"
        env = {key: value for key, value in os.environ.items() if key.startswith(("AIRFLOW_CONN_", "AWS_"))}
        assert self._server.stdin is not None
        self._server.stdin.write(json.dumps({**arguments, "log": str(log), "env": env}) + "\n")
        self._server.stdin.flush()
        self.pid = int(self._answer(timeout=30)["pid"])
        return self.pid

    def wait(self, timeout: float = 60) -> int:
        """Wait for the try to end; its exit code (``-9`` if it was SIGKILLed)."""
        answer = self._answer(timeout)
        assert answer["pid"] == self.pid
        self.pid = None
        return int(answer["status"])

    def poll(self) -> int | None:
        """The try's exit code if it has ended (as :meth:`wait`), else ``None`` at once."""
        try:
            line = self._lines.get_nowait()
        except queue.Empty:
            return None
        answer = json.loads(line)
        assert answer["pid"] == self.pid
        self.pid = None
        return int(answer["status"])

    def signal(self, signum: int) -> None:
        assert self.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def close(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self._server.kill()
        self._server.wait(timeout=10)
        self._log.close()


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def _task_process_server() -> Iterator[TaskProcesses]:
    processes = TaskProcesses()
    yield processes
    processes.close()


@pytest.fixture
def task_processes(_task_process_server: TaskProcesses) -> Iterator[TaskProcesses]:
    yield _task_process_server
    if _task_process_server.pid is not None:  # a test that failed mid-try: end it, collect its status
        _task_process_server.signal(signal.SIGKILL)
        _task_process_server.wait(timeout=30)


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[JiMengEmulator]:
    with JiMengEmulator() as emulator:
        monkeypatch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(emulator.base_url, **FAST_RETRIES))
        yield emulator


@pytest.fixture
def gate(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Gate]:
    gate = S3Gate(s3_server.port).start()
    extra = {
        "endpoint_url": gate.endpoint_url,
        "region_name": AWS_REGION,
        # Fail fast when the gate is closed: one retry, short timeouts.
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 2}, "connect_timeout": 1, "read_timeout": 5},
    }
    connection = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    yield gate
    gate.release()
    gate.stop()


@pytest.fixture
def bucket(s3_client: Any, gate: S3Gate) -> str:
    name = f"jimeng-faults-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def pipeline(airflow_db: None, emulator: JiMengEmulator, bucket: str, s3_client: Any) -> Iterator[Pipeline]:
    runner = Pipeline(emulator, bucket, s3_client)
    yield runner
    runner.module().BEFORE_RETRY.clear()


# ------------------------------------------------------------------------------ other storage backends
#: The backends the storage guarantees are proved on: S3 (moto behind the gate) and ``file://``
#: through ``ObjectStoragePath`` (``output_path``). GCS and Azure are not: see docs/storage.md.
BACKENDS = ("s3", "file")


class FileGate:
    """The S3 gate's faults for a ``file://`` destination, in this process: refuse writes of some objects.

    It fails the filesystem's own ``open`` with ``PermissionError``, as a read-only mount or a
    full disk would, so the store's error handling is what is tested.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fsspec.implementations.local import LocalFileSystem

        #: "pass" | "deny_records" | "deny_writes"
        self.mode = "pass"
        original = LocalFileSystem._open
        gate = self

        def _open(fs: Any, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
            name = os.path.basename(str(path))
            if "w" in mode and (
                gate.mode == "deny_writes" or (gate.mode == "deny_records" and name.startswith(".records.json."))
            ):
                raise PermissionError(13, "Permission denied (the test's file gate)")
            return original(fs, path, mode, *args, **kwargs)

        monkeypatch.setattr(LocalFileSystem, "_open", _open)


class FilePipeline(Pipeline):
    """The faults DAGs storing under ``file://<root>/jimeng`` through ``output_path``; keys read as on S3."""

    backend = "file"

    def __init__(self, emulator: JiMengEmulator, root: Path) -> None:
        super().__init__(emulator, "unused", None)
        self.root = root

    @property
    def output_path(self) -> str:
        return f"file://{self.root}/jimeng"

    def dag_id(self, dag_id: str) -> str:
        from tests.dags.faults_pipeline import OBJSTORE

        return OBJSTORE[dag_id]

    def run(self, dag_id: str = "faults_pipeline", *, prompts: list[str] | None = None, **conf: Any) -> PipelineRun:
        return super().run(self.dag_id(dag_id), prompts=prompts, **{"output_path": self.output_path, **conf})

    def objects(self) -> list[str]:
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in self.root.rglob("*")
            if path.is_file() and not path.name.endswith(".part")
        )

    def account(self) -> Accounting:
        return account(self.emulator, None, "", stored=sum(1 for key in self.objects() if key.endswith(".jpeg")))

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def delete(self, key: str) -> None:
        (self.root / key).unlink()


class S3Pipeline(Pipeline):
    """:class:`Pipeline` with the same helpers as :class:`FilePipeline`, for tests over both backends."""

    backend = "s3"

    def dag_id(self, dag_id: str) -> str:
        return dag_id

    def read(self, key: str) -> bytes:
        data: bytes = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return data

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=key)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def any_pipeline(
    backend: str, request: pytest.FixtureRequest, airflow_db: None, emulator: JiMengEmulator, tmp_path: Path
) -> Iterator[S3Pipeline | FilePipeline]:
    """The faults pipeline on ``backend``: S3 (``s3_bucket``, the fast path) or ``file://`` (``output_path``)."""
    runner: S3Pipeline | FilePipeline
    if backend == "s3":
        runner = S3Pipeline(emulator, request.getfixturevalue("bucket"), request.getfixturevalue("s3_client"))
    else:
        root = tmp_path / "objstore"
        (root / "jimeng").mkdir(parents=True)  # output_path must exist, as a bucket must on S3
        runner = FilePipeline(emulator, root)
    yield runner
    runner.module().BEFORE_RETRY.clear()


@dataclass
class S3Outage:
    """S3 stopped mid-run by :func:`stop_s3_while_prompt_1_is_generated`."""

    gate: S3Gate
    #: Set once S3 is down; prompt 1's answer waits for it.
    down: threading.Event

    def repair(self) -> None:
        """S3 back for the retry (and prompt 1's answer released, should S3 never have gone down)."""
        self.down.set()
        self.gate.start()


def stop_s3_while_prompt_1_is_generated(
    pipeline: Pipeline, emulator: JiMengEmulator, gate: S3Gate, image_0_key: str, monkeypatch: pytest.MonkeyPatch
) -> S3Outage:
    """Prompt 0 is stored; S3 stops while prompt 1 is generated: prompt 1's answer waits for the outage
    (``down``), not for a latency a busy machine could outlast, as it once did."""
    s3_down = threading.Event()
    answers = iter(range(1_000))
    latency = emulator.pause

    def pause(seconds: float) -> None:
        if next(answers) == 1:
            s3_down.wait(30)
        latency(seconds)

    monkeypatch.setattr(emulator, "pause", pause)

    def watch() -> None:
        if wait_for(lambda: image_0_key in pipeline.objects(), timeout=30):
            gate.stop()
        s3_down.set()

    threading.Thread(target=watch, daemon=True).start()
    return S3Outage(gate, s3_down)
