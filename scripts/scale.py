"""`make scale`: the CeleryExecutor proof (docs/scaling.md, "The proof: make scale").

On loopback, in a temporary directory, from what the project's own files install (the `scale` extra,
Debian's redis-server and postgresql), it starts PostgreSQL (metadata DB and Celery result backend),
Redis (Celery broker and the jimeng shared store), the emulator with a token-bucket rate limit, moto's
S3 server, and Airflow: api-server, scheduler, dag-processor and two Celery workers. It runs the
mapped example and a run that asks for more than the rate cap, SIGKILLs one worker mid-run, restarts
it, and checks what docs/scaling.md promises: tasks ran on both workers, the pool held, every image
is stored, billed minus stored is within what docs/faults.md admits for a crash, the cap held, every
run succeeded. It tears down only the process groups it started, also on failure or Ctrl-C, and
writes its numbers to a JSON report.

    python scripts/scale.py [--keep] [--report scale-output/report.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from airflow_provider_jimeng.testing import (  # noqa: E402 - after the path is set
    aws_connection_json,
    jimeng_connection_json,
    redis_connection_json,
)

MAPPED_DAG = "jimeng_mapped_generation"
RATE_CAP_DAG = "jimeng_scale_rate_cap"
#: The images each DAG stores: 6 scenes and 3 banners; 4 mapped instances of 36 prompts (more than CAP).
EXPECTED_IMAGES = {MAPPED_DAG: 9, RATE_CAP_DAG: 144}
BUCKET = "jimeng-scale"
POOL, POOL_SLOTS = "jimeng", 4
MAX_CONCURRENCY = 4  # the rate-cap DAG's, per task
CAP, BURST, LATENCY = 120, 8, 1.0  # the emulator: images a minute, token bucket, seconds per image
HEARTBEAT_TIMEOUT = 30  # [scheduler] task_instance_heartbeat_timeout (Airflow's default: 300 s)
WORKERS = ("w1", "w2")


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, condition: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll ``condition`` until it returns something true; errors count as not yet (the last is reported)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception as error:
            last_error = error
        else:
            if result:
                return result
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last error: {last_error!r})")


# -- processes: each in its own session, so a process group is ours to signal ---------------------


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM


@dataclass
class Services:
    """Every process this script started, each the leader of its own session and process group."""

    logs: Path
    running: dict[str, Service] = field(default_factory=dict)

    def start(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        *,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Service:
        log_path = self.logs / f"{name}.log"
        with log_path.open("ab") as output:
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                group=pwd.getpwnam(user).pw_gid if user else None,
                extra_groups=[] if user else None,
            )
        service = self.running[name] = Service(name, process, log_path, stop_signal)
        return service

    def kill(self, name: str) -> None:
        """SIGKILL a service's whole session (a Celery worker: main process, pool children, task processes)."""
        service = self.running.pop(name)
        _signal_session(service.process.pid, signal.SIGKILL)
        service.process.wait()

    def stop_all(self, grace: float = 15.0) -> None:
        """Airflow and the emulators first, the stores they write to last (no errors from a vanished DB)."""
        stores = ("redis", "postgres")
        self._stop([s for s in self.running.values() if s.name not in stores], grace)
        self._stop([s for s in self.running.values() if s.name in stores], grace)
        self.running.clear()

    @staticmethod
    def _stop(services: list[Service], grace: float) -> None:
        for service in services:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, service.stop_signal)
        deadline = time.monotonic() + grace
        for service in services:
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        for service in services:
            _signal_session(service.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.process.wait(timeout=5)


def _session_members(session_id: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # Fields after the command name (which may hold spaces): state ppid pgrp session ...
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session_id:
                    members.append(int(entry.name))
    return members


def _signal_session(session_id: int, signum: int) -> None:
    """Signal the process group, then any member of the session that left it (none of it is foreign)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session_id, signum)
    for pid in _session_members(session_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


# -- the services -----------------------------------------------------------------------------------


def postgres_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise SystemExit("PostgreSQL is not installed: apt-get install postgresql (make scale does it)")
    return Path(initdb).parent


def postgres_user() -> str | None:
    """PostgreSQL refuses to run as root: run it as `postgres` (or `nobody`) when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise SystemExit("running as root and no `postgres` or `nobody` user to run PostgreSQL as")


def start_postgres(services: Services, root: Path, port: int) -> str:
    """initdb into the temp dir, serve on 127.0.0.1 only (no Unix socket), create the `airflow` database."""
    bin_dir, user = postgres_bin(), postgres_user()
    data = root / "pgdata"
    data.mkdir(mode=0o700)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(data, entry.pw_uid, entry.pw_gid)
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8"]
    subprocess.run(
        initdb,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        user=user,
        group=pwd.getpwnam(user).pw_gid if user else None,
        extra_groups=[] if user else None,
    )
    server = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
    for setting in (
        "listen_addresses=127.0.0.1",
        "unix_socket_directories=",
        "max_connections=200",
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
    ):
        server += ["-c", setting]
    services.start("postgres", server, env, user=user, stop_signal=signal.SIGINT)  # SIGINT: fast shutdown

    def create_database() -> bool:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="airflow", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:  # not `with connection`: that opens a transaction
            cursor.execute("CREATE DATABASE airflow")
        connection.close()
        return True

    wait_until("PostgreSQL accepts connections", create_database, timeout=60)
    return f"postgresql+psycopg2://airflow@127.0.0.1:{port}/airflow"


def start_redis(services: Services, root: Path, port: int) -> None:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise SystemExit("redis-server is not installed: apt-get install redis-server (make scale does it)")
    (root / "redis").mkdir()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    services.start("redis", [*command, "--dir", str(root / "redis")], dict(os.environ))
    wait_until("Redis answers", lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 30)


def start_emulator(services: Services, port: int) -> str:
    command = [sys.executable, "-m", "airflow_provider_jimeng.emulator", "--port", str(port)]
    command += ["--latency", str(LATENCY), "--images-per-minute", str(CAP), "--rate-limit-burst", str(BURST)]
    services.start("emulator", command, dict(os.environ))
    root_url = f"http://127.0.0.1:{port}"
    wait_until("the emulator answers", lambda: http_json(f"{root_url}/healthz"), 60)
    return root_url


def start_s3(services: Services, port: int) -> str:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    services.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env)
    endpoint = f"http://127.0.0.1:{port}"
    wait_until("moto's S3 server answers", lambda: s3_client(endpoint).create_bucket(Bucket=BUCKET), 60)
    return endpoint


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def http_json(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


# -- Airflow -------------------------------------------------------------------------------------


@dataclass
class Ports:
    postgres: int = field(default_factory=free_port)
    redis: int = field(default_factory=free_port)
    emulator: int = field(default_factory=free_port)
    s3: int = field(default_factory=free_port)
    api: int = field(default_factory=free_port)
    worker_logs: dict[str, int] = field(default_factory=lambda: {name: free_port() for name in WORKERS})


def pacing_extras(pacing: str) -> dict[str, Any]:
    """The jimeng connection's pacing extras: ``shared`` is the account-wide limiter on the shared Redis
    (which also keeps the journals a retry on the other worker reads); ``static`` divides the cap by the
    pool's slots, with no shared store (docs/scaling.md); ``none`` paces nothing (the emulator's 429s do)."""
    shared = {"redis_conn_id": "redis_shared", "account_images_per_minute": CAP}
    return {
        "static": {"max_images_per_minute": CAP // POOL_SLOTS},
        "shared": shared,
        "none": {},
    }[pacing]


def airflow_env(
    root: Path, ports: Ports, database: str, emulator_url: str, s3_endpoint: str, pacing: str
) -> dict[str, str]:
    """The environment every Airflow process shares: the Celery setup, the connections, quick crash detection."""
    redis_url = f"redis://127.0.0.1:{ports.redis}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(root / "airflow"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{ports.api}/execution/",
            # Both workers run on this machine: a per-worker host name tells their task instances apart.
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "scale_hostname.hostname",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{ports.api}",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database,
            # SQLAlchemy 2.1 has no default PostgreSQL driver: the result backend names psycopg2 too.
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database}",
            # The broker in database 1, apart from the jimeng shared store (redis_shared, database 0).
            "AIRFLOW__CELERY__BROKER_URL": f"{redis_url}/1",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "3",
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "5",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "pylib"), env.get("PYTHONPATH")])),
            "AIRFLOW_CONN_JIMENG_DEFAULT": jimeng_connection_json(f"{emulator_url}/api/v3", **pacing_extras(pacing)),
            "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_json(s3_endpoint),
            "AIRFLOW_CONN_REDIS_SHARED": redis_connection_json(f"{redis_url}/0"),
        }
    )
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def prepare_airflow_home(root: Path) -> None:
    (root / "airflow").mkdir()
    dags = root / "dags"
    dags.mkdir()
    shutil.copy(REPO / "dags_examples" / f"{MAPPED_DAG}.py", dags)
    shutil.copy(REPO / "scripts" / "scale_dags" / f"{RATE_CAP_DAG}.py", dags)
    (root / "pylib").mkdir()
    (root / "pylib" / "scale_hostname.py").write_text(
        "import os, socket\n\n\ndef hostname():\n    return os.environ.get('JIMENG_SCALE_HOST') or socket.getfqdn()\n"
    )


def airflow(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    command = [str(Path(sys.executable).parent / "airflow"), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args[:2])} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def start_worker(services: Services, env: dict[str, str], name: str, log_port: int) -> None:
    worker_env = {
        **env,
        "JIMENG_SCALE_HOST": f"{name}.scale",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
    }
    command = [str(Path(sys.executable).parent / "airflow"), "celery", "worker", "--celery-hostname", f"{name}@%h"]
    services.start(f"worker-{name}", [*command, "--concurrency", "4", "--without-mingle"], worker_env)


def worker_ready(services: Services, name: str) -> bool:
    service = services.running[f"worker-{name}"]
    if service.process.poll() is not None:
        raise RuntimeError(f"worker {name} exited: see {service.log_path}")
    return " ready." in service.log_path.read_text(errors="replace")


def start_airflow(services: Services, env: dict[str, str], ports: Ports) -> None:
    binary = str(Path(sys.executable).parent / "airflow")
    services.start("api-server", [binary, "api-server", "--host", "127.0.0.1", "--port", str(ports.api)], env)
    services.start("scheduler", [binary, "scheduler"], env)
    services.start("dag-processor", [binary, "dag-processor"], env)
    for name in WORKERS:
        start_worker(services, env, name, ports.worker_logs[name])
    wait_until("the api-server answers", lambda: http_json(f"http://127.0.0.1:{ports.api}/api/v2/version"), 180)
    for name in WORKERS:
        wait_until(f"Celery worker {name} is ready", lambda name=name: worker_ready(services, name), 180)


# -- the metadata DB, read directly -------------------------------------------------------------------


class MetadataDB:
    def __init__(self, port: int) -> None:
        import psycopg2

        self._connection = psycopg2.connect(host="127.0.0.1", port=port, user="airflow", dbname="airflow")
        self._connection.autocommit = True

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with self._connection.cursor() as cursor:
            cursor.execute(query, params)
            return list(cursor.fetchall())

    def close(self) -> None:
        self._connection.close()


def dags_serialized(db: MetadataDB) -> bool:
    found = db.rows("SELECT DISTINCT dag_id FROM serialized_dag WHERE dag_id IN (%s, %s)", MAPPED_DAG, RATE_CAP_DAG)
    return len(found) == 2


def run_states(db: MetadataDB, run_ids: dict[str, str]) -> dict[str, str]:
    rows = db.rows("SELECT dag_id, run_id, state FROM dag_run WHERE run_id IN %s", tuple(run_ids.values()))
    return {dag_id: state for dag_id, _, state in rows}


def pool_occupancy(db: MetadataDB) -> tuple[int, int]:
    """(running, running + queued) in the pool now: what Airflow counts against its slots."""
    rows = db.rows(
        "SELECT state, sum(pool_slots) FROM task_instance WHERE pool = %s AND state IN ('running', 'queued') "
        "GROUP BY state",
        POOL,
    )
    counts = {state: int(total) for state, total in rows}
    return counts.get("running", 0), counts.get("running", 0) + counts.get("queued", 0)


def running_on(db: MetadataDB, dag_id: str) -> dict[str, list[str]]:
    rows = db.rows(
        "SELECT hostname, task_id || '[' || map_index || ']' FROM task_instance "
        "WHERE dag_id = %s AND state = 'running' AND hostname <> ''",
        dag_id,
    )
    hosts: dict[str, list[str]] = {}
    for hostname, task in rows:
        hosts.setdefault(hostname.split(".")[0], []).append(task)
    return hosts


def all_tries(db: MetadataDB, run_ids: dict[str, str]) -> list[dict[str, Any]]:
    """Every try of every task instance of the runs: the current ones and task_instance_history."""
    columns = "dag_id, task_id, map_index, try_number, hostname, state, pool, pool_slots, start_date, end_date"
    query = f"SELECT {columns} FROM {{table}} WHERE run_id IN %s"
    rows = db.rows(query.format(table="task_instance"), tuple(run_ids.values()))
    rows += db.rows(query.format(table="task_instance_history"), tuple(run_ids.values()))
    names = [name.strip() for name in columns.split(",")]
    return [dict(zip(names, row, strict=False)) for row in rows]


def peak_overlap(tries: list[dict[str, Any]], now: Any) -> int:
    """The most pool slots held at once, from every try's start and end (a dead try holds its slot until failed)."""
    events: list[tuple[Any, int]] = []
    for entry in tries:
        if entry["pool"] == POOL and entry["start_date"] is not None:
            events.append((entry["start_date"], entry["pool_slots"]))
            events.append((entry["end_date"] or now, -entry["pool_slots"]))
    peak = held = 0
    for _, change in sorted(events, key=lambda event: (event[0], event[1])):
        held += change
        peak = max(peak, held)
    return peak


def usage_xcoms(db: MetadataDB, run_ids: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The ``usage`` XCom of every generation task instance of the runs, by ``task[map_index]``."""
    rows = db.rows(
        "SELECT dag_id, task_id, map_index, value FROM xcom WHERE run_id IN %s AND key = 'usage'",
        tuple(run_ids.values()),
    )
    found = {}
    for dag_id, task_id, map_index, value in rows:
        usage = json.loads(value) if isinstance(value, str) else value
        if isinstance(usage, dict):
            found[f"{dag_id}.{task_id}[{map_index}]"] = usage
    return found


def usage_over_tries(usages: dict[str, dict[str, Any]], killed_tasks: list[str]) -> dict[str, Any]:
    """What the ``usage`` XComs add up to, and how many tries each killed task's retry summed."""
    totals = {
        name: sum(int(usage.get(name) or 0) for usage in usages.values())
        for name in ("generated_images", "possibly_billed_images", "attempts", "rate_limited", "retries")
    }
    tries_of_killed = {
        task: usage.get("tries") for task in killed_tasks for key, usage in usages.items() if key.endswith(f".{task}")
    }
    return {"task_instances": len(usages), **totals, "tries_summed_by_killed_tasks": tries_of_killed}


# -- the proof -----------------------------------------------------------------------------------------


@dataclass
class Observations:
    pool_running_max: int = 0
    pool_claimed_max: int = 0
    samples: int = 0
    killed: dict[str, Any] = field(default_factory=dict)


def trigger_runs(env: dict[str, str]) -> dict[str, str]:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    run_ids = {MAPPED_DAG: f"scale_mapped_{stamp}", RATE_CAP_DAG: f"scale_rate_cap_{stamp}"}
    conf = {MAPPED_DAG: {"bucket": BUCKET, "prefix": "mapped"}, RATE_CAP_DAG: {"bucket": BUCKET, "prefix": "rate-cap"}}
    for dag_id, run_id in run_ids.items():
        airflow(env, "dags", "trigger", dag_id, "--run-id", run_id, "--conf", json.dumps(conf[dag_id]))
    return run_ids


def kill_busiest_worker(services: Services, hosts: dict[str, list[str]], stats: dict[str, Any]) -> dict[str, Any]:
    """SIGKILL the worker running the most rate-cap tasks; what it ran and what was in flight, for the report."""
    victim = max(hosts, key=lambda host: len(hosts[host]))
    services.kill(f"worker-{victim}")
    log(f"SIGKILLed worker {victim} running {hosts[victim]} ({stats['in_flight']} requests in flight)")
    return {
        "worker": victim,
        "tasks": hosts[victim],
        "requests_in_flight_at_kill": stats["in_flight"],
        "billed_images_at_kill": stats["billed_images"],
        "at": time.time(),
    }


def watch(
    db: MetadataDB,
    services: Services,
    env: dict[str, str],
    ports: Ports,
    emulator_url: str,
    run_ids: dict[str, str],
    timeout: float,
) -> Observations:
    """Sample the pool until the runs finish; kill a worker mid-run and restart it 5 s later."""
    seen = Observations()
    deadline = time.monotonic() + timeout
    restart_at: float | None = None
    generating_since: float | None = None
    while time.monotonic() < deadline:
        running, claimed = pool_occupancy(db)
        seen.pool_running_max = max(seen.pool_running_max, running)
        seen.pool_claimed_max = max(seen.pool_claimed_max, claimed)
        seen.samples += 1
        if not seen.killed:
            hosts = running_on(db, RATE_CAP_DAG)
            if hosts and generating_since is None:
                generating_since = time.monotonic()
            stats = http_json(f"{emulator_url}/_emulator/stats")
            # Mid-run: both workers generating (or, should Celery give every task to one worker, that one
            # after 20 s; the other then takes the retries), some images paid, requests in flight.
            lopsided = generating_since is not None and time.monotonic() - generating_since > 20
            if hosts and (len(hosts) == 2 or lopsided) and stats["billed_images"] >= 12 and stats["in_flight"] > 0:
                seen.killed = kill_busiest_worker(services, hosts, stats)
                restart_at = time.monotonic() + 5
        if restart_at is not None and time.monotonic() >= restart_at:
            victim = seen.killed["worker"]
            start_worker(services, env, victim, ports.worker_logs[victim])
            log(f"restarted worker {victim}")
            restart_at = None
        states = run_states(db, run_ids)
        if len(states) == 2 and all(state in ("success", "failed") for state in states.values()):
            return seen
        time.sleep(0.5)
    raise TimeoutError(f"the DAG runs did not finish within {timeout:.0f} s: {run_states(db, run_ids)}")


def stored_images(endpoint: str) -> dict[str, Any]:
    client = s3_client(endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys += [item["Key"] for item in page.get("Contents", [])]
    images = [key for key in keys if key.endswith((".jpeg", ".png"))]
    request_ids: dict[str, int] = {}
    for key in images:
        request_id = client.head_object(Bucket=BUCKET, Key=key)["Metadata"].get("jimeng-request-id", "")
        request_ids[request_id] = request_ids.get(request_id, 0) + 1
    per_dag = {dag_id: sum(f"/{dag_id}/" in f"/{key}" for key in images) for dag_id in EXPECTED_IMAGES}
    # Each task instance's records.json lists the images of its finished prompts: together, every image.
    recorded = set()
    for key in keys:
        if key.endswith("records.json"):
            records = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
            recorded |= {image["key"] for prompt in records["prompts"] for image in prompt["images"]}
    return {
        "images": len(images),
        "per_dag": per_dag,
        "journals_left": sum("/_pending/" in key for key in keys),
        "records_files": sum(key.endswith("records.json") for key in keys),
        "recorded_images": len(recorded),
        "stored_but_not_recorded": len(set(images) - recorded),
        "request_ids": request_ids,
    }


def retries_after_kill(tries: list[dict[str, Any]], killed: dict[str, Any]) -> list[dict[str, Any]]:
    """For each task of the killed worker: where its next try ran, and how long after the kill it started."""
    if not killed:
        return []
    retries = []
    for task in killed["tasks"]:
        task_id, map_index = task.rstrip("]").split("[")
        later = [
            entry
            for entry in tries
            if entry["dag_id"] == RATE_CAP_DAG
            and entry["task_id"] == task_id
            and entry["map_index"] == int(map_index)
            and entry["start_date"] is not None
            and entry["start_date"].timestamp() > killed["at"]
        ]
        if later:
            first = min(later, key=lambda entry: entry["start_date"])
            retries.append(
                {
                    "task": task,
                    "try_number": first["try_number"],
                    "worker": (first["hostname"] or "").split(".")[0],
                    "seconds_after_kill": round(first["start_date"].timestamp() - killed["at"], 1),
                }
            )
    return retries


def peak_images_per_minute(entries: list[dict[str, Any]]) -> int:
    """The most images billed in any 60 s window, from the ledger's billing times."""
    times = sorted((entry["billed_at"], entry["images"]) for entry in entries)
    peak = held = start = 0
    for end in range(len(times)):
        held += times[end][1]
        while times[end][0] - times[start][0] >= 60:
            held -= times[start][1]
            start += 1
        peak = max(peak, held)
    return peak


def evaluate(
    db: MetadataDB, emulator_url: str, s3_endpoint: str, run_ids: dict[str, str], seen: Observations, pacing: str
) -> dict[str, Any]:
    import datetime

    tries = all_tries(db, run_ids)
    ledger = http_json(f"{emulator_url}/_emulator/ledger")
    stats = http_json(f"{emulator_url}/_emulator/stats")
    stored = stored_images(s3_endpoint)
    billed = ledger["billed_images"]
    not_stored = sum(e["images"] for e in ledger["entries"] if e["request_id"] not in stored["request_ids"])
    entries = ledger["entries"]
    span = max(e["billed_at"] for e in entries) - min(e["billed_at"] for e in entries) if entries else 0.0
    hosts = sorted({(t["hostname"] or "").split(".")[0] for t in tries if t["hostname"]})
    killed_tasks = len(seen.killed.get("tasks", []))
    retries = retries_after_kill(tries, seen.killed)
    usage = usage_over_tries(usage_xcoms(db, run_ids), list(seen.killed.get("tasks", [])))
    report: dict[str, Any] = {
        "runs": run_states(db, run_ids),
        "task_tries": len(tries),
        "failed_tries": sum(t["state"] == "failed" for t in tries),
        "tries_per_worker": {h: sum((t["hostname"] or "").startswith(f"{h}.") for t in tries) for h in hosts},
        "killed": seen.killed,
        "retries_after_kill": retries,
        "pool": {
            "slots": POOL_SLOTS,
            "running_max_sampled": seen.pool_running_max,
            "running_plus_queued_max_sampled": seen.pool_claimed_max,
            "held_max_from_try_times": peak_overlap(tries, datetime.datetime.now(datetime.timezone.utc)),
            "samples": seen.samples,
        },
        "images": {
            "expected": sum(EXPECTED_IMAGES.values()),
            "stored": stored["images"],
            "stored_per_dag": stored["per_dag"],
            "billed": billed,
            "billed_minus_stored": billed - stored["images"],
            "billed_not_stored_by_request_id": not_stored,
            "undelivered": ledger["undelivered_images"],
            "allowed_loss": 2 * MAX_CONCURRENCY * killed_tasks,
            "journals_left_in_s3": stored["journals_left"],
            "records_files": stored["records_files"],
            "recorded_in_records_json": stored["recorded_images"],
        },
        "rate": {
            "cap_images_per_minute": CAP,
            # What the rate-cap DAG would ask for unpaced: every slot's requests back to back.
            "demand_unpaced_images_per_minute": round(POOL_SLOTS * MAX_CONCURRENCY * 60 / LATENCY),
            "burst": BURST,
            "peak_images_in_any_60s": peak_images_per_minute(entries),
            "mean_images_per_minute": round(billed * 60 / span, 1) if span else None,
            "generation_requests": stats["request_count"],
            "rate_limited_429": stats["rate_limited"],
            "peak_requests_in_flight": stats["peak_in_flight"],
        },
        # The usage XComs sum every try: a killed try counts up to its last journal batch (docs/faults.md).
        "usage_xcoms": usage,
    }
    report["checks"] = {
        "all_runs_succeeded": all(state == "success" for state in report["runs"].values()) and len(report["runs"]) == 2,
        "tasks_ran_on_both_workers": set(WORKERS) <= set(hosts),
        "a_worker_was_killed_mid_run": bool(seen.killed),
        "pool_held": max(seen.pool_running_max, seen.pool_claimed_max, report["pool"]["held_max_from_try_times"])
        <= POOL_SLOTS,
        "every_image_stored": stored["images"] == report["images"]["expected"] and stored["per_dag"] == EXPECTED_IMAGES,
        "billed_minus_stored_within_crash_bound": 0 <= billed - stored["images"] <= report["images"]["allowed_loss"],
        # The emulator enforces the cap, so the peak can never exceed it: what shows the clients kept to it
        # is that it never had to answer 429 (unless the run is unpaced on purpose).
        "rate_cap_held": report["rate"]["peak_images_in_any_60s"] <= CAP + BURST
        and (pacing == "none" or stats["rate_limited"] == 0),
        # The usage XComs sum every try: they match the emulator's own counts of images billed, requests
        # and 429s, short at most by what the killed tries did after their last journal batch (a try
        # killed before its first answer leaves nothing to sum): the crash bound again.
        "usage_counts_every_try": len(usage["tries_summed_by_killed_tasks"]) == killed_tasks
        and all(tries in (1, 2) for tries in usage["tries_summed_by_killed_tasks"].values())
        and all(
            0 <= emulator - counted <= report["images"]["allowed_loss"]
            for emulator, counted in (
                (billed, usage["generated_images"] + usage["possibly_billed_images"]),
                (stats["request_count"], usage["attempts"]),
                (stats["rate_limited"], usage["rate_limited"]),
            )
        ),
    }
    return report


def print_report(report: dict[str, Any]) -> None:
    images, rate, pool = report["images"], report["rate"], report["pool"]
    log(f"runs: {report['runs']}; task tries {report['task_tries']} ({report['failed_tries']} failed)")
    log(
        f"tries per worker: {report['tries_per_worker']}; killed: {report['killed'].get('worker')} "
        f"running {report['killed'].get('tasks')}"
    )
    log(
        f"pool {pool['slots']} slots: running max {pool['running_max_sampled']}, running+queued max "
        f"{pool['running_plus_queued_max_sampled']}, held max from try times {pool['held_max_from_try_times']}"
    )
    log(
        f"images: expected {images['expected']}, stored {images['stored']}, billed {images['billed']} "
        f"(billed - stored {images['billed_minus_stored']}, allowed {images['allowed_loss']}, "
        f"undelivered {images['undelivered']}, journals left {images['journals_left_in_s3']}, "
        f"{images['recorded_in_records_json']} in {images['records_files']} records.json)"
    )
    log(
        f"rate: cap {rate['cap_images_per_minute']}/min (+{rate['burst']} burst), "
        f"peak {rate['peak_images_in_any_60s']} in any 60 s, mean {rate['mean_images_per_minute']}/min, "
        f"{rate['rate_limited_429']} 429s of {rate['generation_requests']} requests, "
        f"peak {rate['peak_requests_in_flight']} in flight"
    )
    usage = report["usage_xcoms"]
    log(
        f"usage XComs of {usage['task_instances']} task instances: {usage['generated_images']} images billed "
        f"(+{usage['possibly_billed_images']} possibly), {usage['attempts']} attempts, {usage['rate_limited']} 429s, "
        f"{usage['retries']} retries; tries summed by the killed tasks' retries {usage['tries_summed_by_killed_tasks']}"
    )
    for retry in report["retries_after_kill"]:
        log(
            f"retry of {retry['task']}: try {retry['try_number']} on {retry['worker']}, "
            f"{retry['seconds_after_kill']} s after the kill"
        )
    for name, passed in report["checks"].items():
        log(f"  {'PASS' if passed else 'FAIL'}  {name}")


# -- main ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the teardown in `finally` always runs."""

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def prove(root: Path, services: Services, timeout: float, pacing: str) -> dict[str, Any]:
    started = time.monotonic()
    ports = Ports()
    log(f"working in {root}; starting PostgreSQL, Redis, the emulator and moto")
    database = start_postgres(services, root, ports.postgres)
    start_redis(services, root, ports.redis)
    emulator_url = start_emulator(services, ports.emulator)
    s3_endpoint = start_s3(services, ports.s3)
    prepare_airflow_home(root)
    env = airflow_env(root, ports, database, emulator_url, s3_endpoint, pacing)
    log("airflow db migrate")
    airflow(env, "db", "migrate")
    airflow(env, "pools", "set", POOL, str(POOL_SLOTS), "JiMeng API calls (make scale)")
    log("starting the api-server, scheduler, dag-processor and two Celery workers")
    start_airflow(services, env, ports)
    db = MetadataDB(ports.postgres)
    try:
        wait_until("both DAGs are parsed", lambda: dags_serialized(db), 180)
        ready = time.monotonic()
        log(f"stack up in {ready - started:.0f} s; triggering {MAPPED_DAG} and {RATE_CAP_DAG}")
        run_ids = trigger_runs(env)
        seen = watch(db, services, env, ports, emulator_url, run_ids, timeout)
        finished = time.monotonic()
        report = evaluate(db, emulator_url, s3_endpoint, run_ids, seen, pacing)
        report["seconds"] = {
            "startup": round(ready - started),
            "runs": round(finished - ready),
            "total": round(time.monotonic() - started),
        }
        report["config"] = {
            "heartbeat_timeout": HEARTBEAT_TIMEOUT,
            "latency_per_image": LATENCY,
            "pacing": pacing,
            "connection_pacing_extras": pacing_extras(pacing),
            "pool_slots": POOL_SLOTS,
            "worker_concurrency": 4,
        }
        return report
    finally:
        db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=REPO / "scale-output" / "report.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, AIRFLOW_HOME)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the DAG runs may take")
    parser.add_argument(
        "--pacing",
        choices=("static", "shared", "none"),
        default="shared",
        help="the jimeng connection's pacing extras (default: %(default)s; see pacing_extras)",
    )
    args = parser.parse_args()
    # Everything is on loopback: a proxy configured for the machine must not see these requests.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
    root = Path(tempfile.mkdtemp(prefix="jimeng-scale-"))
    root.chmod(0o711)  # PostgreSQL runs as another user when we are root: it must reach its data dir
    (root / "logs").mkdir()
    services = Services(root / "logs")
    report: dict[str, Any] = {}
    try:
        with interrupts_raise():
            report = prove(root, services, args.timeout, args.pacing)
    except (Exception, KeyboardInterrupt) as error:
        report = {"error": f"{type(error).__name__}: {error}"}
        log(f"FAILED: {report['error']}")
    finally:
        log("tearing down the services this script started")
        services.stop_all()
        logs = args.report.parent / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        shutil.copytree(root / "logs", logs)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if "checks" in report:
        print_report(report)
    log(f"report: {args.report}; service logs: {args.report.parent / 'logs'}")
    return 0 if report.get("checks") and all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
