"""What the gallery shows of one task instance, read from its own XComs and its own storage.

The gallery trusts nothing the request names beyond the task instance itself: the images it may
serve are the ones in that task instance's ``images`` XCom (written by the task, kept in the
metadata DB), each under the task's ``storage`` prefix; it reads them, and the task's
``records.json``, through the connection the task itself used (the ``storage`` XCom's ``conn_id``).

``s3://`` objects are read through the Amazon provider's ``S3Hook``; any other scheme (``gs://``,
``file://``, ...) through Airflow's ``ObjectStoragePath`` with the same connection id.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_provider_jimeng.storage.records import PromptRecord, StoredImage

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

#: The XComs the operator pushes that the gallery reads.
XCOM_KEYS = ("images", "storage", "usage")
#: ``records.json`` is small (one entry per prompt); anything bigger than this is not read.
MAX_RECORDS_BYTES = 16 * 1024 * 1024
#: Images are streamed to the browser in pieces of this size.
CHUNK_BYTES = 256 * 1024
#: ``prompt 3 image 1: OutputImageSensitiveContentDetected (request id r-1): message``
_FAILURE = re.compile(r"^prompt (?P<prompt>\d+)(?: image (?P<image>\d+))?: (?P<rest>.*)$", re.DOTALL)
_CODE = re.compile(r"^(?P<code>[A-Za-z][\w.]*)(?= \(request id|:|$)")


@dataclass(frozen=True)
class Failure:
    """An image (or a whole prompt) that was not produced, as ``records.json`` tells it."""

    prompt_index: int | None
    image_index: int | None
    code: str | None
    message: str


def parse_failure(text: str) -> Failure:
    """A failure string of ``records.json`` (``prompt P image I: Code (request id R): message``)."""
    match = _FAILURE.match(text)
    if match is None:
        return Failure(None, None, None, text)
    rest = match["rest"]
    code = _CODE.match(rest)
    return Failure(
        int(match["prompt"]),
        int(match["image"]) if match["image"] is not None else None,
        code["code"] if code else None,
        rest,
    )


@dataclass(frozen=True)
class Storage:
    """Where a task instance's objects are (its ``storage`` XCom)."""

    prefix: str
    records: str
    conn_id: str | None

    @classmethod
    def from_xcom(cls, value: Any) -> Storage | None:
        if not isinstance(value, Mapping):
            return None
        prefix, records, conn_id = value.get("prefix"), value.get("records"), value.get("conn_id")
        if not isinstance(prefix, str) or "://" not in prefix or not prefix.endswith("/"):
            return None
        if not isinstance(records, str) or not records.startswith(prefix):
            return None
        return cls(prefix=prefix, records=records, conn_id=conn_id if isinstance(conn_id, str) else None)

    def holds(self, image: StoredImage) -> bool:
        """Whether ``image`` is one of this task's own objects (its URI under the task's prefix)."""
        uri = image.uri
        if not uri.startswith(self.prefix) or "/../" in f"/{uri[len(self.prefix) :]}/":
            return False
        if uri.startswith("s3://"):
            return uri == f"s3://{image.bucket}/{image.key}"
        return True


@dataclass
class TaskImages:
    """Everything the gallery shows of one task instance (one map index)."""

    map_index: int
    images: list[StoredImage]
    storage: Storage | None
    usage: dict[str, Any]
    records: dict[int, PromptRecord] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    records_error: str | None = None

    def image(self, number: int) -> StoredImage | None:
        """The ``number``-th image of the task's ``images`` XCom, if it is one of the task's own objects."""
        if self.storage is None or not 0 <= number < len(self.images):
            return None
        image = self.images[number]
        return image if self.storage.holds(image) else None


def load_task_images(
    session: Session, *, dag_id: str, run_id: str, task_id: str, map_index: int | None
) -> list[TaskImages]:
    """The task instance's XComs, per map index (``None``: every map index the task pushed images for)."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    query = select(XComModel).where(
        XComModel.dag_id == dag_id,
        XComModel.run_id == run_id,
        XComModel.task_id == task_id,
        XComModel.key.in_(XCOM_KEYS),
    )
    if map_index is not None:
        query = query.where(XComModel.map_index == map_index)
    values: dict[int, dict[str, Any]] = {}
    for row in session.scalars(query):
        values.setdefault(row.map_index, {})[row.key] = XComModel.deserialize_value(row)
    found = []
    for index in sorted(values):
        xcoms = values[index]
        images_json = xcoms.get("images")
        images = [StoredImage.from_json(item) for item in (images_json if isinstance(images_json, list) else [])]
        usage = xcoms.get("usage")
        found.append(
            TaskImages(
                map_index=index,
                images=[image for image in images if image is not None],
                storage=Storage.from_xcom(xcoms.get("storage")),
                usage=dict(usage) if isinstance(usage, Mapping) else {},
            )
        )
    return found


def read_records(task: TaskImages) -> None:
    """Fill in the task's prompt records and failures from its ``records.json`` (a missing one is no error)."""
    if task.storage is None:
        return
    try:
        stream = open_object(task.storage.records, task.storage.conn_id)
        data = b""
        for chunk in stream.chunks:
            data += chunk
            if len(data) > MAX_RECORDS_BYTES:
                stream.close()
                raise ValueError("records.json is too large")
        document = json.loads(data)
    except FileNotFoundError:
        return
    except Exception as error:
        log.warning("JiMeng gallery: records.json of %s not read (%s)", task.storage.prefix, type(error).__name__)
        task.records_error = "The task's records could not be read."
        return
    prompts = document.get("prompts") if isinstance(document, Mapping) else None
    for entry in prompts if isinstance(prompts, list) else []:
        record = PromptRecord.from_json(entry)
        if record is not None:
            task.records[record.prompt_index] = record
            task.failures.extend(parse_failure(text) for text in record.failures)


# ---------------------------------------------------------------------------------------- reading
@dataclass
class ObjectStream:
    """An object being read: its first bytes already fetched (so a missing object fails before streaming)."""

    chunks: Iterator[bytes]
    first: bytes
    size: int | None
    _close: Any = field(default=None, repr=False)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def open_object(uri: str, conn_id: str | None) -> ObjectStream:
    """Open ``uri`` through ``conn_id``: ``FileNotFoundError`` when it is not there."""
    if uri.startswith("s3://"):
        return _open_s3(uri, conn_id)
    return _open_object_storage(uri, conn_id)


def _stream(first: bytes, rest: Iterator[bytes], close: Any) -> Iterator[bytes]:
    try:
        if first:
            yield first
        yield from rest
    finally:
        close()


def _open_s3(uri: str, conn_id: str | None) -> ObjectStream:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.exceptions import ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        answer = S3Hook(aws_conn_id=conn_id).get_conn().get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in {"NoSuchKey", "404", "NotFound"}:
            raise FileNotFoundError(uri) from None
        raise
    body = answer["Body"]
    chunks = body.iter_chunks(CHUNK_BYTES)
    first = next(chunks, b"")
    size = answer.get("ContentLength")
    return ObjectStream(
        chunks=_stream(first, chunks, body.close),
        first=first,
        size=size if isinstance(size, int) else None,
        _close=body.close,
    )


def _open_object_storage(uri: str, conn_id: str | None) -> ObjectStream:
    from airflow.sdk import ObjectStoragePath

    handle = ObjectStoragePath(uri, conn_id=conn_id).open("rb")  # type: ignore[no-untyped-call]
    first = handle.read(CHUNK_BYTES)

    def rest() -> Iterator[bytes]:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk

    return ObjectStream(chunks=_stream(first, rest(), handle.close), first=first, size=None, _close=handle.close)
