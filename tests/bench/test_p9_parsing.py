"""P9 reads the worker's slot time from Airflow's own output; these are the lines it parses, as Airflow
3 writes them (copied from a run), so that a format change fails here rather than in ``make bench``."""

from __future__ import annotations

import json

from bench.visual import task_process_seconds, workload_durations

TI = "01a24a54-2e72-76d2-a1b3-9d5f0c1e2a3b"
SCHEDULER_LOG = f"""
2026-12-06T07:49:23.094442Z [info     ] Workload finished              [supervisor] duration=1.8152063110010204 exit_code=0 final_state=deferred loc=supervisor.py:2658 workload_id={TI} workload_type=ExecuteTask
2026-12-06T07:49:24.106954Z [info     ] TaskInstance Finished: dag_id=d, task_id=generate [airflow.jobs.scheduler_job_runner]
2026-12-06T07:50:12.944153Z [info     ] Workload finished              [supervisor] duration=6.699245282999982 exit_code=0 final_state=success loc=supervisor.py:2658 workload_id={TI} workload_type=ExecuteTask
2026-12-06T07:50:56.436610Z [info     ] Workload finished              [supervisor] duration=41.82202597799915 exit_code=0 final_state=success loc=supervisor.py:2658 workload_id=01a24a54-0dc4-72a7-9e00-000000000000 workload_type=ExecuteTask
"""  # noqa: E501


def test_each_workload_of_a_task_instance_is_found_with_its_final_state() -> None:
    durations = workload_durations(SCHEDULER_LOG)
    assert durations[TI] == [("deferred", 1.8152063110010204), ("success", 6.699245282999982)]
    assert len(durations) == 2


def _line(timestamp: str, event: str) -> str:
    return json.dumps({"timestamp": timestamp, "level": "info", "event": event, "logger": "task"})


def test_a_deferred_tasks_log_has_one_segment_per_process() -> None:
    log = "\n".join(
        [
            _line("2026-12-06T07:49:21.315000Z", "::group::Pre Execute"),
            _line("2026-12-06T07:49:23.073000Z", "::endgroup::"),
            _line("2026-12-06T07:50:06.273000Z", "::group::Pre Execute"),
            "not json",
            _line("2026-12-06T07:50:07.924000Z", "::endgroup::"),
        ]
    )
    first, second = task_process_seconds(log)
    assert round(first, 3) == 1.758
    assert round(second, 3) == 1.651
