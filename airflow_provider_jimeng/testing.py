"""Offline stand-ins for DAG development and tests: the JiMeng emulator and an S3 server on loopback.

``offline_stack()`` starts both and points the ``jimeng_default`` and ``aws_default`` connections at
them through ``AIRFLOW_CONN_*`` environment variables, so an unchanged DAG runs without a key and
without spending credits. Needs the ``emulator`` extra (Pillow) and ``moto[server]``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, JiMengEmulator

AWS_TEST_CREDENTIALS = {"login": "testing", "password": "testing"}
AWS_REGION = "us-east-1"


def jimeng_connection_json(base_url: str, api_key: str = DEFAULT_API_KEY, **extra: Any) -> str:
    """The JSON form of a ``jimeng`` connection pointing at ``base_url`` (plain http allowed)."""
    return json.dumps(
        {"conn_type": "jimeng", "host": base_url, "password": api_key, "extra": {"allow_http": True, **extra}}
    )


def aws_connection_json(endpoint_url: str) -> str:
    """The JSON form of an ``aws`` connection for an S3 server on loopback."""
    return json.dumps(
        {
            "conn_type": "aws",
            **AWS_TEST_CREDENTIALS,
            "extra": {"endpoint_url": endpoint_url, "region_name": AWS_REGION},
        }
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _ServerProcess:
    """A server in a child process on a loopback port: a real endpoint that can be stopped mid-run."""

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Any:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self._process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the {self.name} exited at start; is it installed?")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the {self.name} did not start within 30 s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class S3Server(_ServerProcess):
    """moto's S3 server in a child process."""

    name = "moto S3 server"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def __enter__(self) -> S3Server:
        return self.start()  # type: ignore[no-any-return]


#: fakeredis's TCP server, with Lua scripting through lupa: the stand-in where redis-server is not installed.
_FAKEREDIS_SERVER = (
    "import sys; from fakeredis import TcpFakeServer; "
    "TcpFakeServer(('127.0.0.1', int(sys.argv[1])), server_type='redis').serve_forever()"
)


class RedisServer(_ServerProcess):
    """A Redis server on loopback: ``redis-server`` when it is installed, else fakeredis's TCP server.

    Both speak the protocol over a real socket (scripts included), so the shared rate limiter and
    journals are tested as they run against a deployment's Redis.
    """

    name = "Redis server"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def real(self) -> bool:
        return self._binary() is not None

    @staticmethod
    def _binary() -> str | None:
        """``redis-server``, unless ``JIMENG_TEST_FAKEREDIS=1`` asks for fakeredis (what CI has) anyway."""
        return None if os.environ.get("JIMENG_TEST_FAKEREDIS") == "1" else shutil.which("redis-server")

    def command(self) -> list[str]:
        binary = self._binary()
        if binary is not None:
            return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        return [sys.executable, "-c", _FAKEREDIS_SERVER, str(self.port)]

    def __enter__(self) -> RedisServer:
        return self.start()  # type: ignore[no-any-return]


def redis_connection_json(url: str) -> str:
    """The JSON form of a ``redis`` connection for a Redis server on loopback."""
    split = urlsplit(url)
    return json.dumps({"conn_type": "redis", "host": split.hostname, "port": split.port, "extra": {"db": 0}})


@dataclass
class OfflineStack:
    emulator: JiMengEmulator
    s3: S3Server

    def s3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3.endpoint_url,
            region_name=AWS_REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, restoring the old values after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def offline_stack(
    *, jimeng_conn_id: str = "jimeng_default", aws_conn_id: str = "aws_default", **emulator_options: Any
) -> Iterator[OfflineStack]:
    """Run the emulator and an S3 server, with connections pointing at both, for the block's duration."""
    with JiMengEmulator(**emulator_options) as emulator, S3Server() as s3:
        env = {
            f"AIRFLOW_CONN_{jimeng_conn_id.upper()}": jimeng_connection_json(emulator.base_url),
            f"AIRFLOW_CONN_{aws_conn_id.upper()}": aws_connection_json(s3.endpoint_url),
        }
        with patched_environ(env):
            yield OfflineStack(emulator=emulator, s3=s3)


def activate_dag_assets(dag: Any) -> None:
    """Airflow 3.0's dag.test() never registers the DAG's assets, so a task with an asset outlet fails
    as "inactive" (apache/airflow#51644); later releases sync the DAG, assets included, first."""
    from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS

    if AIRFLOW_V_3_1_PLUS:
        return
    # Airflow 3.0 only (type-checked against a later release, where these moved).
    from airflow.dag_processing.collection import AssetModelOperation
    from airflow.serialization.serialized_objects import SerializedDAG  # type: ignore[attr-defined]
    from airflow.utils.session import create_session

    scheduler_dag = SerializedDAG.deserialize_dag(SerializedDAG.serialize_dag(dag))  # type: ignore[attr-defined]
    with create_session() as session:
        assets = AssetModelOperation.collect({dag.dag_id: scheduler_dag})
        models = assets.sync_assets(session=session)
        assets.sync_asset_aliases(session=session)
        session.flush()  # the active-asset rows reference the asset rows
        assets.activate_assets_if_possible(models.values(), session=session)
