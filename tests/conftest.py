"""Shared fixtures: every test talks to real servers on loopback, in a throwaway AIRFLOW_HOME."""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

# Airflow reads its configuration at import time: point it at a private home before anything imports it.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="jimeng-airflow-home-")
REPO_ROOT = Path(__file__).resolve().parent.parent
# dag.test() finds DAGs by parsing the DAGs folder: expose the examples and the test DAGs there.
DAGS_FOLDER = Path(_AIRFLOW_HOME) / "dags"
DAGS_FOLDER.mkdir()
_DAG_SOURCES = [
    *sorted((REPO_ROOT / "dags_examples").glob("*.py")),
    *sorted((REPO_ROOT / "tests" / "dags").glob("*.py")),
]
for _source in _DAG_SOURCES:
    if not _source.name.startswith("_"):
        (DAGS_FOLDER / _source.name).symlink_to(_source)
# The complete DAGs of the README and docs, as written there (tests/packaging/test_doc_blocks.py
# trigger them the way the UI does, with no logical date).
sys.path.insert(0, str(REPO_ROOT))
from tests.doc_blocks import dag_files  # noqa: E402

for _module, _source in dag_files().items():
    (DAGS_FOLDER / f"{_module}.py").write_text(_source, encoding="utf-8")
os.environ.update(
    {
        "AIRFLOW_HOME": _AIRFLOW_HOME,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME}/airflow.db",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
)
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "JIMENG_BASE_URL"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402

from airflow_provider_jimeng.emulator import JiMengEmulator  # noqa: E402
from airflow_provider_jimeng.emulator.pytest_plugin import jimeng_emulator  # noqa: E402,F401
from airflow_provider_jimeng.testing import (  # noqa: E402
    RedisServer,
    S3Server,
    aws_connection_json,
    jimeng_connection_json,
    redis_connection_json,
)
from tests.compat import install_dag_test_shims  # noqa: E402

install_dag_test_shims()


@pytest.fixture
def jimeng_conn(jimeng_emulator: JiMengEmulator, monkeypatch: pytest.MonkeyPatch) -> JiMengEmulator:  # noqa: F811
    """``jimeng_default`` pointing at a fresh emulator; returns the emulator for its ledger and knobs."""
    monkeypatch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(jimeng_emulator.base_url))
    return jimeng_emulator


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_client(s3_server: S3Server):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def s3_bucket(s3_server: S3Server, s3_client, monkeypatch: pytest.MonkeyPatch) -> str:  # type: ignore[no-untyped-def]
    """A new empty bucket, with ``aws_default`` pointing at the S3 server."""
    name = f"jimeng-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", aws_connection_json(s3_server.endpoint_url))
    return name


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A migrated SQLite metadata DB, for whole-DAG tests with ``dag.test()``."""
    from airflow.utils import db

    db.resetdb()


@pytest.fixture
def child_airflow_db(airflow_db: None, tmp_path: Path) -> str:
    """``sql_alchemy_conn`` of a migrated metadata DB of its own, for a child process (SQLite is never
    shared between processes here): a consistent copy of this process's, saving the child a migration."""
    path = tmp_path / "airflow.db"
    with sqlite3.connect(Path(_AIRFLOW_HOME) / "airflow.db") as reading, sqlite3.connect(path) as writing:
        reading.backup(writing)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_conn(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> RedisServer:
    """``redis_shared`` pointing at the session's Redis server, emptied first."""
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    monkeypatch.setenv("AIRFLOW_CONN_REDIS_SHARED", redis_connection_json(redis_server.url))
    return redis_server
