"""Keep the benchmark harness from rotting: ``python -m bench --quick`` runs and reports every section.

Tiny sizes and no timing assertions: the numbers of a smoke run mean nothing, but an import that
moved, a renamed emulator knob or a broken worker protocol fails here instead of in ``make bench``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("p1_throughput", "p2_rate_limit", "p3_memory", "p4_overhead", "scaling", "p5_shared_limit")

pytestmark = [pytest.mark.bench, pytest.mark.timeout(90)]


def test_quick_run_produces_every_section(tmp_path: Path) -> None:
    results_path = tmp_path / "quick.json"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW_CONN_")}
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-docs", "--json", str(results_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(results_path.read_text())

    assert set(SECTIONS) <= set(results)
    assert results["meta"]["mode"] == "quick"
    p1 = results["p1_throughput"]
    n = p1["params"]["n"]
    assert all(run["outputs"] == n for run in p1["runs"])
    assert [run["objects_stored"] for run in p1["naive"]] == [n] * len(p1["runs"])  # the naive pool stored all
    assert [run["spec"]["max_concurrency"] for run in p1["naive"]] == [p1["params"]["max_concurrency"]]
    assert p1["complete"]
    for run in (*p1["runs"], *p1["naive"]):
        # Set-up, the generation window and finish split the task, each a positive part of it.
        phases = run["phases"]
        assert min(phases["setup_s"], phases["window_s"], phases["finish_s"]) > 0
        assert phases["setup_s"] + phases["window_s"] + phases["finish_s"] == pytest.approx(run["wall_s"], abs=0.01)
    assert p1["ratio"] >= 1.0  # the window holds ceil(N/K) latencies: nothing beats the ideal
    p2 = results["p2_rate_limit"]
    assert p2["paced"]["succeeded"]
    assert isinstance(p2["unpaced"]["http_429_seen_by_hook"], int)
    for response_format in ("url", "b64_json"):
        assert all(run["rss_growth_mib"] >= 0 for run in results["p3_memory"][response_format]["runs"].values())
    assert results["p4_overhead"]["ratio"] > 0
    scaling = results["scaling"]
    assert [point["max_concurrency"] for point in scaling["by_concurrency"]] == [1, 2]
    assert all(point["wall_s"] > 0 for point in scaling["by_prompts"])
    assert "PASS" not in completed.stdout  # a smoke run claims no verdict
