"""The emulator's token-bucket rate limit (``rate_limit_burst``), used by the rate-limit benchmark."""

from __future__ import annotations

from airflow_provider_jimeng.emulator.ratelimit import ImageRateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_the_burst_then_refills_evenly() -> None:
    clock = FakeClock()
    limiter = ImageRateLimiter(clock)
    admitted = [limiter.reserve(1, 240, burst=4) for _ in range(5)]
    assert [r is not None for r in admitted] == [True, True, True, True, False]
    clock.now += 0.25  # 240 a minute is one image every 0.25 s
    assert limiter.reserve(1, 240, burst=4) is not None
    assert limiter.reserve(1, 240, burst=4) is None


def test_settle_returns_unbilled_images_to_the_bucket() -> None:
    limiter = ImageRateLimiter(FakeClock())
    reservation = limiter.reserve(4, 240, burst=4)
    assert reservation is not None
    assert limiter.reserve(1, 240, burst=4) is None
    limiter.settle(reservation, 1)
    assert [limiter.reserve(1, 240, burst=4) is not None for _ in range(4)] == [True, True, True, False]


def test_a_request_larger_than_the_burst_passes_when_full_and_leaves_debt() -> None:
    clock = FakeClock()
    limiter = ImageRateLimiter(clock)
    assert limiter.reserve(6, 60, burst=2) is not None
    clock.now += 4.0  # debt of 4 images at 1 image a second
    assert limiter.reserve(1, 60, burst=2) is None
    clock.now += 1.0
    assert limiter.reserve(1, 60, burst=2) is not None


def test_without_burst_the_sliding_window_is_unchanged() -> None:
    clock = FakeClock()
    limiter = ImageRateLimiter(clock)
    assert all(limiter.reserve(1, 240) is not None for _ in range(240))
    assert limiter.reserve(1, 240) is None
    clock.now += 60.0
    assert limiter.reserve(1, 240) is not None
