"""What the gallery shows of one task instance: its own XComs, read defensively, and allowed objects.

Everything here was written by task code (XCom values, ``records.json``) and is untrusted: values
are size-bounded and type-checked, an entry that fails a check is shown as unreadable, and a URI is
read only if it lies under a storage root the deployment allows, through the connection the
deployment named for it (:mod:`~airflow_provider_jimeng.plugins.gallery_access`). The ``conn_id`` and
``prefix`` a task wrote in its ``storage`` XCom are not used to decide anything.

``s3://`` objects are read through one cached boto3 client per allowed connection; ``file://`` ones
with ``open`` on their real path; any other scheme (``gs://``, ``abfs://``) through Airflow's
``ObjectStoragePath`` with the root's connection id.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow_provider_jimeng.plugins.gallery_access import (
    ConnectionMissing,
    StorageRoot,
    connection_exists,
    local_path,
    root_of,
    s3_client,
)
from airflow_provider_jimeng.storage.records import PromptRecord, StoredImage
from airflow_provider_jimeng.storage.thumbnails import THUMBNAIL_FOLDER, thumbnail_key

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

#: The XComs the operator pushes that the gallery reads.
XCOM_KEYS = ("images", "storage", "usage")
#: ``records.json`` is small (one entry per prompt); anything bigger than this is not read.
MAX_RECORDS_BYTES = 16 * 1024 * 1024
#: An XCom value (as stored) larger than this is not parsed at all.
MAX_XCOM_CHARS = 64 * 1024 * 1024
#: Entries of the ``images`` XCom (and prompts of ``records.json``) beyond these are not read.
MAX_IMAGES = 10_000
MAX_PROMPTS = 10_000
#: Failures of one prompt beyond this are not shown.
MAX_FAILURES_PER_PROMPT = 100
#: Longest string field of an image entry (URIs have their own bound, MAX_URI_CHARS).
MAX_FIELD_CHARS = 2048
#: Images are streamed to the browser in pieces of this size.
CHUNK_BYTES = 256 * 1024
#: ``prompt 3 image 1: OutputImageSensitiveContentDetected (request id r-1): message``
_FAILURE = re.compile(r"^prompt (?P<prompt>\d{1,9})(?: image (?P<image>\d{1,9}))?: (?P<rest>.*)$", re.DOTALL)
_CODE = re.compile(r"^(?P<code>[A-Za-z][\w.]{0,199})(?= \(request id|:|$)")


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


def _xcom_value(row: Any) -> Any:
    """An XCom row's value as plain JSON (no class decoding on the API server), ``None`` if too big or not JSON."""
    value = row.value
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return value  # already plain JSON (stored through the Task Execution API)
    if len(value) > MAX_XCOM_CHARS:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


def image_entry(item: Any) -> StoredImage | None:
    """One entry of the ``images`` XCom, or ``None`` (shown as unreadable) when it fails a check."""
    if not isinstance(item, Mapping) or len(item) > 64:
        return None
    if any(isinstance(value, str) and len(value) > MAX_FIELD_CHARS for value in item.values()):
        return None
    return StoredImage.from_json(item)


@dataclass(frozen=True)
class Storage:
    """Where the task says its ``records.json`` is (its ``storage`` XCom): a candidate, checked like any URI."""

    records: str | None

    @classmethod
    def from_xcom(cls, value: Any) -> Storage | None:
        if not isinstance(value, Mapping):
            return None
        records = value.get("records")
        return cls(records=records if isinstance(records, str) and len(records) <= MAX_FIELD_CHARS else None)


#: The XCom a review task (``JiMengReviewOperator``) pushes its decision under.
REVIEW_XCOM_KEY = "review"
#: Review decisions of one run beyond this are not read.
MAX_REVIEWS = 50
#: What a review's decision lists, and the verdict each list gives its images.
_REVIEW_LISTS = (("approved", "approved"), ("regenerate", "take again"), ("rejected", "not approved"))


@dataclass(frozen=True)
class Verdict:
    """A review's decision about one image, as the gallery shows it."""

    outcome: str
    review_task: str
    decided_by: str | None
    timed_out: bool

    @property
    def text(self) -> str:
        who = "the deadline" if self.timed_out or not self.decided_by else self.decided_by
        return f"{self.outcome.capitalize()} by {who} ({self.review_task})"


@dataclass
class TaskImages:
    """Everything the gallery shows of one task instance (one map index)."""

    map_index: int
    #: The ``images`` XCom's entries in order; ``None`` for an entry that failed a check.
    images: list[StoredImage | None]
    storage: Storage | None
    usage: dict[str, Any]
    roots: tuple[StorageRoot, ...] = ()
    #: More entries than the gallery reads (:data:`MAX_IMAGES`): how many were left out.
    images_left_out: int = 0
    records: dict[int, PromptRecord] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    records_note: str | None = None
    #: Numbers of images whose object is known to be gone (deleted since the task stored it).
    missing: set[int] = field(default_factory=set)
    #: What the run's reviews decided about an image (by URI), in review task order.
    reviews: dict[str, list[Verdict]] = field(default_factory=dict)
    #: Numbers of images whose stored thumbnail was found (their tiles load from sheets).
    thumbnails_stored: set[int] = field(default_factory=set)

    def readable(self, number: int) -> tuple[str, StorageRoot] | None:
        """The URI and allowed root of the ``number``-th image; ``None``: it is never read."""
        if not 0 <= number < len(self.images):
            return None
        image = self.images[number]
        return root_of(image.uri, self.roots) if image is not None else None


def _task_xcoms(*, dag_id: str, run_id: str, task_id: str, keys: tuple[str, ...], map_index: int | None) -> Any:
    """The query of one task's ``keys`` XComs in a run (``map_index`` ``None``: every map index)."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    query = select(XComModel).where(
        XComModel.dag_id == dag_id,
        XComModel.run_id == run_id,
        XComModel.task_id == task_id,
        XComModel.key.in_(keys),
    )
    return query if map_index is None else query.where(XComModel.map_index == map_index)


def load_task_images(
    session: Session,
    *,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int | None,
    roots: tuple[StorageRoot, ...] = (),
) -> list[TaskImages]:
    """The task instance's XComs, per map index (``None``: every map index the task pushed images for)."""
    query = _task_xcoms(dag_id=dag_id, run_id=run_id, task_id=task_id, keys=XCOM_KEYS, map_index=map_index)
    values: dict[int, dict[str, Any]] = {}
    for row in session.scalars(query.limit(3 * 10_000)):
        values.setdefault(row.map_index, {})[row.key] = _xcom_value(row)
    found = []
    for index in sorted(values):
        xcoms = values[index]
        images_json = xcoms.get("images")
        entries = images_json if isinstance(images_json, list) else []
        usage = xcoms.get("usage")
        found.append(
            TaskImages(
                map_index=index,
                images=[image_entry(item) for item in entries[:MAX_IMAGES]],
                images_left_out=max(0, len(entries) - MAX_IMAGES),
                storage=Storage.from_xcom(xcoms.get("storage")),
                usage=_flat_usage(usage),
                roots=roots,
            )
        )
    return found


def load_images(
    session: Session,
    *,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int,
    first: int,
    count: int,
    roots: tuple[StorageRoot, ...],
) -> list[tuple[StoredImage, tuple[str, StorageRoot]] | None] | None:
    """Images ``first`` to ``first + count - 1`` of one task instance and where each may be read.

    The lookup of every tile, sheet and image request: the same checks as :meth:`TaskImages.readable`,
    but only the ``images`` XCom is read (one query) and only the asked entries checked (a grid of 64
    tiles would otherwise check all 64 entries 64 times). ``None``: the range is not the task's (no
    such entries); an entry that fails a check is ``None`` in the list: it is never read.
    """
    if first < 0 or count < 1 or first + count > MAX_IMAGES:
        return None
    query = _task_xcoms(dag_id=dag_id, run_id=run_id, task_id=task_id, keys=("images",), map_index=map_index)
    row = session.scalars(query).first()
    entries = _xcom_value(row) if row is not None else None
    if not isinstance(entries, list) or first + count > len(entries):
        return None
    found: list[tuple[StoredImage, tuple[str, StorageRoot]] | None] = []
    for item in entries[first : first + count]:
        image = image_entry(item)
        allowed = root_of(image.uri, roots) if image is not None else None
        found.append(None if image is None or allowed is None else (image, allowed))
    return found


def load_reviews(session: Session, *, dag_id: str, run_id: str, tasks: list[TaskImages]) -> None:
    """Mark the tasks' images with what the run's reviews decided (their ``review`` XComs, read defensively)."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select

    query = (
        select(XComModel)
        .where(XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.key == REVIEW_XCOM_KEY)
        .order_by(XComModel.task_id, XComModel.map_index)
    )
    verdicts: dict[str, list[Verdict]] = {}
    for row in session.scalars(query.limit(MAX_REVIEWS)):
        decision = _xcom_value(row)
        if not isinstance(decision, Mapping):
            continue
        user = decision.get("decided_by")
        name = user.get("name") if isinstance(user, Mapping) else None
        for list_name, outcome in _REVIEW_LISTS:
            choices = decision.get(list_name)
            for choice in (choices if isinstance(choices, list) else [])[:MAX_IMAGES]:
                uri = choice.get("uri") if isinstance(choice, Mapping) else None
                if isinstance(uri, str) and len(uri) <= MAX_FIELD_CHARS:
                    verdicts.setdefault(uri, []).append(
                        Verdict(
                            outcome=outcome,
                            review_task=str(row.task_id)[:MAX_FIELD_CHARS],
                            decided_by=name[:MAX_FIELD_CHARS] if isinstance(name, str) else None,
                            timed_out=decision.get("timed_out") is True,
                        )
                    )
    for task in tasks:
        for image in task.images:
            if image is not None and image.uri in verdicts:
                task.reviews[image.uri] = verdicts[image.uri]


def _flat_usage(usage: Any) -> dict[str, Any]:
    """The usage XCom's counters: short keys with numbers only (it is shown on the page)."""
    if not isinstance(usage, Mapping):
        return {}
    return {
        key: value
        for key, value in list(usage.items())[:64]
        if isinstance(key, str) and len(key) <= 64 and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def read_records(task: TaskImages) -> None:
    """Fill in the task's prompt records and failures from its ``records.json``, if it may be read."""
    if task.storage is None or task.storage.records is None:
        return
    allowed = root_of(task.storage.records, task.roots)
    if allowed is None:
        task.records_note = "The task's records are not where this deployment allows the gallery to read."
        return
    uri, root = allowed
    try:
        stream = open_object(uri, root)
        data = bytearray()
        try:
            for chunk in stream.chunks:
                data += chunk
                if len(data) > MAX_RECORDS_BYTES:
                    raise ValueError("records.json is too large")
        finally:
            stream.close()
        document = json.loads(bytes(data))
    except FileNotFoundError:
        task.records_note = "The task's records.json is missing (deleted, or never written): no prompts or failures."
        return
    except Exception as error:
        log.warning("JiMeng gallery: records.json not read (%s)", type(error).__name__)
        task.records_note = "The task's records could not be read."
        return
    if not isinstance(document, Mapping):
        task.records_note = "The task's records could not be read."
        return
    prompts = document.get("prompts")
    for entry in (prompts if isinstance(prompts, list) else [])[:MAX_PROMPTS]:
        record = PromptRecord.from_json(entry)
        if record is not None:
            task.records[record.prompt_index] = record
            task.failures.extend(parse_failure(text) for text in record.failures[:MAX_FAILURES_PER_PROMPT])
    # Prompts that finished with no record (a whole prompt refused, not sent): their failures alone.
    unfinished = document.get("failures")
    for text in (unfinished if isinstance(unfinished, list) else [])[:MAX_PROMPTS]:
        if isinstance(text, str):
            task.failures.append(parse_failure(text[:MAX_FIELD_CHARS]))


def find_missing(task: TaskImages, *, thumbnails: bool = False) -> None:
    """Mark the allowed images whose object is gone: one listing per folder (S3) or a stat (``file://``).

    With ``thumbnails``, also mark the images whose stored thumbnail (``[jimeng] store_thumbnails``) is
    there, from one more listing per folder (its ``_thumbnails/``): the page loads those tiles from
    sheets. Only a hint for the page: the sheet route checks and reads each thumbnail itself.
    Best effort: a folder that cannot be listed (no ``s3:ListBucket``, another backend) marks nothing.
    """
    folders: dict[tuple[str, str, str], list[tuple[int, str, str | None]]] = {}
    for number in range(len(task.images)):
        allowed = task.readable(number)
        if allowed is None:
            continue
        uri, root = allowed
        thumb = root_of(thumbnail_key(uri), task.roots) if thumbnails else None
        if uri.startswith("s3://") and root.conn_id is not None:
            bucket, _, key = uri.removeprefix("s3://").partition("/")
            folder = posixpath.dirname(key)
            thumb_key = thumb[0].removeprefix(f"s3://{bucket}/") if thumb is not None and thumb[1] == root else None
            folders.setdefault((root.conn_id, bucket, f"{folder}/" if folder else ""), []).append(
                (number, key, thumb_key)
            )
        elif uri.startswith("file://"):
            if local_path(uri, root) is None:
                task.missing.add(number)
            elif thumb is not None and local_path(*thumb) is not None:
                task.thumbnails_stored.add(number)
    for (conn_id, bucket, prefix), wanted in list(folders.items())[:20]:
        try:
            client = s3_client(conn_id)
            present = _list_keys(client, bucket, prefix, {key for _, key, _ in wanted})
            thumb_keys = {thumb for _, _, thumb in wanted if thumb is not None}
            stored = _list_keys(client, bucket, f"{prefix}{THUMBNAIL_FOLDER}/", thumb_keys) if thumb_keys else set()
        except Exception as error:
            log.info("JiMeng gallery: folder not listed (%s)", type(error).__name__)
            continue
        task.missing.update(number for number, key, _ in wanted if key not in present)
        task.thumbnails_stored.update(
            number for number, key, thumb in wanted if key in present and thumb is not None and thumb in stored
        )


def _list_keys(client: Any, bucket: str, prefix: str, wanted: set[str], pages: int = 10) -> set[str]:
    """Which of ``wanted`` are in ``s3://bucket/prefix`` (at most ``pages`` listings; beyond: assumed present)."""
    present: set[str] = set()
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    for _ in range(pages):
        answer = client.list_objects_v2(**kwargs)
        present.update(item["Key"] for item in answer.get("Contents", []) if item.get("Key") in wanted)
        if not answer.get("IsTruncated"):
            return present
        kwargs["ContinuationToken"] = answer["NextContinuationToken"]
    return present | wanted


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


def open_object(uri: str, root: StorageRoot) -> ObjectStream:
    """Open ``uri`` (normalised, under ``root``) through the root's connection.

    ``FileNotFoundError`` when it is not there; ``ConnectionMissing`` when the root's connection does
    not exist (no read with default credentials).
    """
    if root.scheme == "file":
        path = local_path(uri, root)
        if path is None:
            raise FileNotFoundError(uri)
        handle = open(path, "rb")  # noqa: SIM115 (closed by the stream)
        first = handle.read(CHUNK_BYTES)

        def local_rest() -> Iterator[bytes]:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk

        return ObjectStream(
            chunks=_stream(first, local_rest(), handle.close), first=first, size=None, _close=handle.close
        )
    if root.conn_id is None:
        raise ConnectionMissing(uri)
    if root.scheme == "s3":
        return _open_s3(uri, root.conn_id)
    if not connection_exists(root.conn_id):
        raise ConnectionMissing(root.conn_id)
    return _open_object_storage(uri, root.conn_id)


def _stream(first: bytes, rest: Iterator[bytes], close: Any) -> Iterator[bytes]:
    try:
        if first:
            yield first
        yield from rest
    finally:
        close()


def _open_s3(uri: str, conn_id: str) -> ObjectStream:
    from botocore.exceptions import ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        answer = s3_client(conn_id).get_object(Bucket=bucket, Key=key)
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


def _open_object_storage(uri: str, conn_id: str) -> ObjectStream:
    from airflow.sdk import ObjectStoragePath

    handle = ObjectStoragePath(uri, conn_id=conn_id).open("rb")  # type: ignore[no-untyped-call]
    first = handle.read(CHUNK_BYTES)

    def rest() -> Iterator[bytes]:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk

    return ObjectStream(chunks=_stream(first, rest(), handle.close), first=first, size=None, _close=handle.close)
