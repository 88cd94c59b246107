"""The benchmarks (P1-P4 and the scaling sweep) and how one measurement is taken.

Every measurement is one fresh worker process (:mod:`bench.worker`) against the emulator and S3
children of :mod:`bench.services`. The emulator is reconfigured and reset between the worker's
warm-up and its measured run, so counters (images billed, 429s) and the rate limit belong to the
measured run alone. Stored objects are deleted after each measurement, untimed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.services import AWS_CONN_ID, JIMENG_CONN_ID, Stack
from bench.worker import READY, RESULT

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT = 900.0
MiB = 2**20


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: the issue's for a real run, tiny ones for ``--quick`` (harness smoke test)."""

    p1_prompts: int
    p1_latency: float
    p1_concurrency: int
    p2_prompts: int
    p2_cap: int
    p2_burst: int
    p2_latency: float
    p2_concurrency: int
    p3_prompts: tuple[int, int]
    p3_size: str
    p4_prompts: int
    scaling_latency: float
    scaling_concurrency: tuple[int, ...]
    scaling_concurrency_prompts: int
    scaling_prompts: tuple[int, ...]
    scaling_prompts_concurrency: int
    repeats: int
    #: P5: images per task run, the cap (IPM) and burst of the emulator's token bucket, its latency.
    p5_prompts: int = 16
    p5_cap: int = 240
    p5_burst: int = 8
    p5_latency: float = 0.5
    #: P5's variants (``--quick`` runs one: each starts worker processes).
    p5_variants: tuple[str, ...] = (
        "shared_all_busy",
        "unpaced_all_busy",
        "static_all_busy",
        "shared_alone",
        "static_alone",
    )
    #: P8: images in the gallery of one task instance, and their side in pixels.
    p8_images: int = 64
    p8_side: int = 2048
    #: P9: prompts, seconds per image, tasks the emulator generates at once, the operator's poll_interval
    #: and max_concurrency; pending task ids for the triggerer, and the window its usage is sampled over.
    p9_prompts: int = 64
    p9_latency: float = 5.0
    p9_parallelism: int = 8
    p9_poll_interval: float = 5.0
    p9_max_concurrency: int = 8
    p9_pending: int = 1000
    p9_window: float = 60.0

    def with_repeats(self, repeats: int) -> Sizes:
        return dataclasses.replace(self, repeats=repeats)


FULL = Sizes(
    p1_prompts=64,
    p1_latency=0.5,
    p1_concurrency=8,
    p2_prompts=120,
    p2_cap=240,
    p2_burst=8,
    p2_latency=0.5,
    p2_concurrency=16,
    p3_prompts=(8, 32),
    p3_size="4K",
    p4_prompts=64,
    scaling_latency=0.5,
    scaling_concurrency=(1, 2, 4, 8, 16),
    scaling_concurrency_prompts=64,
    scaling_prompts=(8, 16, 32, 64, 128),
    scaling_prompts_concurrency=8,
    repeats=3,
)
QUICK = Sizes(
    p1_prompts=8,
    p1_latency=0.1,
    p1_concurrency=4,
    p2_prompts=4,
    p2_cap=240,
    p2_burst=4,
    p2_latency=0.0,
    p2_concurrency=4,
    p3_prompts=(1, 2),
    p3_size="1K",
    p4_prompts=4,
    scaling_latency=0.02,
    scaling_concurrency=(1, 2),
    scaling_concurrency_prompts=4,
    scaling_prompts=(2,),
    scaling_prompts_concurrency=2,
    repeats=1,
    p5_prompts=2,
    p5_latency=0.0,
    p5_variants=("shared_all_busy",),
    p8_images=4,
    p8_side=512,
    p9_prompts=4,
    p9_latency=0.5,
    p9_parallelism=2,
    p9_poll_interval=1.0,
    p9_max_concurrency=4,
    p9_pending=50,
    p9_window=12.0,
)


class Worker:
    """A worker process and the line protocol to it (spec, READY, go, RESULT)."""

    def __init__(self, stack: Stack, workdir: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = self.stderr_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", str(workdir / f"{name}.log")],
            cwd=REPO_ROOT,
            env={**os.environ, **stack.env, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._output = (workdir / f"{name}.stdout").open("w")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """Queue protocol lines; keep the rest (the operator's log, as Airflow prints it) in a file."""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith((READY, RESULT)):
                self._lines.put(line)
            else:
                self._output.write(line)
        self._output.close()
        self._lines.put(None)

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def expect(self, prefix: str, timeout: float) -> str:
        """The rest of the next line starting with ``prefix`` (other output is skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise self.failure(f"no {prefix.strip()!r} within {timeout:.0f} s") from None
            if line is None:
                raise self.failure(f"exited (code {self.process.wait()}) before {prefix.strip()!r}")
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def failure(self, what: str) -> RuntimeError:
        self._stderr.flush()
        return RuntimeError(f"worker {self.name} {what}:\n{self.stderr_path.read_text()[-3000:]}")

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._stderr.close()


class Harness:
    """Takes single measurements, each in a worker process, with the emulator set up for it.

    ``fresh_workers`` (the default) starts a new worker per measurement; ``--quick`` reuses one.
    """

    def __init__(
        self,
        stack: Stack,
        workdir: Path,
        *,
        progress: Callable[[str], None],
        profile_dir: Path | None = None,
        fresh_workers: bool = True,
    ) -> None:
        self.stack = stack
        self.workdir = workdir
        self.progress = progress
        self.profile_dir = profile_dir
        self.fresh_workers = fresh_workers
        self._count = 0
        self._worker: Worker | None = None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def prime(self, n: int, size: str) -> None:
        """Render the run's images in the emulator beforehand (it caches them), untimed.

        The emulator renders an image the first time it is asked for it, two at a time; left to the
        measured run, those renders would stretch the emulator's latency and be charged to the operator.
        """
        import requests

        from airflow_provider_jimeng.emulator import DEFAULT_API_KEY
        from bench.worker import MODEL, prompt_text

        self.stack.emulator.configure(latency=0.0, images_per_minute=None, rate_limit_burst=None)
        url = f"{self.stack.emulator.base_url}/images/generations"
        headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}

        def render(index: int) -> None:
            body = {"model": MODEL, "prompt": prompt_text(index), "size": size, "watermark": True}
            requests.post(url, json=body, headers=headers, timeout=120).raise_for_status()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(render, range(n)))

    def measure(
        self,
        kind: str,
        *,
        n: int,
        size: str = "2K",
        response_format: str = "url",
        max_concurrency: int = 8,
        max_images_per_minute: float | None = None,
        storage: bool = True,
        latency: float = 0.0,
        images_per_minute: int | None = None,
        rate_limit_burst: int | None = None,
    ) -> dict[str, Any]:
        """One run of ``kind`` (``operator`` or ``naive``); the worker's numbers and the emulator's."""
        self._count += 1
        label = f"run{self._count:03d}-{kind}"
        spec = {
            "kind": kind,
            "label": label,
            "n": n,
            "size": size,
            "response_format": response_format,
            "max_concurrency": max_concurrency,
            "max_images_per_minute": max_images_per_minute,
            "storage": storage,
            "bucket": self.stack.bucket,
            "jimeng_conn_id": JIMENG_CONN_ID,
            "aws_conn_id": AWS_CONN_ID,
        }
        if self.profile_dir is not None:
            spec["profile"] = str(self.profile_dir / f"{label}.pstats")
        if self._worker is None or self.fresh_workers:
            self.close()
            self._worker = Worker(self.stack, self.workdir, label)
        worker = self._worker
        # The warm-up runs unthrottled and instantly; the measured run gets the scenario's emulator.
        self.stack.emulator.configure(latency=0.0, images_per_minute=None, rate_limit_burst=None)
        try:
            worker.send(json.dumps(spec))
            worker.expect(READY, timeout=WORKER_TIMEOUT)
            self.stack.empty_bucket()  # what the warm-up stored must not count as the run's
            self.stack.emulator.configure(
                latency=latency, images_per_minute=images_per_minute, rate_limit_burst=rate_limit_burst
            )
            self.stack.emulator.reset()
            worker.send("go")
            result: dict[str, Any] = json.loads(worker.expect(RESULT, timeout=WORKER_TIMEOUT))
        except BaseException:
            self.close()
            raise
        if self.fresh_workers:
            self.close()
        result["emulator"] = self.stack.emulator.stats()
        result["objects_stored"] = self.stack.empty_bucket()
        result["spec"] = {key: spec[key] for key in ("n", "size", "response_format", "max_concurrency")}
        self.progress(
            f"  {label}: n={n} K={max_concurrency} {size} {response_format} wall={result['wall_s']:.2f}s "
            f"cpu={result['cpu_s']:.2f}s rss+={result['rss_growth_mib']:.1f}MiB "
            f"billed={result['emulator']['billed_images']} 429s={result['emulator']['rate_limited']}"
            + (f" ERROR {result['error']}" if result.get("error") else "")
        )
        return result


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": float(statistics.median(values)), "min": min(values), "max": max(values)}


P1_LIMIT = 1.05


def p1_phases(run: dict[str, Any], ideal: float) -> dict[str, float]:
    """A run's generation window and the fixed set-up and finish around it, by the shared monotonic clock.

    The window runs from the first generation request received by the emulator to the last answer
    it sent (its request records' stamps); set-up from the task's start (``execute()`` called, or
    the naive task body entered) to that first request; finish from that last answer to the task's end.
    """
    first, last = run["emulator"]["first_request_at"], run["emulator"]["last_answer_at"]
    window, setup, finish = last - first, first - run["started_at"], run["ended_at"] - last
    return {
        "window_s": window,
        "window_ratio": window / ideal,
        "setup_s": setup,
        "setup_share": setup / ideal,
        "finish_s": finish,
        "finish_share": finish / ideal,
        "wall_s": run["wall_s"],
        "wall_ratio": run["wall_s"] / ideal,
    }


def p1_summary(operator: list[dict[str, Any]], naive: list[dict[str, Any]], *, n: int, ideal: float) -> dict[str, Any]:
    """P1 as decided: the operator's generation window over the ideal, at most 1.05 and no worse than
    the naive thread pool's in the same run (medians of the interleaved runs); set-up and finish beside it.
    """

    def side(runs: list[dict[str, Any]]) -> dict[str, Any]:
        phases = [p1_phases(run, ideal) for run in runs]
        return {key: _spread([phase[key] for phase in phases]) for key in phases[0]}

    ours, theirs = side(operator), side(naive)
    ratio, naive_ratio = ours["window_ratio"]["median"], theirs["window_ratio"]["median"]
    complete = all(run["outputs"] == n and not run["error"] for run in operator) and all(
        run["objects_stored"] == n for run in naive
    )
    return {
        "ratio": ratio,
        "naive_ratio": naive_ratio,
        "operator": ours,
        "naive_pool": theirs,
        "complete": complete,
        "pass": complete and ratio <= P1_LIMIT and ratio <= naive_ratio,
    }


def p1_throughput(h: Harness, s: Sizes) -> dict[str, Any]:
    """The operator's generation window against the ideal ceil(N/K) x latency and against the naive
    thread pool (the same K) measured in the same run, with the fixed set-up and finish beside it."""
    h.progress("P1 throughput")
    k = s.p1_concurrency
    settings: dict[str, Any] = {"n": s.p1_prompts, "size": "2K", "latency": s.p1_latency, "max_concurrency": k}
    ideal = math.ceil(s.p1_prompts / k) * s.p1_latency
    h.prime(s.p1_prompts, "2K")
    operator_runs: list[dict[str, Any]] = []
    naive_runs: list[dict[str, Any]] = []
    # Interleaved, and in alternating order, so that a change in the machine's load hits both alike.
    for repeat in range(s.repeats):
        order = ("operator", "naive") if repeat % 2 == 0 else ("naive", "operator")
        for kind in order:
            (operator_runs if kind == "operator" else naive_runs).append(h.measure(kind, **settings))
    # The operator without storage: the generation window of the API (emulator) and HTTP alone.
    unstored = h.measure("operator", storage=False, **settings)
    summary = p1_summary(operator_runs, naive_runs, n=s.p1_prompts, ideal=ideal)
    for run in (*operator_runs, *naive_runs, unstored):
        run["phases"] = p1_phases(run, ideal)
    return {
        "params": {**settings, "storage": "s3", "response_format": "url", "repeats": s.repeats},
        "ideal_s": ideal,
        "definition": "generation window (first request received by the emulator to last answer sent) "
        "/ (ceil(N/K) x latency)",
        "limit": P1_LIMIT,
        "target": f"window / ideal <= {P1_LIMIT} and <= the naive thread pool's (medians, same run)",
        **summary,
        "without_storage": unstored["phases"],
        "runs": operator_runs,
        "naive": naive_runs,
        "without_storage_run": unstored,
    }


def p2_rate_limit(h: Harness, s: Sizes) -> dict[str, Any]:
    """A burst of prompts against an emulator capped at ``p2_cap`` images a minute, paced and not."""
    h.progress("P2 rate limit")
    common: dict[str, Any] = {
        "n": s.p2_prompts,
        "size": "2K",
        "latency": s.p2_latency,
        "max_concurrency": s.p2_concurrency,
        "images_per_minute": s.p2_cap,
        "rate_limit_burst": s.p2_burst,
    }
    h.prime(s.p2_prompts, "2K")
    variants = {}
    for name, pacing in (("paced", float(s.p2_cap)), ("unpaced", None)):
        run = h.measure("operator", max_images_per_minute=pacing, **common)
        billed = run["emulator"]["billed_images"]
        rate = billed / run["wall_s"] * 60
        variants[name] = {
            "max_images_per_minute": pacing,
            "succeeded": run["error"] is None and run["outputs"] == s.p2_prompts,
            "images": billed,
            "wall_s": run["wall_s"],
            "images_per_minute": rate,
            "fraction_of_cap": rate / s.p2_cap,
            "http_429_seen_by_hook": run["usage"].get("rate_limited"),
            "retries": run["usage"].get("retries"),
            "http_429_sent_by_emulator": run["emulator"]["rate_limited"],
            "requests": run["emulator"]["requests"],
            "error": run["error"],
            "run": run,
        }
    paced = variants["paced"]
    return {
        "params": {**common, "emulator_limit": "token bucket", "storage": "s3"},
        "cap_images_per_minute": s.p2_cap,
        **variants,
        "target": "task succeeds, rate >= 95% of cap, 429s counted",
        "pass": bool(paced["succeeded"] and paced["fraction_of_cap"] >= 0.95),
    }


def p3_memory(h: Harness, s: Sizes) -> dict[str, Any]:
    """Peak RSS growth storing large images, in both response formats, at two N (must not grow with N)."""
    h.progress("P3 memory")
    small, large = s.p3_prompts
    results: dict[str, Any] = {}
    ok = True
    h.prime(large, s.p3_size)
    for response_format in ("url", "b64_json"):
        runs = {
            n: h.measure("operator", n=n, size=s.p3_size, response_format=response_format, max_concurrency=8)
            for n in (small, large)
        }
        growth = {n: run["rss_growth_mib"] for n, run in runs.items()}
        image_mib = runs[large]["image_bytes"] / max(1, runs[large]["outputs"]) / MiB
        # "No growth with N": the larger run may not need more than the smaller one plus 8 MiB of
        # allocator noise (arenas and fragmentation move by a few MiB between identical runs).
        bounded = growth[large] <= 64 and growth[small] <= 64 and growth[large] - growth[small] <= 8
        complete = all(run["outputs"] == n and not run["error"] for n, run in runs.items())
        ok = ok and bounded and complete
        results[response_format] = {
            "rss_growth_mib": {str(n): value for n, value in growth.items()},
            "rss_baseline_mib": {str(n): run["rss_baseline_mib"] for n, run in runs.items()},
            "wall_s": {str(n): run["wall_s"] for n, run in runs.items()},
            "mib_per_image": image_mib,
            "pass": bounded and complete,
            "runs": {str(n): run for n, run in runs.items()},
        }
    return {
        "params": {"size": s.p3_size, "n": [small, large], "max_concurrency": 8, "latency": 0.0, "storage": "s3"},
        **results,
        "target": f"growth <= 64 MiB, N={large} not above N={small} (+8 MiB noise)",
        "pass": ok,
    }


def p4_overhead(h: Harness, s: Sizes) -> dict[str, Any]:
    """CPU time per image of the operator against the naive loop, with the API answering at once."""
    h.progress("P4 overhead")
    settings: dict[str, Any] = {"n": s.p4_prompts, "size": "1K", "latency": 0.0}
    h.prime(s.p4_prompts, "1K")
    runs = [h.measure("operator", max_concurrency=8, **settings) for _ in range(s.repeats)]
    naive = [h.measure("naive", max_concurrency=1, **settings) for _ in range(s.repeats)]
    operator_cpu = [run["cpu_s"] / s.p4_prompts * 1000 for run in runs]
    naive_cpu = [run["cpu_s"] / s.p4_prompts * 1000 for run in naive]
    ratio = statistics.median(operator_cpu) / statistics.median(naive_cpu)
    ok = all(run["outputs"] == s.p4_prompts and not run["error"] for run in runs)
    return {
        "params": {**settings, "max_concurrency": 8, "storage": "s3", "response_format": "url"},
        "operator_cpu_ms_per_image": _spread(operator_cpu),
        "naive_cpu_ms_per_image": _spread(naive_cpu),
        "ratio": ratio,
        "target": "ratio <= 1.2",
        "pass": ok and ratio <= 1.2,
        "runs": runs,
        "naive": naive,
    }


def scaling(h: Harness, s: Sizes) -> dict[str, Any]:
    """Wall time against concurrency (fixed N) and against N (fixed concurrency), with their ideals."""
    h.progress("Scaling")
    latency = s.scaling_latency
    h.prime(max(s.scaling_concurrency_prompts, *s.scaling_prompts), "2K")
    by_concurrency = []
    for k in s.scaling_concurrency:
        run = h.measure("operator", n=s.scaling_concurrency_prompts, max_concurrency=k, latency=latency)
        ideal = math.ceil(s.scaling_concurrency_prompts / k) * latency
        by_concurrency.append({"max_concurrency": k, "wall_s": run["wall_s"], "ideal_s": ideal, "cpu_s": run["cpu_s"]})
    by_prompts = []
    for n in s.scaling_prompts:
        run = h.measure("operator", n=n, max_concurrency=s.scaling_prompts_concurrency, latency=latency)
        ideal = math.ceil(n / s.scaling_prompts_concurrency) * latency
        by_prompts.append({"n": n, "wall_s": run["wall_s"], "ideal_s": ideal, "cpu_s": run["cpu_s"]})
    return {
        "params": {
            "latency": latency,
            "size": "2K",
            "storage": "s3",
            "n_for_concurrency_sweep": s.scaling_concurrency_prompts,
            "concurrency_for_n_sweep": s.scaling_prompts_concurrency,
        },
        "by_concurrency": by_concurrency,
        "by_prompts": by_prompts,
    }


P5_CONN_ID = "jimeng_p5"
P5_REDIS_CONN_ID = "redis_bench"
P5_WORKERS = 2
P5_TASKS_PER_WORKER = 2


def _p5_group(
    h: Harness,
    s: Sizes,
    name: str,
    *,
    workers: int,
    tasks: int,
    n: int,
    extras: dict[str, Any],
    redis_url: str,
) -> dict[str, Any]:
    """``workers`` processes running ``tasks`` task runs each, all at once, on one account (one key).

    Every task uses the jimeng connection ``jimeng_p5`` with ``extras`` (the shared limiter's or a
    per-task pace); the emulator's token bucket (``p5_cap`` a minute, burst ``p5_burst``) is the account.
    """
    import redis

    from airflow_provider_jimeng.testing import jimeng_connection_json, redis_connection_json

    h.stack.emulator.configure(latency=0.0, images_per_minute=None, rate_limit_burst=None)
    env = {
        f"AIRFLOW_CONN_{P5_CONN_ID.upper()}": jimeng_connection_json(
            h.stack.emulator.base_url, **h.stack.connection_extras, **extras
        ),
        f"AIRFLOW_CONN_{P5_REDIS_CONN_ID.upper()}": redis_connection_json(redis_url),
    }
    spec = {
        "kind": "operator",
        "n": n,
        "tasks": tasks,
        "size": "1K",
        "response_format": "url",
        "max_concurrency": 4,
        "max_images_per_minute": None,
        "storage": False,
        "bucket": h.stack.bucket,
        "jimeng_conn_id": P5_CONN_ID,
        "aws_conn_id": AWS_CONN_ID,
    }
    group = []
    try:
        for index in range(workers):
            h._count += 1
            label = f"run{h._count:03d}-p5-{name}-w{index}"
            group.append(Worker(h.stack, h.workdir, label, env))
            group[-1].send(json.dumps({**spec, "label": label}))
        for worker in group:
            worker.expect(READY, timeout=WORKER_TIMEOUT)
        redis.Redis.from_url(redis_url).flushall()  # the warm-ups' reservations are not the run's
        h.stack.emulator.configure(latency=s.p5_latency, images_per_minute=s.p5_cap, rate_limit_burst=s.p5_burst)
        h.stack.emulator.reset()
        for worker in group:
            worker.send("go")
        runs = [json.loads(worker.expect(RESULT, timeout=WORKER_TIMEOUT)) for worker in group]
    finally:
        for worker in group:
            worker.close()
    emulator = h.stack.emulator.stats()
    billed = emulator["billed_images"]
    window = emulator.get("last_answer_at", 0.0) - emulator.get("first_request_at", 0.0)
    admitted = emulator.pop("admitted_at")
    # The sustained rate: requests admitted (one image each) after the first second, whose burst a long
    # run does not get again.
    steady = [at for at in admitted if at >= admitted[0] + 1.0] if admitted else []
    sustained = (len(steady) - 1) / (steady[-1] - steady[0]) * 60 if len(steady) > 2 else None
    failed = sum(run.get("failed_tasks", 1 if run.get("error") else 0) for run in runs)
    window_rate = billed / window * 60 if window > 0 else None
    result = {
        "workers": workers,
        "task_runs": workers * tasks,
        "images_per_task": n,
        "extras": {key: value for key, value in extras.items() if key != "redis_conn_id"},
        "shared_limiter": "account_images_per_minute" in extras,
        "images": billed,
        "expected_images": workers * tasks * n,
        "window_s": window,
        "images_per_minute": window_rate,
        "fraction_of_cap": window_rate / s.p5_cap if window_rate else None,
        "sustained_images_per_minute": sustained,
        "sustained_fraction_of_cap": sustained / s.p5_cap if sustained else None,
        "http_429": emulator["rate_limited"],
        "failed_task_tries": failed,
        "retries": sum(int(run.get("usage", {}).get("retries") or 0) for run in runs),
        "wall_s": max(run["wall_s"] for run in runs),
        "emulator": emulator,
        "errors": [run["error"] for run in runs if run.get("error")],
    }
    h.progress(
        f"  p5 {name}: {workers}x{tasks} task runs, {billed} images in {window:.1f}s = "
        f"{(window_rate or 0):.0f}/min ({(result['fraction_of_cap'] or 0):.0%} of cap; sustained "
        f"{(sustained or 0):.0f}/min), 429s={result['http_429']} failed tries={failed}"
    )
    return result


def p5_shared_limit(h: Harness, s: Sizes) -> dict[str, Any]:
    """P5: one account (the emulator's token bucket), many task runs on two worker processes.

    The shared limiter (Redis) against the static split (``max_images_per_minute = cap / slots``) and
    against no pacing at all, in one run: the account's rate reached, the 429s, failed task tries.
    """
    from airflow_provider_jimeng.testing import RedisServer

    h.progress("P5 shared account limit")
    cap, slots = s.p5_cap, P5_WORKERS * P5_TASKS_PER_WORKER
    h.prime(s.p5_prompts * 2, "1K")
    shared = {"redis_conn_id": P5_REDIS_CONN_ID, "account_images_per_minute": cap}
    static = {"max_images_per_minute": cap / slots}
    n = s.p5_prompts
    busy: dict[str, Any] = {"workers": P5_WORKERS, "tasks": P5_TASKS_PER_WORKER, "n": n}
    alone: dict[str, Any] = {"workers": 1, "tasks": 1}
    plans: dict[str, dict[str, Any]] = {
        "shared_all_busy": {"extras": shared, **busy},
        "unpaced_all_busy": {"extras": {}, **busy},
        "static_all_busy": {"extras": static, **busy},
        "shared_alone": {"extras": shared, "n": n * 2, **alone},
        "static_alone": {"extras": static, "n": max(2, n // 2), **alone},
    }
    with RedisServer() as server:
        variants = {
            name: _p5_group(h, s, name.replace("_", "-"), redis_url=server.url, **plans[name]) for name in s.p5_variants
        }
        redis_kind = "redis-server" if server.real else "fakeredis"
    busy_ok = variants.get("shared_all_busy", {})
    alone_ok = variants.get("shared_alone", {})
    return {
        "params": {
            "cap_images_per_minute": cap,
            "emulator_burst": s.p5_burst,
            "latency": s.p5_latency,
            "workers": P5_WORKERS,
            "task_runs_per_worker": P5_TASKS_PER_WORKER,
            "max_concurrency": 4,
            "size": "1K",
            "storage": "none (URLs)",
            "redis": redis_kind,
        },
        "definition": "images billed / (first request received to last answer sent) x 60; sustained: "
        "the requests admitted after the first second, first to last",
        "target": "shared limiter: all slots busy >= 95% of cap with 0 failed tries; one task alone >= 90%",
        **variants,
        "pass": bool(
            (busy_ok.get("sustained_fraction_of_cap") or 0) >= 0.95
            and busy_ok.get("failed_task_tries") == 0
            and (alone_ok.get("sustained_fraction_of_cap") or 0) >= 0.90
        ),
    }


def p8_gallery(h: Harness, s: Sizes) -> dict[str, Any]:
    """P8: the Images tab with 64 real-size images in headless Chromium (:mod:`bench.gallery`)."""
    from bench.gallery import p8_gallery as measure

    return measure(h.stack, images=s.p8_images, side=s.p8_side, progress=h.progress)


def p9_visual(h: Harness, s: Sizes) -> dict[str, Any]:
    """P9: the Visual API deferrable against polling, under a real scheduler and triggerer (:mod:`bench.visual`)."""
    from bench.visual import p9_visual as measure

    return measure(
        h.stack,
        prompts=s.p9_prompts,
        latency=s.p9_latency,
        parallelism=s.p9_parallelism,
        poll_interval=s.p9_poll_interval,
        max_concurrency=s.p9_max_concurrency,
        pending=s.p9_pending,
        window=s.p9_window,
        repeats=s.repeats,
        progress=h.progress,
    )


SECTIONS: dict[str, Callable[[Harness, Sizes], dict[str, Any]]] = {
    "p1_throughput": p1_throughput,
    "p2_rate_limit": p2_rate_limit,
    "p3_memory": p3_memory,
    "p4_overhead": p4_overhead,
    "scaling": scaling,
    "p5_shared_limit": p5_shared_limit,
    "p8_gallery": p8_gallery,
    "p9_visual": p9_visual,
}
#: Sections a ``--quick`` run of every section leaves out: P8 starts Airflow's API server twice and a
#: browser, P9 a whole Airflow (``python -m bench --only p8 --quick`` runs it small).
NOT_IN_QUICK = frozenset({"p8_gallery", "p9_visual"})


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="jimeng-bench-runs-"))
