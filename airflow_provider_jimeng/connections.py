"""Named connections: one that does not exist is a configuration error, never a silent default.

Airflow's lookup raises ``AirflowNotFoundException``, which Airflow retries, and the amazon provider
swallows it and falls back to the worker's ambient credentials (images then land in another account's
bucket, or fail after they were paid for). Every connection this provider names (``jimeng_conn_id``,
``aws_conn_id``, ``output_conn_id``, the ``redis_conn_id`` extra) is looked up here first, before any
request: a typo fails the task at once, without retries, naming the parameter.
"""

from __future__ import annotations

from typing import Any

from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.version_compat import AirflowNotFoundException, BaseHook


def missing_connection(parameter: str, conn_id: str) -> JiMengConfigurationError:
    """The error for a named connection that is not defined (not retried: every try would look in vain)."""
    return JiMengConfigurationError(
        parameter,
        f"connection {conn_id!r} is not defined; nothing was sent. Allowed: the id of a connection "
        "defined in the metadata database, a secrets backend or an AIRFLOW_CONN_* variable",
    )


def get_connection(parameter: str, conn_id: str) -> Any:
    """The connection ``conn_id`` (named by ``parameter``), or :func:`missing_connection`'s error."""
    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise missing_connection(parameter, conn_id) from None
