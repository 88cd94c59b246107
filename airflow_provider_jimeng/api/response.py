"""Typed results of a generation, parsed from JSON or a server-sent event stream.

Parsing tolerates what gateways vary (missing or extra ``usage`` fields, ``×`` in sizes) and keeps
signed URLs and base64 data out of every ``repr``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_jimeng.api.capabilities import parse_dimensions
from airflow_provider_jimeng.exceptions import JiMengAPIError, JiMengResponseError, error_class_for
from airflow_provider_jimeng.redaction import redact_url

__all__ = [
    "GeneratedImage",
    "GenerationResult",
    "Usage",
    "api_error_from_payload",
    "iter_sse_events",
    "parse_event_stream",
    "parse_generation",
    "redact_url",  # re-exported: its home is airflow_provider_jimeng.redaction
]


@dataclass(frozen=True)
class GeneratedImage:
    """One image of a response: a URL or base64 data when it succeeded, an error code when not.

    ``details`` keeps the other per-image fields the official SDK knows (:data:`IMAGE_DETAIL_FIELDS`:
    the output format, and a layer decomposition's ``z_index``, ``bounding_box``, ``name`` and
    ``description``), those the answer has.
    """

    index: int
    url: str | None = field(default=None, repr=False)
    b64_json: str | None = field(default=None, repr=False)
    size: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error_code is None and bool(self.url or self.b64_json)

    @property
    def dimensions(self) -> tuple[int, int] | None:
        return parse_dimensions(self.size) if self.size else None

    def __repr__(self) -> str:
        where = redact_url(self.url) if self.url else ("<b64_json>" if self.b64_json else None)
        return (
            f"GeneratedImage(index={self.index}, ok={self.ok}, size={self.size!r}, where={where!r}, "
            f"error_code={self.error_code!r})"
        )


@dataclass(frozen=True)
class Usage:
    """What a request was billed for; fields a gateway leaves out are ``None``."""

    generated_images: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Usage:
        data = dict(data or {})
        known = {key: data.pop(key, None) for key in ("generated_images", "output_tokens", "total_tokens")}
        return cls(**{key: _as_int(value) for key, value in known.items()}, extra=data)

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated_images": self.generated_images,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            **self.extra,
        }


@dataclass(frozen=True)
class GenerationResult:
    """A whole response: every image (succeeded or failed), usage and the request id to quote."""

    model: str | None
    created: int | None
    images: list[GeneratedImage]
    usage: Usage
    request_id: str | None = None
    #: The code of what ended the answer before all its images came, after some were delivered: an
    #: ``error`` event's code (nothing more was generated), or why the stream broke off.
    interrupted_by: str | None = None
    #: The answer broke off after delivering some images: those not delivered (listed in ``failed``)
    #: may still have been generated and billed.
    truncated: bool = False

    @property
    def succeeded(self) -> list[GeneratedImage]:
        return [image for image in self.images if image.ok]

    @property
    def failed(self) -> list[GeneratedImage]:
        return [image for image in self.images if not image.ok]

    @property
    def billed_images(self) -> int:
        """What the answer was billed: ``usage.generated_images``, else (a gateway sending only tokens)
        the images delivered."""
        if self.usage.generated_images is not None:
            return self.usage.generated_images
        return len(self.succeeded)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _normalise_size(size: Any) -> str | None:
    if not isinstance(size, str):
        return None
    dims = parse_dimensions(size)
    return f"{dims[0]}x{dims[1]}" if dims else size


def _is_error(error: Any) -> bool:
    """An error object that says something: ``{"code": "", "message": ""}`` beside an image is no error."""
    return isinstance(error, Mapping) and bool(error.get("code") or error.get("message"))


#: Per-image answer fields besides ``url``/``b64_json``/``size`` that the official SDK's ``Image`` knows.
IMAGE_DETAIL_FIELDS = ("output_format", "z_index", "bounding_box", "name", "description")
_DETAIL_TYPES: dict[str, tuple[type, ...]] = {
    "output_format": (str,),
    "z_index": (int,),
    "bounding_box": (dict,),
    "name": (str,),
    "description": (str,),
}


def image_details(item: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`IMAGE_DETAIL_FIELDS` of an answer's image (or a record of one), of the SDK's types."""
    details = {}
    for name in IMAGE_DETAIL_FIELDS:
        value = item.get(name)
        if isinstance(value, _DETAIL_TYPES[name]) and not isinstance(value, bool):
            details[name] = value
    return details


def _image_from_json(index: int, item: Mapping[str, Any]) -> GeneratedImage:
    error = item.get("error")
    if _is_error(error):
        assert isinstance(error, Mapping)
        return GeneratedImage(
            index=index,
            size=_normalise_size(item.get("size")),
            error_code=str(error.get("code") or "UnknownError"),
            error_message=str(error.get("message") or ""),
        )
    url = item.get("url") if isinstance(item.get("url"), str) else None
    b64 = item.get("b64_json") if isinstance(item.get("b64_json"), str) else None
    if not url and not b64:
        return GeneratedImage(index=index, error_code="MissingImage", error_message="no url or b64_json in response")
    return GeneratedImage(
        index=index, url=url, b64_json=b64, size=_normalise_size(item.get("size")), details=image_details(item)
    )


def parse_generation(payload: Any, request_id: str | None) -> GenerationResult:
    """Parse the JSON answer of a non-streaming request.

    A 200 whose body carries an ``error`` and no images is a failed request: it raises the class of
    its code (content policy, rate limit...), like an error status would.
    """
    if isinstance(payload, Mapping) and _is_error(payload.get("error")) and not payload.get("data"):
        raise api_error_from_payload(200, payload, request_id=request_id)
    if not isinstance(payload, Mapping) or not isinstance(payload.get("data"), list):
        raise JiMengResponseError(
            "the response has no 'data' list",
            status_code=200,
            code="MalformedResponse",
            request_id=request_id,
        )
    images = [
        _image_from_json(index, item if isinstance(item, Mapping) else {}) for index, item in enumerate(payload["data"])
    ]
    return GenerationResult(
        model=payload.get("model"),
        created=_as_int(payload.get("created")),
        images=images,
        usage=Usage.from_json(payload.get("usage") if isinstance(payload.get("usage"), Mapping) else None),
        request_id=request_id,
    )


def api_error_from_payload(
    status_code: int | None,
    payload: Any,
    *,
    request_id: str | None,
    retry_after: float | None = None,
    fallback_message: str = "",
) -> JiMengAPIError:
    """Build the exception for an error envelope ``{"error": {"code", "message", "param"}}``."""
    error = payload.get("error") if isinstance(payload, Mapping) else None
    if not isinstance(error, Mapping):
        error = {}
    code = error.get("code")
    code = str(code) if code not in (None, "") else None
    # Gateways echo request bodies, URLs and even keys into messages: the exception redacts its text
    # (inline images, queries, tokens); keep it short as well.
    message = str(error.get("message") or fallback_message or "no error message")[:500]
    param = error.get("param")
    return error_class_for(status_code, code)(
        message,
        status_code=status_code,
        code=code,
        request_id=request_id,
        param=str(param) if param else None,
        retry_after=retry_after,
    )


def iter_sse_events(lines: Iterable[bytes]) -> Iterator[tuple[str | None, str]]:
    """Yield ``(event, data)`` for each server-sent event; blank lines end an event."""
    event: str | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)


def parse_event_stream(
    lines: Iterable[bytes], request_id: str | None, *, expected_images: int | None = None
) -> GenerationResult:
    """Fold an SSE stream into the same :class:`GenerationResult` a plain request gives.

    Images delivered before the stream fails are billed and kept, whatever ends it: an ``error`` event
    (rendering failed mid-set), a frame that is not JSON, the connection breaking off (``lines`` ends,
    or raises a :class:`JiMengAPIError` saying why). The images of the set not delivered
    (``expected_images``, when known, else one) are then listed as failed with the reason's code, and
    nothing is raised: sending the request again would pay again for the delivered ones. A stream that
    fails before delivering any image raises, so that the request can be retried.
    """
    images: dict[int, GeneratedImage] = {}
    model: str | None = None
    created: int | None = None
    usage: Usage | None = None
    # Why the stream stopped early: an error event (nothing more was generated), or a break (unknown).
    stopped: JiMengAPIError | None = None
    broke_off = True
    try:
        for event, data in iter_sse_events(lines):
            if data.strip() == "[DONE]":
                break
            try:
                payload = json.loads(data)
            except ValueError:
                raise JiMengResponseError(
                    "a stream event is not JSON", status_code=200, code="MalformedResponse", request_id=request_id
                ) from None
            if not isinstance(payload, Mapping):
                raise JiMengResponseError(
                    "a stream event is not a JSON object",
                    status_code=200,
                    code="MalformedResponse",
                    request_id=request_id,
                )
            kind = payload.get("type") or event
            if kind == "error" or (kind is None and _is_error(payload.get("error"))):
                stopped = api_error_from_payload(None, payload, request_id=request_id)
                broke_off = False
                break
            model = payload.get("model", model)
            created = _as_int(payload.get("created")) or created
            if kind in ("image_generation.partial_succeeded", "image_generation.partial_failed"):
                index = _as_int(payload.get("image_index"))
                index = len(images) if index is None else index
                images[index] = _image_from_json(index, payload)
            elif kind == "image_generation.completed":
                usage = Usage.from_json(payload.get("usage") if isinstance(payload.get("usage"), Mapping) else None)
    except JiMengAPIError as cut:  # a frame that is not JSON, or the body reader giving up
        stopped = cut
    delivered = sum(1 for image in images.values() if image.ok)
    if usage is not None and stopped is None:
        return GenerationResult(model, created, [images[index] for index in sorted(images)], usage, request_id)
    if not delivered:
        raise stopped or JiMengResponseError(
            "the stream ended before any image was delivered or 'image_generation.completed' arrived",
            status_code=200,
            code="TruncatedStream",
            request_id=request_id,
        )
    if stopped is None:
        code, message = "StreamInterrupted", "the stream ended before 'image_generation.completed'"
    else:
        code, message = stopped.code or type(stopped).__name__, stopped.api_message
    if expected_images is None:
        missing = [max(images) + 1]
    else:
        missing = [index for index in range(expected_images) if index not in images]
    for index in missing:
        images[index] = GeneratedImage(index=index, error_code=code, error_message=f"not delivered: {message}"[:300])
    return GenerationResult(
        model=model,
        created=created,
        images=[images[index] for index in sorted(images)],
        usage=usage or Usage(generated_images=delivered),
        request_id=request_id,
        interrupted_by=code,
        truncated=broke_off,
    )
