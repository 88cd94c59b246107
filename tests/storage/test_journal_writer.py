"""The journal writer's group commit, against moto's S3 server on loopback.

What a retry relies on: every entry handed over reaches S3 (batched: far fewer objects than
entries), ``close`` writes what is still queued, and when S3 refuses a batch its entries, and every
later one, are kept on the worker's disk while the run is told to stop paying.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from airflow_provider_jimeng.exceptions import JiMengStorageError
from airflow_provider_jimeng.storage.journal import JournalWriter
from airflow_provider_jimeng.storage.records import JournaledImage, JournalEntry
from airflow_provider_jimeng.storage.s3 import LocalJournal, S3ImageStore, TaskKeyspace


def _store(bucket: str, tmp_path: Path) -> S3ImageStore:
    keyspace = TaskKeyspace(bucket, "jimeng", "dag", "manual__run", "generate", -1)
    return S3ImageStore(S3Hook(aws_conn_id="aws_default"), keyspace, LocalJournal(keyspace, tmp_path))


def _entry(index: int) -> JournalEntry:
    return JournalEntry(
        prompt_index=index,
        fingerprint=f"f{index}",
        written_at=1.0,
        request_id=f"entry-request-{index}",
        model=None,
        created=None,
        usage={},
        images=(JournaledImage(index=0),),
    )


def test_entries_are_written_in_batches_and_read_back_by_prompt(s3_bucket: str, tmp_path: Path) -> None:
    store = _store(s3_bucket, tmp_path)
    failures: list[JiMengStorageError] = []
    writer = JournalWriter(store, on_failure=failures.append)
    # Sixteen answers arriving at once from eight threads, as a round of generation does.
    threads = [threading.Thread(target=writer.add, args=(index, _entry(index))) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.close()

    assert failures == []
    existing = store.existing_keys()
    objects = sorted(key for key in existing if key.startswith(store.keyspace.journal_prefix))
    assert 1 <= len(objects) < 16, "entries of a burst share an object"
    assert sorted(writer.written) == objects
    entries, held = store.read_journals(existing, 16)
    assert sorted(entries) == list(range(16))
    assert entries[7].request_id == "entry-request-7"
    assert set().union(*held.values()) == set(range(16))


def test_close_writes_what_is_queued_and_a_later_try_never_overwrites(s3_bucket: str, tmp_path: Path) -> None:
    store = _store(s3_bucket, tmp_path)
    first = JournalWriter(store, on_failure=pytest.fail)
    first.add(0, _entry(0))
    first.close()
    second = JournalWriter(store, on_failure=pytest.fail)
    second.add(0, dataclasses.replace(_entry(0), written_at=2.0, request_id="newer"))
    second.close()

    entries, held = store.read_journals(store.existing_keys(), 1)
    assert len(held) == 2, "each try writes its own objects"
    assert entries[0].request_id == "newer", "the newest entry of a prompt wins"


def test_a_refused_batch_is_kept_locally_and_stops_the_run(
    s3_bucket: str, s3_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(s3_bucket, tmp_path)
    s3_client.delete_bucket(Bucket=s3_bucket)  # every write now fails with NoSuchBucket
    failures: list[JiMengStorageError] = []
    writer = JournalWriter(store, on_failure=failures.append)
    writer.add(0, _entry(0))
    writer.close()
    later = JournalWriter(store, on_failure=failures.append)
    later.add(1, _entry(1))
    later.close()

    assert len(failures) == 2
    assert "NoSuchBucket" in str(failures[0])
    assert writer.written == {}
    for index in (0, 1):
        local = store.local_journal.read(index)
        assert local is not None
        assert local.request_id == f"entry-request-{index}"
        assert oct(store.local_journal.path(index).stat().st_mode & 0o777) == "0o600"
    assert "journaled on this machine" in caplog.text
    # (S3's random request id may hold any short string: look for the whole id.)
    assert "entry-request-0" not in json.dumps(failures[0].args), "the error names the object, not the entry"
