"""A fake hook and an in-memory store: what :class:`~airflow_provider_jimeng.run.engine.GenerationRun` needs, and
nothing more, so the run engine is tested on its own (no HTTP, no S3, no Airflow task).

:class:`FakeHook` answers each body from a script (a function of the body), bills like the service
(every image it delivers; a scripted error bills nothing) and settles the run's spending cap the way
the real hook does. :class:`MemoryStore` keeps objects in a dict and its fallback journals in
memory too; it implements the storage Protocol through the same ``RecordsAndJournals`` mix-in as
the S3 and object-store backends, so records, journals and counters are read back exactly as there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from airflow_provider_jimeng.api.request import max_images_billed
from airflow_provider_jimeng.api.response import GeneratedImage, GenerationResult, Usage
from airflow_provider_jimeng.budget import SpendingCap
from airflow_provider_jimeng.exceptions import JiMengStorageError, JiMengTimeoutError
from airflow_provider_jimeng.storage.base import RecordsAndJournals
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.records import JournalEntry

#: A JPEG's first bytes: what the stores sniff a content type from.
JPEG = b"\xff\xd8\xff\xe0" + b"fake image" * 8


def images(count: int, *, failed: Mapping[int, str] | None = None) -> list[GeneratedImage]:
    """``count`` images as base64 data, those in ``failed`` failed with that code."""
    failed = failed or {}
    data = base64.b64encode(JPEG).decode()
    return [
        GeneratedImage(index=index, error_code=failed[index], error_message="failed")
        if index in failed
        else GeneratedImage(index=index, b64_json=data, size="1024x1024")
        for index in range(count)
    ]


class FakeHook:
    """Answers ``send`` from ``script(body)``: a list of images, or an exception to raise (billed nothing).

    Records every body sent (``sent``) and the images billed (``billed``).
    """

    def __init__(self, script: Callable[[Mapping[str, Any]], list[GeneratedImage] | BaseException] | None = None):
        self.script = script or (lambda body: images(max_images_billed(body)))
        self.sent: list[dict[str, Any]] = []
        self.billed = 0
        self.stats: dict[str, int] = {"attempts": 0, "rate_limited": 0, "retries": 0}
        self.stopped = threading.Event()
        self._lock = threading.Lock()

    def images_billed(self, body: Mapping[str, Any]) -> int:
        return max_images_billed(body)

    def stop(self) -> None:
        self.stopped.set()

    def send(
        self,
        body: Mapping[str, Any],
        *,
        before_body: Callable[[int | None], None] | None = None,
        spending_cap: SpendingCap | None = None,
    ) -> GenerationResult:
        if self.stopped.is_set():
            raise JiMengTimeoutError("the task was stopped before the request was sent", code="Stopped")
        reservation = (spending_cap or SpendingCap()).reserve(self.images_billed(body))  # may refuse: not sent
        with self._lock:
            self.sent.append(dict(body))
            self.stats["attempts"] += 1
            number = len(self.sent)
        answer = self.script(body)
        if isinstance(answer, BaseException):
            reservation.release()
            raise answer
        if before_body is not None:
            before_body(None)
        billed = sum(1 for image in answer if image.ok)
        with self._lock:
            self.billed += billed
        reservation.settle(billed)
        return GenerationResult(
            model=str(body.get("model")),
            created=1,
            images=answer,
            usage=Usage(generated_images=billed, output_tokens=16 * billed, total_tokens=16 * billed),
            request_id=f"req-{number}",
        )

    def open_image(self, url: str) -> Any:  # only url answers download; these carry their data
        raise AssertionError(f"the fake hook answers with base64 data; nothing downloads {url}")


class MemoryFallback:
    """The worker-side fallback journal (``LocalJournal``'s interface), in memory."""

    def __init__(self) -> None:
        self.entries: dict[int, JournalEntry] = {}
        self.usage: dict[str, dict[str, Any]] = {}

    def write(self, entry: JournalEntry) -> str:
        self.entries[entry.prompt_index] = entry
        return f"memory:p{entry.prompt_index}"

    def read(self, prompt_index: int) -> JournalEntry | None:
        return self.entries.get(prompt_index)

    def path(self, prompt_index: int) -> str:
        return f"memory:p{prompt_index}"

    def read_many(self, prompt_indexes: Iterable[int]) -> dict[int, JournalEntry]:
        return {index: self.entries[index] for index in prompt_indexes if index in self.entries}

    def delete(self, prompt_index: int) -> None:
        self.entries.pop(prompt_index, None)

    def read_usage(self) -> dict[str, dict[str, Any]]:
        return dict(self.usage)

    def write_usage(self, token: str, usage: Mapping[str, Any]) -> bool:
        self.usage[token] = dict(usage)
        return True

    def delete_usage(self) -> None:
        self.usage.clear()


class MemoryStore(RecordsAndJournals):
    """One task instance's objects in a dict (key -> (bytes, metadata)); ``fail_writes`` makes writes fail."""

    storage_name = "memory"

    def __init__(self, keyspace: TaskKeyspace | None = None) -> None:
        self.keyspace = keyspace or TaskKeyspace("bucket", "jimeng", "dag", "run", "task", -1)
        self.local_journal = MemoryFallback()
        self.shared_journal = None
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        #: Which writes fail (``JiMengStorageError``): a predicate on the key.
        self.fail_writes: Callable[[str], bool] = lambda key: False
        self._lock = threading.Lock()

    @property
    def bucket(self) -> str:
        return self.keyspace.bucket

    def images(self) -> list[str]:
        return sorted(key for key in self.objects if key.endswith(f".{self.keyspace.image_ext}"))

    def _put(self, key: str, data: bytes, metadata: Mapping[str, str]) -> None:
        if self.fail_writes(key):
            raise JiMengStorageError(f"writing memory://{key} failed: refused by the test")
        with self._lock:
            self.objects[key] = (bytes(data), dict(metadata))

    def existing_keys(self, *, first: bool = False) -> dict[str, int]:
        prefix = self.keyspace.task_prefix + "/"
        with self._lock:
            return {key: len(data) for key, (data, _) in self.objects.items() if key.startswith(prefix)}

    def size_of(self, key: str) -> int | None:
        with self._lock:
            found = self.objects.get(key)
        return None if found is None else len(found[0])

    def read_json(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            found = self.objects.get(key)
        data = json.loads(found[0]) if found is not None else None
        return data if isinstance(data, dict) else None

    def write_json(self, key: str, data: Mapping[str, Any]) -> None:
        self._put(key, json.dumps(data, default=str).encode(), {})

    def discard_journals(self, keys: list[str], prompt_indexes: list[int]) -> None:
        self._discard_fallback_journals(prompt_indexes)
        with self._lock:
            for key in keys:
                self.objects.pop(key, None)

    def head(self, key: str) -> dict[str, Any]:
        with self._lock:
            data, metadata = self.objects[key]
        return {"Metadata": dict(metadata), "ContentLength": len(data)}

    def upload_stream(
        self, key: str, stream: Any, metadata: Mapping[str, str], content_type: str = "image/jpeg"
    ) -> tuple[int, str]:
        return self.upload_bytes(key, stream.read(), metadata)

    def upload_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> tuple[int, str]:
        self._put(key, data, metadata)
        return len(data), hashlib.sha256(data).hexdigest()
