"""Fallback journals (where paid answers go when S3 refuses them) and the tries' counters.

* Local journal files never outlive the try that can use them: the listing every run makes before its
  first request removes any file of the directory older than the signed URLs' 24 h, and keeps the rest.
* The shared journal (Redis, a real server on loopback) holds what the local file holds, under keys
  that name nothing, for 23 h; Redis failing is logged, never raised.
* Each try's counters, from ``records.json``, journal snapshots and fallbacks, merge by try.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from airflow_provider_jimeng.coordination.journals import SHARED_JOURNAL_TTL_SECONDS, SharedJournal
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.records import (
    USAGE_COUNTERS,
    JournaledImage,
    JournalEntry,
    merge_try_usage,
    sum_usage,
    try_usage,
)
from airflow_provider_jimeng.storage.s3 import LOCAL_JOURNAL_MAX_AGE_SECONDS, LocalJournal
from airflow_provider_jimeng.testing import RedisServer

SIGNED_URL = "https://images.example/p0.jpeg?X-Tos-Signature=secret"
KEYSPACE = TaskKeyspace("bucket", "jimeng", "dag", "manual__run", "generate", -1)


def _entry(index: int, *, data: str | None = None) -> JournalEntry:
    return JournalEntry(
        prompt_index=index,
        fingerprint=f"f{index}",
        written_at=time.time(),
        request_id=f"req-{index}",
        model="m",
        created=None,
        usage={"generated_images": 1},
        images=(JournaledImage(index=0, url=None if data else SIGNED_URL, b64_json=data),),
    )


def test_the_listing_removes_files_older_than_the_signed_urls_and_keeps_the_rest(tmp_path: Path) -> None:
    journal = LocalJournal(KEYSPACE, tmp_path)
    fresh, old = journal.write(_entry(0)), journal.write(_entry(1))
    assert fresh is not None
    assert old is not None
    # Another task's file, and a partial write a killed process left: old ones go whoever left them.
    stray_old, stray_fresh = tmp_path / "0123abcd.json", tmp_path / "4567ef.json.1234.tmp"
    stray_old.write_text("{}")
    stray_fresh.write_text("{}")
    day_ago = time.time() - LOCAL_JOURNAL_MAX_AGE_SECONDS - 60
    for path in (old, stray_old):
        os.utime(path, (day_ago, day_ago))

    found = journal.read_many(range(2))

    assert list(found) == [0]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([fresh.name, stray_fresh.name])


def test_the_listing_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert LocalJournal(KEYSPACE, tmp_path / "never-made").read_many(range(3)) == {}


@pytest.fixture
def client(redis_server: RedisServer) -> redis.Redis:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return client


def test_the_shared_journal_keeps_data_and_urls_under_keys_that_name_nothing(client: redis.Redis) -> None:
    shared = SharedJournal(client, KEYSPACE)
    assert shared.write(_entry(0))
    assert shared.write(_entry(3, data="aGVsbG8="))

    keys = sorted(key.decode() for key in client.keys("*"))
    assert all(re.fullmatch(r"jimeng:journal:[0-9a-f]{40}", key) for key in keys), keys
    assert all(0 < client.ttl(key) <= SHARED_JOURNAL_TTL_SECONDS < 24 * 3600 for key in keys)
    # The same names as the local files: the hash of the task's prefix URI and the prompt index.
    assert shared.key(0).rsplit(":", 1)[1] == LocalJournal(KEYSPACE).path(0).stem
    found = shared.read_many(range(5))
    assert sorted(found) == [0, 3]
    assert found[0].images[0].url == SIGNED_URL
    assert found[3].images[0].b64_json == "aGVsbG8="
    # Another task instance's keys are its own.
    other = SharedJournal(client, TaskKeyspace("bucket", "jimeng", "dag", "manual__other", "generate", -1))
    assert other.read_many(range(5)) == {}

    shared.delete([0, 1, 2, 3])
    assert client.keys("jimeng:journal:*") == []


def test_the_shared_usage_of_tries_is_kept_and_dropped(client: redis.Redis) -> None:
    shared = SharedJournal(client, KEYSPACE)
    doc = try_usage("t1", 1, {"generated_images": 3, "rate_limited": 7}, final=True, now=1.0)
    assert shared.write_usage("t1", doc)
    assert shared.read_usage() == {"t1": json.loads(json.dumps(doc))}
    assert 0 < client.ttl(shared.usage_key) <= SHARED_JOURNAL_TTL_SECONDS
    shared.delete_usage()
    assert shared.read_usage() == {}


def test_a_redis_that_fails_is_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    # No retries: redis-py's default of 10, with backoff, would spend 20 s on a port nobody listens on.
    dead = redis.Redis(
        host="127.0.0.1",
        port=RedisServer().port,
        password="hunter2",
        socket_connect_timeout=1,
        retry=Retry(NoBackoff(), 0),
    )
    shared = SharedJournal(dead, KEYSPACE)
    with caplog.at_level(logging.WARNING):
        assert not shared.write(_entry(0))
        assert shared.read_many(range(2)) == {}
        shared.delete([0])
        assert not shared.write_usage("t", {})
        assert shared.read_usage() == {}
    assert "ConnectionError" in caplog.text
    assert "hunter2" not in caplog.text
    assert SIGNED_URL not in caplog.text


def test_tries_merge_by_token_final_first_then_newest() -> None:
    recorded = [try_usage("a", 1, {"generated_images": 4}, final=True, now=10.0)]
    snapshots = [
        try_usage("a", 1, {"generated_images": 9}, final=False, now=20.0),  # superseded by the final one
        try_usage("b", 2, {"generated_images": 1, "attempts": 1}, final=False, now=30.0),
        try_usage("b", 2, {"generated_images": 2, "attempts": 3}, final=False, now=31.0),
    ]
    junk = [{"try": 7}, {"generated_images": 5}, {"try": "c", "generated_images": "many", "final": True}]

    merged = merge_try_usage(recorded, snapshots, junk)

    assert sorted(merged) == ["a", "b", "c"]
    assert merged["a"]["generated_images"] == 4
    assert (merged["b"]["generated_images"], merged["b"]["attempts"]) == (2, 3)
    assert merged["c"]["generated_images"] == 0
    totals = sum_usage(merged.values())
    assert set(totals) == set(USAGE_COUNTERS)
    assert totals["generated_images"] == 6
