"""The shared Redis client: one per connection id, reached through the redis provider's RedisHook."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_jimeng.coordination.redis_client import interrupt_shared_redis, shared_redis
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.testing import RedisServer


def test_the_client_reaches_the_connections_server_and_is_built_once(redis_conn: RedisServer) -> None:
    client = shared_redis("redis_shared")
    client.set("jimeng-test", "1")
    assert client.get("jimeng-test") == b"1"
    assert shared_redis("redis_shared") is client


def test_a_script_runs_on_the_server(redis_conn: RedisServer) -> None:
    """The limiter is a Lua script: the server the suite uses must run one, whichever it is."""
    client = shared_redis("redis_shared")
    assert client.eval("return redis.call('INCRBY', KEYS[1], ARGV[1])", 1, "jimeng-script", 5) == 5
    seconds, micros = client.eval("return redis.call('TIME')", 0)
    assert int(seconds) > 1_700_000_000
    assert 0 <= int(micros) < 1_000_000


@pytest.mark.parametrize("value", ["None", "", " null "])
def test_an_unset_redis_conn_id_means_no_shared_store(value: str, jimeng_conn, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from airflow_provider_jimeng.hooks.jimeng import JiMengHook
    from airflow_provider_jimeng.testing import jimeng_connection_json

    monkeypatch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(jimeng_conn.base_url, redis_conn_id=value))
    assert JiMengHook().config.redis_conn_id is None


def test_an_account_limit_without_a_shared_store_is_refused(jimeng_conn, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from airflow_provider_jimeng.exceptions import JiMengConfigurationError
    from airflow_provider_jimeng.hooks.jimeng import JiMengHook
    from airflow_provider_jimeng.testing import jimeng_connection_json

    monkeypatch.setenv(
        "AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(jimeng_conn.base_url, account_images_per_minute=500)
    )
    with pytest.raises(JiMengConfigurationError, match=r"account_images_per_minute: .*redis_conn_id"):
        _ = JiMengHook().config


def test_a_silent_redis_costs_seconds_not_a_minute(redis_conn: RedisServer) -> None:
    """redis-py retries a failed command 10 times by default: with a 5 s socket timeout, a Redis that
    stopped answering would hold a limiter wait (which stop cannot interrupt) for about a minute."""
    from airflow_provider_jimeng.coordination import redis_client

    client = shared_redis("redis_shared")
    retry = client.get_retry()
    assert retry is not None
    assert retry.get_retries() == redis_client.REDIS_RETRIES
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] <= redis_client.REDIS_TIMEOUT_SECONDS
    assert (kwargs["socket_timeout"] + 0.5) * (redis_client.REDIS_RETRIES + 1) < 6


def test_a_connection_that_does_not_exist_is_a_configuration_error_for_every_user() -> None:
    """The limiter (hook) and the shared journals (operator) both get their client here: a missing
    connection must fail the task at once, not as Airflow's retried AirflowNotFoundException."""
    from airflow_provider_jimeng.exceptions import JiMengConfigurationError

    with pytest.raises(JiMengConfigurationError, match="redis_conn_id: connection 'redis_nowhere' is not defined"):
        shared_redis("redis_nowhere")


@pytest.fixture
def silent_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """``redis_silent``: a real listener on loopback that accepts, reads commands and never answers.

    Yields an event set once a command arrived (the client is then blocked reading the answer).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.1)
    received = threading.Event()
    done = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                continue
            held.append(connection)
            connection.settimeout(0.1)
            while not done.is_set():
                try:
                    if not connection.recv(65536):
                        break
                    received.set()
                except OSError:
                    continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    monkeypatch.setenv(
        "AIRFLOW_CONN_REDIS_SILENT", json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": port})
    )
    try:
        yield received
    finally:
        done.set()
        thread.join(timeout=2)
        for connection in held:
            connection.close()
        listener.close()
        interrupt_shared_redis()  # drop the client of this port


def test_a_silent_redis_costs_a_command_seconds(silent_redis: threading.Event, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: ~15 s a command (redis-py 8's own 5 s socket timeout was kept, three attempts), and two
    commands per limiter wait. The client's timeouts are the provider's, whatever redis-py defaults to."""
    from redis.exceptions import RedisError

    from airflow_provider_jimeng.coordination import redis_client

    assert (redis_client.REDIS_RETRIES + 1) * redis_client.REDIS_TIMEOUT_SECONDS <= 5, "the bound in docs/faults.md"
    monkeypatch.setattr(redis_client, "REDIS_TIMEOUT_SECONDS", 0.3)  # the same path, faster
    client = shared_redis("redis_silent")
    started = time.monotonic()
    with pytest.raises(RedisError):
        client.get("jimeng-silent")
    elapsed = time.monotonic() - started
    assert elapsed < (redis_client.REDIS_RETRIES + 1) * 0.3 + 2, elapsed


def test_on_kill_ends_a_command_waiting_on_a_silent_redis_at_once(silent_redis: threading.Event) -> None:
    """on_kill could not interrupt a limiter wait on a Redis that never answers: it now ends it at once."""
    from redis.exceptions import RedisError

    client = shared_redis("redis_silent")
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def command() -> None:
        try:
            client.get("jimeng-silent")
        except BaseException as error:  # the test asserts on what it was
            outcome["error"] = error
        finally:
            finished.set()

    threading.Thread(target=command, daemon=True).start()
    assert silent_redis.wait(10), "the command reached the listener"
    interrupted = time.monotonic()
    operator = JiMengGenerateOperator(task_id="generate", prompt="a fox")
    stopped: list[str] = []
    operator._active_run = SimpleNamespace(stop=stopped.append, store=None)  # type: ignore[assignment]  # the try in progress
    operator.on_kill()
    assert stopped == ["on_kill"]
    assert finished.wait(10)
    assert time.monotonic() - interrupted < 1.0, "well under one socket timeout: not waited out"
    assert isinstance(outcome.get("error"), RedisError), outcome  # what the limiter and journals catch
    assert shared_redis("redis_silent") is not client, "a later user gets a fresh client"
