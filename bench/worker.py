"""Measured workloads in a worker process: ``python -m bench.worker LOG_PATH``, specs on stdin.

The harness starts a fresh worker per measurement, which keeps runs from inheriting each other's
heap, thread pools and connection pools and gives an honest RSS baseline (``--quick`` reuses one
worker for every run, to stay fast). Before its first run of a workload the worker runs it once on
one image (imports, connection lookup, botocore's service model, first connections); for each spec
it then prints ``READY`` and waits for ``go`` so that the harness can reset the emulator's counters
and rate limit, measures exactly one run and prints ``RESULT`` with the numbers as JSON.

The operator runs through ``JiMengGenerateOperator.execute(context)`` with a minimal but real
context (a task instance that records XComs): the execute path a worker runs, without the
scheduler, the supervisor and the metadata database, which cost the same whatever the operator does.
The bench uses nothing of the operator but its public surface (constructor, ``execute``, the
``images`` and ``usage`` XComs, ``JiMengGenerationIncompleteError``); when its requests went out and
its answers came back is read from the emulator. The naive baseline is a ``PythonOperator`` body: a
thread pool of ``requests.post``, a download and ``put_object``.
"""

from __future__ import annotations

import cProfile
import gc
import json
import logging
import pstats
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

READY = "BENCH-WORKER-READY"
_WARMED_UP: set[str] = set()
RESULT = "BENCH-WORKER-RESULT "
MODEL = "doubao-seedream-4-0-250828"


def prompt_text(index: int) -> str:
    """Deterministic prompts: the emulator's render cache then serves repeated runs."""
    return f"bench prompt {index}: a lighthouse on a cliff at dusk, watercolour"


@dataclass
class BenchTaskInstance:
    """What the operator reads from ``context["ti"]``: ids for its keys, and ``xcom_push``."""

    dag_id: str
    run_id: str
    task_id: str = "generate"
    map_index: int = -1
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


class MemoryProbe:
    """Peak RSS of this process from a chosen moment on.

    Linux resets the peak (``VmHWM``) when ``5`` is written to ``/proc/self/clear_refs``; where that
    is refused, a thread samples ``VmRSS`` every 5 ms instead (and may miss short spikes).
    """

    def __init__(self) -> None:
        self.method = "VmHWM after clear_refs"
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status(field_name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field_name} not in /proc/self/status")

    def rss(self) -> int:
        return self._status("VmRSS")

    def start(self) -> int:
        """Reset the peak and return the current RSS (the baseline)."""
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "VmRSS sampled every 5 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        baseline = self.rss()
        self._peak = baseline
        return baseline

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self.rss())

    def peak(self) -> int:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return max(self._peak, self.rss())
        return self._status("VmHWM")


class ThreadProfiler:
    """cProfile of CPU time for every thread started from now on, plus this one (cProfile sees one thread).

    Only for finding where time goes (``--profile``): it slows the measured run several-fold.
    """

    def __init__(self) -> None:
        self._profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def _install(self, *_: Any) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)  # CPU time of the profiled thread, not wall time
        with self._lock:
            self._profiles.append(profile)
        profile.enable()

    def start(self) -> None:
        threading.setprofile(self._install)
        self._install()

    def dump(self, path: str) -> None:
        threading.setprofile(None)
        with self._lock:
            main, *others = self._profiles
        stats = pstats.Stats(*others, main) if others else pstats.Stats(main)
        stats.dump_stats(path)


def _operator_run(spec: dict[str, Any], prompts: list[str], label: str) -> Callable[[], dict[str, Any]]:
    """The operator's task: built here (in Airflow, at DAG parse), the returned call is ``execute()``.

    Only the operator's public surface: its constructor, ``execute(context)``, the ``images`` and
    ``usage`` XComs and ``JiMengGenerationIncompleteError``.
    """
    from airflow_provider_jimeng.exceptions import JiMengGenerationIncompleteError
    from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

    operator = JiMengGenerateOperator(
        task_id="generate",
        prompt=prompts,
        jimeng_conn_id=spec["jimeng_conn_id"],
        aws_conn_id=spec["aws_conn_id"],
        s3_bucket=spec["bucket"] if spec["storage"] else None,
        s3_key_prefix="bench",
        size=spec["size"],
        response_format=spec["response_format"],
        max_concurrency=spec["max_concurrency"],
        max_images_per_minute=spec.get("max_images_per_minute"),
    )
    ti = BenchTaskInstance(dag_id="bench", run_id=label)

    def execute() -> dict[str, Any]:
        error = None
        try:
            outputs = operator.execute({"ti": ti})  # type: ignore[typeddict-item]  # a stand-in task instance
        except JiMengGenerationIncompleteError as exc:
            outputs, error = [], f"{type(exc).__name__}: {str(exc)[:300]}"
        stored = sum(int(record.get("bytes") or 0) for record in ti.xcoms.get("images", []))
        return {"outputs": len(outputs), "error": error, "usage": ti.xcoms.get("usage", {}), "image_bytes": stored}

    return execute


def _naive_run(spec: dict[str, Any], prompts: list[str], label: str) -> Callable[[], dict[str, Any]]:
    """What a user writes in a PythonOperator: a thread pool of ``max_concurrency`` (K) mapping each
    prompt to ``requests.post``, a download of its URL and ``boto3`` ``put_object``.

    The returned call is the whole task body, the connection lookup and S3 client included.
    """
    return lambda: _naive_task(spec, prompts, label)


def _naive_task(spec: dict[str, Any], prompts: list[str], label: str) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    try:  # Airflow 3.1+
        from airflow.sdk import BaseHook
    except ImportError:  # Airflow 3.0
        from airflow.hooks.base import BaseHook  # type: ignore[no-redef]

    conn = BaseHook.get_connection(spec["jimeng_conn_id"])
    s3 = S3Hook(aws_conn_id=spec["aws_conn_id"]).get_conn()
    headers = {"Authorization": f"Bearer {conn.password}"}

    def generate_and_store(index: int) -> int:
        body = {
            "model": MODEL,
            "prompt": prompts[index],
            "size": spec["size"],
            "response_format": "url",
            "watermark": True,
        }
        response = requests.post(f"{conn.host}/images/generations", json=body, headers=headers, timeout=300)
        response.raise_for_status()
        image = requests.get(response.json()["data"][0]["url"], timeout=300)
        image.raise_for_status()
        s3.put_object(
            Bucket=spec["bucket"],
            Key=f"naive/{label}/{index:04d}.jpeg",
            Body=image.content,
            ContentType="image/jpeg",
        )
        return len(image.content)

    with ThreadPoolExecutor(spec["max_concurrency"]) as pool:
        stored = sum(pool.map(generate_and_store, range(len(prompts))))
    return {"outputs": len(prompts), "error": None, "usage": {"generated_images": len(prompts)}, "image_bytes": stored}


def _side_by_side(runs: list[Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    """Every run in a thread of its own at once; their outcomes, and the sums of their counts.

    A task that raises counts as a failed try (as in Airflow), with the error's type and message.
    """
    outcomes: list[dict[str, Any]] = [{} for _ in runs]

    def run_one(index: int) -> None:
        try:
            outcomes[index] = runs[index]()
        except Exception as exc:  # a failed task try, whatever it raised
            outcomes[index] = {"outputs": 0, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "usage": {}}

    threads = [threading.Thread(target=run_one, args=(index,)) for index in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    usage: dict[str, int] = {}
    for outcome in outcomes:
        for key, value in outcome.get("usage", {}).items():
            if isinstance(value, int):
                usage[key] = usage.get(key, 0) + value
    errors = [outcome["error"] for outcome in outcomes if outcome.get("error")]
    return {
        "outputs": sum(outcome.get("outputs", 0) for outcome in outcomes),
        "error": errors[0] if errors else None,
        "failed_tasks": len(errors),
        "usage": usage,
        "image_bytes": sum(outcome.get("image_bytes", 0) for outcome in outcomes),
        "tasks": outcomes,
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm up, wait for the harness's ``go``, measure one run; returns the measurement."""
    workload = _operator_run if spec["kind"] == "operator" else _naive_run
    label = spec["label"]
    if spec["kind"] not in _WARMED_UP:  # once per workload and process (a --quick worker serves many runs)
        workload({**spec, "max_images_per_minute": None}, ["bench warm-up image"], f"{label}-warmup")()
        _WARMED_UP.add(spec["kind"])
    probe = MemoryProbe()
    print(READY, flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("the harness did not say go")
    prompts = [prompt_text(index) for index in range(spec["n"])]
    tasks = int(spec.get("tasks") or 1)
    if tasks == 1:
        task = workload(spec, prompts, label)
    else:  # task runs side by side in one process, as a Celery worker with several slots runs them
        runs = [workload(spec, prompts, f"{label}-task{index}") for index in range(tasks)]
        task = lambda: _side_by_side(runs)  # noqa: E731
    baseline = probe.start()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = time.process_time()
    started_at = time.monotonic()
    started = time.perf_counter()
    profiler = ThreadProfiler() if spec.get("profile") else None
    if profiler is not None:
        profiler.start()
    outcome = task()
    wall = time.perf_counter() - started
    ended_at = time.monotonic()
    if profiler is not None:
        profiler.dump(spec["profile"])
    cpu = time.process_time() - cpu_before
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    peak = probe.peak()
    return {
        **outcome,
        "wall_s": wall,
        "started_at": started_at,
        "ended_at": ended_at,
        "cpu_s": cpu,
        "user_s": usage_after.ru_utime - usage_before.ru_utime,
        "system_s": usage_after.ru_stime - usage_before.ru_stime,
        "rss_baseline_mib": baseline / 2**20,
        "rss_peak_mib": peak / 2**20,
        "rss_growth_mib": (peak - baseline) / 2**20,
        "rss_method": probe.method,
        "voluntary_switches": usage_after.ru_nvcsw - usage_before.ru_nvcsw,
        "involuntary_switches": usage_after.ru_nivcsw - usage_before.ru_nivcsw,
    }


def main(argv: list[str]) -> int:
    """Serve specs from stdin, one JSON object a line, until stdin closes."""
    (log_path,) = argv
    # The operator's own lines go through Airflow's structlog set-up to stdout (the harness keeps
    # them in a file), as formatted as in a task; plain stdlib loggers (botocore, urllib3) to LOG_PATH.
    import airflow_provider_jimeng.operators.jimeng  # noqa: F401

    logging.basicConfig(
        filename=log_path, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True
    )
    for line in sys.stdin:
        if line.strip():
            result = run(json.loads(line))
            print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
