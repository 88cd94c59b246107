"""One Redis client per connection id and process, through the redis provider's ``RedisHook``."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.version_compat import AirflowNotFoundException

if TYPE_CHECKING:
    from redis import Redis

#: Per command: the limiter's script and a journal write are small, so a slower answer means trouble.
REDIS_TIMEOUT_SECONDS = 5.0
#: Retries of a failed command (a dropped connection is common and cheap to redo); then the caller's fallback.
REDIS_RETRIES = 2

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
            try:
                client = RedisHook(redis_conn_id=redis_conn_id).get_conn()  # type: ignore[no-untyped-call]
            except AirflowNotFoundException:
                # Not retried: every try would look it up in vain (the limiter and the journals both land here).
                raise JiMengConfigurationError(
                    "redis_conn_id", f"connection {redis_conn_id!r} is not defined; nothing was sent"
                ) from None
            _fail_fast(client)
            _clients[redis_conn_id] = client
        return client


def _fail_fast(client: Redis) -> None:
    """A Redis that stopped answering must cost an attempt seconds, not a minute: redis-py 6+ retries a
    failed command many times by default, during which the hook's stop (``on_kill``, a timeout) cannot
    interrupt the limiter's wait. Both users have their own fallback (own pace, local journal)."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    if hasattr(client, "set_retry"):
        client.set_retry(Retry(ExponentialBackoff(cap=0.5, base=0.05), REDIS_RETRIES))
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if isinstance(kwargs, dict):
        kwargs.setdefault("socket_connect_timeout", REDIS_TIMEOUT_SECONDS)
        if not kwargs.get("socket_timeout"):
            kwargs["socket_timeout"] = REDIS_TIMEOUT_SECONDS
