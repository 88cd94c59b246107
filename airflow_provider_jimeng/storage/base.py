"""What the run engine and the journal writer need from a store: one interface, two implementations.

:class:`~.s3.S3ImageStore` is the fast, measured path (boto3 through the amazon provider's hook);
:class:`~.objstore.ObjectImageStore` reaches any filesystem Airflow's ``ObjectStoragePath`` knows
(``gs://``, ``abfs://``, ``file://`` ...). Both keep the same objects under the same keys of a
:class:`~.keys.TaskKeyspace`, and both answer :meth:`ImageStore.head` in S3's shape (``Metadata``,
``ContentLength``), which is what lets a retry recognise an answer that an earlier try stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.records import SCHEMA_VERSION, JournalEntry, PromptRecord, newer

log = logging.getLogger(__name__)


class ImageStore(Protocol):
    """One task instance's objects: images, ``records.json`` and journals, under :attr:`keyspace`."""

    keyspace: TaskKeyspace
    #: How messages name the storage: "S3", or an object store's scheme ("gs://", "file://").
    storage_name: str

    @property
    def bucket(self) -> str:
        """The bucket (container) the keys are in; empty for a local filesystem."""
        ...

    def existing_keys(self, *, first: bool = False) -> dict[str, int]:
        """Objects under the task's prefix (key -> size). ``first``: refuse a wrong destination without retries."""
        ...

    def find_keys(self, keys: Iterable[str]) -> dict[str, int]:
        """Which of ``keys`` exist (key -> size), for custom keys outside the listed prefix."""
        ...

    def read_json(self, key: str) -> dict[str, Any] | None: ...

    def write_json(self, key: str, data: Mapping[str, Any]) -> None: ...

    def read_records(self, existing: Mapping[str, int]) -> dict[int, PromptRecord]: ...

    def write_records(self, records: list[PromptRecord]) -> None: ...

    def journal_keys(self, existing: Mapping[str, int]) -> list[str]: ...

    def read_journals(
        self, existing: Mapping[str, int], prompt_count: int
    ) -> tuple[dict[int, JournalEntry], dict[str, set[int]]]: ...

    def save_local_journal(self, entry: JournalEntry) -> None: ...

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


class RecordsAndJournals:
    """``records.json`` and journals, written the same way on every backend through ``read_json``/``write_json``.

    A store mixes this in and provides ``keyspace``, ``local_journal`` (:class:`~.s3.LocalJournal`),
    ``read_json`` and ``write_json``.
    """

    keyspace: TaskKeyspace
    local_journal: Any
    #: How log lines name the storage ("S3", or the URL scheme of an object store).
    storage_name = "S3"

    def read_json(self, key: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def write_json(self, key: str, data: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def size_of(self, key: str) -> int | None:
        """The size of the object at ``key``, or ``None`` when there is none (one request)."""
        raise NotImplementedError

    def find_keys(self, keys: Iterable[str]) -> dict[str, int]:
        """Which of ``keys`` exist (key -> size), by name: for custom keys outside the listed prefix."""
        found: dict[str, int] = {}
        prefix = self.keyspace.task_prefix + "/"
        for key in dict.fromkeys(keys):
            if key.startswith(prefix):
                continue  # the listing already said
            if (size := self.size_of(key)) is not None:
                found[key] = size
        return found

    def read_records(self, existing: Mapping[str, int]) -> dict[int, PromptRecord]:
        """The records an earlier try wrote, by prompt index (empty if it wrote none)."""
        if self.keyspace.records_key not in existing:
            return {}
        data = self.read_json(self.keyspace.records_key) or {}
        prompts = data.get("prompts")
        records = [PromptRecord.from_json(entry) for entry in (prompts if isinstance(prompts, list) else [])]
        return {record.prompt_index: record for record in records if record is not None}

    def write_records(self, records: list[PromptRecord]) -> None:
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
            },
        )

    def journal_keys(self, existing: Mapping[str, int]) -> list[str]:
        """The journal objects among ``existing`` (a listing of the task's prefix), oldest batch first."""
        return sorted(key for key in existing if key.startswith(self.keyspace.journal_prefix))

    def read_journals(
        self, existing: Mapping[str, int], prompt_count: int
    ) -> tuple[dict[int, JournalEntry], dict[str, set[int]]]:
        """Earlier tries' journal entries by prompt, and which prompts each S3 object holds.

        The newest entry of a prompt wins; a local copy of the same answer wins where it holds the
        image data (:func:`~.records.newer`).
        """
        found: dict[int, list[JournalEntry]] = {}
        objects: dict[str, set[int]] = {}
        for key in self.journal_keys(existing):
            batch = self.read_json(key) or {}
            prompts = batch.get("prompts") if isinstance(batch.get("prompts"), dict) else {}
            objects[key] = set()
            for index_text, data in (prompts or {}).items():
                if not str(index_text).isdigit():
                    continue
                index = int(index_text)
                objects[key].add(index)
                if (entry := JournalEntry.from_json(data, prompt_index=index)) is not None:
                    found.setdefault(index, []).append(entry)
        for index, local in self.local_journal.read_many(range(prompt_count)).items():
            found.setdefault(index, []).append(local)
        entries = {index: best for index, candidates in found.items() if (best := newer(candidates)) is not None}
        return entries, objects

    def save_local_journal(self, entry: JournalEntry) -> None:
        current = self.local_journal.read(entry.prompt_index)
        if current is not None and current.same_answer(entry) and current.holds_data:
            return  # the same answer is kept here already, with its image data
        where = self.local_journal.write(entry)
        if where is not None:
            log.warning(
                "Prompt %d: %s failed; its generated image(s) are journaled on this machine (%s) for a retry",
                entry.prompt_index,
                self.storage_name,
                where,
            )
