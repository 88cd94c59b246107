"""What a run produced, prompt by prompt, and the sums the task reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from airflow_provider_jimeng.api.response import GeneratedImage, GenerationResult
from airflow_provider_jimeng.exceptions import JiMengAPIError
from airflow_provider_jimeng.storage.records import DeliveredImage, JournalEntry, PromptRecord, StoredImage


@dataclass
class PromptOutcome:
    """What happened to one prompt in this try: images kept, failures, and whether it is finished."""

    prompt_index: int
    stored: list[StoredImage] = field(default_factory=list)
    delivered: list[DeliveredImage] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: Why a prompt whose images are all kept is not finished (its record not written): not failures of
    #: an image, so the task's count leaves them out, but its error message lists them.
    notes: list[str] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    reused: bool = False
    #: Paid images not stored yet (S3 failed, a download broke off): a retry stores them without paying.
    incomplete: bool = False
    #: The prompt's entry of ``records.json`` once it is finished (stored, or reused from an earlier try).
    record: PromptRecord | None = None

    @property
    def outputs(self) -> list[str]:
        """What goes downstream: ``s3://`` URIs, or the signed URLs when nothing is stored."""
        return [image.published_uri or image.uri for image in self.stored] or [image.url for image in self.delivered]

    @property
    def image_records(self) -> list[dict[str, Any]]:
        return [image.to_json() for image in self.stored] + [image.to_json() for image in self.delivered]


@dataclass(frozen=True)
class Answer:
    """What a generation thread hands the engine's loop: nothing else changes a prompt's outcome there."""

    result: GenerationResult
    #: The answer as journaled (image indexes those of the prompt: a top-up fills an earlier answer's gaps).
    entry: JournalEntry
    #: Images that failed transiently, for the record: a retry asks for them again.
    retry_images: tuple[int, ...] = ()


@dataclass(frozen=True)
class Stored:
    """What a storage thread hands the engine's loop for one answer: the loop applies it to the outcome."""

    stored: tuple[StoredImage, ...]
    failures: tuple[str, ...]
    #: Paid images not stored (kept for a retry).
    incomplete: bool
    #: The prompt's record, when every image of the answer is stored.
    record: PromptRecord | None


def describe_error(error: BaseException) -> str:
    if isinstance(error, JiMengAPIError):
        code = error.code or type(error).__name__
        return f"{code} (request id {error.request_id or 'n/a'}): {error.api_message}"
    return f"{type(error).__name__}: {error}"


def image_failure(prompt_index: int, image: GeneratedImage, request_id: str | None) -> str:
    return (
        f"prompt {prompt_index} image {image.index}: {image.error_code} "
        f"(request id {request_id or 'n/a'}): {image.error_message or ''}".rstrip(": ")
    )
