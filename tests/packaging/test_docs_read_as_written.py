"""The Markdown reads on the code host as on the site: no snippet markers, no tables the site build fills in.

The site build (MkDocs) used to include the getting-started commands from ``scripts/getting-started.sh``
and to fill the connection extras table from the code, so the pages showed ``--8<--`` lines and an
invisible comment where a reader on the code host expected commands and a table. The pages now carry
both; these tests keep them equal to what ``make package-check`` runs and to ``CONNECTION_EXTRAS``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import uuid
from pathlib import Path
from types import ModuleType

import pytest

from airflow_provider_jimeng.testing import S3Server

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SECTION = re.compile(r"^# --8<-- \[start:(?P<name>\w+)\]\n(?P<body>.*?)^# --8<-- \[end:(?P=name)\]\n", re.M | re.S)


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generated_hook", DOCS / ".hooks" / "generated.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", markdown, re.M | re.S)


def test_no_page_shows_a_snippet_marker() -> None:
    pages = [DOCS.parent / "README.md", *DOCS.glob("*.md")]
    shown = [page.name for page in pages if re.search(r"^--8<--", page.read_text(encoding="utf-8"), re.M)]
    assert shown == []


def test_getting_started_shows_the_commands_package_check_runs() -> None:
    sections = {m["name"]: m["body"] for m in SECTION.finditer((ROOT / "scripts" / "getting-started.sh").read_text())}
    assert set(sections) == {"home", "emulator", "run"}
    blocks = _bash_blocks((DOCS / "getting-started.md").read_text(encoding="utf-8"))
    for name, body in sections.items():
        assert body in blocks, f"getting-started.md does not show the script's {name!r} section as it runs"


def test_getting_started_sets_a_throwaway_airflow_home_before_any_airflow_command() -> None:
    page = (DOCS / "getting-started.md").read_text(encoding="utf-8")
    offline = page.split("## 2. Try it offline", 1)[1]
    assert offline.index("export AIRFLOW_HOME=") < offline.index("python -m airflow_provider_jimeng")


def test_the_connection_extras_table_is_the_one_made_from_the_code() -> None:
    hook = _hook()
    page = (DOCS / "connection.md").read_text(encoding="utf-8")
    assert hook.extras_table_in(page) == hook._extras_table(), "run: python docs/.hooks/generated.py"


def test_the_documented_local_s3_connection_stores_on_an_s3_server(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``aws`` connection getting-started.md and storage.md show for MinIO works, pointed at an S3 server."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    shown = set()
    for page in ("getting-started.md", "storage.md"):
        for block in _bash_blocks((DOCS / page).read_text(encoding="utf-8")):
            if "AIRFLOW_CONN_AWS_DEFAULT" in block:
                shown.add(block.split("=", 1)[1].strip().strip("'"))
    assert len(shown) == 1, "the two pages show the same connection"
    connection = json.loads(shown.pop())
    connection["extra"]["endpoint_url"] = s3_server.endpoint_url
    connection["login"], connection["password"] = "testing", "testing"  # moto's; MinIO's defaults otherwise
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(connection))
    bucket = f"docs-{uuid.uuid4().hex[:12]}"
    hook = S3Hook(aws_conn_id="aws_default")
    hook.create_bucket(bucket_name=bucket)
    hook.load_bytes(b"stored", key="check.txt", bucket_name=bucket)
    assert hook.read_key("check.txt", bucket_name=bucket) == "stored"
