"""One Redis client per connection id and process, through the redis provider's ``RedisHook``.

A Redis that accepts connections and never answers costs a command at most about
``(REDIS_RETRIES + 1) * REDIS_TIMEOUT_SECONDS`` (4 s), and ``on_kill`` ends a command waiting on it at
once (:func:`interrupt_shared_redis`); both users (the limiter, the shared journals) have a fallback.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import TYPE_CHECKING

from airflow_provider_jimeng.connections import missing_connection
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.version_compat import AirflowNotFoundException

if TYPE_CHECKING:
    from redis import Redis

#: Per command: the limiter's script and a journal write are small, so a slower answer means trouble.
REDIS_TIMEOUT_SECONDS = 2.0
#: Retries of a failed command (a dropped connection is common and cheap to redo); then the caller's fallback.
REDIS_RETRIES = 1

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
                raise missing_connection("redis_conn_id", redis_conn_id) from None
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
        # Always: the redis provider offers no extra for them, and redis-py 8 defaults both to 5 s.
        kwargs["socket_connect_timeout"] = REDIS_TIMEOUT_SECONDS
        kwargs["socket_timeout"] = REDIS_TIMEOUT_SECONDS


def interrupt_shared_redis() -> None:
    """End every command waiting on a shared Redis at once, with a ``ConnectionError`` (``on_kill``).

    A blocked socket read cannot be interrupted from another thread except by shutting the socket
    down; retries are turned off first, so the command fails instead of reconnecting to the Redis that
    does not answer. The clients are dropped: a later :func:`shared_redis` builds fresh ones.
    """
    with _lock:
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        retry = client.get_retry() if hasattr(client, "get_retry") else None
        if retry is not None:
            retry.update_retries(0)
        pool = client.connection_pool
        for connection in list(getattr(pool, "_in_use_connections", ())):
            own_retry = getattr(connection, "retry", None)
            if own_retry is not None:
                own_retry.update_retries(0)
            sock = getattr(connection, "_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
