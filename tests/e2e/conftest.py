"""A real Airflow on loopback for the browser tests: API server, scheduler, DAG processor, emulator.

Opt-in: these tests run only with ``JIMENG_E2E=1`` (``make e2e`` sets it), because starting Airflow
takes most of a minute on two cores. The browser is the Debian ``chromium`` package driven by
Playwright; ``playwright install`` (a browser download) is never needed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY
from tests.e2e.stack import (
    CHROMIUM,
    CHROMIUM_ARGS,
    EMULATOR_API_KEY,
    REPO_ROOT,
    STARTUP_TIMEOUT,
    AirflowStack,
    free_port,
    stack_env,
)
from tests.gallery.auth import RestrictedAuthManager

HELLO_DAG = "jimeng_hello"
#: Stores its images in S3 (moto's server): what the gallery shows.
PIPELINE_DAG = "jimeng_content_pipeline"
#: The bucket the pipeline stores in, and the one storage root the gallery may read (its default prefix).
GALLERY_BUCKET = "jimeng-gallery-e2e"
GALLERY_ROOT = f"s3://{GALLERY_BUCKET}/catalogue/"
#: The reviewer of jimeng_review_before_publishing: the user every UI request is made as (all admins).
REVIEWER = "Anonymous"
#: The example DAGs, every one in the stack's DAGs folder.
EXAMPLE_FILES = sorted(path for path in (REPO_ROOT / "dags_examples").glob("*.py") if not path.name.startswith("_"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("JIMENG_E2E") == "1":
        return
    skip = pytest.mark.skip(reason="browser end-to-end test; opt in with `make e2e` (JIMENG_E2E=1)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def airflow_stack() -> Iterator[AirflowStack]:
    """The emulator and Airflow 3 (API server, scheduler, DAG processor) on loopback, healthy."""
    home = Path(tempfile.mkdtemp(prefix="jimeng-e2e-airflow-"))
    (home / "logs").mkdir()
    dags = home / "dags"
    dags.mkdir()
    # Every example (tests/e2e/test_examples_scheduled.py triggers each); each reads its data files
    # next to its resolved path, in dags_examples/.
    for example in EXAMPLE_FILES:
        (dags / example.name).symlink_to(example)
    # DAGs only the e2e tests run (e.g. a review nobody answers, for its deadline).
    for extra in sorted((Path(__file__).parent / "dags").glob("*.py")):
        (dags / extra.name).symlink_to(extra)
    api_port, emulator_port, s3_port = free_port(), free_port(), free_port()
    stack = AirflowStack(
        home=home,
        api_port=api_port,
        emulator_port=emulator_port,
        s3_port=s3_port,
        env=stack_env(home, api_port, s3_port),
    )
    stack.env.update(
        {
            # What the gallery may read: the pipeline's storage root, through aws_default (docs/gallery.md).
            "AIRFLOW__JIMENG__GALLERY_STORAGE": json.dumps({GALLERY_ROOT: "aws_default"}),
            # Everyone is an admin but ``outsider``, who may read no jimeng_ DAG (the refused user).
            "AIRFLOW__CORE__AUTH_MANAGER": f"{RestrictedAuthManager.__module__}.{RestrictedAuthManager.__qualname__}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), stack.env.get("PYTHONPATH")])),
            # jimeng_review_before_publishing: only the UI's user (all admins: "Anonymous") may answer.
            "JIMENG_REVIEWERS": REVIEWER,
            # jimeng_visual_deferrable: the emulator's Visual API, with its default key pair.
            "AIRFLOW_CONN_JIMENG_VISUAL": json.dumps(
                {
                    "conn_type": "jimeng",
                    "host": f"http://127.0.0.1:{emulator_port}",
                    "login": DEFAULT_ACCESS_KEY_ID,
                    "password": DEFAULT_SECRET_ACCESS_KEY,
                    "extra": {"api": "visual", "allow_http": True},
                }
            ),
        }
    )
    started = time.monotonic()
    try:
        stack.start(
            "emulator",
            "airflow_provider_jimeng.emulator",
            "--port",
            str(emulator_port),
            "--api-key",
            EMULATOR_API_KEY,
        )
        stack.start("s3", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port))
        stack.run("db-migrate", "airflow", "db", "migrate")
        stack.timings["db migrate"] = time.monotonic() - started
        stack.start("api-server", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(api_port))
        stack.start("scheduler", "airflow", "scheduler")
        stack.start("dag-processor", "airflow", "dag-processor")
        stack.start("triggerer", "airflow", "triggerer")  # the Visual API example defers
        stack.wait_for("Airflow healthy", stack.healthy, STARTUP_TIMEOUT)
        for example in (HELLO_DAG, PIPELINE_DAG):
            stack.wait_for(f"DAG {example} parsed", lambda e=example: stack.api(f"dags/{e}")["dag_id"], STARTUP_TIMEOUT)
        stack.timings["stack ready"] = time.monotonic() - started
        yield stack
    finally:
        stack.stop()
        if os.environ.get("JIMENG_E2E_KEEP") != "1":
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (no browser download)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="install the e2e extra: pip install -e '.[e2e]'")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium chromium-driver (make e2e does this)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    """Where screenshots go: ``JIMENG_E2E_SCREENSHOT_DIR`` (``make e2e``: docs/img), else a temp dir."""
    configured = os.environ.get("JIMENG_E2E_SCREENSHOT_DIR")
    directory = (REPO_ROOT / configured) if configured else Path(tempfile.mkdtemp(prefix="jimeng-e2e-shots-"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory
