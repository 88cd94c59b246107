"""What a run may spend: images billed (:class:`SpendingCap`) and image bytes in memory (:class:`ByteBudget`).

Neutral ground: the hook, the run engine and storage all use these, and none of them owns them.


A 4K image weighs megabytes (a third more as base64), and a run may generate hundreds. Image data is
in the worker's memory only between its arrival (a ``b64_json`` answer, a download) and its upload to
S3; a byte budget shared by every thread of a run caps that sum. A thread that would exceed it waits
*before* reading a body, so the bytes stay in the kernel's socket buffers meanwhile. Memory then
depends on the budget, not on the number of prompts or on ``max_concurrency``.

The cap is soft: a body waits at most ``timeout`` seconds, then is read anyway, because it was paid
for and a server does not hold an unread answer forever; an image larger than the whole budget
waits until nothing else is held, then goes alone.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from airflow_provider_jimeng.exceptions import JiMengSpendingCapError

#: Image bytes one run may hold at once: room for several 4K images, far more than 1K/2K need.
DEFAULT_IMAGE_MEMORY_BYTES = 32 * 1024 * 1024
#: The longest a body waits for memory before it is read regardless.
DEFAULT_WAIT_SECONDS = 30.0
#: glibc's ``mallopt`` parameter for the size from which blocks are mapped from the OS.
_M_MMAP_THRESHOLD = -3
#: Blocks this large are image-sized and mapped from the OS, not malloc'd: unmapped, they are returned
#: at once, where a malloc'd block of megabytes would stay in its thread's arena (glibc raises its mmap
#: and trim thresholds as large blocks are freed), so a dozen threads would keep tens of MiB.
IMAGE_BLOCK_BYTES = 1024 * 1024


def return_image_blocks_to_the_os() -> None:
    """Map every image-sized block from the OS, in this (the task's) process.

    glibc raises its mmap threshold each time a large mapped block is freed, up to 32 MiB, so after
    the first base64 answer the next ones (body, text, decoded string: megabytes each) come from the
    parsing thread's malloc arena, which keeps them when freed. Every generation thread takes its turn
    with a large answer, so a run's memory grows with its number of threads up to ~64 MiB. A fixed
    threshold keeps image-sized blocks out of the arenas, for the cost of a page fault per 4 KiB.
    A no-op where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, IMAGE_BLOCK_BYTES)


class ByteBudget:
    """A weighted semaphore in bytes, shared by the threads of one run."""

    def __init__(self, capacity: int = DEFAULT_IMAGE_MEMORY_BYTES, stop: threading.Event | None = None) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.used = 0
        #: For reports: the most ever held, and how often a thread waited or went over the cap.
        self.peak = 0
        self.waits = 0
        self.overdrawn = 0
        self._stop = stop
        self._condition = threading.Condition()

    def acquire(self, amount: int, timeout: float = DEFAULT_WAIT_SECONDS) -> int:
        """Take ``amount`` bytes, waiting while they do not fit (at most ``timeout`` s); returns the amount."""
        amount = max(0, int(amount))
        deadline = time.monotonic() + timeout
        with self._condition:
            if self.used and self.used + amount > self.capacity:
                self.waits += 1
            while self.used and self.used + amount > self.capacity:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._stop is not None and self._stop.is_set()):
                    self.overdrawn += 1
                    break
                self._condition.wait(min(remaining, 0.5))
            self.used += amount
            self.peak = max(self.peak, self.used)
        return amount

    def release(self, amount: int) -> None:
        if amount <= 0:
            return
        with self._condition:
            self.used = max(0, self.used - amount)
            self._condition.notify_all()

    @contextmanager
    def hold(self, amount: int, timeout: float = DEFAULT_WAIT_SECONDS) -> Iterator[int]:
        taken = self.acquire(amount, timeout)
        try:
            yield taken
        finally:
            self.release(taken)


class SpendingCap:
    """The most images a run may bill, enforced before every attempt is sent, retries included.

    The API has no idempotency key: an attempt that timed out, or whose answer broke off or could not
    be parsed, may have generated (and billed) its images. Each attempt therefore *reserves* the most
    it can bill before it is sent, and the reservation is settled once its fate is known:

    * :meth:`Reservation.settle` with the images the answer says were billed (the rest is returned);
    * :meth:`Reservation.release` when the service answered with an error (nothing generated);
    * :meth:`Reservation.keep_as_possible` when nobody can tell: it counts as possibly billed.

    A reservation that would take ``earlier + billed + possibly billed + reserved`` above ``limit``
    raises :class:`~airflow_provider_jimeng.exceptions.JiMengSpendingCapError` and the attempt is not
    sent. ``earlier`` is what earlier tries of the task instance committed (:meth:`carry`, read before
    the first request), so the limit holds for the task instance, not for each try. ``billed`` and
    ``possibly_billed`` are this try's own. Thread-safe; one cap serves every thread of a run.
    ``limit=None`` counts without refusing.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.billed = 0
        self.possibly_billed = 0
        self.reserved = 0
        #: Images earlier tries of the same budget billed or possibly billed.
        self.earlier = 0
        self._lock = threading.Lock()

    def carry(self, images: int) -> None:
        """Count what earlier tries committed against the limit (before this try's first request)."""
        with self._lock:
            self.earlier += max(0, int(images))

    @property
    def committed(self) -> int:
        """Images billed for sure or possibly: what a report must admit to."""
        return self.billed + self.possibly_billed

    def reserve(self, images: int) -> Reservation:
        images = max(0, int(images))
        with self._lock:
            committed = self.earlier + self.billed + self.possibly_billed + self.reserved
            if self.limit is not None and committed + images > self.limit:
                raise JiMengSpendingCapError(
                    limit=self.limit,
                    billed=self.billed,
                    possibly_billed=self.possibly_billed,
                    in_flight=self.reserved,
                    requested=images,
                    earlier=self.earlier,
                )
            self.reserved += images
        return Reservation(self, images)

    def _settle(self, reserved: int, billed: int, possible: int) -> None:
        with self._lock:
            self.reserved -= reserved
            self.billed += billed
            self.possibly_billed += possible


class Reservation:
    """Room for one attempt's images in a :class:`SpendingCap`; settled exactly once."""

    def __init__(self, cap: SpendingCap, images: int) -> None:
        self._cap = cap
        self.images = images
        self._open = True

    def _close(self, billed: int, possible: int) -> None:
        if self._open:
            self._open = False
            self._cap._settle(self.images, billed, possible)

    def settle(self, billed: int, possibly_billed: int = 0) -> None:
        """The answer said what was billed (a gateway may bill more than reserved: it counts all the same).

        ``possibly_billed``: images the answer did not deliver because it broke off, which the service
        may have generated all the same.
        """
        self._close(max(0, int(billed)), max(0, int(possibly_billed)))

    def release(self) -> None:
        """The attempt was refused or never sent: nothing was billed."""
        self._close(0, 0)

    def keep_as_possible(self) -> None:
        """Unknown fate (timeout, broken answer): every reserved image counts as possibly billed."""
        self._close(0, self.images)
