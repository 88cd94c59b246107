"""What the emulator billed, request by request, so tests can prove a retry did not pay twice."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class LedgerEntry:
    """One request that billed at least one image or web search.

    ``delivered`` is ``False`` when the answer could not be written completely (the client hung up,
    timed out or the connection broke): the real service bills those images all the same.
    A Visual API task is billed when it is submitted and stays undelivered until a poll fetched its images.
    ``web_searches`` is what Seedream 5.0's web-search tool ran (billed apart from the images).
    ``billed_at`` is the wall-clock time (``time.time()``) it was billed, finer than ``created``:
    a rate measured across processes (``GET /_emulator/ledger``) needs sub-second stamps.
    """

    request_id: str
    model: str
    prompt: str
    images: int
    output_tokens: int
    delivered: bool
    created: int
    web_searches: int = 0
    billed_at: float = 0.0


class Ledger:
    """Thread-safe list of :class:`LedgerEntry`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[LedgerEntry] = []

    def record(self, entry: LedgerEntry) -> None:
        with self._lock:
            self._entries.append(entry)

    def mark_undelivered(self, request_id: str) -> None:
        with self._lock:
            # Newest first: the entry was appended moments ago.
            for position in range(len(self._entries) - 1, -1, -1):
                if self._entries[position].request_id == request_id:
                    self._entries[position] = dataclasses.replace(self._entries[position], delivered=False)
                    return

    def mark_delivered(self, request_id: str) -> None:
        """A Visual API task's images were fetched (its entry is billed at submit, undelivered until then)."""
        with self._lock:
            for position in range(len(self._entries) - 1, -1, -1):
                if self._entries[position].request_id == request_id:
                    self._entries[position] = dataclasses.replace(self._entries[position], delivered=True)
                    return

    def entries(self) -> list[LedgerEntry]:
        with self._lock:
            return list(self._entries)

    def billed_images(self) -> int:
        with self._lock:
            return sum(entry.images for entry in self._entries)

    def billed_web_searches(self) -> int:
        with self._lock:
            return sum(entry.web_searches for entry in self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
