"""One Redis client per connection id and process, through the redis provider's ``RedisHook``."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from airflow_provider_jimeng.exceptions import JiMengConfigurationError

if TYPE_CHECKING:
    from redis import Redis

_clients: dict[str, Redis] = {}
_lock = threading.Lock()


def shared_redis(redis_conn_id: str) -> Redis:
    """The client for ``redis_conn_id``, built once: its connection pool is thread-safe and shared by
    every thread of the task (the limiter, the journal writer)."""
    with _lock:
        client = _clients.get(redis_conn_id)
        if client is None:
            try:
                from airflow.providers.redis.hooks.redis import RedisHook
            except ImportError:
                raise JiMengConfigurationError(
                    "redis_conn_id",
                    "a shared Redis needs the redis provider: pip install 'airflow-provider-jimeng[redis]'",
                ) from None
            client = _clients[redis_conn_id] = RedisHook(redis_conn_id=redis_conn_id).get_conn()  # type: ignore[no-untyped-call]
        return client
