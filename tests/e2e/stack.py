"""The Airflow stack the browser tests drive: processes on loopback, and their REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("JIMENG_E2E_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EMULATOR_API_KEY = "e2e-emulator-key"
STARTUP_TIMEOUT = 150.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class AirflowStack:
    """Processes started for one test session, each in its own process group so it stops whole."""

    home: Path
    api_port: int
    emulator_port: int
    env: dict[str, str]
    s3_port: int = 0
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def emulator_root(self) -> str:
        return f"http://127.0.0.1:{self.emulator_port}"

    @property
    def emulator_base_url(self) -> str:
        return f"{self.emulator_root}/api/v3"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def s3_client(self, *buckets: str) -> Any:
        """A boto3 client of the stack's S3 server, with ``buckets`` created if they are not there yet."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for bucket in buckets:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=bucket)
        return client

    def log_path(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        """Start ``python -m <args>`` as ``name`` (``env``: settings on top of the stack's, for this one)."""
        log = self.log_path(name).open("wb")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", *args],
            env={**self.env, **(env or {})},
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the API server and scheduler fork workers: stop the whole group
        )

    def run(self, name: str, *args: str, timeout: float = 120) -> None:
        with self.log_path(name).open("wb") as log:
            subprocess.run(
                [sys.executable, "-m", *args],
                env=self.env,
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=timeout,
            )

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # children outliving their parent (a uvicorn worker)
                os.killpg(process.pid, signal.SIGKILL)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name} ---\n{_tail(self.log_path(name))}" for name in self.processes)

    # ---------------------------------------------------------------------------------- REST API
    def healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.base_url}/api/v2/monitor/health", timeout=5) as response:
            health = json.load(response)
        return all(health[part]["status"] == "healthy" for part in ("metadatabase", "scheduler", "dag_processor"))

    def token(self) -> str:
        # SimpleAuthManager with all_admins hands out an admin token without credentials.
        with urllib.request.urlopen(f"{self.base_url}/auth/token", timeout=10) as response:
            return str(json.load(response)["access_token"])

    def api(self, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.base_url}/api/v2/{path}", headers={"Authorization": f"Bearer {self.token()}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def post(self, path: str, body: dict[str, Any], method: str = "POST") -> Any:
        request = urllib.request.Request(
            f"{self.base_url}/api/v2/{path}",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token()}", "Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def delete(self, path: str) -> None:
        request = urllib.request.Request(
            f"{self.base_url}/api/v2/{path}", headers={"Authorization": f"Bearer {self.token()}"}, method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=30):
            pass

    def task_api(self, dag_id: str, run_id: str, task_id: str, path: str = "") -> Any:
        return self.api(f"dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}{path}")

    def wait_for(self, what: str, check: Any, timeout: float, interval: float = 1.0) -> Any:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}\n{self.diagnostics()}")
            try:
                result = check()
                if result:
                    return result
            except (OSError, urllib.error.URLError, KeyError, ValueError) as error:
                last_error = error
            time.sleep(interval)
        raise TimeoutError(f"{what} not within {timeout:.0f} s (last error: {last_error})\n{self.diagnostics()}")


def stack_env(home: Path, api_port: int, s3_port: int = 0) -> dict[str, str]:
    # Start from the shell's environment without the unit tests' Airflow settings and connections.
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("AIRFLOW") and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    base_url = f"http://127.0.0.1:{api_port}"
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__API__BASE_URL": base_url,
            "AIRFLOW__API__WORKERS": "1",
            # Throwaway secrets for a loopback-only server that lives for one test session.
            "AIRFLOW__API__SECRET_KEY": os.urandom(32).hex(),
            "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(64).hex(),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    if s3_port:
        # moto's S3 server: the content pipeline stores there, and the gallery reads it back through
        # the same connection on the API server.
        env["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": f"http://127.0.0.1:{s3_port}", "region_name": "us-east-1"},
            }
        )
        # The deployment allows the gallery to read the e2e bucket (nothing is read otherwise).
        env["AIRFLOW__JIMENG__GALLERY_STORAGE"] = json.dumps({"s3://jimeng-gallery-e2e/": "aws_default"})
    return env
