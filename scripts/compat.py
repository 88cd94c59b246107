"""``make compat``: the test suite on the newest release of each supported Airflow series, one venv each.

For each version it runs ``make test AIRFLOW_VERSION=<version>`` (the newest, the one the lock pins,
runs in the lock's venv: ``make test``), reads pytest's JUnit report, and writes a table of series,
version, passed / failed / skipped and time to ``compat-output/summary.md`` (docs/compatibility.md
quotes it; each version's row is kept in ``compat-output/airflow-<version>.json``, so a series run on
its own updates its row only). A failing series does not stop the others; the exit status is 1 if any failed.

    python scripts/compat.py [--workers N] [--pytest-args "ARGS"] [VERSION ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "compat-output"
#: The newest release of each supported series (``pip index versions apache-airflow``).
VERSIONS = ["3.0.6", "3.1.8", "3.2.2", "3.3.2"]


def _locked_version() -> str:
    found = re.search(r"^apache-airflow==(\S+)", (ROOT / "requirements" / "constraints.txt").read_text(), re.M)
    assert found, "requirements/constraints.txt pins no apache-airflow"
    return found[1]


def _counts(report: Path) -> dict[str, int]:
    """passed / failed / skipped from a JUnit report (errors count as failed)."""
    if not report.exists():
        return {"passed": 0, "failed": 0, "skipped": 0}
    root = ElementTree.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = total["failures"] + total["errors"]
    return {"passed": total["tests"] - failed - total["skipped"], "failed": failed, "skipped": total["skipped"]}


def run(version: str, workers: int, pytest_args: str) -> dict[str, object]:
    report = OUTPUT / f"airflow-{version}.xml"
    report.unlink(missing_ok=True)
    pinned = [] if version == _locked_version() else [f"AIRFLOW_VERSION={version}"]
    venv = subprocess.run(["make", "venv", *pinned], cwd=ROOT, check=False)
    started = time.monotonic()
    if venv.returncode == 0:
        args = f"{pytest_args} --junitxml={shlex.quote(str(report))}".strip()
        test = ["make", "test", *pinned, f"TEST_WORKERS={workers}", f"PYTEST_ARGS={args}"]
        subprocess.run(test, cwd=ROOT, check=False)
    seconds = time.monotonic() - started
    counts = _counts(report)
    row = {
        "series": ".".join(version.split(".")[:2]),
        "version": version,
        "venv": "afresh, within requirements/airflow-<series>.txt" if pinned else "the lock",
        "resolved": venv.returncode == 0,
        "ran": pytest_args or "the full suite",
        "time": f"{int(seconds // 60)}:{int(seconds % 60):02d}",
        "date": datetime.date.today().isoformat(),
        "workers": workers,
        **counts,
    }
    (OUTPUT / f"airflow-{version}.json").write_text(json.dumps(row, indent=1), encoding="utf-8")
    return row


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        f"`make compat` (scripts/compat.py), Python {sys.version.split()[0]}; each row from its last run.",
        "",
        "| series | Airflow | venv | ran | passed | failed | skipped | time | workers | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if not row["resolved"]:
            lines.append(f"| {row['series']} | {row['version']} | {row['venv']} | did not resolve |" + " |" * 6)
            continue
        lines.append(
            f"| {row['series']} | {row['version']} | {row['venv']} | {row['ran']} | {row['passed']} | {row['failed']}"
            f" | {row['skipped']} | {row['time']} | {row['workers']} | {row['date']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", default=VERSIONS)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--pytest-args", default="", help="e.g. test paths, for a quick subset")
    options = parser.parse_args()
    OUTPUT.mkdir(exist_ok=True)
    rows = [run(version, options.workers, options.pytest_args) for version in options.versions]
    # The table: every version's last run, this one's and earlier ones' (a series run on its own keeps the others).
    recorded = sorted(OUTPUT.glob("airflow-*.json"), key=lambda path: [int(part) for part in path.stem[8:].split(".")])
    summary = table([json.loads(path.read_text(encoding="utf-8")) for path in recorded])
    (OUTPUT / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    return 0 if all(row["resolved"] and row["failed"] == 0 and row["passed"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
