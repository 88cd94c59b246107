"""The deployment's ``[jimeng] gallery_storage`` in the gallery tests.

A module of its own: pytest imports the conftest twice (as ``conftest`` and by its dotted path).
"""

from __future__ import annotations

import json
import os

import pytest

#: ``[jimeng] gallery_storage`` as an environment variable (read by the app at every request).
GALLERY_STORAGE_ENV = "AIRFLOW__JIMENG__GALLERY_STORAGE"
#: The roots every stored run's bucket adds (read through ``aws_default``, the S3 server's connection).
ALLOWED_ROOTS: dict[str, str | None] = {}


def allow(monkeypatch: pytest.MonkeyPatch, roots: dict[str, str | None]) -> None:
    """Set the deployment's ``[jimeng] gallery_storage`` for one test."""
    monkeypatch.setenv(GALLERY_STORAGE_ENV, json.dumps(roots))


def register_root(uri: str, conn_id: str | None) -> None:
    """Allow ``uri`` for the rest of the session (the default every test starts from)."""
    ALLOWED_ROOTS[uri] = conn_id
    os.environ[GALLERY_STORAGE_ENV] = json.dumps(ALLOWED_ROOTS)
