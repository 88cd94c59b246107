"""The ``jimeng`` connection's form: fields, labels and extras, shared by the hook and provider info.

Kept free of Airflow imports because the providers manager reads it while Airflow is still starting.
"""

from __future__ import annotations

import json
from typing import Any

from airflow_provider_jimeng.api.capabilities import DEFAULT_MODEL

CHINA_BASE_URL = "https://ark.cn-beijing.volces.com/api/v3"
BYTEPLUS_BASE_URL = "https://ark.ap-southeast.bytepluses.com/api/v3"
GENERATIONS_PATH = "/images/generations"
OFFICIAL_HOST_SUFFIXES = ("volces.com", "bytepluses.com")

#: Connection extras a user may set, with what each one means; feeds the UI form and the docs.
CONNECTION_EXTRAS: dict[str, dict[str, Any]] = {
    "model": {
        "label": "Default model",
        "description": "Model or endpoint id used when a task names none, e.g. doubao-seedream-4-0-250828.",
        "schema": {"type": ["string", "null"]},
    },
    "timeout": {
        "label": "Read timeout (seconds)",
        "description": "How long to wait for an answer; generation takes seconds to minutes. Default 300.",
        "schema": {"type": ["number", "null"], "minimum": 1},
    },
    "connect_timeout": {
        "label": "Connect timeout (seconds)",
        "description": "How long to wait for a connection. Default 10.",
        "schema": {"type": ["number", "null"], "minimum": 0.1},
    },
    "max_retries": {
        "label": "Max retries",
        "description": "Retries on rate limits, server errors and timeouts (never on invalid input). Default 5.",
        "schema": {"type": ["integer", "null"], "minimum": 0},
    },
    "max_billed_retries": {
        "label": "Max retries of possibly billed attempts",
        "description": (
            "Retries, in all, of a request whose attempt may have been billed (timed out, broke off, "
            "malformed answer): each may pay again. Default 1; 0 never re-sends such a request."
        ),
        "schema": {"type": ["integer", "null"], "minimum": 0},
    },
    "retry_backoff": {
        "label": "Retry backoff (seconds)",
        "description": "First wait before a retry; doubles each retry, with jitter. Default 2.",
        "schema": {"type": ["number", "null"], "minimum": 0},
    },
    "retry_max_wait": {
        "label": "Longest retry wait (seconds)",
        "description": "Cap on one wait between retries, including a server's Retry-After. Default 120.",
        "schema": {"type": ["number", "null"], "minimum": 0},
    },
    "response_deadline": {
        "label": "Answer deadline (seconds)",
        "description": (
            "Longest time to receive a whole generation answer once its headers came (a stream: all its "
            "events). Default 3 x the read timeout."
        ),
        "schema": {"type": ["number", "null"], "minimum": 1},
    },
    "max_response_bytes": {
        "label": "Max answer size (bytes)",
        "description": "Largest generation answer accepted (b64_json sets are large). Default 536870912 (512 MiB).",
        "schema": {"type": ["integer", "null"], "minimum": 1024},
    },
    # A select, not a switch: Airflow's form shows an untouched boolean switch as "off", which here would
    # hide that untouched means true. The null entry is the untouched value, labelled with what it means.
    "watermark": {
        "label": "Watermark",
        "description": "Default for the 'AI generated' mark, sent on every request; a task's watermark wins.",
        "schema": {
            "type": ["string", "null"],
            "enum": [None, "true", "false"],
            "values_display": {"null": "true (default)", "true": "true", "false": "false"},
        },
    },
    "max_images_per_minute": {
        "label": "Max images per minute",
        "description": "Client-side pacing per task, below the account's rate limit (500 by default).",
        "schema": {"type": ["integer", "null"], "minimum": 1},
    },
    "images_per_request": {
        "label": "Images billed per request",
        "description": (
            "For a gateway that answers every request with N images, whatever was asked (all billed): the "
            "spending cap and the account limiter then reserve at least N per request. Empty: what the "
            "request asks (1, or a set's max_images)."
        ),
        "schema": {"type": ["integer", "null"], "minimum": 1, "maximum": 100},
    },
    "redis_conn_id": {
        "label": "Shared Redis connection",
        "description": (
            "Id of a redis connection every worker can reach. Tasks using this JiMeng connection then share "
            "one account-wide rate limiter (with Account images per minute) and keep journals there that a "
            "retry on any worker reads (docs/scaling.md; needs the redis extra)."
        ),
        "schema": {"type": ["string", "null"]},
    },
    "account_images_per_minute": {
        "label": "Account images per minute",
        "description": (
            "The account's limit per model (500 by default; yours may differ) that the shared limiter keeps "
            "every task using this key under, together. Empty: no account-wide limit. Needs the shared Redis "
            "connection."
        ),
        "schema": {"type": ["integer", "null"], "minimum": 1},
    },
    "proxies": {
        "label": "Proxies (JSON)",
        "description": 'requests-style proxies, e.g. {"https": "http://proxy:3128"}.',
        "schema": {"type": ["object", "string", "null"]},
    },
    "verify": {
        "label": "Verify TLS",
        "description": "true (default), false, or a path to a CA bundle.",
        "schema": {"type": ["boolean", "string", "null"]},
    },
    "allow_http": {
        "label": "Allow plain HTTP",
        "description": "Permit http:// base and image URLs (the offline emulator on loopback). Default false.",
        "schema": {"type": ["boolean", "null"]},
    },
}

UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": ["login", "schema", "port"],
    "relabeling": {"host": "Base URL", "password": "API Key"},
    "placeholders": {
        # Short enough to show whole in the form's input (BytePlus and gateway URLs: docs/connection.md).
        "host": f"{CHINA_BASE_URL} (default when empty)",
        "password": "API key (Bearer token)",
        "extra": json.dumps({"model": DEFAULT_MODEL, "timeout": 300, "watermark": False}),
    },
}
