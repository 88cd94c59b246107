"""A plan delivered as server-sent events: one event per image as it is ready, then ``completed``.

``partial_succeeded``/``partial_failed`` per image, then ``image_generation.completed`` with the
usage and ``data: [DONE]``; or, when the set broke (``stream_error``), an ``error`` event instead.
Like the service, generation goes on (and bills) even if the client has hung up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_jimeng.emulator.answers import Plan, RenderFailed, bill, render
from airflow_provider_jimeng.emulator.faults import Fault
from airflow_provider_jimeng.emulator.protocol import error_object
from airflow_provider_jimeng.emulator.wire import Exchange

if TYPE_CHECKING:
    from airflow_provider_jimeng.emulator.server import JiMengEmulator

#: Delivery faults that cut the stream: no ``completed`` event, no ``[DONE]``.
_CUTTING = frozenset({"malformed", "truncated", "reset_mid_body"})


def answer_stream(
    exchange: Exchange, emulator: JiMengEmulator, plan: Plan, record: dict[str, Any], fault: Fault | None
) -> int:
    kind = fault.kind if fault else None
    record["status"] = 200
    emulator.runtime.stats.add_record(record)
    alive = exchange.start_events(emulator.stream_content_type)
    # Faults that cut the stream stop writing after half of the images (at least one).
    cut_after = max(1, len(plan.slots) // 2) if kind in ("truncated", "reset_mid_body") else len(plan.slots)
    billed = 0
    error = plan.stream_error
    for position, slot in enumerate(plan.slots):
        emulator.pause(emulator.latency)
        base = {"model": plan.model, "created": plan.created, "image_index": slot.index}
        if slot.key is None:
            event = {"type": "image_generation.partial_failed", **base, "error": slot.error}
        else:
            try:
                item = render(emulator, exchange, plan, slot, fault)
            except RenderFailed:
                error = error_object("InternalServiceError", "Rendering failed.", plan.request_id)
                break
            billed += 1
            event = {"type": "image_generation.partial_succeeded", **base, **item}
        if alive and kind == "malformed":
            alive = position > 0 or exchange.write_raw(b"data: {not json\n\n")
        elif alive and position < cut_after:
            alive = exchange.write_event(event)
    record["images"] = billed
    bill(emulator, plan, billed)
    if alive and error is not None:
        alive = exchange.write_event({"type": "error", "error": error})
    elif alive and kind not in _CUTTING:
        completed = {
            "type": "image_generation.completed",
            "model": plan.model,
            "created": plan.created,
            "usage": plan.usage(billed),
        }
        if plan.tools is not None:
            completed["tools"] = plan.tools
        alive = exchange.write_event(completed) and exchange.write_raw(b"data: [DONE]\n\n")
    if kind == "reset_mid_body":
        exchange.reset()
        alive = False
    elif alive:
        alive = exchange.end_events()
    if not alive and billed:
        emulator.runtime.ledger.mark_undelivered(plan.request_id)
    return billed
