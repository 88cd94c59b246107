"""P9: the Visual API deferrable against polling on the worker, under a real scheduler, triggerer and worker.

One Airflow on loopback (``airflow scheduler`` with the LocalExecutor, ``airflow triggerer``,
``airflow dag-processor``, ``airflow api-server``: :class:`tests.e2e.stack.AirflowStack`, as P8 and
``make e2e`` start it) against the bench's emulator and S3 server. Two DAGs run the same
``JiMengGenerateOperator`` (64 prompts, one image each, stored in S3, the same ``poll_interval`` and
``max_concurrency``), one with ``deferrable=True`` and one with ``deferrable=False``, alternated
(``repeats`` pairs: D P, P D, ...; medians reported) in the same run, after an untimed warm-up run
(the emulator renders each image once).

The emulator makes 5 s per image and generates ``visual_parallelism`` tasks at once (the others wait
``in_queue``, first come first served): an account that generates 8 images at a time, the K=8 of P1.
64 prompts then take 40 s to generate, whoever waits for them.

* **Worker-slot seconds**: how long each task instance held a LocalExecutor worker, read from the
  ``Workload finished ... duration=`` line the worker's task supervisor logs (into the scheduler's
  output) when a workload ends: one per process, so a deferred task has two (submit, then collect),
  summed. That duration runs from the supervisor's start to its noticing the task process's exit, the
  time the worker slot is taken (the task's own log gives the task processes' share); the metadata
  database cannot say it (a deferred task instance keeps one ``start_date``/``end_date`` pair spanning
  the deferral, and no ``TaskInstanceHistory`` row is written for a deferral), and polling the REST API
  for the ``running`` state would cost the two cores the run uses and miss up to a polling interval at
  each edge.
* **End to end**: the DAG run's ``start_date`` to ``end_date`` (REST API), what a user waits for.
* **Triggerer for 1,000 pending task ids**: 1,000 tasks submitted to the emulator with an hour of
  latency (they stay ``generating``), then a task defers onto one :class:`JiMengVisualTrigger` polling
  all of them at the operator's default ``poll_interval``. The triggerer's process tree (its supervisor,
  the trigger runner and the log server) is sampled with psutil: CPU seconds per minute and RSS, idle (before) and
  while polling, and the polls the emulator answered.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.services import AWS_CONN_ID, Stack

VISUAL_CONN_ID = "jimeng_bench_visual"
DEFERRABLE_DAG = "jimeng_bench_visual_deferrable"
POLLING_DAG = "jimeng_bench_visual_polling"
PENDING_DAG = "jimeng_bench_visual_pending"
TASK_ID = "generate"
#: Targets of issue 21.
SLOT_RATIO = 0.10
END_TO_END_RATIO = 1.10
RUN_TIMEOUT = 900.0
WORKLOAD_FINISHED = re.compile(r"Workload finished.*")
#: ``[workers] min_heartbeat_interval`` of the stack (Airflow's default): how late a task supervisor can
#: notice its task process's exit (it waits that long in a ``select`` with no socket left to wake it).
MIN_HEARTBEAT_INTERVAL_S = 5.0

DAG_FILE = '''
import json, os, time
from airflow.sdk import DAG, BaseOperator
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.triggers.visual import JiMengVisualTrigger

SPEC = json.loads(open(os.environ["JIMENG_BENCH_VISUAL_SPEC"]).read())
PROMPTS = [f"bench prompt {{index}}: a lighthouse on a cliff at dusk, watercolour" for index in range(SPEC["prompts"])]

for dag_id, deferrable in (("{deferrable_dag}", True), ("{polling_dag}", False)):
    with DAG(dag_id=dag_id, schedule=None, catchup=False, max_active_runs=1):
        JiMengGenerateOperator(
            task_id="{task_id}",
            prompt=PROMPTS,
            jimeng_conn_id="{conn_id}",
            aws_conn_id="{aws_conn_id}",
            s3_bucket=SPEC["bucket"],
            s3_key_prefix="p9",
            size="2K",
            watermark=False,
            deferrable=deferrable,
            poll_interval=SPEC["poll_interval"],
            max_concurrency=SPEC["max_concurrency"],
        )


class WaitOnVisualTasks(BaseOperator):
    """Defers straight onto one trigger polling the task ids the bench submitted."""

    def execute(self, context):
        ids = json.loads(open(os.environ["JIMENG_BENCH_VISUAL_PENDING"]).read())
        self.defer(
            trigger=JiMengVisualTrigger(task_ids=ids, deadlines=time.time() + 3600, jimeng_conn_id="{conn_id}"),
            method_name="finish",
        )

    def finish(self, context, event=None):
        return {{"polls": event["polls"], "tasks": len(event["tasks"])}}


with DAG(dag_id="{pending_dag}", schedule=None, catchup=False):
    WaitOnVisualTasks(task_id="wait")
'''


def visual_connection_json(emulator_base_url: str) -> str:
    """A ``jimeng`` connection speaking the Visual API on the emulator (its default key pair)."""
    from airflow_provider_jimeng.emulator import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY

    root = emulator_base_url.rsplit("/api/", 1)[0]
    return json.dumps(
        {
            "conn_type": "jimeng",
            "host": root,
            "login": DEFAULT_ACCESS_KEY_ID,
            "password": DEFAULT_SECRET_ACCESS_KEY,
            "extra": {"api": "visual", "allow_http": True},
        }
    )


def workload_durations(scheduler_log: str) -> dict[str, list[tuple[str, float]]]:
    """Each workload's final state and ``duration`` (seconds) by its id (a task instance's id), from the
    ``Workload finished`` lines of the scheduler's output (where the LocalExecutor's workers log)."""
    durations: dict[str, list[tuple[str, float]]] = {}
    for line in WORKLOAD_FINISHED.findall(scheduler_log):
        workload = re.search(r"workload_id=['\"]?([0-9a-f-]{36})", line)
        duration = re.search(r"duration=([0-9.]+)", line)
        state = re.search(r"final_state=(\w+)", line)
        if workload and duration:
            durations.setdefault(workload.group(1), []).append(
                (state.group(1) if state else "unknown", float(duration.group(1)))
            )
    return durations


def task_process_seconds(task_log: str) -> list[float]:
    """How long each task process of one try ran its task: from its ``Pre Execute`` to its last log line.

    The task log holds one segment per process (a deferred task has two). The supervisor's duration
    (:func:`workload_durations`) adds what the worker spends around it, noticing the exit included.
    """
    segments: list[list[float]] = []
    for line in task_log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        stamp = record.get("timestamp")
        if not isinstance(stamp, str):
            continue
        if str(record.get("event", "")).startswith("::group::Pre Execute"):
            segments.append([])
        if segments:
            segments[-1].append(_timestamp(stamp))
    return [segment[-1] - segment[0] for segment in segments if segment]


def _timestamp(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class _Airflow:
    """The Airflow stack of P9 and the REST calls it needs."""

    def __init__(self, stack: Stack, spec: dict[str, Any]) -> None:
        from airflow_provider_jimeng.testing import aws_connection_json
        from tests.e2e.stack import AirflowStack, free_port, stack_env

        self.home = Path(tempfile.mkdtemp(prefix="jimeng-bench-visual-"))
        (self.home / "logs").mkdir()
        (self.home / "dags").mkdir()
        (self.home / "spec.json").write_text(json.dumps(spec))
        (self.home / "dags" / "jimeng_bench_visual.py").write_text(
            DAG_FILE.format(
                deferrable_dag=DEFERRABLE_DAG,
                polling_dag=POLLING_DAG,
                pending_dag=PENDING_DAG,
                task_id=TASK_ID,
                conn_id=VISUAL_CONN_ID,
                aws_conn_id=AWS_CONN_ID,
            )
        )
        port = free_port()
        env = stack_env(self.home, port)
        env.update(
            {
                f"AIRFLOW_CONN_{VISUAL_CONN_ID.upper()}": visual_connection_json(stack.emulator.base_url),
                f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}": aws_connection_json(stack.s3.endpoint_url),
                "JIMENG_BENCH_VISUAL_SPEC": str(self.home / "spec.json"),
                "JIMENG_BENCH_VISUAL_PENDING": str(self.home / "pending.json"),
                # Both modes get the same worker: two task slots, as stack_env sets for make e2e.
                "AIRFLOW__CORE__PARALLELISM": "2",
            }
        )
        self.stack = AirflowStack(home=self.home, api_port=port, emulator_port=0, env=env)

    def start(self) -> None:
        from tests.e2e.stack import STARTUP_TIMEOUT

        airflow = self.stack
        airflow.run("db-migrate", "airflow", "db", "migrate", timeout=300)
        airflow.start("api-server", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(airflow.api_port))
        airflow.start("scheduler", "airflow", "scheduler")
        airflow.start("dag-processor", "airflow", "dag-processor")
        airflow.start("triggerer", "airflow", "triggerer")
        airflow.wait_for("Airflow healthy", airflow.healthy, STARTUP_TIMEOUT)
        for dag_id in (DEFERRABLE_DAG, POLLING_DAG, PENDING_DAG):
            airflow.wait_for(
                f"DAG {dag_id} parsed", lambda d=dag_id: airflow.api(f"dags/{d}")["dag_id"], STARTUP_TIMEOUT
            )

    def stop(self) -> None:
        self.stack.stop()

    def trigger(self, dag_id: str) -> str:
        return str(self.stack.post(f"dags/{dag_id}/dagRuns", {"logical_date": None})["dag_run_id"])

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self.stack.api(f"dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"))

    def wait_finished(self, dag_id: str, run_id: str) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            run = self.dag_run(dag_id, run_id)
            return run if run["state"] in ("success", "failed") else None

        run: dict[str, Any] = self.stack.wait_for(f"{dag_id} run", finished, RUN_TIMEOUT, interval=0.5)
        return run

    def task_instance(self, dag_id: str, run_id: str, task_id: str = TASK_ID) -> dict[str, Any]:
        return dict(self.stack.task_api(dag_id, run_id, task_id))

    def slot_seconds(self, ti_id: str, *, deferred: bool) -> list[tuple[str, float]]:
        """The workloads the worker logged for this task instance: final state and duration, once all are logged.

        A worker logs a workload when its supervisor returns, which can be after the DAG run is marked
        done, and a deferred task's first workload can be logged after its second.
        """
        log_path = self.stack.log_path("scheduler")

        def logged() -> list[tuple[str, float]] | None:
            found = workload_durations(log_path.read_text(errors="replace")).get(ti_id) or []
            states = [state for state, _ in found]
            finished = any(state != "deferred" for state in states)
            return found if finished and (not deferred or "deferred" in states) else None

        workloads: list[tuple[str, float]] = self.stack.wait_for(
            f"the worker's workloads of {ti_id}", logged, 60, interval=0.2
        )
        return workloads

    def task_log(self, dag_id: str, run_id: str, task_id: str = TASK_ID) -> str:
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return (folder / "attempt=1.log").read_text(errors="replace")


def _measured_run(airflow: _Airflow, stack: Stack, dag_id: str, prompts: int, progress: Any) -> dict[str, Any]:
    stack.emulator.reset()
    run_id = airflow.trigger(dag_id)
    run = airflow.wait_finished(dag_id, run_id)
    ti = airflow.task_instance(dag_id, run_id)
    workloads = airflow.slot_seconds(ti["id"], deferred=dag_id == DEFERRABLE_DAG)
    slots = [duration for _, duration in workloads]
    task_seconds = task_process_seconds(airflow.task_log(dag_id, run_id))
    emulator = stack.emulator.stats()
    stored = stack.empty_bucket()
    end_to_end = _timestamp(run["end_date"]) - _timestamp(run["start_date"])
    result = {
        "state": run["state"],
        "end_to_end_s": end_to_end,
        "slot_s": sum(slots),
        "slot_s_per_image": sum(slots) / prompts,
        "workloads": [{"final_state": state, "duration_s": duration} for state, duration in workloads],
        # The task processes alone; the rest of the slot is the worker around them (see the module doc).
        "task_process_s": sum(task_seconds),
        "task_processes": task_seconds,
        # Exits the supervisor noticed a whole min_heartbeat_interval late (docs/visual-api.md).
        "late_exit_detections": round((sum(slots) - sum(task_seconds)) / MIN_HEARTBEAT_INTERVAL_S),
        "ti_start_to_end_s": _timestamp(ti["end_date"]) - _timestamp(ti["start_date"]),
        "billed_images": emulator["billed_images"],
        "requests": emulator["requests"],
        "objects_stored": stored,
    }
    progress(
        f"  p9 {dag_id}: {run['state']}, end to end {end_to_end:.1f} s, worker slot {sum(slots):.2f} s "
        f"({len(slots)} workload(s); task processes {sum(task_seconds):.2f} s), "
        f"billed {emulator['billed_images']}, {stored} object(s) stored"
    )
    return result


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": float(statistics.median(values)), "min": min(values), "max": max(values)}


def _summary(runs: list[dict[str, Any]], prompts: int) -> dict[str, Any]:
    """Medians and ranges of one mode's runs; the worker's time beside the task processes is the supervisor's."""
    slots = [run["slot_s"] for run in runs]
    return {
        "state": ",".join(sorted({run["state"] for run in runs})),
        "slot_s": _spread(slots),
        "slot_s_per_image": statistics.median(slots) / prompts,
        "task_process_s": _spread([run["task_process_s"] for run in runs]),
        "around_task_processes_s": _spread([run["slot_s"] - run["task_process_s"] for run in runs]),
        "end_to_end_s": _spread([run["end_to_end_s"] for run in runs]),
        "workloads": statistics.median(len(run["workloads"]) for run in runs),
        "late_exit_detections": sum(run.get("late_exit_detections", 0) for run in runs),
        "process_exits": sum(len(run["workloads"]) for run in runs),
        "billed_images": max(run["billed_images"] for run in runs),
    }


def _process_tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _sample(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and RSS (bytes) of a process tree, now."""
    import psutil

    cpu = rss = 0.0
    for process in _process_tree(pid):
        try:
            times = process.cpu_times()
            cpu += times.user + times.system
            rss += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return {"cpu_s": cpu, "rss": rss, "at": time.monotonic()}


def _usage_over(pid: int, seconds: float, stack: Stack) -> dict[str, Any]:
    import psutil

    before, requests_before = _sample(pid), stack.emulator.stats()["requests"]
    time.sleep(seconds)
    after, requests_after = _sample(pid), stack.emulator.stats()["requests"]
    elapsed = after["at"] - before["at"]
    processes = []
    for process in _process_tree(pid):
        try:
            processes.append(
                {"name": " ".join(process.cmdline()[:4])[-60:], "rss_mib": process.memory_info().rss / 2**20}
            )
        except psutil.NoSuchProcess:
            continue
    return {
        "window_s": elapsed,
        "cpu_s_per_min": (after["cpu_s"] - before["cpu_s"]) * 60 / elapsed,
        "rss_mib": after["rss"] / 2**20,
        "processes": processes,
        "polls_per_min": (requests_after - requests_before) * 60 / elapsed,
    }


def _submit_pending(stack: Stack, count: int) -> list[str]:
    """``count`` Visual API tasks that stay ``generating`` (an hour of latency), submitted from here."""
    from airflow.sdk import Connection

    from airflow_provider_jimeng.hooks.visual import REQ_KEY, VisualClient, visual_config

    logging.getLogger("airflow_provider_jimeng.hooks.visual").setLevel(logging.WARNING)  # a line per submit
    fields = json.loads(visual_connection_json(stack.emulator.base_url))
    conn = Connection(conn_id=VISUAL_CONN_ID, **{**fields, "extra": json.dumps(fields["extra"])})
    client = VisualClient(visual_config(conn), pool_maxsize=8)
    body = {"req_key": REQ_KEY, "size": 1024 * 1024, "force_single": True}
    try:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda index: client.submit({**body, "prompt": f"pending {index}"}), range(count)))
    finally:
        client.close()


def _triggerer_load(airflow: _Airflow, stack: Stack, pending: int, window: float, progress: Any) -> dict[str, Any]:
    pid = airflow.stack.processes["triggerer"].pid
    idle = _usage_over(pid, window, stack)
    stack.emulator.reset()
    stack.emulator.configure(latency=3600.0, visual_parallelism=None)
    ids = _submit_pending(stack, pending)
    (airflow.home / "pending.json").write_text(json.dumps(ids))
    run_id = airflow.trigger(PENDING_DAG)
    started = stack.emulator.stats()["requests"]
    # The first round of polls is under way: the trigger runs in the triggerer.
    airflow.stack.wait_for(
        "the trigger polling", lambda: stack.emulator.stats()["requests"] - started >= pending, 300, interval=0.5
    )
    polling = _usage_over(pid, window, stack)
    stack.emulator.reset()  # every id is now not_found: the trigger fires and the task ends
    run = airflow.wait_finished(PENDING_DAG, run_id)
    progress(
        f"  p9 triggerer, {pending} pending task ids: {polling['cpu_s_per_min']:.2f} CPU s/min "
        f"(idle {idle['cpu_s_per_min']:.2f}), RSS {polling['rss_mib']:.0f} MiB (idle {idle['rss_mib']:.0f}), "
        f"{polling['polls_per_min']:.0f} polls/min; the waiting task {run['state']}"
    )
    return {"pending_task_ids": pending, "idle": idle, "polling": polling, "state": run["state"]}


def p9_visual(
    stack: Stack,
    *,
    prompts: int,
    latency: float,
    parallelism: int,
    poll_interval: float,
    max_concurrency: int,
    pending: int,
    window: float,
    repeats: int,
    progress: Any,
) -> dict[str, Any]:
    """Measure both modes side by side, then the triggerer's cost for ``pending`` task ids."""
    from airflow_provider_jimeng.triggers.visual import DEFAULT_POLL_INTERVAL

    progress(
        f"P9 Visual API: {prompts} prompts, {latency} s per image, {parallelism} generated at once, "
        f"poll_interval {poll_interval} s; triggerer with {pending} pending ids"
    )
    spec = {
        "prompts": prompts,
        "bucket": stack.bucket,
        "poll_interval": poll_interval,
        "max_concurrency": max_concurrency,
    }
    airflow = _Airflow(stack, spec)
    try:
        airflow.start()
        # Untimed: the emulator renders each image once (it caches them) and the first task imports things.
        stack.emulator.configure(latency=0.0, visual_parallelism=None, images_per_minute=None, rate_limit_burst=None)
        warm = airflow.trigger(POLLING_DAG)
        airflow.wait_finished(POLLING_DAG, warm)
        stack.empty_bucket()
        stack.emulator.configure(latency=latency, visual_parallelism=parallelism)
        runs: dict[str, list[dict[str, Any]]] = {"deferrable": [], "polling": []}
        for repeat in range(repeats):
            # Alternated (D P, P D, ...), so that a drift in the machine's load hits both modes alike.
            order = ("deferrable", "polling") if repeat % 2 == 0 else ("polling", "deferrable")
            for mode in order:
                dag_id = DEFERRABLE_DAG if mode == "deferrable" else POLLING_DAG
                runs[mode].append(_measured_run(airflow, stack, dag_id, prompts, progress))
        triggerer = _triggerer_load(airflow, stack, pending, window, progress)
    except BaseException:
        progress(airflow.stack.diagnostics())
        raise
    finally:
        airflow.stop()
        stack.emulator.configure(latency=0.0, visual_parallelism=None)
    summary = {mode: _summary(mode_runs, prompts) for mode, mode_runs in runs.items()}
    deferrable, polling = summary["deferrable"], summary["polling"]
    slot_ratio = deferrable["slot_s"]["median"] / polling["slot_s"]["median"]
    end_to_end_ratio = deferrable["end_to_end_s"]["median"] / polling["end_to_end_s"]["median"]
    task_process_ratio = deferrable["task_process_s"]["median"] / polling["task_process_s"]["median"]
    complete = all(
        run["state"] == "success" and run["billed_images"] == prompts and run["objects_stored"] >= prompts
        for mode_runs in runs.values()
        for run in mode_runs
    )
    return {
        "params": {
            "prompts": prompts,
            "latency_s": latency,
            "parallelism": parallelism,
            "ideal_s": -(-prompts // parallelism) * latency,
            "poll_interval_s": poll_interval,
            "max_concurrency": max_concurrency,
            "trigger_poll_interval_s": DEFAULT_POLL_INTERVAL,
            "repeats": repeats,
        },
        "target": "deferrable worker-slot time <= 10% of polling's; end to end within 10% of polling's (medians)",
        **summary,
        "runs": runs,
        "slot_ratio": slot_ratio,
        "task_process_ratio": task_process_ratio,
        "end_to_end_ratio": end_to_end_ratio,
        "triggerer": triggerer,
        "complete": complete,
        "pass": bool(complete and slot_ratio <= SLOT_RATIO and end_to_end_ratio <= END_TO_END_RATIO),
    }
