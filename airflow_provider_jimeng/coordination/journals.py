"""Journals in the shared Redis: where paid answers go when S3 refuses them, for a retry on any worker.

When S3 fails mid-run, the answers already paid for (the requests in flight) cannot reach their S3
journal. A file on the worker (:class:`~airflow_provider_jimeng.storage.s3.LocalJournal`) serves a
retry that runs on the same machine only; with Celery the retry often lands on another worker, which
would pay again. With a shared store configured (the ``jimeng`` connection's ``redis_conn_id``), the
same entries are also written here, where any worker's retry reads them.

Keys hold no secret: ``jimeng:journal:<sha256 of the task's prefix URI and the prompt index>``, as
the local file's name. Values hold what the local file holds, base64 image data included (in
``b64_json`` mode the file on the first worker is the only other copy) and signed URLs: they live
:data:`SHARED_JOURNAL_TTL_SECONDS`, less than the signed URLs' 24 h, and are deleted once
``records.json`` covers their prompt. Plain commands only (``SET EX``, ``MGET``, ``DEL``, ``HSET``,
``HGETALL``, ``EXPIRE``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.records import JOURNAL_MAX_AGE_SECONDS, JournalEntry

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

#: How long a journal lives in Redis: no longer than its signed URLs can be trusted (23 h of 24 h).
SHARED_JOURNAL_TTL_SECONDS = JOURNAL_MAX_AGE_SECONDS
#: Keys deleted per ``DEL`` command.
_DELETE_CHUNK = 500


def _describe(error: BaseException) -> str:
    # Exception text of a Redis client may quote the connection URL (with its password): the class only.
    return type(error).__name__


class SharedJournal:
    """One task instance's fallback journals in Redis (one key per prompt) and its tries' usage (one hash).

    Every method is best effort: a Redis that fails is logged (never raised), so that a run whose S3
    already failed still fails cleanly with its local journal written.

    :param client: a ``redis.Redis`` (:func:`~.redis_client.shared_redis`).
    :param keyspace: the task instance's keys.
    """

    def __init__(self, client: Redis, keyspace: TaskKeyspace) -> None:
        self._client = client
        self.keyspace = keyspace

    def key(self, prompt_index: int) -> str:
        """The Redis key of a prompt's journal: a hash, like the local file's name (no ids, no URLs)."""
        return f"jimeng:journal:{self.keyspace.fallback_journal_name(f'p{prompt_index:04d}')}"

    @property
    def usage_key(self) -> str:
        """The hash holding each try's usage (field: the try's token), for tries S3 did not record."""
        return f"jimeng:usage:{self.keyspace.fallback_journal_name('usage')}"

    def write(self, entry: JournalEntry) -> bool:
        """Keep an entry, with its base64 data; ``False`` (logged) when Redis fails too."""
        value = json.dumps(entry.to_json(with_data=True), ensure_ascii=False, separators=(",", ":"))
        try:
            self._client.set(self.key(entry.prompt_index), value, ex=SHARED_JOURNAL_TTL_SECONDS)
        except Exception as error:
            log.error(
                "Prompt %d: could not journal it in the shared Redis either (%s); only this worker's local "
                "journal holds it, and a retry on another worker pays for it again",
                entry.prompt_index,
                _describe(error),
            )
            return False
        return True

    def read_many(self, prompt_indexes: Iterable[int]) -> dict[int, JournalEntry]:
        """The entries kept for these prompts (one ``MGET``); none when Redis fails (logged)."""
        indexes = list(prompt_indexes)
        if not indexes:
            return {}
        try:
            values = self._client.mget([self.key(index) for index in indexes])
        except Exception as error:
            log.warning(
                "Could not read the shared journals from Redis (%s): answers an earlier try kept only there "
                "are generated again",
                _describe(error),
            )
            return {}
        found: dict[int, JournalEntry] = {}
        for index, value in zip(indexes, values, strict=True):
            if value is None:
                continue
            try:
                data = json.loads(value)
            except ValueError:
                continue
            if (entry := JournalEntry.from_json(data, prompt_index=index)) is not None:
                found[index] = entry
        return found

    def delete(self, prompt_indexes: Iterable[int]) -> None:
        """Drop the journals of prompts ``records.json`` now covers (one ``DEL`` per 500)."""
        keys = [self.key(index) for index in prompt_indexes]
        for start in range(0, len(keys), _DELETE_CHUNK):
            try:
                self._client.delete(*keys[start : start + _DELETE_CHUNK])
            except Exception as error:
                # They expire within 23 h; records.json, read first, supersedes them meanwhile.
                log.warning("Could not delete shared journals from Redis: %s", _describe(error))
                return

    # ------------------------------------------------------------------------------------------ usage
    def write_usage(self, token: str, usage: Mapping[str, Any]) -> bool:
        """Keep a try's counters (``HSET`` + ``EXPIRE``), for a try S3 refused ``records.json`` to."""
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.hset(self.usage_key, token, json.dumps(dict(usage), separators=(",", ":")))
            pipe.expire(self.usage_key, SHARED_JOURNAL_TTL_SECONDS)
            pipe.execute()
        except Exception as error:
            log.error("Could not keep this try's usage in the shared Redis either: %s", _describe(error))
            return False
        return True

    def read_usage(self) -> dict[str, dict[str, Any]]:
        """Earlier tries' counters kept here, by try token (empty when Redis fails)."""
        try:
            raw = self._client.hgetall(self.usage_key)
        except Exception as error:
            log.warning("Could not read earlier tries' usage from Redis: %s", _describe(error))
            return {}
        found: dict[str, dict[str, Any]] = {}
        for token, value in (raw or {}).items():
            try:
                data = json.loads(value)
            except ValueError:
                continue
            if isinstance(data, dict):
                found[token.decode() if isinstance(token, bytes) else str(token)] = data
        return found

    def delete_usage(self) -> None:
        try:
            self._client.delete(self.usage_key)
        except Exception as error:
            log.warning("Could not delete earlier tries' usage from Redis: %s", _describe(error))
