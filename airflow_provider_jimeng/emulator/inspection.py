"""``/_emulator/...``: the ledger and counters over HTTP, for tests that run in other processes.

A distributed test (``make scale``: Celery workers, a scheduler, the emulator in its own process)
cannot read :attr:`JiMengEmulator.ledger` from Python, so the same facts are served as JSON. The
routes are read-only except ``POST /_emulator/reset``; they need no key (the emulator is a loopback
development tool) and never show one: ledger entries carry the prompt and its SHA-256, not headers.
"""

from __future__ import annotations

from collections import Counter
from hashlib import sha256
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider_jimeng.emulator.server import JiMengEmulator

INSPECTION_PREFIX = "/_emulator/"
LEDGER_PATH = "/_emulator/ledger"
STATS_PATH = "/_emulator/stats"
RESET_PATH = "/_emulator/reset"


def ledger_payload(emulator: JiMengEmulator) -> dict[str, Any]:
    """Every billed request, oldest first, with totals."""
    entries = [
        {
            "request_id": entry.request_id,
            "model": entry.model,
            "images": entry.images,
            "web_searches": entry.web_searches,
            "output_tokens": entry.output_tokens,
            "delivered": entry.delivered,
            "created": entry.created,
            "billed_at": entry.billed_at,
            "prompt": entry.prompt,
            "prompt_sha256": sha256(entry.prompt.encode()).hexdigest(),
        }
        for entry in emulator.ledger
    ]
    return {
        "entries": entries,
        "billed_images": sum(entry["images"] for entry in entries),
        "undelivered_images": sum(entry["images"] for entry in entries if not entry["delivered"]),
    }


def stats_payload(emulator: JiMengEmulator) -> dict[str, Any]:
    """The counters, the rate-limit configuration and the peak of concurrent generation requests."""
    stats = emulator.runtime.stats
    ledger = emulator.ledger
    statuses = Counter(str(record["status"]) for record in stats.records() if record["status"] is not None)
    limit, burst = emulator.images_per_minute, emulator.rate_limit_burst
    kind = None if limit is None else "sliding_window" if burst is None else "token_bucket"
    return {
        "request_count": stats.request_count,
        "rate_limited": stats.rate_limited,
        "statuses": dict(sorted(statuses.items())),
        "downloads": stats.downloads,
        "billed_images": sum(entry.images for entry in ledger),
        "undelivered_images": sum(entry.images for entry in ledger if not entry.delivered),
        "billed_web_searches": sum(entry.web_searches for entry in ledger),
        "billed_requests": len(ledger),
        "in_flight": stats.in_flight,
        "peak_in_flight": stats.peak_in_flight,
        "pending_faults": emulator.pending_faults,
        "rate_limit": {"images_per_minute": limit, "burst": burst, "kind": kind},
        "latency": emulator.latency,
    }
