"""The review step over Airflow's real API server app: the gallery tests' app, users and S3 server."""

from __future__ import annotations

from tests.gallery.conftest import gallery  # noqa: F401  (a fixture: the API server app and a JWT per user)
