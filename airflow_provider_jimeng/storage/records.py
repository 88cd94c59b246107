"""The durable state of a run, typed: journal entries, prompt records, and what a retry does with them.

A *journal entry* says what an answer delivered (and so what was paid for) the moment it arrives; a
*prompt record* says that a prompt is finished, with everything needed to audit it. Both are written
as JSON with a schema version and read back into these dataclasses; anything malformed or of an
unknown schema reads as absent, never as a half-understood promise.

:func:`resume_plan` is the one decision a retry makes for each prompt, from an earlier try's record,
its journal entry and the listing of stored objects: reuse what is stored, finish storing a paid
answer, or generate. It is pure (no I/O) so every path is unit-tested without Airflow or S3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from airflow_provider_jimeng.api.response import GeneratedImage, GenerationResult, image_details, redact_url
from airflow_provider_jimeng.exceptions import JiMengContentPolicyError, error_class_for

#: Version 2: typed entries (version 1 was written before the run engine; its records read as absent).
SCHEMA_VERSION = 2
#: Journals older than this are not trusted to fetch images: their signed URLs are about to expire.
JOURNAL_MAX_AGE_SECONDS = 23 * 3600


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _indexes(value: Any) -> tuple[int, ...]:
    """A list of image indexes, or none (an older record, or anything malformed)."""
    if not isinstance(value, list) or not all(_int(item) is not None and item >= 0 for item in value):
        return ()
    return tuple(value)


def _time(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


# ----------------------------------------------------------------------------------------- journal
@dataclass(frozen=True)
class JournaledImage:
    """An image an answer delivered: where to fetch it (url mode) or its data (local journals only)."""

    index: int
    size: str | None = None
    url: str | None = field(default=None, repr=False)
    b64_json: str | None = field(default=None, repr=False)
    #: The answer's other per-image fields (``GeneratedImage.details``).
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self, *, with_data: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"index": self.index, "size": self.size, "url": self.url, **self.details}
        if with_data and self.b64_json:
            item["b64_json"] = self.b64_json
        return item

    @classmethod
    def from_json(cls, data: Any) -> JournaledImage | None:
        if not isinstance(data, Mapping) or _int(data.get("index")) is None:
            return None
        return cls(
            index=data["index"],
            size=_text(data.get("size")),
            url=_text(data.get("url")),
            b64_json=_text(data.get("b64_json")),
            details=image_details(data),
        )

    def fetchable(self, *, fresh: bool) -> bool:
        """Whether this image can still be stored without a new request."""
        return bool(self.b64_json) or (fresh and bool(self.url))

    def as_generated(self) -> GeneratedImage:
        return GeneratedImage(
            index=self.index, url=self.url, b64_json=self.b64_json, size=self.size, details=dict(self.details)
        )


@dataclass(frozen=True)
class FailedImage:
    """An image of an answer that was not produced, with the service's code."""

    index: int
    error_code: str | None = None
    error_message: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "error_code": self.error_code, "error_message": self.error_message}

    @classmethod
    def from_json(cls, data: Any) -> FailedImage | None:
        if not isinstance(data, Mapping) or _int(data.get("index")) is None:
            return None
        return cls(data["index"], _text(data.get("error_code")), _text(data.get("error_message")))


@dataclass(frozen=True)
class JournalEntry:
    """What one answer delivered, written as soon as it arrives: the proof of what was paid for."""

    prompt_index: int
    fingerprint: str
    written_at: float
    request_id: str | None
    model: str | None
    created: int | None
    usage: dict[str, Any]
    images: tuple[JournaledImage, ...]
    failed: tuple[FailedImage, ...] = ()
    #: Airflow's try number of the try that paid for the answer (``None``: unknown, an older journal).
    try_number: int | None = None

    @classmethod
    def from_result(
        cls, prompt_index: int, fingerprint: str, result: GenerationResult, *, now: float, try_number: int | None = None
    ) -> JournalEntry:
        return cls(
            prompt_index=prompt_index,
            fingerprint=fingerprint,
            written_at=now,
            request_id=result.request_id,
            model=result.model,
            created=result.created,
            usage=result.usage.as_dict(),
            images=tuple(
                JournaledImage(
                    index=image.index, size=image.size, url=image.url, b64_json=image.b64_json, details=image.details
                )
                for image in result.succeeded
            ),
            failed=tuple(FailedImage(image.index, image.error_code, image.error_message) for image in result.failed),
            try_number=try_number,
        )

    @property
    def holds_data(self) -> bool:
        return any(image.b64_json for image in self.images)

    def to_json(self, *, with_data: bool = False) -> dict[str, Any]:
        """JSON for a journal; base64 data only where ``with_data`` (local files, never S3 or logs)."""
        return {
            "schema": SCHEMA_VERSION,
            "prompt_index": self.prompt_index,
            "fingerprint": self.fingerprint,
            "written_at": self.written_at,
            "request_id": self.request_id,
            "model": self.model,
            "created": self.created,
            "usage": self.usage,
            "images": [image.to_json(with_data=with_data) for image in self.images],
            "failed": [image.to_json() for image in self.failed],
            "try_number": self.try_number,
        }

    @classmethod
    def from_json(cls, data: Any, *, prompt_index: int | None = None) -> JournalEntry | None:
        if not isinstance(data, Mapping) or data.get("schema") != SCHEMA_VERSION:
            return None
        index = _int(data.get("prompt_index"))
        fingerprint = _text(data.get("fingerprint"))
        images_json, failed_json = data.get("images"), data.get("failed", [])
        if (
            index is None
            or fingerprint is None
            or not isinstance(images_json, list)
            or not isinstance(failed_json, list)
        ):
            return None
        if prompt_index is not None and index != prompt_index:
            return None
        images = [JournaledImage.from_json(item) for item in images_json]
        failed = [FailedImage.from_json(item) for item in failed_json]
        if any(item is None for item in images) or any(item is None for item in failed):
            return None
        usage = data.get("usage")
        return cls(
            prompt_index=index,
            fingerprint=fingerprint,
            written_at=_time(data.get("written_at")),
            request_id=_text(data.get("request_id")),
            model=_text(data.get("model")),
            created=_int(data.get("created")),
            usage=dict(usage) if isinstance(usage, Mapping) else {},
            images=tuple(item for item in images if item is not None),
            failed=tuple(item for item in failed if item is not None),
            try_number=_int(data.get("try_number")),
        )

    def same_answer(self, other: JournalEntry) -> bool:
        return self.request_id == other.request_id and self.fingerprint == other.fingerprint

    def at_indexes(self, indexes: Sequence[int]) -> JournalEntry:
        """This answer with its image ``j`` renumbered ``indexes[j]`` (a top-up fills an earlier answer's gaps)."""
        return replace(
            self,
            images=tuple(replace(image, index=gap_index(indexes, image.index)) for image in self.images),
            failed=tuple(replace(image, index=gap_index(indexes, image.index)) for image in self.failed),
        )


def gap_index(gaps: Sequence[int], index: int) -> int:
    """Where image ``index`` of a top-up answer goes: the ``index``-th gap, or after the last one."""
    return gaps[index] if index < len(gaps) else max(gaps, default=-1) + 1 + index - len(gaps)


#: Per-image failure codes no retry can change: refused content. Any other is the service failing
#: (``InternalServiceError`` in a set, a stream that broke off): a retry may produce the image.
def transient_failure(code: str | None) -> bool:
    """Whether an image that failed with ``code`` may be produced by a new request."""
    if code in TRANSIENT_IMAGE_CODES:
        return True
    kind = error_class_for(None, code)
    return kind.retryable and not issubclass(kind, JiMengContentPolicyError)


#: Codes the client gives images an answer did not deliver (a broken stream, a broken-off set).
TRANSIENT_IMAGE_CODES = frozenset({"StreamInterrupted", "TruncatedStream", "MalformedResponse", "ConnectionError"})


def images_to_retry(entry: JournalEntry, most: int) -> tuple[int, ...]:
    """The images of an answer a retry should ask for again: those that failed transiently, and (the set
    stopped there) every later one up to ``most``, the images the request could produce."""
    failed = sorted(image.index for image in entry.failed if transient_failure(image.error_code))
    if not failed:
        return ()
    present = {image.index for image in entry.images} | {image.index for image in entry.failed}
    later = [index for index in range(failed[0] + 1, most) if index not in present]
    return tuple(sorted({*failed, *later}))


def newer(entries: Sequence[JournalEntry]) -> JournalEntry | None:
    """The entry that wins for one prompt: the newest; a copy holding the image data beats its data-less twin."""
    best: JournalEntry | None = None
    for entry in entries:
        if best is None:
            best = entry
        elif entry.same_answer(best):
            if entry.holds_data and not best.holds_data:
                best = entry
        elif entry.written_at >= best.written_at:
            best = entry
    return best


# ------------------------------------------------------------------------------------ tries' usage
#: What each try counts, summed over the tries of a task instance in the ``usage`` XCom.
USAGE_COUNTERS = (
    "generated_images",
    "possibly_billed_images",
    "output_tokens",
    "total_tokens",
    "requests",
    "attempts",
    "web_searches",
    "rate_limited",
    "retries",
)


def try_usage(
    token: str, try_number: int | None, counters: Mapping[str, int], *, final: bool, now: float
) -> dict[str, Any]:
    """One try's counters as persisted: in ``records.json`` (``final``), else as a running snapshot.

    ``token`` tells tries apart (a try's journal objects carry it too); ``try_number`` is Airflow's,
    for people reading ``records.json``.
    """
    return {
        "try": token,
        "try_number": try_number,
        "final": final,
        "updated_at": now,
        **{name: int(counters.get(name) or 0) for name in USAGE_COUNTERS},
    }


def merge_try_usage(*sources: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each try's best-known counters by token: a final document beats a snapshot, a later snapshot an earlier."""
    merged: dict[str, dict[str, Any]] = {}
    for source in sources:
        for doc in source:
            token = doc.get("try") if isinstance(doc, Mapping) else None
            if not isinstance(token, str) or not token:
                continue
            current = merged.get(token)
            rank = (bool(doc.get("final")), _time(doc.get("updated_at")))
            if current is None or rank > (bool(current.get("final")), _time(current.get("updated_at"))):
                merged[token] = {
                    "try": token,
                    "try_number": _int(doc.get("try_number")),
                    "final": bool(doc.get("final")),
                    "updated_at": _time(doc.get("updated_at")),
                    **{name: max(0, _int(doc.get(name)) or 0) for name in USAGE_COUNTERS},
                }
    return merged


def committed_images(docs: Iterable[Mapping[str, Any]], first_try: int | None = None) -> int:
    """Images billed or possibly billed by the tries that share a budget: from Airflow try ``first_try`` on.

    ``first_try=None`` counts every try; a try whose number is not known counts too (never less).
    """
    total = 0
    for doc in docs:
        number = _int(doc.get("try_number"))
        if first_try is None or number is None or number >= first_try:
            total += (_int(doc.get("generated_images")) or 0) + (_int(doc.get("possibly_billed_images")) or 0)
    return total


def sum_usage(docs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The counters of several tries, added up."""
    totals = dict.fromkeys(USAGE_COUNTERS, 0)
    for doc in docs:
        for name in USAGE_COUNTERS:
            totals[name] += _int(doc.get(name)) or 0
    return totals


# ----------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class StoredImage:
    """One image kept in object storage: the per-image record pushed to XCom and written to records.json."""

    prompt_index: int
    image_index: int
    size: str | None
    request_id: str | None
    model: str | None
    bucket: str
    key: str
    uri: str
    bytes: int | None
    sha256: str | None
    #: The answer's other per-image fields (``GeneratedImage.details``), written only when there are some.
    details: dict[str, Any] = field(default_factory=dict)
    #: Where ``s3_key`` published a copy (``None``: no template, or the publication was refused).
    published_key: str | None = None
    published_uri: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index,
            "image_index": self.image_index,
            "size": self.size,
            "request_id": self.request_id,
            "model": self.model,
            "uri": self.uri,
            "bucket": self.bucket,
            "key": self.key,
            "bytes": self.bytes,
            "sha256": self.sha256,
            **self.details,
            "published_uri": self.published_uri,
            "published_key": self.published_key,
        }

    @classmethod
    def from_json(cls, data: Any) -> StoredImage | None:
        if not isinstance(data, Mapping):
            return None
        prompt_index, image_index = _int(data.get("prompt_index")), _int(data.get("image_index"))
        bucket, key, uri = _text(data.get("bucket")), _text(data.get("key")), _text(data.get("uri"))
        if prompt_index is None or image_index is None or bucket is None or key is None or uri is None:
            return None
        return cls(
            prompt_index=prompt_index,
            image_index=image_index,
            size=_text(data.get("size")),
            request_id=_text(data.get("request_id")),
            model=_text(data.get("model")),
            bucket=bucket,
            key=key,
            uri=uri,
            bytes=_int(data.get("bytes")),
            sha256=_text(data.get("sha256")),
            details=image_details(data),
            published_key=_text(data.get("published_key")),
            published_uri=_text(data.get("published_uri")),
        )


@dataclass(frozen=True)
class DeliveredImage:
    """One image handed downstream as its signed URL (no storage): the record shows it redacted."""

    prompt_index: int
    image_index: int
    size: str | None
    request_id: str | None
    model: str | None
    url: str = field(repr=False)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_index": self.prompt_index,
            "image_index": self.image_index,
            "size": self.size,
            "request_id": self.request_id,
            "model": self.model,
            "url": redact_url(self.url),
            **self.details,
        }


@dataclass(frozen=True)
class PromptRecord:
    """A finished prompt's entry of ``records.json``: what was asked, answered, billed and kept."""

    prompt_index: int
    fingerprint: str
    prompt: str | None
    parameters: dict[str, Any]
    reference_images: int
    model: str | None
    created: int | None
    request_id: str | None
    usage: dict[str, Any]
    images: tuple[StoredImage, ...]
    failures: tuple[str, ...] = ()
    #: Images that failed transiently (the service failed, the stream broke off): a retry asks for them
    #: again in a request of their own, and reuses the images kept here without paying for them.
    retry_images: tuple[int, ...] = ()
    #: Airflow's try number of the try that paid for the answer (``None``: unknown, an older record).
    try_number: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "prompt_index": self.prompt_index,
            "fingerprint": self.fingerprint,
            "prompt": self.prompt,
            "parameters": self.parameters,
            "reference_images": self.reference_images,
            "model": self.model,
            "created": self.created,
            "request_id": self.request_id,
            "usage": self.usage,
            "images": [image.to_json() for image in self.images],
            "failures": list(self.failures),
            "retry_images": list(self.retry_images),
            "try_number": self.try_number,
        }

    @classmethod
    def from_json(cls, data: Any) -> PromptRecord | None:
        if not isinstance(data, Mapping) or data.get("schema") != SCHEMA_VERSION:
            return None
        index, fingerprint = _int(data.get("prompt_index")), _text(data.get("fingerprint"))
        images_json, failures = data.get("images"), data.get("failures", [])
        if index is None or fingerprint is None or not isinstance(images_json, list) or not isinstance(failures, list):
            return None
        images = [StoredImage.from_json(item) for item in images_json]
        if any(image is None for image in images) or not all(isinstance(item, str) for item in failures):
            return None
        parameters, usage = data.get("parameters"), data.get("usage")
        return cls(
            prompt_index=index,
            fingerprint=fingerprint,
            prompt=_text(data.get("prompt")),
            parameters=dict(parameters) if isinstance(parameters, Mapping) else {},
            reference_images=_int(data.get("reference_images")) or 0,
            model=_text(data.get("model")),
            created=_int(data.get("created")),
            request_id=_text(data.get("request_id")),
            usage=dict(usage) if isinstance(usage, Mapping) else {},
            images=tuple(image for image in images if image is not None),
            failures=tuple(failures),
            retry_images=_indexes(data.get("retry_images")),
            try_number=_int(data.get("try_number")),
        )


# ------------------------------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Reuse:
    """The prompt is finished: an earlier try stored it and recorded it."""

    record: PromptRecord


@dataclass(frozen=True)
class FinishStoring:
    """An earlier try paid for this answer: store what is missing from it, with no new request."""

    entry: JournalEntry
    #: Images already under their key: checked (the object must be this answer's), not fetched.
    stored: tuple[JournaledImage, ...]
    #: Images to fetch (fresh URL) or decode (local base64 data) and store.
    missing: tuple[JournaledImage, ...]


@dataclass(frozen=True)
class TopUp:
    """Reuse the record's images, and ask again, in a request of their own, for those it lost to a
    transient failure (:attr:`PromptRecord.retry_images`)."""

    record: PromptRecord


@dataclass(frozen=True)
class Generate:
    """Nothing reusable: send the request (``reason`` says why, for the log)."""

    reason: str


ResumePlan = Reuse | TopUp | FinishStoring | Generate


def resume_plan(
    *,
    fingerprint: str,
    record: PromptRecord | None,
    journal: JournalEntry | None,
    stored_keys: Mapping[str, int] | frozenset[str] | set[str],
    image_key: Callable[[int], str],
    now: float,
) -> ResumePlan:
    """What a retry does with one prompt, given what earlier tries left behind.

    ``image_key(i)`` is the key of the prompt's image ``i``; ``stored_keys`` the listing of the task's
    objects. A record for the same request (``fingerprint``) that kept at least one image is reused;
    one that kept none (moderation refused it, or every download was lost) is generated again, which
    cannot pay twice for anything kept. Otherwise a journal entry of the same request is finished
    when every image it delivered is stored already, or can still be fetched (a URL younger than
    :data:`JOURNAL_MAX_AGE_SECONDS`) or decoded (base64 data kept locally). Anything less generates.
    """
    if record is not None and record.fingerprint == fingerprint:
        if record.images and record.retry_images:
            return TopUp(record)
        if record.images or not record.failures:
            return Reuse(record)
        # Nothing of it was kept (refused by moderation, which is not billed, or lost at download):
        # generating it again cannot pay twice for anything this task kept.
        return Generate("an earlier try stored none of its images")
    if journal is None:
        return Generate("nothing stored by an earlier try" if record is None else "the request changed")
    if journal.fingerprint != fingerprint:
        return Generate("the journaled answer was for another request")
    stored = tuple(image for image in journal.images if image_key(image.index) in stored_keys)
    missing = tuple(image for image in journal.images if image_key(image.index) not in stored_keys)
    fresh = now - journal.written_at < JOURNAL_MAX_AGE_SECONDS
    if not all(image.fetchable(fresh=fresh) for image in missing):
        return Generate("the journaled images can no longer be fetched (URLs expired, or base64 data lost)")
    return FinishStoring(journal, stored, missing)


# ------------------------------------------------------------------------ images that outlived their journal
#: Object metadata that lets an image vouch for its answer when no journal or record does.
FINGERPRINT_METADATA = "jimeng-fingerprint"
DELIVERED_METADATA = "jimeng-delivered"
FAILED_METADATA = "jimeng-failed"
#: The try that paid for the answer (``replace=True`` reuses only what its own run of tries paid for).
TRY_NUMBER_METADATA = "airflow-try-number"


def answer_metadata(fingerprint: str, entry: JournalEntry) -> dict[str, str]:
    """What every stored image of ``entry`` carries so that a retry can recognise the whole answer.

    A process killed after uploading an answer's images but before its journal reached S3 left only
    the images: with the request's fingerprint and the list of the answer's delivered (and failed)
    images on each of them, the retry can tell that the answer is complete, and not pay for it again.
    """
    failed = ";".join(f"{image.index}:{image.error_code or 'Failed'}" for image in entry.failed)
    metadata = {
        FINGERPRINT_METADATA: fingerprint,
        DELIVERED_METADATA: ",".join(str(image.index) for image in entry.images),
        FAILED_METADATA: failed[:1000],
    }
    if entry.try_number is not None:
        metadata[TRY_NUMBER_METADATA] = str(entry.try_number)
    return metadata


def answer_from_stored_objects(fingerprint: str, heads: Mapping[int, Mapping[str, Any]]) -> JournalEntry | None:
    """The answer whose images are all stored, read back from their metadata (``HEAD`` per image index).

    ``heads`` maps an image index to its object's ``HEAD`` (``Metadata``, ``ContentLength``). Only an
    answer of the same request (``fingerprint``) whose every delivered image is there counts; anything
    less (an image missing, metadata of an older provider, another request's images) is ``None``.
    """
    by_request: dict[str, dict[int, Mapping[str, Any]]] = {}
    for index, head in heads.items():
        metadata = head.get("Metadata") or {}
        request_id = metadata.get("jimeng-request-id")
        if metadata.get(FINGERPRINT_METADATA) == fingerprint and request_id:
            by_request.setdefault(request_id, {})[index] = metadata
    for request_id, found in by_request.items():
        metadata = next(iter(found.values()))
        try:
            delivered = {int(text) for text in metadata.get(DELIVERED_METADATA, "").split(",") if text}
            failed = [
                FailedImage(int(index), code or None, "recorded by the earlier try")
                for index, code in (item.split(":", 1) for item in metadata.get(FAILED_METADATA, "").split(";") if item)
            ]
        except ValueError:
            continue
        if not delivered or not delivered <= set(found):
            continue
        return JournalEntry(
            prompt_index=-1,
            fingerprint=fingerprint,
            written_at=0.0,
            request_id=request_id,
            model=metadata.get("jimeng-model") or None,
            created=None,
            usage={},
            images=tuple(
                JournaledImage(index=index, size=found[index].get("jimeng-size") or None) for index in sorted(delivered)
            ),
            failed=tuple(failed),
            try_number=int(text) if (text := metadata.get(TRY_NUMBER_METADATA, "")).isdigit() else None,
        )
    return None
