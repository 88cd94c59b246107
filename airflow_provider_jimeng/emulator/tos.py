"""Image downloads behind the signed URLs of an answer, answered like TOS (the service's object store)."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from airflow_provider_jimeng.emulator.wire import Exchange

if TYPE_CHECKING:
    from airflow_provider_jimeng.emulator.server import JiMengEmulator

log = logging.getLogger(__name__)

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def tos_error(exchange: Exchange, status: int, code: str, message: str) -> None:
    """TOS's own error document (not the API's envelope), as a download failure really looks."""
    body = {"Code": code, "Message": message, "RequestId": exchange.request_id, "HostId": "tos-emulator"}
    exchange.send(status, json.dumps(body).encode(), headers={"x-tos-request-id": exchange.request_id})


def serve_download(exchange: Exchange, emulator: JiMengEmulator, raw_path: str) -> None:
    runtime = emulator.runtime
    name = urlsplit(raw_path).path.rsplit("/", 1)[-1]
    image_id = name.rsplit(".", 1)[0]
    query = parse_qs(urlsplit(raw_path).query)

    def param(key: str) -> str:
        return query.get(key, [""])[0]

    if not runtime.signer.verify(image_id, param("X-Tos-Date"), param("X-Tos-Expires"), param("X-Tos-Signature")):
        tos_error(
            exchange,
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )
        return
    stored = runtime.store.get(image_id)
    if stored is None:
        tos_error(exchange, 404, "NoSuchKey", "The specified key does not exist.")
        return
    if time.time() >= stored.expires_at:
        tos_error(exchange, 403, "AccessDenied", "Request has expired")
        return
    try:
        data = runtime.cache.get(stored.key)
    except Exception:
        log.exception("JiMeng emulator: rendering image %s failed", image_id)
        tos_error(exchange, 500, "InternalError", "We encountered an internal error.")
        return
    runtime.stats.count("downloads")
    exchange.send(
        200,
        data,
        content_type=CONTENT_TYPES[stored.key.image_format],
        headers={"x-tos-request-id": exchange.request_id, "Cache-Control": "no-cache"},
    )
