"""Group commit of journals: what was paid for reaches S3 in batches, off the generation threads.

A journal entry must be durable soon after an answer arrives (a try that dies before storing its
images can then finish them without paying again), but one ``PutObject`` per answer, written on the
thread that sends the next paid request, costs a round trip per prompt on the generation path and
more client CPU than the rest of an image's handling. One writer thread instead takes whatever
entries arrived while its previous write was in flight (waiting :data:`LINGER_SECONDS` for a burst
to complete) and writes them as one object, like a database's group commit: generation threads hand
over an entry and go on at once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from airflow_provider_jimeng.exceptions import JiMengStorageError
from airflow_provider_jimeng.storage.base import ImageStore
from airflow_provider_jimeng.storage.records import JournalEntry

log = logging.getLogger(__name__)

#: How long the writer waits after the first entry of a batch for the rest of a burst (answers of
#: one round arrive within milliseconds). It bounds how long an answer stays journaled in memory only.
LINGER_SECONDS = 0.05


class JournalWriter:
    """Writes journal entries to ``_pending/<try>-<seq>.json`` on one background thread.

    :param store: the task's store.
    :param on_failure: called (on the writer thread) when S3 refuses a batch; the batch's entries
        are then kept on the worker's disk (:class:`~.s3.LocalJournal`) and in the shared store when
        one is configured, and later entries are not sent to S3.
    :param usage: the try's counters so far; each batch carries a snapshot of them, so that a try
        killed before writing ``records.json`` is counted up to its last batch.
    :param try_token: tells this try's objects apart from other tries' (a fresh one when ``None``).
    :param max_unconfirmed: the most requests that may be sent or answered while their journal has
        not reached S3 (:meth:`reserve`); ``None``: no bound.
    """

    def __init__(
        self,
        store: ImageStore,
        *,
        on_failure: Callable[[JiMengStorageError], None],
        usage: Callable[[], Mapping[str, Any]] | None = None,
        try_token: str | None = None,
        max_unconfirmed: int | None = None,
    ) -> None:
        self._store = store
        self._on_failure = on_failure
        self._usage = usage
        #: Unique per try, so that a retry never overwrites an earlier try's journals.
        self._try_token = try_token or uuid.uuid4().hex[:12]
        self._sequence = 0
        self._queue: dict[int, JournalEntry] = {}
        self._condition = threading.Condition()
        self._closing = False
        self._hurry = False
        self._failed: JiMengStorageError | None = None
        self._max_unconfirmed = max_unconfirmed
        #: Requests reserved and not yet settled: in flight, or answered and not yet journaled in S3.
        self._unconfirmed = 0
        #: Generation threads waiting in reserve(): the writer then writes without lingering.
        self._waiting = 0
        #: Journal objects written by this try -> the prompts each holds.
        self.written: dict[str, set[int]] = {}
        #: Entries S3 refused, kept in a fallback journal instead.
        self.diverted: dict[int, JournalEntry] = {}
        self._thread = threading.Thread(target=self._serve, name="jimeng-journal", daemon=True)
        self._thread.start()

    def reserve(self, give_up: Callable[[], bool]) -> bool:
        """Room for one more request, before it is sent; ``False`` (send nothing) once ``give_up()`` says so.

        Waits while ``max_unconfirmed`` requests are in flight or answered but not yet journaled in S3.
        S3 may fail slowly (a write that hangs for its timeouts before it is refused): without this
        bound the run would go on paying for answers whose only journal then is on this worker, which
        a retry on another worker cannot read. At twice ``max_concurrency`` it never waits while S3
        answers within a round of requests. Each reservation ends with :meth:`add` or :meth:`release`.
        """
        with self._condition:
            while self._max_unconfirmed is not None and self._unconfirmed >= self._max_unconfirmed:
                if give_up() or self._failed is not None:
                    return False
                self._waiting += 1
                self._condition.notify_all()  # the writer: someone waits, write now
                self._condition.wait(0.05)
                self._waiting -= 1
            if give_up():
                return False
            self._unconfirmed += 1
            return True

    def release(self) -> None:
        """A reserved request that left no entry (it failed, or its answer holds no image)."""
        with self._condition:
            self._unconfirmed -= 1
            self._condition.notify_all()

    def add(self, prompt_index: int, entry: JournalEntry) -> None:
        """Queue a prompt's entry (it settles the prompt's reservation once written); returns at once."""
        with self._condition:
            self._queue[prompt_index] = entry
            self._condition.notify_all()

    def flush(self) -> None:
        """No more entries are coming soon (the last answers are in): write what is queued without lingering."""
        with self._condition:
            self._hurry = True
            self._condition.notify_all()

    def close(self) -> None:
        """Write what is queued and stop (waits for the last write)."""
        with self._condition:
            self._closing = self._hurry = True
            self._condition.notify_all()
        self._thread.join()

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closing:
                    self._condition.wait()
                if not self._queue:
                    return
                deadline = time.monotonic() + LINGER_SECONDS  # let the rest of a burst join this batch
                while not self._hurry and not self._waiting and (remaining := deadline - time.monotonic()) > 0:
                    self._condition.wait(remaining)
                batch, self._queue = self._queue, {}
            self._write(batch)
            with self._condition:
                # Written, or kept in the fallback journals (and the run stopped): settled either way.
                self._unconfirmed -= len(batch)
                self._condition.notify_all()

    def _put(self, batch: Mapping[int, JournalEntry]) -> str:
        """Write one batch as the try's next journal object; returns its key (raises what S3 raised)."""
        key = self._store.keyspace.journal_key(f"{self._try_token}-{self._sequence:05d}")
        self._sequence += 1
        document: dict[str, Any] = {
            "written_at": time.time(),
            "prompts": {str(index): entry.to_json() for index, entry in batch.items()},
        }
        if self._usage is not None:
            document["usage"] = dict(self._usage())
        self._store.write_json(key, document)
        self.written[key] = set(batch)
        return key

    def _write(self, batch: dict[int, JournalEntry]) -> None:
        if self._failed is None:
            try:
                self._put(batch)
            except JiMengStorageError as error:
                self._failed = error
                log.error("Could not journal %d prompt(s) in %s: %s", len(batch), self._store.storage_name, error)
                self._on_failure(error)
            else:
                return
        # S3 refused journals in this run: keep them in the shared store when configured (for a retry on
        # any worker), else on this machine (for a retry that runs here).
        self.diverted.update(batch)
        for entry in batch.values():
            self._store.save_local_journal(entry)

    def write_diverted(self, prompt_indexes: Iterable[int]) -> None:
        """Once S3 works again at the end of the try: journal there the diverted entries of these prompts.

        Called after S3 took ``records.json`` (so it is back, and this costs one request, never a wait
        on a dead S3). A brief outage then leaves the paid answers where a retry on any worker finds
        them, even without a shared store. Only entries with signed URLs are worth it: an S3 journal
        never holds image data, so a ``b64_json`` entry stays in its fallback.
        """
        batch = {
            index: entry
            for index in prompt_indexes
            if (entry := self.diverted.get(index)) is not None and entry.images and all(i.url for i in entry.images)
        }
        if not batch:
            return
        try:
            self._put(batch)
        except JiMengStorageError as error:
            log.warning(
                "Could not journal %d prompt(s) in %s after all: %s", len(batch), self._store.storage_name, error
            )
            return
        log.info(
            "Journaled %d prompt(s) in %s after all, for a retry on any worker", len(batch), self._store.storage_name
        )
