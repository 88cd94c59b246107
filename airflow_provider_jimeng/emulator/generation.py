"""``POST .../images/generations`` once authenticated: validate, apply faults, plan, answer, bill.

The checks come in the service's order (body, model, moderation, rate limit), so a fault is
consumed only by a request the service would have started to work on. The answer is a
:class:`~.answers.Plan` rendered as JSON here or as events by :mod:`.streaming`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from airflow_provider_jimeng.api.capabilities import MAX_IMAGES_PER_REQUEST
from airflow_provider_jimeng.api.request import MissingParameterError, max_images_billed, validate_body
from airflow_provider_jimeng.emulator.answers import Plan, RenderFailed, bill, plan_for, render
from airflow_provider_jimeng.emulator.faults import ERROR_FAULTS, Fault, shape_answer
from airflow_provider_jimeng.emulator.protocol import KNOWN_MODELS, redact_body
from airflow_provider_jimeng.emulator.streaming import answer_stream
from airflow_provider_jimeng.emulator.wire import Exchange
from airflow_provider_jimeng.exceptions import JiMengConfigurationError

if TYPE_CHECKING:
    from airflow_provider_jimeng.emulator.server import JiMengEmulator

log = logging.getLogger(__name__)

MALFORMED_BODY = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"


def fail(
    exchange: Exchange,
    record: dict[str, Any],
    emulator: JiMengEmulator,
    status: int,
    code: str,
    message: str,
    *,
    error_type: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer with an error envelope and keep the request's record."""
    record["status"] = status
    record["error"] = code
    emulator.runtime.stats.add_record(record)
    exchange.send_error(status, code, message, error_type=error_type, param=param, headers=headers)


def error_fault(exchange: Exchange, record: dict[str, Any] | None, emulator: JiMengEmulator, fault: Fault) -> bool:
    """Faults that act before any work: error answers, resets and delays (``False`` = go on)."""
    if fault.kind in ERROR_FAULTS:
        status, code, error_type, message = ERROR_FAULTS[fault.kind]
        headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
        if record is None:
            exchange.send_error(status, code, message, error_type=error_type, headers=headers)
        else:
            fail(exchange, record, emulator, status, code, message, error_type=error_type, headers=headers)
        return True
    if fault.kind == "reset":
        if record is not None:
            emulator.runtime.stats.add_record(record)
        exchange.reset()
        return True
    if fault.kind == "slow":
        emulator.pause(fault.delay)
    return False


def generate(exchange: Exchange, emulator: JiMengEmulator, path: str, raw: bytes, record: dict[str, Any]) -> None:
    runtime = emulator.runtime
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        fail(
            exchange,
            record,
            emulator,
            400,
            "InvalidParameter",
            "The request body must be a JSON object.",
            error_type="BadRequest",
        )
        return
    record["body"] = redact_body(body)
    try:
        validate_body(body)
    except JiMengConfigurationError as exc:
        code = "MissingParameter" if isinstance(exc, MissingParameterError) else "InvalidParameter"
        fail(exchange, record, emulator, 400, code, str(exc), error_type="BadRequest", param=exc.parameter)
        return
    model = body["model"]
    if model not in KNOWN_MODELS and not model.startswith("ep-"):
        message = f"The model or endpoint {model} does not exist or you do not have access to it."
        fail(
            exchange,
            record,
            emulator,
            404,
            "InvalidEndpointOrModel.NotFound",
            message,
            error_type="NotFound",
            param="model",
        )
        return
    fault = runtime.faults.take(path, generation=True)
    if fault is not None:
        record["fault"] = fault.kind
        log.info("JiMeng emulator: request %s gets injected fault %r", exchange.request_id, fault.kind)
        if error_fault(exchange, record, emulator, fault):
            return
    if emulator.moderation_marker and emulator.moderation_marker in body["prompt"]:
        message = "The request failed because the input text may contain sensitive information."
        fail(exchange, record, emulator, 400, "InputTextSensitiveContentDetected", message, error_type="BadRequest")
        return
    try:
        reservation_size = max(max_images_billed(body), emulator.images_per_request or 1)
    except (TypeError, ValueError):
        reservation_size = MAX_IMAGES_PER_REQUEST
    reservation = runtime.limiter.reserve(reservation_size, emulator.images_per_minute, emulator.rate_limit_burst)
    if reservation is None:
        runtime.stats.count("rate_limited")
        _, code, error_type, message = ERROR_FAULTS["rate_limit"]
        fail(exchange, record, emulator, 429, code, message, error_type=error_type)
        return
    plan = plan_for(body, exchange.request_id, int(time.time()), at_least=emulator.images_per_request or 1)
    shape_answer(plan, fault)
    billed = 0
    try:
        if plan.stream and plan.envelope_error is None:
            billed = answer_stream(exchange, emulator, plan, record, fault)
        else:
            billed = answer_json(exchange, emulator, plan, record, fault)
    finally:
        runtime.limiter.settle(reservation, billed)


def render_failed(exchange: Exchange, emulator: JiMengEmulator, record: dict[str, Any]) -> int:
    message = (
        "The emulator could not render the image "
        "(is Pillow installed? pip install 'airflow-provider-jimeng[emulator]')."
    )
    fail(exchange, record, emulator, 500, "InternalServiceError", message, error_type="InternalServerError")
    return 0


def answer_json(
    exchange: Exchange, emulator: JiMengEmulator, plan: Plan, record: dict[str, Any], fault: Fault | None
) -> int:
    emulator.pause(emulator.latency * len(plan.slots))
    try:
        items = [
            render(emulator, exchange, plan, slot, fault) if slot.key is not None else {"error": slot.error}
            for slot in plan.slots
        ]
    except RenderFailed:
        return render_failed(exchange, emulator, record)
    billed = sum(slot.key is not None for slot in plan.slots)
    payload: dict[str, Any]
    if plan.envelope_error is not None:
        payload = {"error": plan.envelope_error}
        if plan.envelope_data:
            payload = {"model": plan.model, "created": plan.created, "data": [], **payload}
    else:
        payload = {"model": plan.model, "created": plan.created, "data": items, "usage": plan.usage(billed)}
        if plan.tools is not None:
            payload["tools"] = plan.tools
    # A client that gave up (timed out, hung up) is billed as undelivered in the same step, so that
    # nobody reading the ledger sees the answer delivered in between.
    gone = exchange.peer_gone()
    bill(emulator, plan, billed, delivered=not gone)
    data = json.dumps(payload).encode()
    record["status"] = 200
    record["images"] = billed
    emulator.runtime.stats.add_record(record)
    kind = fault.kind if fault else None
    if gone:
        delivered = False
        exchange.hang_up()
    elif kind == "malformed":
        delivered = exchange.send(200, MALFORMED_BODY)
    elif kind == "truncated":
        delivered = exchange.send(200, data[: len(data) // 2])
    elif kind == "reset_mid_body":
        exchange.send(200, data[: len(data) // 2], content_length=len(data))
        exchange.reset()
        delivered = False
    else:
        delivered = exchange.send(200, data)
    if not delivered and not gone:
        emulator.runtime.ledger.mark_undelivered(plan.request_id)
    return billed
