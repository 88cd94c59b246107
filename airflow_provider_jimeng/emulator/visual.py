"""The Visual API (JiMeng 4.0, ``req_key: jimeng_t2i_v40``) on the emulator's server: ``POST /?Action=...``.

``CVSync2AsyncSubmitTask`` starts a task (billed at once, as the real submit starts paid work) and
answers its id; ``CVSync2AsyncGetResult`` answers the task's state (:mod:`.tasks`) and, once it is
``done``, its JPEGs as URLs or base64, watermarked as the poll's ``req_json`` asks. Every request is
first checked like the Volcengine gateway does (``ResponseMetadata.Error``: a missing or unknown access
key, a signature that does not match, an unknown action), with the provider's own signer
(:mod:`airflow_provider_jimeng.hooks.signing`).

Faults reach these requests through their pseudo-paths :data:`SUBMIT_FAULT_PATH` and
:data:`POLL_FAULT_PATH` (``Fault(kind, path=SUBMIT_FAULT_PATH)``): ``visual_error`` answers a body code
of :data:`~.faults.VISUAL_ERROR_FAULTS`, ``reset`` drops the connection before any work, ``slow``
delays the answer, ``reset_mid_body``/``truncated``/``malformed`` break the answer after the work
(a submit is then billed though its task id never arrives), ``expired_url``/``missing_url`` break the
image URLs a poll hands out.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from airflow_provider_jimeng.emulator.faults import VISUAL_ERROR_FAULTS, Fault
from airflow_provider_jimeng.emulator.generation import MALFORMED_BODY
from airflow_provider_jimeng.emulator.images import ImageKey
from airflow_provider_jimeng.emulator.ledger import LedgerEntry
from airflow_provider_jimeng.emulator.protocol import set_size
from airflow_provider_jimeng.emulator.tasks import DONE, NOT_FOUND, VisualTask, new_task_id
from airflow_provider_jimeng.hooks.signing import (
    DEFAULT_REGION,
    DEFAULT_SERVICE,
    canonical_request,
    sha256_hex,
    signature,
)

if TYPE_CHECKING:
    from email.message import Message

    from airflow_provider_jimeng.emulator.server import JiMengEmulator
    from airflow_provider_jimeng.emulator.wire import Exchange

log = logging.getLogger(__name__)

VISUAL_PATH = "/"
SUBMIT_ACTION = "CVSync2AsyncSubmitTask"
POLL_ACTION = "CVSync2AsyncGetResult"
VERSION = "2022-08-31"
REQ_KEY = "jimeng_t2i_v40"
#: What ``Fault.path`` matches for a submit and a poll (e.g. ``Fault("visual_error", code="50429", path=...)``).
SUBMIT_FAULT_PATH = f"/?Action={SUBMIT_ACTION}"
POLL_FAULT_PATH = f"/?Action={POLL_ACTION}"
DEFAULT_ACCESS_KEY_ID = "emulator-ak"
DEFAULT_SECRET_ACCESS_KEY = "emulator-sk"
#: Tasks answer ``expired`` this long after their submit.
TASK_TTL = 12 * 3600.0
#: Images a request may involve (references plus outputs), and references it may carry.
MAX_IMAGES = 15
MAX_REFERENCES = 10
DEFAULT_AREA = 2048 * 2048
MIN_AREA, MAX_AREA = 1024 * 1024, 4096 * 4096
#: Submit faults whose task starts all the same (billed, id never told), and those that fail it once made.
_STARTED_ANYWAY = frozenset({"50500", "50501"})
_FAILED_AFTER = frozenset({"50511", "50512"})
#: The body code of an invalid request (the spec is silent on it; the gateway's own codes are not used).
INVALID_PARAMETER = "50400"
_AUTHORIZATION = re.compile(
    r"^HMAC-SHA256 Credential=(?P<ak>[^/]+)/(?P<scope>[^,]+), "
    r"SignedHeaders=(?P<names>[^,]+), Signature=(?P<sig>[0-9a-f]+)$"
)
_GATEWAY_ERRORS: dict[str, tuple[int, int, str]] = {
    "MissingAuthenticationToken": (401, 100003, "Request is missing Authentication Token."),
    "InvalidActionOrVersion": (404, 100008, "Could not find operation {action} for version {version}."),
    "InvalidAccessKey": (401, 100009, "The accesskey {ak} included in the request is invalid."),
    "SignatureDoesNotMatch": (
        401,
        100010,
        "The request signature we calculated does not match the signature you provided. "
        "Check your Secret Access Key and signing method. Consult the service documentation for details.",
    ),
}


class _Invalid(Exception):
    """A body field is invalid: answered with :data:`INVALID_PARAMETER`."""


class _Call:
    """One Visual API request: its action, request id, timing and record."""

    def __init__(self, exchange: Exchange, emulator: JiMengEmulator, action: str, received_at: float) -> None:
        self.exchange = exchange
        self.emulator = emulator
        self.action = action
        self.request_id = exchange.request_id
        self.started = time.monotonic()
        self.record: dict[str, Any] = {
            "path": f"/?Action={action}",
            "status": None,
            "request_id": exchange.request_id,
            "client_request_id": exchange.client_request_id,
            "body": None,
            "fault": None,
            "images": 0,
            "task_id": None,
            "received_at": received_at,
            "answered_at": None,
        }

    def payload(self, code: str, message: str, data: Any) -> bytes:
        elapsed = (time.monotonic() - self.started) * 1000
        body = {
            "code": int(code),
            "data": data,
            "message": message,
            "request_id": self.request_id,
            "status": int(code),
            "time_elapsed": f"{elapsed:.6f}ms",
        }
        return json.dumps(body).encode()

    def answer(self, status: int, code: str, message: str, data: Any, fault: Fault | None = None) -> bool:
        """Write the body envelope (broken as a delivery fault says); ``True`` when it arrived whole."""
        self.record["status"] = status
        if code != "10000":
            self.record["error"] = code
        self.emulator.runtime.stats.add_record(self.record)
        body = self.payload(code, message, data)
        kind = fault.kind if fault else None
        if kind == "malformed":
            self.exchange.send(status, MALFORMED_BODY)
            return False
        if kind == "truncated":
            self.exchange.send(status, body[: len(body) // 2])
            return False
        if kind == "reset_mid_body":
            self.exchange.send(status, body[: len(body) // 2], content_length=len(body))
            self.exchange.reset()
            return False
        return self.exchange.send(status, body)

    def error(self, code: str, message: str | None = None, fault: Fault | None = None) -> None:
        status, default = VISUAL_ERROR_FAULTS.get(code, (400, "Invalid Parameter"))
        self.answer(status, code, message or default, None, fault)

    def gateway_error(self, name: str, **fields: str) -> None:
        status, code_n, message = _GATEWAY_ERRORS[name]
        self.record["status"] = status
        self.record["error"] = name
        self.emulator.runtime.stats.add_record(self.record)
        metadata = {
            "RequestId": self.request_id,
            "Action": fields.get("action", self.action),
            "Version": fields.get("version", VERSION),
            "Service": DEFAULT_SERVICE,
            "Region": DEFAULT_REGION,
            "Error": {"CodeN": code_n, "Code": name, "Message": message.format(**fields)},
        }
        self.exchange.send(status, json.dumps({"ResponseMetadata": metadata}).encode())


def answer_visual(
    exchange: Exchange, emulator: JiMengEmulator, headers: Message, target: str, raw: bytes, received_at: float
) -> None:
    """Answer ``POST /?Action=...`` (``target`` is the request line's path and query)."""
    query = parse_qsl(urlsplit(target).query, keep_blank_values=True)
    params = dict(query)
    action, version = params.get("Action", ""), params.get("Version", "")
    call = _Call(exchange, emulator, action, received_at)
    stats = emulator.runtime.stats
    stats.count("request_count")
    stats.enter()
    try:
        if _authenticated(call, headers, query, raw):
            if action not in (SUBMIT_ACTION, POLL_ACTION) or version != VERSION:
                call.gateway_error("InvalidActionOrVersion", action=action, version=version)
            elif action == SUBMIT_ACTION:
                _submit(call, raw)
            else:
                _poll(call, raw)
    finally:
        call.record["answered_at"] = time.monotonic()
        stats.leave()


def _authenticated(call: _Call, headers: Message, query: list[tuple[str, str]], raw: bytes) -> bool:
    """Check the request's signature as the gateway does; answer its error and return ``False`` if wrong."""
    emulator = call.emulator
    if emulator.access_key_id is None:
        return True
    authorization = headers.get("Authorization", "")
    if not authorization:
        call.gateway_error("MissingAuthenticationToken")
        return False
    match = _AUTHORIZATION.match(authorization.strip())
    if match is None or not hmac.compare_digest(match["ak"].encode(), emulator.access_key_id.encode()):
        call.gateway_error("InvalidAccessKey", ak=match["ak"] if match else "")
        return False
    x_date = headers.get("X-Date", "")
    names = match["names"].split(";")
    body_sha256 = sha256_hex(raw)
    present = {name.lower(): value for name, value in headers.items()}
    canonical = canonical_request("POST", VISUAL_PATH, query, present, names, body_sha256)
    expected = signature(emulator.secret_access_key or "", x_date, DEFAULT_REGION, DEFAULT_SERVICE, canonical)
    scope_ok = match["scope"] == f"{x_date[:8]}/{DEFAULT_REGION}/{DEFAULT_SERVICE}/request"
    body_ok = present.get("x-content-sha256", body_sha256) == body_sha256
    if not (scope_ok and body_ok and "host" in names and hmac.compare_digest(match["sig"], expected)):
        call.gateway_error("SignatureDoesNotMatch")
        return False
    return True


def _json_object(call: _Call, raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        call.error(INVALID_PARAMETER, "Invalid Parameter: the body must be a JSON object")
        return None
    call.record["body"] = {key: value for key, value in body.items() if key != "binary_data_base64"}
    if body.get("req_key") != REQ_KEY:
        call.error(INVALID_PARAMETER, f"Invalid Parameter: req_key must be {REQ_KEY!r}")
        return None
    return body


def _take_fault(call: _Call, path: str) -> Fault | None:
    fault = call.emulator.runtime.faults.take(path, generation=False)
    if fault is not None:
        call.record["fault"] = fault.kind if fault.kind != "visual_error" else f"visual_error:{fault.code}"
        log.info("JiMeng emulator: Visual API request %s gets injected fault %r", call.request_id, fault.kind)
        if fault.kind == "slow":
            call.emulator.pause(fault.delay)
    return fault


# -- submit ------------------------------------------------------------------------------------------


def _number(body: Mapping[str, Any], name: str, low: float, high: float, *, integer: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _Invalid(f"{name} must be {'an integer' if integer else 'a number'}")
    if not low <= value <= high:
        raise _Invalid(f"{name} must be in [{low:g}, {high:g}], got {value}")
    return float(value)


def _dimensions(body: Mapping[str, Any]) -> tuple[int, int]:
    """``width``/``height`` (both or neither) win over ``size``, an area in pixels (a square is rendered)."""
    width = _number(body, "width", 1, 16384, integer=True)
    height = _number(body, "height", 1, 16384, integer=True)
    if (width is None) != (height is None):
        raise _Invalid("width and height go together: give both or neither")
    if width is not None and height is not None:
        if not MIN_AREA <= width * height <= MAX_AREA:
            raise _Invalid(f"width*height must be in [{MIN_AREA}, {MAX_AREA}], got {int(width * height)}")
        if not 1 / 16 <= width / height < 16:
            raise _Invalid("width/height must be in [1/16, 16)")
        return int(width), int(height)
    area = _number(body, "size", MIN_AREA, MAX_AREA, integer=True) or DEFAULT_AREA
    side = math.isqrt(int(area))
    return side, side


def _validate_submit(body: Mapping[str, Any]) -> tuple[str, list[Any], int, int, int]:
    """The prompt, references, dimensions and seed of a valid submit; :class:`_Invalid` otherwise."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _Invalid("prompt is required and must be a non-empty string")
    references = body.get("image_urls") or []
    if not isinstance(references, list) or not all(isinstance(url, str) and url for url in references):
        raise _Invalid("image_urls must be a list of image URLs")
    if len(references) > MAX_REFERENCES:
        raise _Invalid(f"image_urls takes at most {MAX_REFERENCES} images, got {len(references)}")
    width, height = _dimensions(body)
    _number(body, "scale", 0, 1)
    for name in ("min_ratio", "max_ratio"):
        _number(body, name, 1 / 16, 16)
    if "force_single" in body and not isinstance(body["force_single"], bool):
        raise _Invalid("force_single must be a boolean")
    seed = _number(body, "seed", -1, 2**32, integer=True)
    return prompt, references, width, height, -1 if seed is None else int(seed)


def _submit(call: _Call, raw: bytes) -> None:
    emulator, runtime = call.emulator, call.emulator.runtime
    body = _json_object(call, raw)
    if body is None:
        return
    try:
        prompt, references, width, height, seed = _validate_submit(body)
    except _Invalid as exc:
        call.error(INVALID_PARAMETER, f"Invalid Parameter: {exc}")
        return
    fault = _take_fault(call, SUBMIT_FAULT_PATH)
    kind = fault.kind if fault else None
    code = fault.code if fault and kind == "visual_error" else None
    if kind == "reset":
        runtime.stats.add_record(call.record)
        call.exchange.reset()
        return
    if code is not None and code not in _STARTED_ANYWAY | _FAILED_AFTER:
        call.error(code)
        return
    if emulator.moderation_marker and emulator.moderation_marker in prompt:
        call.error("50412")
        return
    now = emulator.clock()
    limit = emulator.visual_max_concurrent_tasks
    if limit is not None and runtime.visual_tasks.unfinished(now) >= limit:
        call.error("50430")
        return
    room = MAX_IMAGES - len(references)
    images = 1 if body.get("force_single") or room <= 1 else set_size(prompt, room, default=1)
    reservation = runtime.limiter.reserve(images, emulator.images_per_minute, emulator.rate_limit_burst)
    if reservation is None:
        runtime.stats.count("rate_limited")
        call.error("50429")
        return
    started_at = runtime.visual_tasks.start_at(
        now + emulator.visual_queue_delay, emulator.latency * images, emulator.visual_parallelism
    )
    task = VisualTask(
        task_id=new_task_id(),
        request_id=call.request_id,
        prompt=prompt,
        seed=seed,
        width=width,
        height=height,
        images=images,
        submitted_at=now,
        started_at=started_at,
        done_at=started_at + emulator.latency * images,
        expires_at=now + emulator.visual_task_ttl,
        failure=code if code in _FAILED_AFTER else None,
    )
    runtime.visual_tasks.add(task)
    billed = 0 if task.failure else images
    runtime.limiter.settle(reservation, billed)
    if billed:
        stamp = time.time()
        entry = LedgerEntry(
            call.request_id, REQ_KEY, prompt, billed, billed * width * height // 256, False, int(stamp), billed_at=stamp
        )
        runtime.ledger.record(entry)
    call.record["task_id"] = task.task_id
    call.record["images"] = billed
    log.debug("JiMeng emulator: Visual API task %s submitted, %d image(s) billed", task.task_id, billed)
    if code in _STARTED_ANYWAY:
        call.error(code)  # the task runs (and is billed) but its id is never told
        return
    call.answer(200, "10000", "Success", {"task_id": task.task_id}, fault)


# -- poll --------------------------------------------------------------------------------------------


def _poll_options(body: Mapping[str, Any]) -> tuple[bool, bool]:
    """``return_url`` and ``logo_info.add_logo`` from ``req_json`` (a JSON string), validated."""
    req_json = body.get("req_json")
    if req_json is None or req_json == "":
        return False, False
    if not isinstance(req_json, str):
        raise _Invalid("req_json must be a JSON string")
    try:
        options = json.loads(req_json)
    except ValueError:
        raise _Invalid("req_json is not valid JSON") from None
    if not isinstance(options, dict):
        raise _Invalid("req_json must encode a JSON object")
    return_url = options.get("return_url", False)
    logo = options.get("logo_info") or {}
    if not isinstance(return_url, bool) or not isinstance(logo, dict):
        raise _Invalid("req_json: return_url must be a boolean and logo_info an object")
    add_logo = logo.get("add_logo", False)
    if not isinstance(add_logo, bool):
        raise _Invalid("logo_info.add_logo must be a boolean")
    for name, allowed in (("position", (0, 1, 2, 3)), ("language", (0, 1))):
        if name in logo and logo[name] not in allowed:
            raise _Invalid(f"logo_info.{name} must be one of {allowed}")
    opacity = logo.get("opacity", 1)
    if isinstance(opacity, bool) or not isinstance(opacity, (int, float)) or not 0 <= opacity <= 1:
        raise _Invalid("logo_info.opacity must be a number in [0, 1]")
    if not isinstance(options.get("aigc_meta", {}), dict):
        raise _Invalid("req_json: aigc_meta must be an object")
    return return_url, add_logo


def _poll(call: _Call, raw: bytes) -> None:
    emulator, runtime = call.emulator, call.emulator.runtime
    body = _json_object(call, raw)
    if body is None:
        return
    task_id = body.get("task_id")
    try:
        if not isinstance(task_id, str) or not task_id:
            raise _Invalid("task_id is required and must be a string")
        return_url, add_logo = _poll_options(body)
    except _Invalid as exc:
        call.error(INVALID_PARAMETER, f"Invalid Parameter: {exc}")
        return
    call.record["task_id"] = task_id
    fault = _take_fault(call, POLL_FAULT_PATH)
    if fault is not None and fault.kind == "reset":
        runtime.stats.add_record(call.record)
        call.exchange.reset()
        return
    if fault is not None and fault.kind == "visual_error" and fault.code is not None:
        call.error(fault.code)
        return
    task = runtime.visual_tasks.get(task_id)
    state = NOT_FOUND if task is None else task.state(emulator.clock())
    data: dict[str, Any] = {"status": state, "image_urls": None, "binary_data_base64": []}
    if task is None or state != DONE:
        call.answer(200, "10000", "Success", data, fault)
        return
    if task.failure is not None:
        status, message = VISUAL_ERROR_FAULTS[task.failure]
        call.answer(status, task.failure, message, data, fault)
        return
    keys = [
        ImageKey(task.prompt, task.seed, index, task.width, task.height, add_logo, "jpeg")
        for index in range(task.images)
    ]
    url_fault = fault.kind if fault is not None else None
    try:
        if return_url:
            root = call.exchange.url_root()
            data["image_urls"] = [runtime.signer.issue(key, root, emulator.url_ttl, url_fault) for key in keys]
        else:
            data["binary_data_base64"] = [base64.b64encode(runtime.cache.get(key)).decode("ascii") for key in keys]
    except Exception:
        log.exception("JiMeng emulator: rendering Visual API task %s failed", task.task_id)
        call.error("50500")
        return
    call.record["images"] = task.images
    # Marked before the answer is written, so nobody who read it sees it undelivered; undone if it broke.
    first = not task.delivered and not call.exchange.peer_gone()
    if first:
        task.delivered = True
        runtime.ledger.mark_delivered(task.request_id)
    if not call.answer(200, "10000", "Success", data, fault) and first:
        task.delivered = False
        runtime.ledger.mark_undelivered(task.request_id)
