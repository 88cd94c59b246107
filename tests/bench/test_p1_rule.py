"""P1's rule as decided, on made-up runs (no processes): the generation window over the ideal, at most
1.05 and no worse than the naive thread pool's; the fixed set-up and finish are reported, not counted."""

from __future__ import annotations

from typing import Any

import pytest

from bench.scenarios import p1_phases, p1_summary

IDEAL = 4.0
N = 64


def _run(*, setup: float, window: float, finish: float, started_at: float = 100.0) -> dict[str, Any]:
    first = started_at + setup
    return {
        "outputs": N,
        "error": None,
        "objects_stored": N,
        "started_at": started_at,
        "ended_at": first + window + finish,
        "wall_s": setup + window + finish,
        "emulator": {"first_request_at": first, "last_answer_at": first + window},
    }


def test_phases_split_the_task_at_the_first_request_and_the_last_answer() -> None:
    phases = p1_phases(_run(setup=0.2, window=4.1, finish=0.08), IDEAL)
    assert phases["setup_s"] == pytest.approx(0.2)
    assert phases["window_ratio"] == pytest.approx(4.1 / IDEAL)
    assert phases["finish_share"] == pytest.approx(0.08 / IDEAL)
    assert phases["wall_ratio"] == pytest.approx(4.38 / IDEAL)


def test_set_up_and_finish_do_not_count_against_the_window() -> None:
    operator = [_run(setup=0.3, window=w, finish=0.1) for w in (4.10, 4.12, 4.30)]
    naive = [_run(setup=0.1, window=w, finish=0.02) for w in (4.20, 4.25, 4.15)]
    summary = p1_summary(operator, naive, n=N, ideal=IDEAL)
    assert summary["ratio"] == pytest.approx(4.12 / IDEAL)  # medians, not the mean or the worst
    assert summary["naive_ratio"] == pytest.approx(4.20 / IDEAL)
    assert summary["operator"]["window_ratio"]["max"] == pytest.approx(4.30 / IDEAL)
    assert summary["operator"]["setup_s"]["median"] == pytest.approx(0.3)
    assert summary["pass"]


@pytest.mark.parametrize(
    ("operator_window", "naive_window"),
    [(4.25, 4.40), (4.12, 4.08)],
    ids=["above 1.05", "worse than the naive pool"],
)
def test_fails_above_the_limit_or_behind_the_naive_pool(operator_window: float, naive_window: float) -> None:
    summary = p1_summary(
        [_run(setup=0.1, window=operator_window, finish=0.05)],
        [_run(setup=0.1, window=naive_window, finish=0.05)],
        n=N,
        ideal=IDEAL,
    )
    assert not summary["pass"]


def test_an_incomplete_run_fails_whatever_its_window() -> None:
    short = _run(setup=0.1, window=4.0, finish=0.05) | {"outputs": N - 1}
    summary = p1_summary([short], [_run(setup=0.1, window=4.4, finish=0.05)], n=N, ideal=IDEAL)
    assert not summary["complete"]
    assert not summary["pass"]
