"""Where an attempt's images are charged: reserved before it is sent, settled by what became of it.

An attempt reserves the most images it could bill on the run's spending cap (which may refuse: nothing
is sent) and on the hook's own tally; its answer settles them as billed, released (nothing billed) or
kept as possibly billed (timed out, broke off). Caps and reservations are :mod:`airflow_provider_jimeng.budget`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from airflow_provider_jimeng.budget import Reservation, SpendingCap


class Charge:
    """One attempt's images, reserved on the caller's spending cap and on the hook's own tally.

    Both reservations are settled together, once: whatever happens to the attempt, the hook's counters
    say the same as the run's cap.
    """

    def __init__(self, images: int, reservations: Sequence[Reservation]) -> None:
        self.images = images
        self._reservations = reservations

    @classmethod
    def reserve(cls, images: int, spending_cap: SpendingCap | None, tally: SpendingCap) -> Charge:
        """Reserve ``images`` on the caller's cap (which may refuse: nothing is sent) and on ``tally``."""
        reservations = [] if spending_cap is None else [spending_cap.reserve(images)]
        reservations.append(tally.reserve(images))
        return cls(images, reservations)

    def settle(self, billed: int, possibly_billed: int = 0) -> None:
        for reservation in self._reservations:
            reservation.settle(billed, possibly_billed)

    def release(self) -> None:
        for reservation in self._reservations:
            reservation.release()

    def keep_as_possible(self) -> None:
        for reservation in self._reservations:
            reservation.keep_as_possible()
