"""Wire details of the emulated API: known models, request ids, error envelopes, image counts of sets."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from airflow_provider_jimeng.api.request import max_images_billed

#: Model ids the emulator serves (those of the fact sheet, China and BytePlus spellings).
KNOWN_MODELS: tuple[str, ...] = (
    "doubao-seedream-5-0-260128",
    "doubao-seedream-5-0-lite-260128",
    "doubao-seedream-4-0-250828",
    "doubao-seedream-4-5-251128",
    "doubao-seedream-3-0-t2i-250415",
    "seedream-5-0-260128",
    "seedream-5-0-lite-260128",
    "seedream-4-0-250828",
    "seedream-4-5-251128",
    "seedream-3-0-t2i-250415",
)

#: Images of a set when the prompt of an ``auto`` request does not say how many.
DEFAULT_SET_SIZE = 3
#: Per-image moderation failure marker: ``FAIL_IMAGE_1`` in a prompt fails image 1 (0-based) of the answer.
FAIL_IMAGE_MARKER = "FAIL_IMAGE_{index}"

_CHINESE_NUMBERS = {"一": 1, "两": 2, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}
_COUNT_PATTERNS = (
    re.compile(r"\b(\d{1,2})\s*(?:images?|pictures?|photos?|illustrations?|panels?)\b", re.IGNORECASE),
    re.compile(r"\bset of (\d{1,2})\b", re.IGNORECASE),
    re.compile(r"(\d{1,2}|[一两二三四五六七八九十])\s*(?:张|幅)"),
)


def new_request_id() -> str:
    """A request id shaped like the service's: a timestamp followed by random hex."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + uuid.uuid4().hex


def error_object(code: str, message: str, request_id: str) -> dict[str, str]:
    """An error object as the service writes it: the request id at the end of the message."""
    return {"code": code, "message": f"{message} Request id: {request_id}"}


def error_body(code: str, message: str, request_id: str, *, error_type: str, param: str | None = None) -> bytes:
    """The documented error envelope, with the request id at the end of the message."""
    error: dict[str, Any] = dict(error_object(code, message, request_id))
    if param is not None:
        error["param"] = param
    error["type"] = error_type
    return json.dumps({"error": error}).encode()


def set_size(prompt: str, max_images: int, default: int = DEFAULT_SET_SIZE) -> int:
    """How many images a set request produces: the number the prompt asks for, else ``default``, capped."""
    wanted = default
    for pattern in _COUNT_PATTERNS:
        match = pattern.search(prompt)
        if match:
            token = match.group(1)
            wanted = int(token) if token.isdigit() else _CHINESE_NUMBERS[token]
            break
    return max(1, min(wanted, max_images))


def images_for(body: Mapping[str, Any]) -> int:
    """Number of images a valid request generates (successful or not): what the prompt asks for,
    within ``max_images`` and the 15 images a request may involve with its reference images."""
    if body.get("sequential_image_generation") != "auto":
        return 1
    return set_size(str(body.get("prompt", "")), max_images_billed(body))


def redact_body(body: Any) -> Any:
    """A copy of a request body safe to keep and show: reference images become ``"<n chars>"``."""
    if not isinstance(body, Mapping):
        return body
    redacted = dict(body)
    image = redacted.get("image")
    if isinstance(image, str):
        redacted["image"] = f"<{len(image)} chars>"
    elif isinstance(image, list):
        redacted["image"] = [f"<{len(item)} chars>" if isinstance(item, str) else item for item in image]
    return redacted
