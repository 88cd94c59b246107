"""The shared Redis client: one per connection id, reached through the redis provider's RedisHook."""

from __future__ import annotations

import pytest

from airflow_provider_jimeng.coordination.redis_client import shared_redis
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
    assert (kwargs["socket_timeout"] + 0.5) * (redis_client.REDIS_RETRIES + 1) < 20


def test_a_connection_that_does_not_exist_is_a_configuration_error_for_every_user() -> None:
    """The limiter (hook) and the shared journals (operator) both get their client here: a missing
    connection must fail the task at once, not as Airflow's retried AirflowNotFoundException."""
    from airflow_provider_jimeng.exceptions import JiMengConfigurationError

    with pytest.raises(JiMengConfigurationError, match="redis_conn_id: connection 'redis_nowhere' is not defined"):
        shared_redis("redis_nowhere")
