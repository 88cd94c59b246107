"""The servers a benchmark talks to, each in its own child process.

The emulator and the S3 server must not share the measured process: their CPU time, memory and GIL
would be charged to the operator. Both therefore run as children; the emulator is driven over a pipe
so that the harness can reset its counters and change its latency and rate limit between runs
without restarting it (its render cache survives, so renders stay out of the measured runs).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import struct
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from airflow_provider_jimeng.testing import S3Server, aws_connection_json, jimeng_connection_json

JIMENG_CONN_ID = "jimeng_bench"
AWS_CONN_ID = "aws_bench"
_COMMENT_SEGMENT_MAX = 65533  # payload bytes of one JPEG COM segment (its length field is 16 bits)
_PIPE_TIMEOUT = 60.0


def pad_jpeg(data: bytes, target_bytes: int) -> bytes:
    """Grow a JPEG to ``target_bytes`` with comment segments right after SOI; decoders skip them.

    The emulator's pictures are flat colour and compress to a few hundred KB even at 4K, while real
    outputs weigh megabytes; padding gives downloads, uploads and base64 payloads a realistic weight
    without spending the emulator's CPU on rendering noise.
    """
    missing = target_bytes - len(data)
    if missing <= 4 or data[:2] != b"\xff\xd8":
        return data
    segments = []
    while missing > 4:
        payload = min(_COMMENT_SEGMENT_MAX, missing - 4)
        segments.append(b"\xff\xfe" + struct.pack(">H", payload + 2) + b"\x00" * payload)
        missing -= payload + 4
    return data[:2] + b"".join(segments) + data[2:]


def _padded_renderer(render: Callable[[Any], bytes], bits_per_pixel: float) -> Callable[[Any], bytes]:
    def render_padded(key: Any) -> bytes:
        return pad_jpeg(render(key), int(key.width * key.height * bits_per_pixel / 8))

    return render_padded


def generation_window(records: list[dict[str, Any]]) -> dict[str, float]:
    """When the first generation request reached the emulator and when its last answer left it.

    By the emulator's own stamps on its request records (``received_at``, ``answered_at``), on this
    host's monotonic clock, which the worker process shares: the bench needs nothing from the client
    to tell the generation window from the client's set-up before it and its finish after it.
    """
    received = [record["received_at"] for record in records if record.get("received_at") is not None]
    answered = [record["answered_at"] for record in records if record.get("answered_at") is not None]
    window: dict[str, float] = {}
    if received:
        window["first_request_at"] = min(received)
    if answered:
        window["last_answer_at"] = max(answered)
    return window


def _settled_requests(emulator: Any, timeout: float = 2.0) -> list[dict[str, Any]]:
    """The emulator's request records once every answer is stamped.

    A handler thread stamps ``answered_at`` just after its last write, so a client can hold the
    answer a moment before the stamp is there; by the time the harness asks, it nearly always is.
    """
    deadline = time.monotonic() + timeout
    while True:
        records: list[dict[str, Any]] = emulator.requests
        if all(record.get("answered_at") is not None for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.01)


def _serve_emulator(conn: Connection, options: dict[str, Any]) -> None:
    """Child process body: run the emulator and answer commands until told to stop."""
    from airflow_provider_jimeng.emulator import images
    from airflow_provider_jimeng.emulator.server import JiMengEmulator

    if options["jpeg_bits_per_pixel"] > 0:
        images.render_jpeg = _padded_renderer(images.render_jpeg, options["jpeg_bits_per_pixel"])  # type: ignore[assignment]
    emulator = JiMengEmulator().start()
    emulator._cache.max_bytes = options["cache_bytes"]
    conn.send({"base_url": emulator.base_url, "pid": os.getpid()})
    try:
        while True:
            command, arguments = conn.recv()
            if command == "stop":
                break
            if command == "configure":
                for name, value in arguments.items():
                    setattr(emulator, name, value)
                conn.send(None)
            elif command == "reset":
                emulator.reset()
                conn.send(None)
            elif command == "stats":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                conn.send(
                    {
                        "billed_images": emulator.billed_images,
                        "rate_limited": emulator.rate_limited_count,
                        "requests": emulator.request_count,
                        "downloads": emulator.downloads,
                        "renders": emulator._cache.renders,
                        "cpu_seconds": usage.ru_utime + usage.ru_stime,
                        **generation_window(records := _settled_requests(emulator)),
                        # When each request the emulator answered 200 came in (P5's sustained rate).
                        "admitted_at": sorted(
                            record["received_at"] for record in records if record.get("status") == 200
                        ),
                    }
                )
            else:
                conn.send(ValueError(f"unknown command {command!r}"))
    finally:
        emulator.stop()
        conn.close()


class EmulatorProcess:
    """The JiMeng emulator in a spawned child process, driven over a pipe."""

    def __init__(self, *, jpeg_bits_per_pixel: float, cache_bytes: int = 1024 * 1024 * 1024) -> None:
        self._options = {"jpeg_bits_per_pixel": jpeg_bits_per_pixel, "cache_bytes": cache_bytes}
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self.base_url = ""

    def start(self) -> EmulatorProcess:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve_emulator, args=(child, self._options), daemon=True)
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(_PIPE_TIMEOUT):
            self.stop()
            raise RuntimeError("the emulator child did not start")
        self.base_url = parent.recv()["base_url"]
        return self

    def _call(self, command: str, **arguments: Any) -> Any:
        if self._conn is None:
            raise RuntimeError("the emulator child is not running")
        self._conn.send((command, arguments))
        if not self._conn.poll(_PIPE_TIMEOUT):
            raise RuntimeError(f"the emulator child did not answer {command!r}")
        answer = self._conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def configure(self, **settings: Any) -> None:
        """Set emulator attributes (``latency``, ``images_per_minute``, ``rate_limit_burst``)."""
        self._call("configure", **settings)

    def reset(self) -> None:
        """Forget counters, ledger and the rate-limit state (the render cache stays)."""
        self._call("reset")

    def stats(self) -> dict[str, Any]:
        return dict(self._call("stats"))

    def stop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                self._conn.send(("stop", {}))
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(timeout=5)
            self._process = None


@dataclass
class Stack:
    """Both servers, the bench bucket and the environment a worker process needs to reach them."""

    emulator: EmulatorProcess
    s3: S3Server
    bucket: str
    airflow_home: Path
    #: Extras of the bench's jimeng connection (``--quick`` shortens retry backoff).
    connection_extras: dict[str, Any] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.airflow_home}/airflow.db",
            f"AIRFLOW_CONN_{JIMENG_CONN_ID.upper()}": jimeng_connection_json(
                self.emulator.base_url, **self.connection_extras
            ),
            f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}": aws_connection_json(self.s3.endpoint_url),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def s3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def empty_bucket(self) -> int:
        """Delete what a run stored (moto keeps objects in memory); returns how many there were."""
        client = self.s3_client()
        deleted = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
        return deleted


@contextlib.contextmanager
def running_stack(*, jpeg_bits_per_pixel: float, connection_extras: dict[str, Any] | None = None) -> Iterator[Stack]:
    """Start the emulator and moto's S3 server as children and create the bench bucket."""
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        os.environ.pop(variable, None)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    with tempfile.TemporaryDirectory(prefix="jimeng-bench-") as home:
        emulator = EmulatorProcess(jpeg_bits_per_pixel=jpeg_bits_per_pixel).start()
        try:
            with S3Server() as s3:
                stack = Stack(
                    emulator, s3, f"jimeng-bench-{uuid.uuid4().hex[:8]}", Path(home), dict(connection_extras or {})
                )
                stack.s3_client().create_bucket(Bucket=stack.bucket)
                yield stack
        finally:
            emulator.stop()
