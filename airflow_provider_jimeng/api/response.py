"""Typed results of a generation, parsed from JSON or a server-sent event stream.

Parsing tolerates what gateways vary (missing or extra ``usage`` fields, ``×`` in sizes) and keeps
signed URLs and base64 data out of every ``repr``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_jimeng.api.capabilities import parse_dimensions
from airflow_provider_jimeng.exceptions import JiMengAPIError, JiMengResponseError, error_class_for


def redact_url(url: str | None) -> str:
    """Show where a URL points without its signature: ``https://host/path?<redacted>``."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme == "data":
        return "data:<redacted>"
    path = parts.path if len(parts.path) <= 80 else parts.path[:77] + "..."
    return f"{parts.scheme}://{parts.netloc}{path}" + ("?<redacted>" if parts.query else "")


@dataclass(frozen=True)
class GeneratedImage:
    """One image of a response: a URL or base64 data when it succeeded, an error code when not."""

    index: int
    url: str | None = field(default=None, repr=False)
    b64_json: str | None = field(default=None, repr=False)
    size: str | None = None
    error_code: str | None = None
    error_message: str | None = None

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

    @property
    def succeeded(self) -> list[GeneratedImage]:
        return [image for image in self.images if image.ok]

    @property
    def failed(self) -> list[GeneratedImage]:
        return [image for image in self.images if not image.ok]


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


def _image_from_json(index: int, item: Mapping[str, Any]) -> GeneratedImage:
    error = item.get("error")
    if isinstance(error, Mapping):
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
    return GeneratedImage(index=index, url=url, b64_json=b64, size=_normalise_size(item.get("size")))


def parse_generation(payload: Any, request_id: str | None) -> GenerationResult:
    """Parse the JSON answer of a non-streaming request."""
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
    message = str(error.get("message") or fallback_message or "no error message")
    # Gateways sometimes echo request bodies into messages: keep it short and never leak inline images.
    if "base64," in message:
        message = message.split("data:", 1)[0] + "<inline image data redacted>"
    message = message[:500]
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


def parse_event_stream(lines: Iterable[bytes], request_id: str | None) -> GenerationResult:
    """Fold an SSE stream into the same :class:`GenerationResult` a plain request gives."""
    images: dict[int, GeneratedImage] = {}
    model: str | None = None
    created: int | None = None
    usage: Usage | None = None
    for event, data in iter_sse_events(lines):
        if data.strip() == "[DONE]":
            break
        try:
            payload = json.loads(data)
        except ValueError:
            raise JiMengResponseError(
                "a stream event is not JSON", status_code=200, code="MalformedResponse", request_id=request_id
            ) from None
        kind = payload.get("type") or event
        if kind == "error" or (kind is None and "error" in payload):
            raise api_error_from_payload(None, payload, request_id=request_id)
        model = payload.get("model", model)
        created = _as_int(payload.get("created")) or created
        if kind in ("image_generation.partial_succeeded", "image_generation.partial_failed"):
            index = _as_int(payload.get("image_index"))
            index = len(images) if index is None else index
            images[index] = _image_from_json(index, payload)
        elif kind == "image_generation.completed":
            usage = Usage.from_json(payload.get("usage") if isinstance(payload.get("usage"), Mapping) else None)
    if usage is None:
        if not images:
            raise JiMengResponseError(
                "the stream ended before any image or 'image_generation.completed'",
                status_code=200,
                code="TruncatedStream",
                request_id=request_id,
            )
        # Images already streamed were billed: keep them, and record the interruption as a failure.
        next_index = max(images) + 1
        images[next_index] = GeneratedImage(
            index=next_index,
            error_code="StreamInterrupted",
            error_message="the stream ended before 'image_generation.completed'; later images were lost",
        )
        usage = Usage(generated_images=sum(1 for image in images.values() if image.ok))
    return GenerationResult(
        model=model,
        created=created,
        images=[images[index] for index in sorted(images)],
        usage=usage,
        request_id=request_id,
    )
