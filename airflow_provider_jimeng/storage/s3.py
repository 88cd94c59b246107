"""Where images are stored: deterministic S3 keys, streamed uploads, and per-prompt records.

Keys depend only on the DAG, run, task, map index, prompt index and image index, so a retried or
cleared task finds what an earlier try stored. Two small JSON objects per prompt make retries cheap
and honest:

* the *journal* (``_pending/p0000.json``), written right after generation in ``url`` mode, keeps the
  signed URLs (valid 24 h) so a try that died before storing can still fetch what was paid for;
* the *record* (``p0000.json``), written once every image of the prompt is stored, marks the prompt
  done and carries its metadata (prompt, model, parameters, request id, usage, Airflow ids).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_jimeng.exceptions import JiMengConfigurationError, JiMengStorageError

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")
KEY_TEMPLATE_FIELDS = ("dag_id", "run_id", "task_id", "map_index", "prompt_index", "image_index", "ext")
IMAGE_CONTENT_TYPE = "image/jpeg"
#: Journals older than this are not trusted: the signed URLs in them are about to expire.
JOURNAL_MAX_AGE_SECONDS = 23 * 3600


def check_bucket_name(bucket: str) -> None:
    """Refuse a bucket name S3 would refuse, naming the rule it breaks."""
    rules = "3-63 characters of lower-case letters, digits, '.' and '-', starting and ending with a letter or digit"
    if not isinstance(bucket, str) or not _BUCKET_NAME.match(bucket):
        raise JiMengConfigurationError(
            "s3_bucket", f"{str(bucket)[:80]!r} is not a valid bucket name; allowed: {rules}"
        )
    if ".." in bucket or _IP_ADDRESS.match(bucket):
        raise JiMengConfigurationError(
            "s3_bucket", f"{bucket!r} is not a valid bucket name (no '..', not an IP address)"
        )


def safe_key_part(value: object) -> str:
    """Make a run id or task id safe and readable inside an S3 key (deterministic)."""
    return _UNSAFE_KEY_CHARS.sub("_", str(value)).strip("_") or "_"


def check_key_template(template: str, *, images_per_task: int) -> None:
    """Refuse a key template that names an unknown field or would write several images to one key."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as exc:
        raise JiMengConfigurationError("s3_key", f"is not a valid format string: {exc}") from None
    unknown = sorted(names - set(KEY_TEMPLATE_FIELDS))
    if unknown:
        raise JiMengConfigurationError(
            "s3_key",
            f"uses unknown field(s) {unknown}; allowed: {', '.join('{' + f + '}' for f in KEY_TEMPLATE_FIELDS)}",
        )
    if images_per_task > 1 and not {"prompt_index", "image_index"} <= names:
        raise JiMengConfigurationError(
            "s3_key", "must contain {prompt_index} and {image_index} when a task can store more than one image"
        )


@dataclass(frozen=True)
class TaskKeyspace:
    """The keys one task instance writes: images, records and journals under one prefix."""

    bucket: str
    prefix: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    key_template: str | None = None

    @property
    def task_prefix(self) -> str:
        parts = [self.prefix.strip("/")] if self.prefix.strip("/") else []
        parts += [safe_key_part(self.dag_id), safe_key_part(self.run_id), safe_key_part(self.task_id)]
        if self.map_index >= 0:
            parts.append(f"map_{self.map_index}")
        return "/".join(parts)

    def image_key(self, prompt_index: int, image_index: int) -> str:
        if self.key_template:
            return self.key_template.format(
                dag_id=safe_key_part(self.dag_id),
                run_id=safe_key_part(self.run_id),
                task_id=safe_key_part(self.task_id),
                map_index=self.map_index,
                prompt_index=prompt_index,
                image_index=image_index,
                ext="jpeg",
            ).lstrip("/")
        return f"{self.task_prefix}/p{prompt_index:04d}_i{image_index:02d}.jpeg"

    def record_key(self, prompt_index: int) -> str:
        return f"{self.task_prefix}/p{prompt_index:04d}.json"

    def journal_key(self, prompt_index: int) -> str:
        return f"{self.task_prefix}/_pending/p{prompt_index:04d}.json"

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def prompt_fingerprint(body: Mapping[str, Any]) -> str:
    """What makes two requests the same work: a stored result is reused only when this matches."""
    relevant = {k: v for k, v in body.items() if k not in ("stream", "response_format")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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
    response = getattr(error, "response", None)
    if isinstance(response, Mapping):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(error).__name__


class S3ImageStore:
    """Reads and writes one task's objects through the amazon provider's ``S3Hook`` client."""

    def __init__(self, s3_hook: Any, keyspace: TaskKeyspace) -> None:
        self.keyspace = keyspace
        self._hook = s3_hook
        self._client = s3_hook.get_conn()  # boto3 clients are thread-safe; one serves every worker
        self._extra_args: dict[str, Any] = dict(getattr(s3_hook, "extra_args", {}) or {})
        self._transfer_config = getattr(s3_hook, "transfer_config", None)

    @property
    def bucket(self) -> str:
        return self.keyspace.bucket

    def _fail(self, action: str, key: str, error: Exception) -> JiMengStorageError:
        return JiMengStorageError(f"{action} s3://{self.bucket}/{key} failed: {_describe(error)}")

    def existing_keys(self) -> dict[str, int]:
        """Objects already under the task's prefix (key -> size), found with one paginated listing."""
        found: dict[str, int] = {}
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.keyspace.task_prefix + "/"):
                for item in page.get("Contents", []):
                    found[item["Key"]] = int(item["Size"])
        except Exception as error:
            raise self._fail("listing", self.keyspace.task_prefix + "/", error) from None
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
                Body=json.dumps(data, ensure_ascii=False, indent=1, default=str).encode("utf-8"),
                ContentType="application/json",
                **self._extra_args,
            )
        except Exception as error:
            raise self._fail("writing", key, error) from None

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as error:
            raise self._fail("deleting", key, error) from None

    def head(self, key: str) -> dict[str, Any]:
        try:
            return dict(self._client.head_object(Bucket=self.bucket, Key=key))
        except Exception as error:
            raise self._fail("inspecting", key, error) from None

    def upload_stream(self, key: str, stream: Any, metadata: Mapping[str, str]) -> tuple[int, str]:
        """Stream an image into S3 chunk by chunk; returns (bytes, sha256)."""
        reader = HashingReader(stream)
        extra = {**self._extra_args, "ContentType": IMAGE_CONTENT_TYPE, "Metadata": dict(metadata)}
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
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=IMAGE_CONTENT_TYPE,
                Metadata=dict(metadata),
                **self._extra_args,
            )
        except Exception as error:
            raise self._fail("uploading", key, error) from None
        return len(data), hashlib.sha256(data).hexdigest()
