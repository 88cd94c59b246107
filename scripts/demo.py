"""Run the product content pipeline end to end on this machine and save its gallery: ``make demo``.

Offline by default: the JiMeng emulator and an S3 server (moto) on loopback, so it needs no key,
no network and costs nothing. With ``JIMENG_API_KEY`` set it calls the real API instead
(``JIMENG_BASE_URL`` optional, China endpoint by default; ``JIMENG_MODEL`` optional) and bills
one image per catalogue product; storage stays on the loopback S3 server.

Airflow runs in a throwaway ``AIRFLOW_HOME`` with a fresh SQLite database, and its logs go to a
file there (printed when something fails), so the console shows only the summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "dags_examples"
DAG_ID = "jimeng_content_pipeline"
#: ``--api visual`` (``make demo API=visual``): the Visual API example, deferred, always offline.
VISUAL_DAG_ID = "jimeng_visual_deferrable"
BUCKET = "jimeng-demo"
PREFIX = "catalogue"
#: Files of the gallery folder copied to the output directory (the operator's records.json stays in S3).
GALLERY_FILES = ("index.html", "manifest.json")
#: A traceback's last line, e.g. "airflow_provider_jimeng.exceptions.JiMengAuthenticationError: ...".
ERROR_LINE = re.compile(r"^[\w.]*(?:Error|Exception): .+")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo-output"), help="where to save the gallery")
    parser.add_argument("--size", default="1K", help="image size (default 1K: fastest and cheapest)")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary AIRFLOW_HOME and its log")
    parser.add_argument(
        "--api",
        choices=("ark", "visual"),
        default="ark",
        help=f"visual: run {VISUAL_DAG_ID} (the Visual API, deferrable) on the offline emulator instead",
    )
    return parser.parse_args(argv)


def make_home() -> Path:
    """A temporary AIRFLOW_HOME, on tmpfs when there is room: SQLite syncs every commit, tmpfs makes that free."""
    shm = Path("/dev/shm")
    base = None
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 256 * 1024 * 1024:
        base = str(shm)
    return Path(tempfile.mkdtemp(prefix="jimeng-demo-home-", dir=base))


def configure_airflow(home: Path) -> None:
    """Point Airflow at the throwaway home; must run before anything imports airflow."""
    dags = home / "dags"
    shutil.copytree(EXAMPLES, dags, ignore=shutil.ignore_patterns("__pycache__", "_*"))
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            # Loopback services must not go through a proxy.
            "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
            "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1", "localhost"])),
        }
    )


@contextmanager
def console_to(log_file: Path):  # type: ignore[no-untyped-def]
    """Send everything written to fds 1 and 2 (Airflow, structlog, libraries) to ``log_file``.

    Yields a stream on the original stdout, for the summary.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    console: TextIO = os.fdopen(os.dup(saved_out), "w", buffering=1)
    with open(log_file, "ab", buffering=0) as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield console
        finally:
            console.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)


def real_api_connection() -> tuple[str, str] | None:
    """The ``jimeng_default`` connection JSON and a description, when ``JIMENG_API_KEY`` is set."""
    key = os.environ.get("JIMENG_API_KEY", "").strip()
    if not key:
        return None
    from airflow_provider_jimeng.hooks.connection_form import CHINA_BASE_URL

    base_url = os.environ.get("JIMENG_BASE_URL", "").strip() or CHINA_BASE_URL
    extra: dict[str, Any] = {}
    if urlsplit(base_url).scheme == "http" and urlsplit(base_url).hostname in ("127.0.0.1", "localhost", "::1"):
        extra["allow_http"] = True  # a standalone emulator: python -m airflow_provider_jimeng.emulator
    if os.environ.get("JIMENG_MODEL", "").strip():
        extra["model"] = os.environ["JIMENG_MODEL"].strip()
    conn = json.dumps({"conn_type": "jimeng", "host": base_url, "password": key, "extra": extra})
    return conn, f"real JiMeng API at {urlsplit(base_url).hostname or base_url}"


def visual_connection(root_url: str) -> str:
    """The ``jimeng_visual`` connection to the offline emulator's Visual API (its default key pair)."""
    from airflow_provider_jimeng.emulator import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY

    return json.dumps(
        {
            "conn_type": "jimeng",
            "host": root_url,
            "login": DEFAULT_ACCESS_KEY_ID,
            "password": DEFAULT_SECRET_ACCESS_KEY,
            "extra": {"api": "visual", "allow_http": True},
        }
    )


def run_visual(output: Path) -> dict[str, Any]:
    """The Visual API example on the offline stack: submit, defer (dag.test() runs the trigger in line), store."""
    import boto3
    from airflow.utils import db

    from airflow_provider_jimeng.testing import AWS_REGION, offline_stack, patched_environ

    db.resetdb()
    with (
        offline_stack() as stack,
        patched_environ({"AIRFLOW_CONN_JIMENG_VISUAL": visual_connection(stack.emulator.root_url)}),
    ):
        s3 = boto3.client(
            "s3",
            endpoint_url=stack.s3.endpoint_url,
            region_name=AWS_REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket=BUCKET)
        module = load_dag_module(Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{VISUAL_DAG_ID}.py")
        for task in module.dag.tasks:
            task.retries = 0
            if hasattr(task, "poll_interval"):
                task.poll_interval = 0.5  # the emulator answers in a moment: no need to wait 5 s
        dag_run = module.dag.test(run_conf={"bucket": BUCKET})
        result: dict[str, Any] = {
            "backend": "offline emulator (Visual API, deferrable)",
            "state": str(dag_run.state),
            "failed_tasks": {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances() if ti.state != "success"},
            "billed": stack.emulator.billed_images,
            "saved": [],
        }
        if dag_run.state == "success":
            output.mkdir(parents=True, exist_ok=True)
            for stale in output.glob("*.jpeg"):
                stale.unlink()
            for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
                if item["Key"].endswith(".jpeg"):
                    target = output / item["Key"].rsplit("/", 1)[1]
                    s3.download_file(BUCKET, item["Key"], str(target))
                    result["saved"].append(target)
        return result


def run_pipeline(size: str, output: Path, real: tuple[str, str] | None) -> dict[str, Any]:
    """Start the backends, run the DAG with dag.test(), save the gallery; return what the summary needs."""
    import boto3
    from airflow.utils import db

    from airflow_provider_jimeng.testing import (
        AWS_REGION,
        S3Server,
        aws_connection_json,
        offline_stack,
        patched_environ,
    )

    db.resetdb()
    with ExitStack() as running:
        emulator = None
        if real is None:
            stack = running.enter_context(offline_stack())
            s3_server, emulator, backend = stack.s3, stack.emulator, "offline emulator"
        else:
            s3_server, backend = running.enter_context(S3Server()), real[1]
            running.enter_context(
                patched_environ(
                    {
                        "AIRFLOW_CONN_JIMENG_DEFAULT": real[0],
                        "AIRFLOW_CONN_AWS_DEFAULT": aws_connection_json(s3_server.endpoint_url),
                    }
                )
            )
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_server.endpoint_url,
            region_name=AWS_REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket=BUCKET)
        module = load_dag_module(Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{DAG_ID}.py")
        for task in module.dag.tasks:
            task.retries = 0  # report a failure now rather than after the DAG's retry delays
        from airflow_provider_jimeng.testing import activate_dag_assets

        activate_dag_assets(module.dag)
        dag_run = module.dag.test(run_conf={"bucket": BUCKET, "prefix": PREFIX, "size": size})
        result: dict[str, Any] = {
            "backend": backend,
            "state": str(dag_run.state),
            "failed_tasks": {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances() if ti.state != "success"},
            "billed": emulator.billed_images if emulator is not None else None,
            "saved": [],
        }
        if dag_run.state == "success":
            keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
            result["saved"] = save_gallery(s3, keys, output)
        return result


def load_dag_module(path: Path) -> Any:
    """Import the DAG file the way the DAG processor sees it (from the DAGs folder)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_gallery(s3: Any, keys: list[str], output: Path) -> list[Path]:
    """Copy the gallery folder's images, manifest and index.html into ``output`` (flat: the links stay valid)."""
    galleries = [key for key in keys if key.endswith("/index.html")]
    if not galleries:
        raise RuntimeError("the run succeeded but wrote no index.html")
    folder = galleries[0].rsplit("/", 1)[0]
    wanted = [
        key
        for key in keys
        if key.rsplit("/", 1)[0] == folder and (key.endswith(".jpeg") or key.rsplit("/", 1)[1] in GALLERY_FILES)
    ]
    output.mkdir(parents=True, exist_ok=True)
    for stale in [*output.glob("*.jpeg"), *(output / name for name in GALLERY_FILES)]:
        stale.unlink(missing_ok=True)
    saved = []
    for key in wanted:
        target = output / key.rsplit("/", 1)[1]
        s3.download_file(BUCKET, key, str(target))
        saved.append(target)
    return saved


def first_error(log_file: Path) -> str | None:
    """The first exception message in the log (provider errors name the setting or API code at fault)."""
    for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
        match = ERROR_LINE.match(line)
        if match:
            return match.group(0)[:300]
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    home = make_home()
    configure_airflow(home)
    log_file = home / "demo.log"
    output = args.output.resolve()
    ok = False
    with console_to(log_file) as console:
        try:
            visual = args.api == "visual"
            real = None if visual else real_api_connection()
            note = " (bills one image per catalogue product)" if real else " (no key, no network, no cost)"
            print(
                f"JiMeng demo: running {VISUAL_DAG_ID if visual else DAG_ID} against the "
                f"{real[1] if real else 'offline emulator'}{note}",
                file=console,
            )
            result = run_visual(output) if visual else run_pipeline(args.size, output, real)
            if result["state"] != "success":
                print(
                    f"FAILED: the DAG run ended {result['state']}; tasks not successful: {result['failed_tasks']}",
                    file=console,
                )
            else:
                images = [path for path in result["saved"] if path.suffix == ".jpeg"]
                billed = f", billed {result['billed']}" if result["billed"] is not None else ""
                print(f"Backend:  {result['backend']}", file=console)
                print(f"Images:   {len(images)} stored in S3 and copied to {output}{billed}", file=console)
                if not visual:
                    print(f"Manifest: {output / 'manifest.json'}", file=console)
                    print(f"Gallery:  {output / 'index.html'}", file=console)
                print(f"Done in {time.monotonic() - started:.1f} s", file=console)
                ok = True
        except Exception:
            traceback.print_exc()
            print("FAILED: the demo raised an error (traceback in the log)", file=console)
        if not ok:
            cause = first_error(log_file)
            if cause:
                print(f"Cause:    {cause}", file=console)
            print(f"Airflow log: {log_file}", file=console)
    if ok and not args.keep_home:
        shutil.rmtree(home, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
