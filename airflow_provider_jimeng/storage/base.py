"""What the run engine and the journal writer need from a store: one interface, two implementations.

:class:`~.s3.S3ImageStore` is the fast, measured path (boto3 through the amazon provider's hook);
:class:`~.objstore.ObjectImageStore` reaches any filesystem Airflow's ``ObjectStoragePath`` knows
(``gs://``, ``abfs://``, ``file://`` ...). Both keep the same objects under the same keys of a
:class:`~.keys.TaskKeyspace`, and both answer :meth:`ImageStore.head` in S3's shape (``Metadata``,
``ContentLength``), which is what lets a retry recognise an answer that an earlier try stored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.records import (
    SCHEMA_VERSION,
    JournalEntry,
    PromptRecord,
    merge_try_usage,
    newer,
)

log = logging.getLogger(__name__)


@dataclass
class EarlierTries:
    """What earlier tries of the task instance left, read in the listing before the first request."""

    records: dict[int, PromptRecord] = field(default_factory=dict)
    #: The winning journal entry of each prompt (S3, this worker's disk, the shared store).
    journals: dict[int, JournalEntry] = field(default_factory=dict)
    #: Journal objects in storage -> the prompts each holds.
    journal_objects: dict[str, set[int]] = field(default_factory=dict)
    #: Each earlier try's counters by try token (records.json, journal snapshots, fallbacks).
    tries: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Some came from the fallbacks (S3 refused their records.json): drop those once records.json holds them.
    fallback_usage: bool = False


class ImageStore(Protocol):
    """One task instance's objects: images, ``records.json`` and journals, under :attr:`keyspace`."""

    keyspace: TaskKeyspace
    #: How messages name the storage: "S3", or an object store's scheme ("gs://", "file://").
    storage_name: str
    #: Fallback journals in the shared Redis (``coordination.journals.SharedJournal``), or ``None``.
    shared_journal: Any

    @property
    def bucket(self) -> str:
        """The bucket (container) the keys are in; empty for a local filesystem."""
        ...

    def existing_keys(self, *, first: bool = False) -> dict[str, int]:
        """Objects under the task's prefix (key -> size). ``first``: refuse a wrong destination without retries."""
        ...

    def read_json(self, key: str) -> dict[str, Any] | None: ...

    def write_json(self, key: str, data: Mapping[str, Any]) -> None: ...

    def read_records(self, existing: Mapping[str, int]) -> dict[int, PromptRecord]: ...

    def write_records(
        self, records: list[PromptRecord], tries: Sequence[Mapping[str, Any]] = (), failures: Sequence[str] = ()
    ) -> None: ...

    def journal_keys(self, existing: Mapping[str, int]) -> list[str]: ...

    def read_journals(
        self, existing: Mapping[str, int], prompt_count: int
    ) -> tuple[dict[int, JournalEntry], dict[str, set[int]]]: ...

    def read_earlier(self, existing: Mapping[str, int], prompt_count: int) -> EarlierTries: ...

    def save_local_journal(self, entry: JournalEntry) -> None: ...

    def save_fallback_usage(self, token: str, usage: Mapping[str, Any]) -> None: ...

    def discard_fallback_usage(self) -> None: ...

    def discard_journals(self, keys: list[str], prompt_indexes: list[int]) -> None: ...

    def head(self, key: str) -> dict[str, Any]:
        """An image's ``Metadata`` (what :func:`~.records.answer_metadata` wrote) and ``ContentLength``."""
        ...

    def upload_stream(
        self, key: str, stream: Any, metadata: Mapping[str, str], content_type: str = ...
    ) -> tuple[int, str]:
        """Store an image from a readable stream in bounded memory; returns (bytes, sha256)."""
        ...

    def upload_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> tuple[int, str]: ...

    def head_if_exists(self, key: str) -> dict[str, Any] | None:
        """:meth:`head` of ``key``, or ``None`` when nothing is there (a publication's destination)."""
        ...

    def copy_object(self, source_key: str, key: str, metadata: Mapping[str, str]) -> None:
        """Copy a stored image to ``key`` (a publication), with ``metadata`` (the source's own)."""
        ...


class RecordsAndJournals:
    """``records.json`` and journals, written the same way on every backend through ``read_json``/``write_json``.

    A store mixes this in and provides ``keyspace``, ``local_journal`` (:class:`~.s3.LocalJournal`),
    optionally ``shared_journal`` (:class:`~airflow_provider_jimeng.coordination.journals.SharedJournal`),
    ``read_json`` and ``write_json``.
    """

    keyspace: TaskKeyspace
    local_journal: Any
    #: Journals in the deployment's shared Redis, for a retry on another worker (``None``: not configured).
    shared_journal: Any = None
    #: How log lines name the storage ("S3", or the URL scheme of an object store).
    storage_name = "S3"

    def read_json(self, key: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def write_json(self, key: str, data: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def size_of(self, key: str) -> int | None:
        """The size of the object at ``key``, or ``None`` when there is none (one request)."""
        raise NotImplementedError

    def read_records(self, existing: Mapping[str, int]) -> dict[int, PromptRecord]:
        """The records an earlier try wrote, by prompt index (empty if it wrote none)."""
        return self._read_records_and_tries(existing)[0]

    def _read_records_and_tries(
        self, existing: Mapping[str, int]
    ) -> tuple[dict[int, PromptRecord], list[dict[str, Any]]]:
        if self.keyspace.records_key not in existing:
            return {}, []
        data = self.read_json(self.keyspace.records_key) or {}
        prompts = data.get("prompts")
        records = [PromptRecord.from_json(entry) for entry in (prompts if isinstance(prompts, list) else [])]
        tries = data.get("tries")
        return (
            {record.prompt_index: record for record in records if record is not None},
            [doc for doc in tries if isinstance(doc, dict)] if isinstance(tries, list) else [],
        )

    def read_earlier(self, existing: Mapping[str, int], prompt_count: int) -> EarlierTries:
        """Everything earlier tries left: records, journals (S3, local, shared) and their counters."""
        records, recorded_tries = self._read_records_and_tries(existing)
        journals, objects, snapshots = self._scan_journals(existing, prompt_count)
        fallback = [*self.local_journal.read_usage().values()]
        if self.shared_journal is not None:
            fallback += self.shared_journal.read_usage().values()
        tries = merge_try_usage(recorded_tries, snapshots, fallback)
        return EarlierTries(records, journals, objects, tries, fallback_usage=bool(fallback))

    def write_records(
        self, records: list[PromptRecord], tries: Sequence[Mapping[str, Any]] = (), failures: Sequence[str] = ()
    ) -> None:
        """Write ``records.json``: the finished prompts, every try's counters (``tries``), and ``failures``.

        ``failures`` are this try's failures of prompts that have no record (a whole prompt refused,
        such as ``InputTextSensitiveContentDetected``, or not sent): counted by lineage and shown by
        the gallery, never read back by a retry (such a prompt is generated again).
        """
        keyspace = self.keyspace
        self.write_json(
            keyspace.records_key,
            {
                "schema": SCHEMA_VERSION,
                "airflow": {
                    "dag_id": keyspace.dag_id,
                    "run_id": keyspace.run_id,
                    "task_id": keyspace.task_id,
                    "map_index": keyspace.map_index,
                },
                "prompts": [record.to_json() for record in records],
                "failures": list(failures),
                "tries": [dict(doc) for doc in tries],
            },
        )

    def journal_keys(self, existing: Mapping[str, int]) -> list[str]:
        """The journal objects among ``existing`` (a listing of the task's prefix), oldest batch first."""
        return sorted(key for key in existing if key.startswith(self.keyspace.journal_prefix))

    def read_journals(
        self, existing: Mapping[str, int], prompt_count: int
    ) -> tuple[dict[int, JournalEntry], dict[str, set[int]]]:
        """Earlier tries' journal entries by prompt, and which prompts each S3 object holds.

        The newest entry of a prompt wins; a local (or shared) copy of the same answer wins where it
        holds the image data (:func:`~.records.newer`).
        """
        entries, objects, _ = self._scan_journals(existing, prompt_count)
        return entries, objects

    def _scan_journals(
        self, existing: Mapping[str, int], prompt_count: int
    ) -> tuple[dict[int, JournalEntry], dict[str, set[int]], list[dict[str, Any]]]:
        found: dict[int, list[JournalEntry]] = {}
        objects: dict[str, set[int]] = {}
        snapshots: list[dict[str, Any]] = []
        for key in self.journal_keys(existing):
            batch = self.read_json(key) or {}
            if isinstance(batch.get("usage"), dict):
                snapshots.append(batch["usage"])
            prompts = batch.get("prompts") if isinstance(batch.get("prompts"), dict) else {}
            objects[key] = set()
            for index_text, data in (prompts or {}).items():
                if not str(index_text).isdigit():
                    continue
                index = int(index_text)
                objects[key].add(index)
                if (entry := JournalEntry.from_json(data, prompt_index=index)) is not None:
                    found.setdefault(index, []).append(entry)
        fallbacks = [self.local_journal.read_many(range(prompt_count))]
        if self.shared_journal is not None:
            fallbacks.append(self.shared_journal.read_many(range(prompt_count)))
        for fallback in fallbacks:
            for index, entry in fallback.items():
                found.setdefault(index, []).append(entry)
        entries = {index: best for index, candidates in found.items() if (best := newer(candidates)) is not None}
        return entries, objects, snapshots

    def save_local_journal(self, entry: JournalEntry) -> None:
        """Keep a paid answer S3 refused where a retry reads it: this worker's disk, and the shared Redis.

        Both, never one: the Redis copy serves a retry on any worker, the file a retry here when that
        Redis restarts without persistence (or fails) before the retry reads it. A cache is never the
        only copy of a paid answer. The file (mode 0600) goes once ``records.json`` covers its prompt,
        or after 24 h (its signed URLs' life) whichever run lists the directory.
        """
        shared = self.shared_journal is not None and self.shared_journal.write(entry)
        current = self.local_journal.read(entry.prompt_index)
        if current is not None and current.same_answer(entry) and current.holds_data:
            where: Any = self.local_journal.path(entry.prompt_index)  # kept here already, with its image data
        else:
            where = self.local_journal.write(entry)
        if where is None and not shared:
            log.error(
                "Prompt %d: %s failed and no journal could be kept; a retry pays for it again",
                entry.prompt_index,
                self.storage_name,
            )
            return
        places = [("in the shared Redis (any worker)", shared), (f"on this machine ({where})", where is not None)]
        log.warning(
            "Prompt %d: %s failed; its generated image(s) are journaled %s for a retry",
            entry.prompt_index,
            self.storage_name,
            " and ".join(place for place, kept in places if kept),
        )

    def _discard_fallback_journals(self, prompt_indexes: Sequence[int]) -> None:
        for index in prompt_indexes:
            self.local_journal.delete(index)
        if self.shared_journal is not None and prompt_indexes:
            self.shared_journal.delete(prompt_indexes)

    def save_fallback_usage(self, token: str, usage: Mapping[str, Any]) -> None:
        """Keep a try's counters where the next try reads them, when ``records.json`` could not hold them.

        In the shared Redis and on this worker's disk both, as the journals: a Redis that restarts
        without persistence would otherwise take the try's counts (and its share of the budget) along.
        """
        if self.shared_journal is not None:
            self.shared_journal.write_usage(token, usage)
        self.local_journal.write_usage(token, usage)

    def discard_fallback_usage(self) -> None:
        """``records.json`` now carries every earlier try's counters: drop the fallback copies."""
        self.local_journal.delete_usage()
        if self.shared_journal is not None:
            self.shared_journal.delete_usage()
