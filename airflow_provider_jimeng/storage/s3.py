"""Where images are stored: deterministic S3 keys, streamed uploads, records and journals.

Keys depend only on the DAG, run, task, map index, prompt index and image index, so a retried or
cleared task finds what an earlier try stored. Two kinds of small JSON objects make retries cheap
and honest, each written once per batch of prompts, never once per prompt (an S3 request costs more
client CPU than the rest of an image's handling):

* *journals* (``_pending/<try>-<seq>.json``), written by :class:`~.journal.JournalWriter` off the
  generation threads as answers arrive, say what was paid for: request id, usage, image indexes and,
  in ``url`` mode, the signed URLs (valid 24 h) so a try that died before storing can still fetch
  them. They are deleted once ``records.json`` covers their prompts.
* ``records.json``, written at the end of each try, holds one record per finished prompt (prompt,
  parameters, model, request id, usage, stored images, failures, Airflow ids): the audit trail, and
  what the next try reuses without a request.

When S3 itself fails, a journal falls back to a file on the worker (:class:`LocalJournal`, mode 0600),
so a retry that runs on the same machine can still store what was paid for, and also to the
deployment's shared Redis when the ``jimeng`` connection names one
(:class:`~airflow_provider_jimeng.coordination.journals.SharedJournal`: a retry on any worker reads it).
Both: a Redis without persistence is a cache, never the only copy of a paid answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from airflow_provider_jimeng.budget import IMAGE_BLOCK_BYTES
from airflow_provider_jimeng.exceptions import JiMengStorageConfigurationError, JiMengStorageError
from airflow_provider_jimeng.redaction import install_log_redaction
from airflow_provider_jimeng.storage.base import RecordsAndJournals
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.records import JournalEntry
from airflow_provider_jimeng.storage.thumbnails import make_thumbnail, store_thumbnails_enabled, thumbnail_key

log = logging.getLogger(__name__)
# botocore logs request bodies (whole images) and signed URLs at DEBUG: cut them before any handler sees them.
install_log_redaction()

IMAGE_CONTENT_TYPE = "image/jpeg"
#: Local journal files older than this are removed by any run on the worker: their signed URLs are dead.
LOCAL_JOURNAL_MAX_AGE_SECONDS = 24 * 3600
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8", "image/jpeg"))


def image_content_type(head: bytes | bytearray | mmap.mmap, fallback: str = IMAGE_CONTENT_TYPE) -> str:
    """The content type an image's first bytes say (Seedream 5.0 may answer PNG), else ``fallback``."""
    start = bytes(head[:8])
    return next((kind for signature, kind in _SIGNATURES if start.startswith(signature)), fallback)


#: Bounds of every S3 call, so that an S3 that accepts connections and never answers costs a call at
#: most about ``S3_MAX_ATTEMPTS * (S3_CONNECT_TIMEOUT + S3_READ_TIMEOUT)`` plus backoff (~32 s), not
#: botocore's 60 s timeouts times 5 attempts. ``config_kwargs`` in the connection's extra wins, option
#: by option (see :func:`bounded_client_config`).
S3_CONNECT_TIMEOUT = 5.0
#: Seconds without a byte from S3 (per socket read, not per object): S3 answers in milliseconds.
S3_READ_TIMEOUT = 10.0
#: Attempts of one call, the first included (botocore's "standard" retry mode: throttling and 5xx too).
S3_MAX_ATTEMPTS = 2
#: After ``on_kill``: one attempt, this many seconds to connect and without a byte, for each later call
#: (a journal batch, ``records.json``): the whole stop then fits Airflow's 60 s before SIGKILL.
S3_STOPPING_TIMEOUT = 8.0


def bounded_client_config(user_config: Any = None) -> Any:
    """The botocore ``Config`` of the provider's S3 client: bounded timeouts and attempts, under the user's own.

    ``user_config`` is what the connection's extra ``config_kwargs`` (or the hook) set; each option it
    sets explicitly (``read_timeout``, ``retries``...) wins over the bound.
    """
    from botocore.config import Config

    bounded = Config(
        connect_timeout=S3_CONNECT_TIMEOUT,
        read_timeout=S3_READ_TIMEOUT,
        retries={"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS},
    )
    return bounded.merge(user_config) if user_config is not None else bounded


def bounded_s3_hook(conn_id: str | None) -> Any:
    """The amazon provider's ``S3Hook`` whose client is built with :func:`bounded_client_config`.

    Used by the worker (storing) and the API server (the gallery reading), so neither waits on a silent
    S3 for botocore's minutes.
    """
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    hook = S3Hook(aws_conn_id=conn_id)
    wrapper = hook.conn_config  # cached by the hook: the client is built from it
    wrapper.botocore_config = bounded_client_config(wrapper.botocore_config)
    return hook


#: boto3's default: objects up to this size are uploaded with one PutObject.
MULTIPART_THRESHOLD = 8 * 1024 * 1024
#: Downloads are read in pieces this small, for the same reason.
READ_CHUNK_BYTES = 256 * 1024
#: S3 error codes that no retry can fix: a wrong bucket name, region or credentials.
STORAGE_CONFIGURATION_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidBucketName",
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
        "AccountProblem",
    }
)


def _read_all(stream: Any, length: int) -> bytes | bytearray | mmap.mmap:
    """Read a stream announced as ``length`` bytes into one buffer, piece by piece (close it after use)."""
    buffer: bytearray | mmap.mmap = mmap.mmap(-1, length) if length >= IMAGE_BLOCK_BYTES else bytearray(length)
    filled = 0
    while chunk := stream.read(READ_CHUNK_BYTES):
        end = filled + len(chunk)
        if end > length:  # more than announced (a decoded Content-Encoding): finish in a growing buffer
            grown = bytearray(buffer[:filled])
            grown += chunk
            while chunk := stream.read(READ_CHUNK_BYTES):
                grown += chunk
            _close(buffer)
            return grown
        buffer[filled:end] = chunk
        filled = end
    if filled < length:
        short = bytes(buffer[:filled])
        _close(buffer)
        return short
    return buffer


def _close(buffer: object) -> None:
    if isinstance(buffer, mmap.mmap):
        buffer.close()


class HashingReader:
    """Wrap a readable stream, hashing and counting what passes through (for streamed uploads)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        chunk: bytes = self._stream.read(size)
        self._digest.update(chunk)
        self.bytes_read += len(chunk)
        return chunk

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def _describe(error: Exception) -> str:
    """The S3 error code (with S3's request id when there is one), else the exception's class name."""
    response = getattr(error, "response", None)
    if isinstance(response, Mapping):
        code = response.get("Error", {}).get("Code")
        request_id = (response.get("ResponseMetadata") or {}).get("RequestId")
        if code:
            return f"{code} (S3 request id {request_id})" if request_id else str(code)
    return type(error).__name__


class LocalJournal:
    """Journals on the worker's disk, for when S3 cannot take them (outage, access denied, no bucket).

    One file per prompt, named by a hash of the task prefix and prompt index, in a per-user directory of the
    system temp dir (``0700``; files ``0600``: they hold signed URLs or image data). Best effort: it
    helps when the retry runs on the same machine (LocalExecutor, ``dag.test``, a Celery retry that
    lands on the same worker), not when every try gets a fresh container or another worker; a shared
    store (:class:`~airflow_provider_jimeng.coordination.journals.SharedJournal`) serves those.

    Files never outlive the try that can use them: they are deleted once ``records.json`` covers their
    prompt, and the listing every run makes before its first request removes any file of the directory
    older than the signed URLs' life (:data:`LOCAL_JOURNAL_MAX_AGE_SECONDS`), whichever task left it.
    """

    def __init__(self, keyspace: TaskKeyspace, directory: Path | None = None) -> None:
        self.keyspace = keyspace
        uid = getattr(os, "getuid", lambda: 0)()
        self.directory = directory or Path(tempfile.gettempdir()) / f"airflow-provider-jimeng-{uid}" / "journal"

    def _path(self, name: str) -> Path:
        return self.directory / f"{self.keyspace.fallback_journal_name(name)}.json"

    def path(self, prompt_index: int) -> Path:
        return self._path(f"p{prompt_index:04d}")

    @property
    def usage_path(self) -> Path:
        """Where tries whose ``records.json`` S3 refused keep their counters (one file per task instance)."""
        return self._path("usage")

    def _write_json(self, path: Path, data: Any) -> bool:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(data, handle, ensure_ascii=False, separators=(",", ":"))
            os.replace(partial, path)
        except OSError as error:
            log.error("Could not write a local journal file either: %s", type(error).__name__)
            return False
        return True

    def write(self, entry: JournalEntry) -> Path | None:
        """Keep an entry here, with its base64 image data (the only copy of it, once S3 failed)."""
        path = self.path(entry.prompt_index)
        return path if self._write_json(path, entry.to_json(with_data=True)) else None

    def read(self, prompt_index: int) -> JournalEntry | None:
        try:
            data = json.loads(self.path(prompt_index).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return JournalEntry.from_json(data, prompt_index=prompt_index)

    def listing(self) -> set[str]:
        """The directory's file names, from one listing; files older than the signed URLs' life are removed.

        One ``listdir`` and a ``stat`` per file, before the first request: the directory holds files only
        for prompts whose S3 journal failed, so it is empty or small on a healthy worker.
        """
        try:
            names = os.listdir(self.directory)
        except OSError:
            return set()
        cutoff = time.time() - LOCAL_JOURNAL_MAX_AGE_SECONDS
        kept: set[str] = set()
        expired = 0
        for name in names:
            path = self.directory / name
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    expired += 1
                    continue
            except OSError:
                continue
            kept.add(name)
        if expired:
            log.info("Removed %d local journal file(s) older than 24 h (their signed URLs have expired)", expired)
        return kept

    def read_many(self, prompt_indexes: Iterable[int]) -> dict[int, JournalEntry]:
        """The journals kept here for these prompts, from one listing of the directory (which expires old files)."""
        names = self.listing()
        found = {}
        for index in prompt_indexes:
            if self.path(index).name in names and (entry := self.read(index)) is not None:
                found[index] = entry
        return found

    def delete(self, prompt_index: int) -> None:
        with contextlib.suppress(OSError):
            self.path(prompt_index).unlink()

    # ------------------------------------------------------------------------------------------ usage
    def read_usage(self) -> dict[str, dict[str, Any]]:
        """Earlier tries' counters kept here, by try token."""
        try:
            data = json.loads(self.usage_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def write_usage(self, token: str, usage: Mapping[str, Any]) -> bool:
        return self._write_json(self.usage_path, {**self.read_usage(), token: dict(usage)})

    def delete_usage(self) -> None:
        with contextlib.suppress(OSError):
            self.usage_path.unlink()


class S3ImageStore(RecordsAndJournals):
    """Reads and writes one task's objects through the amazon provider's ``S3Hook`` client."""

    def __init__(
        self,
        s3_hook: Any,
        keyspace: TaskKeyspace,
        local_journal: LocalJournal | None = None,
        *,
        shared_journal: Any = None,
    ) -> None:
        self.keyspace = keyspace
        self.local_journal = local_journal or LocalJournal(keyspace)
        self.shared_journal = shared_journal
        self._hook = s3_hook
        self._conn_id = getattr(s3_hook, "aws_conn_id", None)
        self._client = s3_hook.get_conn()  # boto3 clients are thread-safe; one serves every worker
        self._extra_args: dict[str, Any] = dict(getattr(s3_hook, "extra_args", {}) or {})
        self._transfer_config = getattr(s3_hook, "transfer_config", None)
        #: Store a thumbnail next to each image (``[jimeng] store_thumbnails``): the gallery then reads ~16 KB
        #: per tile instead of the whole image (:mod:`airflow_provider_jimeng.storage.thumbnails`).
        self.store_thumbnails = store_thumbnails_enabled()

    @property
    def bucket(self) -> str:
        return self.keyspace.bucket

    def hurry(self) -> None:
        """The try was stopped (``on_kill``): later calls get one short attempt each (:data:`S3_STOPPING_TIMEOUT`).

        Calls under way keep their bounds. What a stopped try still writes is small (a journal batch,
        ``records.json``, the images of ``b64_json`` answers in flight); if S3 does not take it in time,
        it goes to the fallback journal like any failed write.
        """
        from botocore.config import Config

        short = Config(
            connect_timeout=S3_STOPPING_TIMEOUT,
            read_timeout=S3_STOPPING_TIMEOUT,
            retries={"mode": "standard", "total_max_attempts": 1},
        )
        try:
            config = bounded_client_config(self._hook.conn_config.botocore_config).merge(short)
            self._client = self._hook.get_client_type(region_name=self._hook.region_name, config=config)
        except Exception as error:  # the stop goes on with the bounded client
            log.warning("Could not shorten the S3 timeouts after the stop: %s", type(error).__name__)

    def _fail(self, action: str, key: str, error: Exception) -> JiMengStorageError:
        return JiMengStorageError(f"{action} s3://{self.bucket}/{key} failed: {_describe(error)}")

    def existing_keys(self, *, first: bool = False) -> dict[str, int]:
        """Objects already under the task's prefix (key -> size), found with one paginated listing.

        ``first``: this is the try's first call to S3, before anything was paid for. A bucket that does
        not exist or refuses these credentials then fails the task without retries (a retry would meet
        the same answer), instead of spending the task's retries on a typo.
        """
        found: dict[str, int] = {}
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.keyspace.task_prefix + "/"):
                for item in page.get("Contents", []):
                    found[item["Key"]] = int(item["Size"])
        except Exception as error:
            failure = self._fail("listing", self.keyspace.task_prefix + "/", error)
            code = _describe(error).split(" ", 1)[0]
            if first and code in STORAGE_CONFIGURATION_CODES:
                raise JiMengStorageConfigurationError(
                    f"{failure} before any image was generated: check the bucket name, its region and what "
                    f"connection {self._conn_id!r} may do (s3:ListBucket, s3:GetObject, s3:PutObject, "
                    "s3:DeleteObject on the prefix); nothing was paid for, and a retry would meet the same answer"
                ) from None
            raise failure from None
        return found

    def read_json(self, key: str) -> dict[str, Any] | None:
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as error:
            if _describe(error) in ("NoSuchKey", "404"):
                return None
            raise self._fail("reading", key, error) from None
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, key: str, data: Mapping[str, Any]) -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8"),
                ContentType="application/json",
                **self._extra_args,
            )
        except Exception as error:
            raise self._fail("writing", key, error) from None

    def discard_journals(self, keys: list[str], prompt_indexes: list[int]) -> None:
        """Drop journals whose prompts are in ``records.json``: one request per 1,000 objects."""
        self._discard_fallback_journals(prompt_indexes)
        objects = [{"Key": key} for key in keys]
        for start in range(0, len(objects), 1000):
            try:
                answer = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects[start : start + 1000], "Quiet": True}
                )
                errors = answer.get("Errors") or []
            except Exception as error:
                errors = [{"Code": _describe(error)}]
            if errors:
                # records.json, read first on a retry, supersedes journals: only tidiness is lost.
                log.warning("Could not delete %d journal(s): %s", len(errors), errors[0].get("Code"))

    def size_of(self, key: str) -> int | None:
        try:
            return int(self._client.head_object(Bucket=self.bucket, Key=key).get("ContentLength", 0))
        except Exception as error:
            if _describe(error).split(" ", 1)[0] not in ("404", "NoSuchKey", "NotFound"):
                raise self._fail("inspecting", key, error) from None
        return None

    def head(self, key: str) -> dict[str, Any]:
        try:
            return dict(self._client.head_object(Bucket=self.bucket, Key=key))
        except Exception as error:
            raise self._fail("inspecting", key, error) from None

    def head_if_exists(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self._client.head_object(Bucket=self.bucket, Key=key))
        except Exception as error:
            if _describe(error).split(" ", 1)[0] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail("inspecting", key, error) from None

    def copy_object(self, source_key: str, key: str, metadata: Mapping[str, str]) -> None:
        """A server-side copy (no download); the source's metadata and content type come along (they are
        ``metadata``: the engine wrote them, or checked them, before publishing)."""
        try:
            self._client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": source_key},
                MetadataDirective="COPY",
                **self._extra_args,
            )
        except Exception as error:
            raise self._fail("copying to", key, error) from None

    def upload_stream(
        self, key: str, stream: Any, metadata: Mapping[str, str], content_type: str = IMAGE_CONTENT_TYPE
    ) -> tuple[int, str]:
        """Upload an image from a readable stream; returns (bytes, sha256).

        A stream of known length up to the multipart threshold (8 MiB unless the connection says
        otherwise) is read into one buffer and sent with a single PutObject: S3 needs its length and
        checksum before the body, so a managed transfer would buffer it all the same, and would add a
        thread pool per upload. Larger or unsized streams go through a managed transfer in parts.
        """
        length = getattr(stream, "content_length", None)
        threshold = getattr(self._transfer_config, "multipart_threshold", None) or MULTIPART_THRESHOLD
        if isinstance(length, int) and length <= threshold:
            data = _read_all(stream, length)
            try:
                digest = getattr(stream, "sha256", None)
                self._put_image(key, data, metadata, image_content_type(data, content_type))
                return len(data), digest if isinstance(digest, str) else hashlib.sha256(data).hexdigest()
            finally:
                _close(data)
        reader = HashingReader(stream)
        extra = {**self._extra_args, "ContentType": content_type, "Metadata": dict(metadata)}
        try:
            self._client.upload_fileobj(reader, self.bucket, key, ExtraArgs=extra, Config=self._transfer_config)
        except JiMengStorageError:
            raise
        except Exception as error:
            cause = error.__cause__ or error.__context__
            if cause is not None and type(cause).__module__.startswith("airflow_provider_jimeng"):
                raise cause from None
            raise self._fail("uploading", key, error) from None
        return reader.bytes_read, reader.sha256

    def upload_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> tuple[int, str]:
        self._put_image(key, data, metadata, image_content_type(data))
        return len(data), hashlib.sha256(data).hexdigest()

    def _put_image(
        self, key: str, data: bytes | bytearray | mmap.mmap, metadata: Mapping[str, str], content_type: str
    ) -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                Metadata=dict(metadata),
                **self._extra_args,
            )
        except Exception as error:
            raise self._fail("uploading", key, error) from None
        if self.store_thumbnails:
            self._put_thumbnail(key, data)

    def _put_thumbnail(self, key: str, data: bytes | bytearray | mmap.mmap) -> None:
        """The image's thumbnail, best effort: without it the gallery makes one itself, nothing is lost."""
        try:
            small = make_thumbnail(data)
            self._client.put_object(
                Bucket=self.bucket, Key=thumbnail_key(key), Body=small, ContentType="image/jpeg", **self._extra_args
            )
        except Exception as error:  # an image Pillow cannot read, a refused PUT: the image itself is stored
            log.warning("JiMeng: no thumbnail stored for %s (%s)", key, type(error).__name__)
