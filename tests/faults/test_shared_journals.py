"""Journals that follow the retry (issue 15, part 2): S3 fails mid-run, and the retry runs on another worker.

With Celery a retry often lands on another worker, which cannot read the first worker's local
journal. Each test runs try 1 and its retry with ``dag.test()`` in this process; "another worker" is
simulated by pointing the retry's local journal directory (``tempfile.tempdir``) somewhere else, so
that only what try 1 left in S3 or in the shared Redis can serve it. What must hold:

* with a shared store (``redis_conn_id``): the retry on another worker pays for nothing again, in
  both response formats (``b64_json``: the Redis value holds the image data, its only copy);
* without one: it pays again for at most the requests that were in flight (``max_concurrency``),
  as docs/faults.md says;
* Redis failing at the same time as S3: the local journal is still written, the log says Redis
  failed too, the try fails cleanly, and a retry on the same worker pays for nothing again;
* after the first refused journal write, nothing more is sent, not even a retry the hook was waiting
  to make after a 429.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from airflow_provider_jimeng.coordination import redis_client
from airflow_provider_jimeng.coordination.journals import SHARED_JOURNAL_TTL_SECONDS, SharedJournal
from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.s3 import LocalJournal
from airflow_provider_jimeng.testing import RedisServer, jimeng_connection_json, redis_connection_json
from tests.faults.conftest import (
    FAST_RETRIES,
    FORMATS,
    Pipeline,
    PipelineRun,
    S3Gate,
    dag_for,
    stop_s3_while_prompt_1_is_generated,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

RUN_ID = "manual__2025-01-01T00:00:00+00:00"
JOURNAL_KEY = re.compile(r"jimeng:journal:[0-9a-f]{40}")


@pytest.fixture(autouse=True)
def _fresh_redis_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test builds its Redis client from its own connection (the cache is per process)."""
    monkeypatch.setattr(redis_client, "_clients", {})


@pytest.fixture
def workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """Two workers' temp dirs; the test starts on ``a`` (``tempfile.tempdir``) and may move the retry to ``b``."""
    dirs = {name: tmp_path / f"worker-{name}" for name in ("a", "b")}
    for path in dirs.values():
        path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(dirs["a"]))
    return dirs


#: These tests count requests exactly: a read timeout no busy machine reaches (the faults suite's 1 s
#: once timed out a request on a loaded CI machine, and the hook's retry of it was a third request).
PATIENT = {**FAST_RETRIES, "timeout": 30}


def _connect(monkeypatch: pytest.MonkeyPatch, emulator: JiMengEmulator, **extras: Any) -> None:
    connection = jimeng_connection_json(emulator.base_url, **{**PATIENT, **extras})
    monkeypatch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", connection)


def _shared_store(monkeypatch: pytest.MonkeyPatch, emulator: JiMengEmulator, **extras: Any) -> None:
    _connect(monkeypatch, emulator, redis_conn_id="redis_shared", **extras)


def _journal_keys(server: RedisServer) -> list[str]:
    client = redis.Redis.from_url(server.url)
    return sorted(key.decode() for key in client.scan_iter("jimeng:journal:*"))


def _retry_on_worker_b(
    pipeline: Pipeline,
    workers: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    dag_id: str,
    *,
    between_tries: Callable[[], None],
) -> PipelineRun:
    """Two prompts whose try 1 fails on worker a; ``between_tries`` runs there, then the retry runs on
    worker b (a journal directory of its own) and succeeds."""

    def move() -> None:
        between_tries()
        monkeypatch.setattr(tempfile, "tempdir", str(workers["b"]))

    pipeline.before_retry(move)
    run = pipeline.run(dag_id, prompts=["a red fox", "a grey owl"])
    assert run.state == "success", run.errors
    assert run.try_number == 2
    return run


@pytest.mark.parametrize("fmt", FORMATS)
def test_with_a_shared_store_a_retry_on_another_worker_pays_nothing_again(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    redis_conn: RedisServer,
    workers: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    """Regression: the retry on another worker could not read the local journal and paid again."""
    _shared_store(monkeypatch, emulator)
    dag_id = dag_for(fmt, "serial")
    space = TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    outage = stop_s3_while_prompt_1_is_generated(pipeline, emulator, gate, space.image_key(0, 0), monkeypatch)
    after_try_1: dict[str, Any] = {}

    def on_worker_a() -> None:
        client = redis.Redis.from_url(redis_conn.url)
        keys = _journal_keys(redis_conn)
        after_try_1.update(
            billed=emulator.billed_images,
            keys=keys,
            ttls=[client.ttl(key) for key in keys],
            shared=SharedJournal(client, space).read_many(range(2)),
            local_a=LocalJournal(space).read_many(range(2)),
        )
        outage.repair()

    run = _retry_on_worker_b(pipeline, workers, monkeypatch, dag_id, between_tries=on_worker_a)
    (message,) = run.errors
    assert "prompt 1 image 0: not stored" in message
    # Try 1 paid for both prompts and kept prompt 1's answer in Redis, under a key that names nothing,
    # for less than the signed URLs' 24 h; with its image data in b64_json mode (its only copy).
    assert after_try_1["billed"] == 2
    assert after_try_1["keys"]
    assert all(JOURNAL_KEY.fullmatch(key) for key in after_try_1["keys"])
    assert all(0 < ttl <= SHARED_JOURNAL_TTL_SECONDS < 24 * 3600 for ttl in after_try_1["ttls"])
    entry = after_try_1["shared"][1]
    assert entry.images[0].b64_json if fmt == "b64_json" else entry.images[0].url
    # Worker a's disk keeps a copy too: Redis is a cache, never the only copy of a paid answer.
    assert 1 in after_try_1["local_a"]
    # The retry, on worker b, stored prompt 1 from the shared journal: nothing paid twice.
    accounting = pipeline.account()
    assert accounting.requests == 2
    assert accounting.billed == accounting.stored == 2
    assert run.xcom["usage"]["this_try"]["requests"] == 0
    # Try 1's counts too (its records.json was refused: they were kept in Redis).
    assert run.xcom["usage"]["generated_images"] == 2
    assert _journal_keys(redis_conn) == [], "the shared journal goes once records.json covers its prompt"


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_redis_that_restarts_empty_before_the_retry_costs_nothing(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    redis_conn: RedisServer,
    workers: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    """Regression (issue 20, break 8): a paid answer S3 refused went to the shared Redis only; a Redis
    without persistence that restarted before the retry lost it (url: paid again; b64_json: the image
    data gone) and with it try 1's counters (``usage`` summed fewer images than were billed)."""
    _shared_store(monkeypatch, emulator)
    dag_id = dag_for(fmt, "serial")
    space = TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    outage = stop_s3_while_prompt_1_is_generated(pipeline, emulator, gate, space.image_key(0, 0), monkeypatch)
    after_try_1: dict[str, Any] = {}

    def redis_restarts_empty() -> None:
        client = redis.Redis.from_url(redis_conn.url)
        after_try_1.update(billed=emulator.billed_images, keys=len(_journal_keys(redis_conn)))
        client.flushall()  # what a restart without persistence leaves
        outage.repair()

    pipeline.before_retry(redis_restarts_empty)
    run = pipeline.run(dag_id, prompts=["a red fox", "a grey owl"])

    assert run.state == "success", run.errors
    assert run.try_number == 2
    assert after_try_1["billed"] == 2
    assert after_try_1["keys"] >= 1, "try 1 journaled prompt 1 in Redis, which then forgot it"
    accounting = pipeline.account()
    assert accounting.requests == 2, "the retry stored prompt 1 from this worker's copy: no new request"
    assert accounting.billed == accounting.stored == 2
    usage = run.xcom["usage"]
    assert usage["this_try"]["requests"] == 0
    assert usage["generated_images"] == accounting.billed, "try 1's counters survived the restart"
    assert not LocalJournal(space).read_many(range(2)), "the local copy goes once records.json covers it"


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_a_shared_store_a_retry_on_another_worker_pays_again_for_what_was_in_flight(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    workers: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    """What docs/faults.md admits without Redis: at most the requests in flight are paid again."""
    _connect(monkeypatch, emulator)
    dag_id = dag_for(fmt, "serial")  # max_concurrency=1
    space = TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    outage = stop_s3_while_prompt_1_is_generated(pipeline, emulator, gate, space.image_key(0, 0), monkeypatch)
    after_try_1: dict[str, Any] = {}

    def on_worker_a() -> None:
        after_try_1.update(billed=emulator.billed_images, local_a=LocalJournal(space).read_many(range(2)))
        outage.repair()

    run = _retry_on_worker_b(pipeline, workers, monkeypatch, dag_id, between_tries=on_worker_a)
    assert after_try_1["billed"] == 2
    assert 1 in after_try_1["local_a"], "kept on worker a, which the retry does not run on"
    accounting = pipeline.account()
    assert accounting.stored == 2
    # Prompt 1 was the one request in flight when S3 stopped: paid again, and nothing else.
    assert accounting.billed - accounting.stored == 1 <= 1  # max_concurrency of the serial DAG
    # Try 1's counts reached worker b only up to its last S3 journal batch (its records.json was refused,
    # and the counts it then kept on worker a's disk are not read there): fewer than billed, never more.
    usage = run.xcom["usage"]
    assert usage["this_try"]["generated_images"] == 1
    assert usage["this_try"]["generated_images"] <= usage["generated_images"] <= accounting.billed


@pytest.mark.parametrize("fmt", FORMATS)
def test_redis_failing_with_s3_still_keeps_the_local_journal_and_fails_cleanly(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    redis_conn: RedisServer,
    workers: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fmt: str,
) -> None:
    _shared_store(monkeypatch, emulator)
    # The shared Redis is down for the whole test: a connection to a port nothing listens on.
    dead = RedisServer()
    monkeypatch.setenv("AIRFLOW_CONN_REDIS_SHARED", redis_connection_json(f"redis://127.0.0.1:{dead.port}/0"))
    dag_id = dag_for(fmt, "serial")
    space = TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    outage = stop_s3_while_prompt_1_is_generated(pipeline, emulator, gate, space.image_key(0, 0), monkeypatch)
    after_try_1: dict[str, Any] = {}

    def repair_s3_only() -> None:
        after_try_1.update(billed=emulator.billed_images, local=LocalJournal(space).read_many(range(2)))
        outage.repair()

    pipeline.before_retry(repair_s3_only)

    with caplog.at_level(logging.INFO):
        run = pipeline.run(dag_id, prompts=["a red fox", "a grey owl"])

    assert run.state == "success", run.errors
    assert run.try_number == 2
    assert run.error_types == ["JiMengGenerationIncompleteError"]
    (message,) = run.errors
    assert "prompt 1 image 0: not stored" in message
    assert "kept for a retry" in message
    # The local journal was still written (data included in b64_json mode), and the log says Redis failed.
    entry = after_try_1["local"][1]
    assert entry.images[0].b64_json if fmt == "b64_json" else entry.images[0].url
    assert "could not journal it in the shared Redis either (ConnectionError)" in caplog.text
    assert f"127.0.0.1:{dead.port}" not in caplog.text.split("could not journal it")[1][:300]
    # The retry on the same worker finished it from the local journal: nothing paid twice.
    accounting = pipeline.account()
    assert after_try_1["billed"] == accounting.requests == 2
    assert accounting.billed == accounting.stored == 2
    assert not LocalJournal(space).read_many(range(2))


@pytest.mark.parametrize("shared", [False, True], ids=["local", "redis"])
def test_nothing_is_sent_after_the_first_refused_journal_write(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    redis_conn: RedisServer,
    workers: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    shared: bool,
) -> None:
    """Regression: a prompt waiting in the hook to retry a 429 sent its retry after S3 refused a journal.

    Two prompts in flight: one answered at once (its journal write is refused), the other answered
    429 with ``Retry-After: 5``. The hook's wait for that retry must end at the refusal, unsent.
    """
    # Retry-After is honoured up to retry_max_wait: the retry would come 5 s later, long after the refusal.
    extras = {"max_retries": 2, "retry_max_wait": 10}
    if shared:
        _shared_store(monkeypatch, emulator, **extras)
    else:
        _connect(monkeypatch, emulator, **extras)
    emulator.inject(Fault("rate_limit", retry_after=5))
    gate.mode = "deny_writes"
    after_try_1: dict[str, int] = {}

    def repair() -> None:
        after_try_1.update(requests=emulator.request_count, billed=emulator.billed_images)
        gate.mode = "pass"

    pipeline.before_retry(repair)

    run = pipeline.run(dag_for("url"), prompts=["a red fox", "a grey owl"])

    assert run.state == "success", run.errors
    assert run.try_number == 2
    # Try 1: one 429 and one paid answer, then nothing: the retry the hook was waiting to send never went.
    assert after_try_1 == {"requests": 2, "billed": 1}
    (message,) = run.errors
    assert "AccessDenied" in message
    assert "ModelAccountIpmRateLimitExceeded" in message
    accounting = pipeline.account()
    assert accounting.requests == 3  # try 2 sent only the prompt that never got an answer
    assert accounting.billed == accounting.stored == 2


def _threads_waiting_for_s3() -> int:
    """Generation threads blocked in the journal writer's ``reserve`` (waiting for earlier answers to reach S3)."""
    frames = sys._current_frames()
    waiting = 0
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        while frame is not None:
            if frame.f_code.co_name == "reserve" and "journal" in frame.f_code.co_filename:
                waiting += 1
                break
            frame = frame.f_back
    return waiting


def test_a_slow_s3_holds_sending_to_two_rounds_of_unjournaled_answers(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    workers: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: while a journal write hung (S3 failing slowly, before any refusal), the run kept paying.

    Every answer paid while S3 hangs has its journal only in memory, then on this worker: a retry on
    another worker would pay for all of them again. Sending now waits once 2 x ``max_concurrency``
    requests are in flight or answered without their journal in S3.
    """
    # Patient timeouts: with the pipeline's 1 s, a generation answer slowed past it on a loaded machine
    # leaves no journal entry, frees its reservation and lets one more request go (seen as 10, not 8).
    _connect(monkeypatch, emulator)
    prompts = [f"a lighthouse, study {index}" for index in range(20)]
    gate.hold = "journals"
    at_release: dict[str, int] = {}

    def release_when_every_thread_waits() -> None:
        wait_for(lambda: _threads_waiting_for_s3() == 4, timeout=30)
        at_release.update(requests=emulator.request_count, waiting=_threads_waiting_for_s3())
        gate.hold = None
        gate.release()  # the held write fails (503), botocore's retry of it goes through

    threading.Thread(target=release_when_every_thread_waits, daemon=True).start()

    run = pipeline.run(dag_for("url", "wide"), prompts=prompts)

    assert run.state == "success", run.errors
    assert run.try_number == 1
    assert at_release == {"requests": 2 * 4, "waiting": 4}, "sending stopped at 2 x max_concurrency unjournaled"
    accounting = pipeline.account()
    assert accounting.requests == len(prompts)
    assert accounting.billed == accounting.stored == len(prompts)


def test_without_a_shared_store_a_brief_outage_ends_with_the_journal_in_s3(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    workers: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """S3 refuses the first journal (and the image), then takes ``records.json`` at the end of the try:
    the diverted journal is written to S3 then, so a retry on another worker pays nothing again (url)."""
    _connect(monkeypatch, emulator)
    dag_id = dag_for("url", "serial")
    space = TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    gate.mode = "deny_images"
    gate.refuse_journals = 1
    after_try_1: dict[str, Any] = {}

    def on_worker_a() -> None:
        after_try_1.update(
            requests=emulator.request_count,
            journals=[key for key in pipeline.objects() if key.startswith(space.journal_prefix)],
        )
        gate.mode = "pass"

    _retry_on_worker_b(pipeline, workers, monkeypatch, dag_id, between_tries=on_worker_a)
    # Prompt 1 may have been sent before the refusal came back (the journal is written beside the
    # generation thread): then it is paid, diverted and journaled after all like prompt 0.
    assert after_try_1["requests"] in (1, 2)
    assert len(after_try_1["journals"]) == 1, "journaled in S3 after all, at the end of try 1"
    accounting = pipeline.account()
    assert accounting.requests == 2  # what try 1 paid was stored from the journal's signed URLs on worker b
    assert accounting.billed == accounting.stored == 2
