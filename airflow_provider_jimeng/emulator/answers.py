"""What a generation answer says and costs, before anything is written: one :class:`Plan` per request.

The JSON answer (:mod:`.generation`) and the server-sent events (:mod:`.streaming`) both render a
plan, and answer-shape faults (:func:`.faults.shape_answer`) edit it, so a new documented answer
shape is one change to the plan and one branch in one place.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_jimeng.api.capabilities import WEB_SEARCH_TOOL, family_for_model, rendered_dimensions
from airflow_provider_jimeng.emulator.images import ImageKey
from airflow_provider_jimeng.emulator.ledger import LedgerEntry
from airflow_provider_jimeng.emulator.protocol import FAIL_IMAGE_MARKER, error_object, images_for

if TYPE_CHECKING:
    from airflow_provider_jimeng.emulator.faults import Fault
    from airflow_provider_jimeng.emulator.server import JiMengEmulator
    from airflow_provider_jimeng.emulator.wire import Exchange

log = logging.getLogger(__name__)

#: ``WEB_SEARCH_<n>`` in a prompt makes the web-search tool run ``n`` searches (default 1 when enabled).
WEB_SEARCH_MARKER = re.compile(r"WEB_SEARCH_(\d{1,2})")


@dataclass
class Slot:
    """One image of the answer: generated from ``key``, or failed with ``error``."""

    index: int
    key: ImageKey | None
    error: dict[str, str] | None = None


@dataclass
class Plan:
    """Everything an answer will say; images are rendered only when the answer is written."""

    model: str
    prompt: str
    created: int
    request_id: str
    stream: bool
    b64: bool
    width: int
    height: int
    slots: list[Slot]
    #: Searches the web-search tool ran; ``None`` when the request did not enable it.
    web_searches: int | None = None
    #: Stream only: an ``error`` event after the slots, instead of ``completed``.
    stream_error: dict[str, str] | None = None
    #: A 200 whose body is a top-level ``error`` (with ``data: []`` when ``envelope_data``).
    envelope_error: dict[str, str] | None = None
    envelope_data: bool = False
    #: ``usage`` as OpenAI-style gateways write it: tokens, no ``generated_images``.
    gateway_usage: bool = False
    #: ``"error": {"code": "", "message": ""}`` beside every delivered image.
    empty_item_errors: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def tools(self) -> list[dict[str, str]] | None:
        return None if self.web_searches is None else [{"type": WEB_SEARCH_TOOL}]

    def usage(self, billed: int) -> dict[str, Any]:
        tokens = billed * self.pixels // 256
        if self.gateway_usage:
            # As one OpenAI-style gateway answers: token counts only, generated_images absent.
            return {
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": tokens,
                "prompt_tokens_details": {"cached_tokens_details": {}},
                "completion_tokens_details": {},
                "output_tokens": tokens,
            }
        usage: dict[str, Any] = {"generated_images": billed, "output_tokens": tokens, "total_tokens": tokens}
        if self.web_searches is not None:
            usage["tool_usage"] = {"web_search": self.web_searches}
        return usage

    def item(self, slot: Slot, data: bytes | None, url: str | None) -> dict[str, Any]:
        """The ``data`` entry (or event fields) of one generated image."""
        item: dict[str, Any] = {"b64_json": base64.b64encode(data or b"").decode("ascii")} if self.b64 else {"url": url}
        item["size"] = f"{self.width}x{self.height}"
        if self.empty_item_errors:
            item["error"] = {"code": "", "message": ""}
        return item


def plan_for(body: Mapping[str, Any], request_id: str, created: int, *, at_least: int = 1) -> Plan:
    """The images a valid request generates; ``FAIL_IMAGE_<k>`` in the prompt fails image ``k``.

    ``at_least``: a gateway that answers every request with that many images, whatever was asked.
    """
    prompt = str(body["prompt"])
    family = family_for_model(str(body["model"]))
    width, height = rendered_dimensions(body.get("size"), family, prompt)
    seed = body.get("seed")
    image_format = "png" if body.get("output_format") == "png" else "jpeg"
    watermark = body.get("watermark") is not False
    slots = []
    for index in range(max(images_for(body), at_least)):
        if FAIL_IMAGE_MARKER.format(index=index) in prompt:
            error = error_object(
                "OutputImageSensitiveContentDetected",
                f"The output image {index} may contain sensitive information.",
                request_id,
            )
            slots.append(Slot(index, None, error))
        else:
            key = ImageKey(prompt, -1 if seed is None else seed, index, width, height, watermark, image_format)
            slots.append(Slot(index, key))
    web_searches = None
    if any(isinstance(tool, Mapping) and tool.get("type") == WEB_SEARCH_TOOL for tool in body.get("tools") or ()):
        marker = WEB_SEARCH_MARKER.search(prompt)
        web_searches = int(marker.group(1)) if marker else 1
    return Plan(
        model=str(body["model"]),
        prompt=prompt,
        created=created,
        request_id=request_id,
        stream=bool(body.get("stream")),
        b64=body.get("response_format") == "b64_json",
        width=width,
        height=height,
        slots=slots,
        web_searches=web_searches,
    )


class RenderFailed(Exception):
    """An image could not be rendered (Pillow missing or broken)."""


def render(emulator: JiMengEmulator, exchange: Exchange, plan: Plan, slot: Slot, fault: Fault | None) -> dict[str, Any]:
    """The answer's entry for a generated image: its bytes (b64_json) or a signed URL to them."""
    if slot.key is None:
        raise ValueError("a failed slot has nothing to render")
    try:
        data = emulator.runtime.cache.get(slot.key)
    except Exception as exc:
        log.exception("JiMeng emulator: generating request %s failed", plan.request_id)
        raise RenderFailed from exc
    if plan.b64:
        return plan.item(slot, data, None)
    url = emulator.runtime.signer.issue(slot.key, exchange.url_root(), emulator.url_ttl, fault.kind if fault else None)
    return plan.item(slot, None, url)


def bill(emulator: JiMengEmulator, plan: Plan, images: int, *, delivered: bool = True) -> None:
    """Record what the real service would charge: images, and the web searches apart."""
    searches = plan.web_searches or 0
    if images or searches:
        entry = LedgerEntry(
            plan.request_id,
            plan.model,
            plan.prompt,
            images,
            images * plan.pixels // 256,
            delivered,
            plan.created,
            searches,
            billed_at=time.time(),
        )
        emulator.runtime.ledger.record(entry)
    log.debug(
        "JiMeng emulator: request %s generated with %s, %d image(s) and %d web search(es) billed",
        plan.request_id,
        plan.model,
        images,
        searches,
    )
