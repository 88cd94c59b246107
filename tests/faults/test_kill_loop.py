"""The kill loop: SIGKILL the task process at random moments of 20-prompt runs, retry, and audit the bill.

Each run of 20 prompts (4 in flight) is tried in a forked task process (``task_process.py``, as
Airflow 3 forks its task runner). A try is SIGKILLed at a random moment, picked as a random event
of its progress (the k-th request received by the emulator, the k-th answer billed, the k-th image
stored, a journal batch written, ``records.json`` written), plus a random fraction of one answer's
latency; the next try of the same run (same run id, hence same keys) is then started, and killed
in turn, up to :data:`KILLS_PER_RUN` times, before a try is left to finish. The loop goes on over
fresh runs until :data:`KILLS` kills have landed (``JIMENG_KILL_LOOP_KILLS`` asks for more, for a
longer hunt than the suite's time allows). The RNG's seed is printed; set ``JIMENG_KILL_LOOP_SEED``
to replay a run of the loop.

The loop runs on three destinations, in both formats: S3 with the default keys (:data:`KILLS` kills),
S3 with a custom ``s3_key`` (its images are publications of the canonical ones, re-made by a retry)
and ``file://`` through ``output_path`` (:data:`KILLS_PER_VARIANT` kills each, to keep the suite fast).

After each run's successful try, every billed request (the emulator's ledger) is classified:

* **kept**: its image is the one stored under the prompt's key (its ``jimeng-request-id``);
* **undelivered**: in flight at a kill (the ledger says the answer never reached the client);
* **answered, lost with the process**: delivered to a try that was then killed before the answer
  could serve a retry: not yet in an S3 journal (the writer's batch window), or, in ``b64_json``
  mode, journaled without its data and not uploaded yet. Both are what docs/faults.md admits.

Anything else is a double payment the provider should have avoided, and fails the test: an answer
journaled in S3 (url) or uploaded (b64_json) at a kill and yet paid for again, or a paid answer not
kept in a try that was not killed. Also: each prompt's image exactly once under its key, records.json
listing all 20 prompts, and no journal (S3 or local file) left once the run succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.options import parse_output_path
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.s3 import LocalJournal
from tests.dags.faults_pipeline import OBJSTORE
from tests.faults.conftest import S3Gate, TaskProcesses, dag_for, object_keys, wait_for

pytestmark = pytest.mark.timeout(180)

PROMPTS = 20
CONCURRENCY = 4  # the "wide" faults DAGs
#: Seconds per generated image: five rounds of 0.1 s, a try of about a second.
LATENCY = 0.1
#: Kills per format, and at most this many kills of successive tries of one run.
_KILLS = int(os.environ.get("JIMENG_KILL_LOOP_KILLS") or 8)
KILLS = {"url": _KILLS, "b64_json": _KILLS}
#: Kills per format with a custom key, and with file:// (more with JIMENG_KILL_LOOP_KILLS).
KILLS_PER_VARIANT = int(os.environ.get("JIMENG_KILL_LOOP_KILLS") or 3)
KILLS_PER_RUN = 4
CUSTOM_KEY = "pub/{dag_id}/{task_id}/{run_id}/{prompt_index:03d}-{image_index}.{ext}"


@dataclass
class Kill:
    run: int
    attempt: int
    event: str
    #: Ledger positions of the requests billed to the killed try (those in flight at the kill included).
    billed: range
    #: Request ids in an S3 journal, and those whose image was stored, right after the kill.
    journaled: set[str] = field(default_factory=set)
    uploaded: set[str] = field(default_factory=set)


class Destination:
    """What a run's destination holds, read the same way on S3 and on a local directory."""

    def __init__(self, space: TaskKeyspace, gate: S3Gate, s3_client: Any) -> None:
        self.space = space
        self.gate = gate
        self.s3_client = s3_client

    @property
    def local(self) -> bool:
        return self.space.scheme == "file"

    def keys(self) -> set[str]:
        if not self.local:
            return set(object_keys(self.s3_client, self.space.bucket))
        root = Path("/" + self.space.prefix)
        return {str(path)[1:] for path in root.rglob("*") if path.is_file() and not path.name.endswith(".part")}

    def read_json(self, key: str) -> Any:
        if self.local:
            return json.loads(Path("/" + key).read_text())
        return json.loads(self.s3_client.get_object(Bucket=self.space.bucket, Key=key)["Body"].read())

    def request_id(self, key: str) -> str | None:
        """The request id an image's metadata names (a local image's sidecar, written after it)."""
        if not self.local:
            return str(self.s3_client.head_object(Bucket=self.space.bucket, Key=key)["Metadata"]["jimeng-request-id"])
        sidecar = Path("/" + self.space.meta_prefix + key[len(self.space.task_prefix) + 1 :] + ".json")
        if not sidecar.exists():
            return None
        return str(json.loads(sidecar.read_text())["Metadata"]["jimeng-request-id"])

    def snapshot(self) -> tuple[set[str], dict[int, str]]:
        """Request ids journaled, and the request id of each prompt's stored image."""
        journaled: set[str] = set()
        uploaded: dict[int, str] = {}
        keys = self.keys()
        for key in keys:
            if key.startswith(self.space.journal_prefix):
                with contextlib.suppress(FileNotFoundError, ValueError):  # a local journal deleted meanwhile
                    batch = self.read_json(key)
                    journaled |= {entry["request_id"] for entry in batch["prompts"].values()}
        for index in range(PROMPTS):
            key = self.space.image_key(index, 0)
            if key in keys and (request_id := self.request_id(key)) is not None:
                uploaded[index] = request_id
        return journaled, uploaded

    def progress(self, emulator: JiMengEmulator) -> dict[str, int]:
        """Where a run stands, by cheap counters: requests received, answers billed, writes by kind."""
        space = self.space
        if self.local:
            stored = Path("/" + space.task_prefix)
            return {
                "sent": emulator.request_count,
                "answered": len(emulator.ledger),
                "stored": len(list(stored.glob("p*.jpeg"))) if stored.is_dir() else 0,
            }
        return {
            "sent": emulator.request_count,
            "answered": len(emulator.ledger),
            "stored": _writes(self.gate, space.bucket, space.task_prefix + "/", ".jpeg"),
            "journaled": _writes(self.gate, space.bucket, space.journal_prefix),
            "records": _writes(self.gate, space.bucket, space.records_key),
        }


def _kill_point(rng: random.Random, remaining: int, *, local: bool) -> tuple[str, int]:
    if local:  # a local directory has no write counter: kill on requests, answers and images stored
        kind = rng.choices(["sent", "answered", "stored"], weights=[3, 3, 2])[0]
    else:
        kind = rng.choices(["sent", "answered", "stored", "journaled", "records"], weights=[3, 3, 2, 1, 1])[0]
    if kind in ("journaled", "records"):
        return kind, 1
    return kind, rng.randint(1, max(1, remaining))


def _writes(gate: S3Gate, bucket: str, prefix: str, suffix: str = "") -> int:
    """PUTs the gate received under ``prefix`` (the event a kill can wait on: no listing, no load)."""
    path = f"/{bucket}/{prefix}"
    return sum(
        1 for method, key, _ in gate.requests if method == "PUT" and key.startswith(path) and key.endswith(suffix)
    )


@pytest.mark.parametrize("destination", ["s3", "custom_key", "file"])
@pytest.mark.parametrize("fmt", ["url", "b64_json"])
def test_kill_loop(
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    s3_client: Any,
    task_processes: TaskProcesses,
    tmp_path: Path,
    fmt: str,
    destination: str,
) -> None:
    seed = int(os.environ.get("JIMENG_KILL_LOOP_SEED") or random.SystemRandom().randrange(2**32))
    print(f"kill loop ({fmt}, {destination}): seed {seed} (JIMENG_KILL_LOOP_SEED={seed} replays it)")
    rng = random.Random(seed)
    emulator.latency = LATENCY
    dag_id = dag_for(fmt, "wide")
    wanted = KILLS[fmt] if destination == "s3" else KILLS_PER_VARIANT
    where: dict[str, Any] = {"bucket": bucket}
    scheme, root, prefix = "s3", bucket, "jimeng"
    if destination == "file":
        (tmp_path / "out").mkdir()
        where = {"bucket": "unused", "output_path": f"file://{tmp_path}/out"}
        dag_id = OBJSTORE[dag_id]
        scheme, root, prefix = parse_output_path(where["output_path"])
    elif destination == "custom_key":
        where["s3_key"] = CUSTOM_KEY
    prompts = [f"a lighthouse in a storm, study {index}" for index in range(PROMPTS)]
    kills: list[Kill] = []
    totals = {"runs": 0, "tries": 0, "billed": 0, "stored": 0, "undelivered": 0, "lost_with_process": 0}
    started = time.monotonic()

    while len(kills) < wanted:
        run = totals["runs"]
        totals["runs"] += 1
        run_id = f"kill_loop__{fmt}__{seed}__{run}"
        space = TaskKeyspace(
            root, prefix, dag_id, run_id, "generate", -1, key_template=where.get("s3_key"), scheme=scheme,
            key_root=prefix if scheme != "s3" else "",
        )  # fmt: skip
        place = Destination(space, gate, s3_client)
        first_entry = len(emulator.ledger)
        run_kills: list[Kill] = []
        for attempt in range(KILLS_PER_RUN + 1):
            totals["tries"] += 1
            kill_it = attempt < KILLS_PER_RUN and len(kills) < wanted
            listed = place.keys()
            done = sum(1 for index in range(PROMPTS) if space.image_key(index, 0) in listed)
            before = place.progress(emulator)
            result = tmp_path / f"result-{run}-{attempt}.json"
            arguments = {"dag_id": dag_id, "run_id": run_id, "prompts": prompts, **where}
            task_processes.start({**arguments, "result": str(result)}, tmp_path / f"task-{run}-{attempt}.log")
            status: int | None = None
            event = "none"
            if kill_it:
                kind, threshold = _kill_point(rng, PROMPTS - done, local=place.local)
                event = f"{kind}>={threshold}"

                deadline = time.monotonic() + 60
                while status is None and time.monotonic() < deadline:
                    if place.progress(emulator)[kind] - before[kind] >= threshold:
                        break
                    status = task_processes.poll()
                    time.sleep(0.005)
                if status is None:
                    # A random moment within about one answer's time after the event.
                    time.sleep(rng.uniform(0, LATENCY))
                    task_processes.signal(signal.SIGKILL)
            if status is None:
                status = task_processes.wait(timeout=60)
            log = (tmp_path / f"task-{run}-{attempt}.log").read_text()[-3000:]
            # Whatever was in flight completes on the server (billed, undelivered) before the next try.
            assert wait_for(lambda: len(emulator.requests) >= emulator.request_count, timeout=15)
            assert wait_for(lambda: gate.busy == 0, timeout=15)  # and its last S3 write has landed
            if status == -signal.SIGKILL:
                journaled, uploaded = place.snapshot()
                kill = Kill(run, attempt, event, range(before["answered"], len(emulator.ledger)), journaled)
                kill.uploaded = set(uploaded.values())
                kills.append(kill)
                run_kills.append(kill)
                continue
            assert status == 0, f"seed {seed}, run {run}, try {attempt}: exit {status}\n{log}"
            outcome = json.loads(result.read_text())
            assert outcome["ok"], outcome
            assert len(outcome["xcom"]["images"]) == PROMPTS
            break
        else:
            pytest.fail(f"seed {seed}: run {run} did not finish")

        # ------------------------------------------------------------- the audit of this run
        context = f"seed {seed}, run {run}, kills {[(k.attempt, k.event) for k in run_kills]}"
        keys = place.keys()
        mine = [key for key in keys if key.startswith(space.task_prefix + "/")]
        images = sorted(key for key in mine if key.endswith(".jpeg"))
        assert images == sorted(space.image_key(index, 0) for index in range(PROMPTS)), context
        assert not [key for key in mine if key.startswith(space.journal_prefix)], "a journal outlived the run"
        assert not LocalJournal(space).read_many(range(PROMPTS)), "a local journal outlived the run"
        records = place.read_json(space.records_key)
        assert sorted(record["prompt_index"] for record in records["prompts"]) == list(range(PROMPTS))
        _, final = place.snapshot()
        kept = set(final.values())
        assert len(kept) == PROMPTS, context
        if destination == "custom_key":
            # Every publication is there, a copy of its prompt's canonical image (re-made by the retries).
            published = {index: space.publication_key(index, 0) for index in range(PROMPTS)}
            assert {index: place.request_id(str(key)) for index, key in published.items()} == final, context
        entries = emulator.ledger[first_entry:]
        by_position = {position: kill for kill in run_kills for position in kill.billed}
        undelivered = lost = 0
        for position, entry in enumerate(entries, start=first_entry):
            if entry.request_id in kept:
                continue
            kill = by_position.get(position)
            assert kill is not None, f"{context}: {entry} paid in a try that was not killed, and not kept"
            if not entry.delivered:
                undelivered += entry.images
                continue
            # Journaled in S3 at the kill: the retry must finish it (url: from the signed URL; b64_json:
            # once uploaded, by its request id), unless b64_json data never reached S3.
            if fmt == "url" or entry.request_id in kill.uploaded:
                assert entry.request_id not in kill.journaled, f"{context}: journaled at kill {kill}, paid again"
            lost += entry.images
        billed = sum(entry.images for entry in entries)
        assert billed == PROMPTS + undelivered + lost, context
        # The usage XCom sums the tries: every killed try is counted at least up to what it had journaled
        # in S3 (each journal batch carries a snapshot of the try's counters), and nothing is counted twice.
        usage = outcome["xcom"]["usage"]
        ledger = emulator.ledger
        journaled_billed = sum(
            ledger[p].images for kill in run_kills for p in kill.billed if ledger[p].request_id in kill.journaled
        )
        assert journaled_billed + usage["this_try"]["generated_images"] <= usage["generated_images"] <= billed, (
            context,
            usage,
        )
        # A kill costs at most what its four threads held: an answer each not yet kept, and one in flight.
        for kill in run_kills:
            assert sum(emulator.ledger[p].request_id not in kept for p in kill.billed) <= 2 * CONCURRENCY, kill
        totals["billed"] += billed
        totals["stored"] += len(images)
        totals["undelivered"] += undelivered
        totals["lost_with_process"] += lost

    totals["kills"] = len(kills)
    totals["seconds"] = round(time.monotonic() - started, 1)
    print(f"kill loop ({fmt}, {destination}), seed {seed}: {totals}")
    assert totals["billed"] - totals["stored"] == totals["undelivered"] + totals["lost_with_process"]
