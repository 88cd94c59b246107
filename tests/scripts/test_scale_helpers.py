"""The pure parts of scripts/scale.py (`make scale` itself is opt-in and runs minutes)."""

from __future__ import annotations

import datetime
import importlib.util
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "scale.py"


@pytest.fixture(scope="module")
def scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_script"] = module  # dataclasses resolve their module's annotations through it
    spec.loader.exec_module(module)
    return module


def test_peak_images_per_minute_slides_a_60_s_window(scale: ModuleType) -> None:
    entries = [{"billed_at": at, "images": images} for at, images in [(0, 1), (10, 2), (59.9, 1), (60, 3), (130, 1)]]
    assert scale.peak_images_per_minute(entries) == 6  # 10 s to 60 s: 2 + 1 + 3
    assert scale.peak_images_per_minute([]) == 0


def test_peak_overlap_counts_slots_held_at_once(scale: ModuleType) -> None:
    def at(second: int) -> datetime.datetime:
        return datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(seconds=second)

    tries = [
        {"pool": "jimeng", "pool_slots": 1, "start_date": at(0), "end_date": at(10)},
        {"pool": "jimeng", "pool_slots": 2, "start_date": at(5), "end_date": None},  # still running
        {"pool": "jimeng", "pool_slots": 1, "start_date": at(10), "end_date": at(20)},  # starts as the first ends
        {"pool": "default_pool", "pool_slots": 5, "start_date": at(0), "end_date": at(30)},
        {"pool": "jimeng", "pool_slots": 1, "start_date": None, "end_date": None},  # never started
    ]
    assert scale.peak_overlap(tries, at(40)) == 3


def test_pacing_extras(scale: ModuleType) -> None:
    assert scale.pacing_extras("static")["max_images_per_minute"] == scale.CAP // scale.POOL_SLOTS
    assert scale.pacing_extras("shared") == {"redis_conn_id": "redis_shared", "account_images_per_minute": scale.CAP}
    assert scale.pacing_extras("none") == {}


def test_signal_session_kills_the_session_and_nothing_else(scale: ModuleType) -> None:
    # A session leader whose child moved to its own process group: killpg alone would miss it.
    script = "import os, subprocess, time; subprocess.Popen(['sleep', '60'], preexec_fn=os.setpgrp); time.sleep(60)"
    leader = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(scale._session_members(leader.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = scale._session_members(leader.pid)
        assert len(members) == 2

        scale._signal_session(leader.pid, signal.SIGKILL)

        leader.wait(timeout=5)
        deadline = time.monotonic() + 5
        while scale._session_members(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scale._session_members(leader.pid) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_the_rate_cap_dag_asks_for_more_than_the_cap_in_the_pool(scale: ModuleType) -> None:
    path = SCRIPT.parent / "scale_dags" / "jimeng_scale_rate_cap.py"
    spec = importlib.util.spec_from_file_location("jimeng_scale_rate_cap", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    task = module.dag.get_task("generate")
    assert task.partial_kwargs["pool"] == scale.POOL
    images = module.TASKS * module.PROMPTS_PER_TASK
    assert images == scale.EXPECTED_IMAGES[scale.RATE_CAP_DAG]
    assert images > scale.CAP  # more than a minute of the cap, asked for at once
