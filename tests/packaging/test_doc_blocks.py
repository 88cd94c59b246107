"""Every ```python and ```bash block of README.md and docs/*.md runs as the page says it does.

What each block claims is in ``tests/doc_blocks.py`` (an HTML comment before the fence, or none: it
runs as written). Complete DAGs are triggered the way the UI triggers them (no logical date) against
the emulator and an S3 server; DAG snippets are parsed into a DagBag after their named prelude;
scripts run against the emulator; connection exports are read by Airflow and the hook; commands run
in bash in a throwaway ``AIRFLOW_HOME`` against the emulator (whose port stands for 8765).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.testing import S3Server
from tests.dag_runs import run_dag_test
from tests.doc_blocks import PRELUDES, ROOT, Block, blocks
from tests.test_example_dags import dag_test

BLOCKS = blocks()
#: The bucket the pages' DAGs name as written.
PAGE_BUCKET = "my-images"


def _id(block: Block) -> str:
    return block.id


def _exports(code: str) -> list[tuple[str, str]]:
    """``(name, value)`` of each ``export`` of a bash block, as bash reads them (quotes, line breaks)."""
    shown = subprocess.run(
        ["bash", "-c", "export() { printf '%s\\0' \"$@\"; }\n" + code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [tuple(item.split("=", 1)) for item in shown.split("\0") if item]  # type: ignore[misc]


def _is_exports(code: str) -> bool:
    statements = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return all(not line.startswith("export ") or "AIRFLOW_CONN_" in line for line in statements) and any(
        line.startswith("export AIRFLOW_CONN_") for line in statements
    )


SCRIPTS = [b for b in BLOCKS if b.language == "python" and b.kind == "run" and not b.is_dag_file]
SCRIPTS += [b for b in BLOCKS if b.kind == "runs after" and "with DAG(" not in PRELUDES.get(b.note, "with DAG(")]
DAG_SNIPPETS = [b for b in BLOCKS if b.kind == "runs after" and "with DAG(" in PRELUDES.get(b.note, "")]
EXPORTS = [b for b in BLOCKS if b.language == "bash" and b.kind == "run" and _is_exports(b.code)]
#: One block per command: getting-started.md and connection.md show the same ``connections test``.
COMMANDS = list(
    {
        b.code: b for b in reversed(BLOCKS) if b.language == "bash" and b.kind == "run" and not _is_exports(b.code)
    }.values()
)


# --------------------------------------------------------------------------------------- the claims
def test_every_block_says_how_it_runs() -> None:
    """A prelude that exists, a reason for not running, Python that compiles (a reader copies it)."""
    problems = []
    for block in BLOCKS:
        if block.kind == "runs after" and block.note not in PRELUDES:
            problems.append(f"{block.id}: no prelude {block.note!r} in tests/doc_blocks.py")
        if block.language == "python":
            try:
                ast.parse(block.code, block.id)
            except SyntaxError as error:
                problems.append(f"{block.id}: not valid Python: {error}")
    assert problems == []
    assert {b.kind for b in BLOCKS} == {"run", "not run", "excerpt of", "runs after"}


def _names(code: str) -> set[str]:
    """The names, attributes and keyword arguments a piece of Python uses."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return names


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "excerpt of"], ids=_id)
def test_an_excerpt_uses_only_what_the_file_the_suite_runs_uses(block: Block) -> None:
    """An excerpt may shorten its file (tests/test_example_dags.py runs the file), not rename what it calls."""
    assert block.note.startswith("dags_examples/"), f"{block.id}: an excerpt of a file the suite does not run"
    missing = _names(block.code) - _names((ROOT / block.note).read_text(encoding="utf-8"))
    assert missing == set(), f"{block.id} uses what {block.note} does not"


# ------------------------------------------------------------------------------------------- python
@pytest.fixture
def page_bucket(s3_server: S3Server, s3_client: Any, s3_bucket: str) -> str:
    """The bucket the pages name (``my-images``), on the S3 server ``aws_default`` points at."""
    if PAGE_BUCKET not in {bucket["Name"] for bucket in s3_client.list_buckets()["Buckets"]}:
        s3_client.create_bucket(Bucket=PAGE_BUCKET)
    return PAGE_BUCKET


@dag_test
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.is_dag_file], ids=_id)
def test_a_complete_dag_runs_when_triggered_by_hand(
    block: Block, jimeng_conn: JiMengEmulator, page_bucket: str
) -> None:
    """The DAG file as written (``tests/conftest.py`` puts it in the DAGs folder), with no logical date."""
    bag = _dagbag(Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{block.module}.py")
    assert bag.import_errors == {}
    (dag,) = bag.dags.values()
    conf = {"bucket": page_bucket} if "bucket" in dag.params else {}

    dag_run = run_dag_test(dag, logical_date=None, run_conf=conf)

    states = {f"{ti.task_id}[{ti.map_index}]": ti.state for ti in dag_run.get_task_instances()}
    assert dag_run.state == "success", states
    assert jimeng_conn.billed_images > 0


def test_dag_snippets_parse_into_a_dagbag_after_their_prelude(tmp_path: Path) -> None:
    for block in DAG_SNIPPETS:
        (tmp_path / f"{block.module}.py").write_text(block.with_prelude(), encoding="utf-8")

    bag = _dagbag(tmp_path)

    assert bag.import_errors == {}
    prelude_tasks = 2
    tasks = {
        block.id: sum(len(dag.tasks) for dag in bag.dags.values() if Path(dag.fileloc).stem == block.module)
        for block in DAG_SNIPPETS
    }
    added = {block: count - prelude_tasks for block, count in tasks.items()}
    assert all(count > 0 for count in added.values()), f"a snippet that adds no task: {added}"


@pytest.mark.parametrize("block", SCRIPTS, ids=_id)
def test_a_script_runs_against_the_emulator(block: Block, jimeng_conn: JiMengEmulator) -> None:
    code = block.with_prelude() if block.kind == "runs after" else block.code
    exec(compile(code, block.id, "exec"), {"__name__": block.module})  # the page's own code


# --------------------------------------------------------------------------------------------- bash
@pytest.mark.parametrize("block", EXPORTS, ids=_id)
def test_a_connection_export_is_read_by_airflow_and_the_hook(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from airflow_provider_jimeng.hooks.jimeng import JiMengHook
    from airflow_provider_jimeng.version_compat import BaseHook

    exports = _exports(block.code)
    assert exports
    for name, value in exports:
        conn_id = name.removeprefix("AIRFLOW_CONN_").lower()
        monkeypatch.setenv(name, value)
        conn = BaseHook.get_connection(conn_id)
        if conn.conn_type == "aws":
            assert S3Hook(aws_conn_id=conn_id).conn_config.endpoint_url
        else:
            assert conn.conn_type == "jimeng", f"{block.id}: {name}"
            assert JiMengHook(conn_id).config.base_url.startswith(("https://", "http://127.0.0.1:8765/"))


@dag_test  # the metadata DB the command's Airflow copies
@pytest.mark.parametrize("block", COMMANDS, ids=_id)
def test_a_command_runs_offline_against_the_emulator(
    block: Block, jimeng_emulator: JiMengEmulator, child_airflow_db: str, tmp_path: Path
) -> None:
    from airflow_provider_jimeng.testing import jimeng_connection_json

    address = urlsplit(jimeng_emulator.base_url).netloc
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        "AIRFLOW_HOME": str(tmp_path),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": child_airflow_db,
        "AIRFLOW_CONN_JIMENG_DEFAULT": jimeng_connection_json(jimeng_emulator.base_url),
    }
    assert shutil.which("curl") or "curl" not in block.code

    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code.replace("127.0.0.1:8765", address)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert not re.search(r"fail|error", done.stdout, re.I), done.stdout


def _dagbag(path: Path) -> Any:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.1
        from airflow.models.dagbag import DagBag  # type: ignore[attr-defined,no-redef]

    return DagBag(dag_folder=str(path))
