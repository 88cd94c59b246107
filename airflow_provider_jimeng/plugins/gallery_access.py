"""What the gallery may read: decided by the deployment (``[jimeng] gallery_storage``), never by a task.

Everything a task wrote (XCom values, ``records.json``) is untrusted on the API server: a DAG author,
a worker, or a user allowed to edit XComs through the REST API can write any URI there. So a URI a
task wrote is only a *candidate*: it is read only if, after a strict syntactic check (no ``..`` or
``.`` segment, no empty segment, no percent-encoding, backslash, control character, query or
fragment), it lies under a storage root the administrator listed, and it is read through the
connection the administrator named for that root. The connection id a task wrote is ignored.

``[jimeng] gallery_storage`` is a JSON object mapping a root URI (ending with ``/``) to a connection
id: ``{"s3://images/jimeng/": "aws_gallery"}``. In multi-team mode a DAG owned by a team is read with
that team's value only (``AIRFLOW__<TEAM>___JIMENG__GALLERY_STORAGE``), never the global one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SECTION = "jimeng"
OPTION = "gallery_storage"
#: Schemes a root may have. ``file`` only when listed explicitly; http, ftp, memory ... never.
ALLOWED_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss", "az", "file"})
#: Longest URI considered at all (S3 keys are at most 1024 bytes).
MAX_URI_CHARS = 2048
#: A client is rebuilt after this long, so rotated credentials and a changed connection are picked up.
CLIENT_TTL_SECONDS = 300.0

_SCHEME = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)
#: Anything that a decoder, a path library or a URL parser could read differently from a plain split.
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f%\\?#]")


@dataclass(frozen=True)
class StorageRoot:
    """A storage root the deployment allows the gallery to read, and the connection to read it with."""

    uri: str
    conn_id: str | None

    @property
    def scheme(self) -> str:
        return self.uri.partition("://")[0]

    def holds(self, uri: str) -> bool:
        """Whether ``uri`` (already normalised) is an object strictly under this root."""
        return uri.startswith(self.uri) and len(uri) > len(self.uri)


def normalise(uri: Any, *, root: bool = False) -> str | None:
    """``uri`` if it is a plain object URI (a root: a plain prefix ending with ``/``), else ``None``.

    Nothing is decoded or rewritten: a URI that would need it is refused, so the string checked is
    the string read.
    """
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_CHARS or _FORBIDDEN.search(uri):
        return None
    match = _SCHEME.match(uri)
    if match is None or match["scheme"] not in ALLOWED_SCHEMES:
        return None
    rest = match["rest"]
    if match["scheme"] == "file":
        if not rest.startswith("/"):  # file://host/... or file:relative
            return None
        rest = rest[1:]
    if root:
        if not rest.endswith("/"):
            return None
        rest = rest[:-1]
    segments = rest.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        return None
    return uri


def parse_roots(text: str | None) -> tuple[StorageRoot, ...]:
    """The roots of a ``gallery_storage`` value; an invalid value (or entry) allows nothing (logged)."""
    if not text or not text.strip():
        return ()
    try:
        document = json.loads(text)
    except ValueError:
        log.warning("JiMeng gallery: [%s] %s is not JSON: nothing is read", SECTION, OPTION)
        return ()
    if not isinstance(document, Mapping):
        log.warning("JiMeng gallery: [%s] %s is not a JSON object: nothing is read", SECTION, OPTION)
        return ()
    roots = []
    for uri, conn_id in document.items():
        checked = normalise(uri, root=True)
        if checked is None:
            log.warning("JiMeng gallery: storage root %r ignored (a plain URI ending with '/' is needed)", uri)
            continue
        if checked.startswith("file://"):
            roots.append(StorageRoot(checked, None))
        elif isinstance(conn_id, str) and conn_id.strip():
            roots.append(StorageRoot(checked, conn_id.strip()))
        else:
            log.warning("JiMeng gallery: storage root %r ignored (no connection id)", uri)
    return tuple(roots)


_parsed: dict[str, tuple[StorageRoot, ...]] = {}


def allowed_roots(team_name: str | None = None) -> tuple[StorageRoot, ...]:
    """The roots configured now (read at every request; parsing is cached by the value's text)."""
    from airflow.configuration import conf

    kwargs: dict[str, Any] = {"team_name": team_name} if team_name else {}
    text = str(conf.get(SECTION, OPTION, fallback="", **kwargs) or "")
    if text not in _parsed:
        if len(_parsed) > 64:
            _parsed.clear()
        _parsed[text] = parse_roots(text)
    return _parsed[text]


def root_of(uri: Any, roots: tuple[StorageRoot, ...]) -> tuple[str, StorageRoot] | None:
    """The normalised ``uri`` and the root allowing it (the longest), or ``None``: never read it."""
    checked = normalise(uri)
    if checked is None:
        return None
    holding = [root for root in roots if root.holds(checked)]
    if not holding:
        return None
    return checked, max(holding, key=lambda root: len(root.uri))


def local_path(uri: str, root: StorageRoot) -> str | None:
    """The real path of a ``file://`` object, if it (symlinks resolved) is a regular file under the root's real path."""
    root_path = os.path.realpath(root.uri.removeprefix("file://"))
    path = os.path.realpath(uri.removeprefix("file://"))
    if os.path.commonpath([root_path, path]) != root_path or path == root_path:
        return None
    return path if os.path.isfile(path) else None


# ------------------------------------------------------------------------------------------ clients
class ConnectionMissing(LookupError):
    """The root's connection does not exist: nothing is read (never a default credential chain)."""


_clients: dict[str, tuple[float, Any]] = {}
_clients_lock = threading.Lock()


def connection_exists(conn_id: str) -> bool:
    """Whether Airflow resolves ``conn_id`` (metadata DB, environment, secrets backend)."""
    from airflow.sdk import BaseHook

    try:
        BaseHook.get_connection(conn_id)
    except Exception:  # AirflowNotFoundException, or a secrets backend that cannot answer
        return False
    return True


def s3_client(conn_id: str) -> Any:
    """The boto3 S3 client of ``conn_id``: one per connection, reused by every request and thread."""
    now = time.monotonic()
    with _clients_lock:
        cached = _clients.get(conn_id)
        if cached is not None and now - cached[0] < CLIENT_TTL_SECONDS:
            return cached[1]
        if not connection_exists(conn_id):
            _clients.pop(conn_id, None)
            raise ConnectionMissing(conn_id)
        from airflow_provider_jimeng.storage.s3 import bounded_s3_hook

        client = bounded_s3_hook(conn_id).get_conn()  # a silent S3 holds a request seconds, not minutes
        _clients[conn_id] = (now, client)
        return client


def forget_clients() -> None:
    """Drop every cached client (tests; a changed connection is also picked up after :data:`CLIENT_TTL_SECONDS`)."""
    with _clients_lock:
        _clients.clear()
