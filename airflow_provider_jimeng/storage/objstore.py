"""Storage on any filesystem Airflow's ``ObjectStoragePath`` reaches: ``gs://``, ``abfs://``, ``file://`` ...

The same keys, ``records.json`` and journals as on S3 (:class:`~.keys.TaskKeyspace` under the path
of ``output_path``), written through the fsspec filesystem that the backend's provider registers for
the task's connection. Two things S3 gives for free are built here:

* *Metadata that vouches for an answer.* S3 keeps each image's user metadata (request id, request
  fingerprint, the answer's image list) on the object; fsspec backends may not (``file://`` does
  not). Each image therefore gets a small sidecar, ``_meta/<image key>.json``, written after the
  image, holding that metadata and the image's length. :meth:`ObjectImageStore.head` answers in
  S3's shape from it, and only when the image's length matches: an image cut short by a crash never
  vouches for its answer, so a retry stores it again instead of trusting it.
* *Whole objects or none.* Cloud object stores publish an object when its upload completes; a local
  file is written under a temporary name in the same directory and renamed into place.

Images are copied from the download stream in 256 KiB pieces through a writer buffering at most
:data:`~.s3.MULTIPART_THRESHOLD` (what the S3 path buffers for one ``PutObject``), so memory per
image stays bounded whatever its size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from airflow_provider_jimeng.exceptions import JiMengError, JiMengStorageConfigurationError, JiMengStorageError
from airflow_provider_jimeng.storage.base import RecordsAndJournals
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.s3 import (
    IMAGE_CONTENT_TYPE,
    MULTIPART_THRESHOLD,
    READ_CHUNK_BYTES,
    HashingReader,
    LocalJournal,
    image_content_type,
)

log = logging.getLogger(__name__)

#: Version of the sidecar's JSON.
META_SCHEMA = 1
_PARTIAL_SUFFIX = ".part"


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def _is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


class ObjectImageStore(RecordsAndJournals):
    """Reads and writes one task's objects through an fsspec filesystem (``ObjectStoragePath(...).fs``).

    :param fs: the filesystem, built on the task's main thread (the connection is looked up there).
    :param keyspace: the task's keys; ``keyspace.bucket`` is the URL's bucket (empty for ``file://``)
        and ``keyspace.prefix`` its path.
    :param conn_id: the connection, named in configuration errors.
    """

    def __init__(
        self,
        fs: Any,
        keyspace: TaskKeyspace,
        *,
        conn_id: str | None = None,
        local_journal: LocalJournal | None = None,
        shared_journal: Any = None,
    ) -> None:
        self.keyspace = keyspace
        self.local_journal = local_journal or LocalJournal(keyspace)
        self.shared_journal = shared_journal
        self.storage_name = f"{keyspace.scheme}://"
        self._fs = fs
        self._conn_id = conn_id
        self._local = _is_local(fs)

    @property
    def bucket(self) -> str:
        return self.keyspace.bucket

    # ------------------------------------------------------------------------------------- paths
    def _path(self, key: str) -> str:
        return f"{self.bucket}/{key}" if self.bucket else f"/{key}"

    def _key(self, path: str) -> str:
        path = path.lstrip("/")
        if self.bucket and path.startswith(self.bucket + "/"):
            return path[len(self.bucket) + 1 :]
        return path

    def meta_key(self, key: str) -> str:
        """Where an image's metadata sidecar is: under the task's ``_meta/``, also for custom keys elsewhere."""
        keyspace = self.keyspace
        inside = keyspace.task_prefix + "/"
        if key.startswith(inside):
            return f"{keyspace.meta_prefix}{key[len(inside) :]}.json"
        return f"{keyspace.meta_prefix}ext-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:40]}.json"

    def _fail(self, action: str, key: str, error: BaseException) -> JiMengStorageError:
        return JiMengStorageError(f"{action} {self.keyspace.uri(key)} failed: {_describe(error)}")

    # ----------------------------------------------------------------------------------- listing
    def existing_keys(self, *, first: bool = False) -> dict[str, int]:
        """Objects already under the task's prefix (key -> size), from one recursive listing.

        ``first``: before anything was paid for, a destination that cannot work (a local directory
        that does not exist, as when a volume is not mounted; a bucket that is missing or refuses
        the connection) fails the task without retries.
        """
        keyspace = self.keyspace
        base = self._path(keyspace.task_prefix)
        if first and self._local:
            root = self._path(keyspace.prefix.strip("/")) if keyspace.prefix.strip("/") else "/"
            if not self._fs.isdir(root):
                raise JiMengStorageConfigurationError(
                    f"{keyspace.uri(keyspace.prefix.strip('/'))} is not a directory on this worker: create it (or "
                    "mount the volume it is on) before the run; nothing was paid for, and a retry would meet the "
                    "same answer"
                )
        try:
            with contextlib.suppress(Exception):
                self._fs.invalidate_cache(base)  # an earlier try in this process may have listed it
            found = self._fs.find(base, detail=True)
        except Exception as error:
            failure = self._fail("listing", keyspace.task_prefix + "/", error)
            if first and isinstance(error, (PermissionError, FileNotFoundError)):
                raise JiMengStorageConfigurationError(
                    f"{failure} before any image was generated: check the path and what connection "
                    f"{self._conn_id!r} may do (list, read, write and delete under it); nothing was paid for, "
                    "and a retry would meet the same answer"
                ) from None
            raise failure from None
        keys: dict[str, int] = {}
        for name, info in found.items():
            if info.get("type", "file") != "file" or posixpath.basename(name).endswith(_PARTIAL_SUFFIX):
                continue
            keys[self._key(name)] = int(info.get("size") or 0)
        return keys

    def size_of(self, key: str) -> int | None:
        try:
            return int(self._fs.info(self._path(key)).get("size") or 0)
        except FileNotFoundError:
            return None
        except Exception as error:
            raise self._fail("inspecting", key, error) from None

    # ------------------------------------------------------------------------------------- JSON
    def read_json(self, key: str) -> dict[str, Any] | None:
        try:
            body = self._fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        except Exception as error:
            raise self._fail("reading", key, error) from None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, key: str, data: Mapping[str, Any]) -> None:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")
        self._write(key, iter((body,)))

    def discard_journals(self, keys: list[str], prompt_indexes: list[int]) -> None:
        """Drop journals whose prompts are in ``records.json`` (one bulk delete where the backend has one)."""
        self._discard_fallback_journals(prompt_indexes)
        if not keys:
            return
        try:
            self._fs.rm([self._path(key) for key in keys])
        except Exception as error:
            # records.json, read first on a retry, supersedes journals: only tidiness is lost.
            log.warning("Could not delete %d journal(s): %s", len(keys), _describe(error))

    # ------------------------------------------------------------------------------------ images
    def head(self, key: str) -> dict[str, Any]:
        """The image's length and, from its sidecar, its metadata, in the shape of an S3 ``HEAD``.

        The metadata counts only if the sidecar was written for an image of exactly this length.
        """
        try:
            with contextlib.suppress(Exception):
                self._fs.invalidate_cache(self._path(key))
            size = int(self._fs.info(self._path(key)).get("size") or 0)
        except Exception as error:
            raise self._fail("inspecting", key, error) from None
        sidecar = self.read_json(self.meta_key(key)) or {}
        metadata = sidecar.get("Metadata")
        vouches = (
            sidecar.get("schema") == META_SCHEMA
            and sidecar.get("key") == key
            and sidecar.get("ContentLength") == size
            and isinstance(metadata, dict)
        )
        return {
            "ContentLength": size,
            "ContentType": sidecar.get("ContentType") or IMAGE_CONTENT_TYPE,
            "Metadata": {str(k): str(v) for k, v in metadata.items()} if vouches and isinstance(metadata, dict) else {},
        }

    def head_if_exists(self, key: str) -> dict[str, Any] | None:
        """:meth:`head`, or ``None`` when nothing is there. Outside the task's prefix (a publication)
        the sidecar vouches only for the very bytes it was written for: another task instance may
        have written the same path since."""
        try:
            with contextlib.suppress(Exception):
                self._fs.invalidate_cache(self._path(key))
            if not self._fs.exists(self._path(key)):
                return None
        except Exception as error:
            raise self._fail("inspecting", key, error) from None
        head = self.head(key)
        if head["Metadata"] and not key.startswith(self.keyspace.task_prefix + "/"):
            sidecar = self.read_json(self.meta_key(key)) or {}
            try:
                digest = hashlib.sha256(self._fs.cat_file(self._path(key))).hexdigest()
            except Exception as error:
                raise self._fail("reading", key, error) from None
            if sidecar.get("sha256") != digest:
                head["Metadata"] = {}
        return head

    def copy_object(self, source_key: str, key: str, metadata: Mapping[str, str]) -> None:
        """Copy a stored image through this worker (fsspec has no portable server-side copy with a
        sidecar), in bounded memory, whole or not at all, with a sidecar of its own."""
        try:
            source = self._fs.open(self._path(source_key), "rb")
        except Exception as error:
            raise self._fail("reading", source_key, error) from None
        with source:
            self.upload_stream(key, source, metadata)

    def upload_stream(
        self, key: str, stream: Any, metadata: Mapping[str, str], content_type: str = IMAGE_CONTENT_TYPE
    ) -> tuple[int, str]:
        """Copy an image from a readable stream in 256 KiB pieces, then write its sidecar; (bytes, sha256)."""
        reader = HashingReader(stream)
        head = reader.read(READ_CHUNK_BYTES)

        def pieces() -> Iterator[bytes]:
            chunk = head
            while chunk:
                yield chunk
                chunk = reader.read(READ_CHUNK_BYTES)

        self._write(key, pieces())
        self._write_meta(key, metadata, reader.bytes_read, image_content_type(head, content_type), reader.sha256)
        return reader.bytes_read, reader.sha256

    def upload_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> tuple[int, str]:
        digest = hashlib.sha256(data).hexdigest()
        self._write(key, iter((data,)))
        self._write_meta(key, metadata, len(data), image_content_type(data), digest)
        return len(data), digest

    def _write_meta(self, key: str, metadata: Mapping[str, str], length: int, content_type: str, sha256: str) -> None:
        self.write_json(
            self.meta_key(key),
            {
                "schema": META_SCHEMA,
                "key": key,
                "ContentLength": length,
                "ContentType": content_type,
                "sha256": sha256,
                "Metadata": dict(metadata),
            },
        )

    def _write(self, key: str, pieces: Iterator[bytes]) -> None:
        """Write an object whole or not at all: a local file under a temporary name, renamed into place."""
        path = self._path(key)
        target = path
        try:
            if self._local:
                parent, name = posixpath.split(path)
                self._fs.makedirs(parent, exist_ok=True)
                target = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}{_PARTIAL_SUFFIX}"
            with self._fs.open(target, "wb", block_size=MULTIPART_THRESHOLD) as out:
                for piece in pieces:
                    out.write(piece)
            if self._local:
                self._fs.mv(target, path)
        except BaseException as error:
            ours = isinstance(error, JiMengError) or not isinstance(error, Exception)
            if self._local:
                with contextlib.suppress(Exception):
                    self._fs.rm(target)
            elif ours:
                # The download broke (or the task was interrupted) mid-copy, and a cloud writer publishes
                # what it has when closed: remove the stump. A failed write published nothing.
                with contextlib.suppress(Exception):
                    self._fs.rm(path)
            if ours:
                raise  # the hook's download error, or an interruption: not storage's fault
            raise self._fail("writing", key, error) from None
