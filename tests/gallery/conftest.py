"""The gallery over Airflow's real API server app, reading what real ``dag.test()`` runs stored.

One API server app (``airflow.api_fastapi.app.create_app``, which loads the provider's plugin
through its entry point) serves every test; each module runs its DAG once against the emulator
and moto's S3 server, then only reads. Users come from :class:`RestrictedAuthManager`, Airflow's
``SimpleAuthManager`` with one user, ``outsider``, who may read no JiMeng test DAG.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.testing import AWS_REGION, S3Server, aws_connection_json, jimeng_connection_json
from tests.dag_runs import read_xcom, run_dag_test
from tests.gallery.auth import RestrictedAuthManager
from tests.gallery.roots import ALLOWED_ROOTS, GALLERY_STORAGE_ENV, register_root
from tests.operators.conftest import _DECLARED_PARAMS


@dataclass
class Gallery:
    """A client of the API server app, with a JWT per user."""

    client: Any
    tokens: dict[str, str]
    manager: RestrictedAuthManager

    def get(self, path: str, user: str | None = "reader", **params: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return self.client.get(f"/jimeng/{path}", params=params, headers=headers)


@pytest.fixture(scope="session")
def gallery(airflow_db: None) -> Iterator[Gallery]:
    from airflow.api_fastapi.app import create_app, get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi.testclient import TestClient

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(
            "AIRFLOW__CORE__AUTH_MANAGER", f"{RestrictedAuthManager.__module__}.{RestrictedAuthManager.__qualname__}"
        )
        # Sheets on (off by default): the shared app serves them, and the page points stored thumbnails at them.
        patch.setenv("AIRFLOW__JIMENG__GALLERY_SHEETS", "True")
        users = "reader:viewer,outsider:viewer,noxcom:viewer,editor:user"
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", users)
        # A key of the length HS512 wants (the generated default is short and warns on every token).
        patch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_hex(32))
        app = create_app("core")
        manager = get_auth_manager()
        assert isinstance(manager, RestrictedAuthManager)
        tokens = {
            name: manager.generate_jwt(SimpleAuthManagerUser(username=name, role=role))
            for name, role in (("reader", "viewer"), ("outsider", "viewer"), ("editor", "user"), ("noxcom", "viewer"))
        }
        with TestClient(app) as client:
            yield Gallery(client=client, tokens=tokens, manager=manager)


@dataclass
class StoredRun:
    """A finished DAG run whose task stored its images in a bucket of the S3 server."""

    dag_id: str
    run_id: str
    bucket: str
    s3: Any

    def xcom(self, task_id: str, key: str, map_index: int = -1) -> Any:
        return read_xcom(self.dag_id, self.run_id, task_id, key, map_index)


@pytest.fixture(scope="session")
def store_run(airflow_db: None, s3_server: S3Server) -> Iterator[Callable[..., StoredRun]]:
    """Run a DAG once with the emulator and a new bucket; ``aws_default`` stays pointed at the S3 server."""
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=AWS_REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    with pytest.MonkeyPatch.context() as patch, JiMengEmulator() as emulator:
        patch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(emulator.base_url, max_retries=0))
        patch.setenv("AIRFLOW_CONN_AWS_DEFAULT", aws_connection_json(s3_server.endpoint_url))
        patch.setenv(GALLERY_STORAGE_ENV, json.dumps(ALLOWED_ROOTS))  # restored when the session ends

        def run(dag: Any, **conf: Any) -> StoredRun:
            bucket = f"jimeng-gallery-{uuid.uuid4().hex[:12]}"
            s3.create_bucket(Bucket=bucket)
            register_root(f"s3://{bucket}/", "aws_default")
            declared = _DECLARED_PARAMS.setdefault(dag.dag_id, dag.params.dump())
            dagrun = run_dag_test(dag, run_conf={**declared, **conf, "bucket": bucket})
            assert str(dagrun.state) == "success"
            return StoredRun(dag_id=dag.dag_id, run_id=dagrun.run_id, bucket=bucket, s3=s3)

        yield run
