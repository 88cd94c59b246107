"""The account-wide limiter's script over a real socket: arithmetic, atomicity, fairness, the horizon.

Arithmetic is checked with a fixed "now" passed to the script (the fake clock); everything else runs
on the server's own clock and asserts on the due times the server handed out (never on how long a
thread slept), so a busy machine cannot make a test pass or fail.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from airflow_provider_jimeng.coordination.ratelimit import (
    KEY_PREFIX,
    AccountRateLimiter,
    Grant,
    Ticket,
    bucket_key,
)
from airflow_provider_jimeng.testing import RedisServer
from tests.hooks.conftest import wait_for

NOW = 1_000_000_000_000_000  # a fixed server time, in microseconds
KEY = bucket_key("sk-test-key", "doubao-seedream-4-0-250828")


@pytest.fixture
def client(redis_conn: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_conn.url)
    yield connection
    connection.close()


def limiter(client: redis.Redis, ipm: float = 240, *, horizon: float = 10.0, key: str = KEY) -> AccountRateLimiter:
    return AccountRateLimiter(client, key, ipm, horizon=horizon)


def conforms(dues: list[tuple[int, int]], ipm: float, burst: float) -> tuple[bool, str]:
    """Whether images sent at ``dues`` ((due us, images) each) stay within ``burst`` plus the rate
    in every window: for each pair of requests, the images from the first to the second inclusive."""
    ordered = sorted(dues)
    per_us = ipm / 60 / 1_000_000
    for i, (start, _) in enumerate(ordered):
        total = 0
        for end, images in ordered[i:]:
            total += images
            allowed = burst + (end - start) * per_us + 1e-6
            if total > allowed:
                return False, f"{total} images between {start} and {end} (allowed {allowed:.2f})"
    return True, ""


# ----------------------------------------------------------------------------------- arithmetic
def test_a_full_bucket_lets_one_seconds_worth_go_then_spaces_images_at_the_rate(client: redis.Redis) -> None:
    bucket = limiter(client, 240)  # 4 images a second: the burst is 4
    waits = [bucket.try_acquire(1, now_us=NOW).seconds for _ in range(8)]
    assert waits == [0.0, 0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
    assert bucket.burst == 4


def test_a_low_rate_still_lets_one_image_go_at_once(client: redis.Redis) -> None:
    bucket = limiter(client, 6)  # one image every 10 s: the burst is never below one image
    assert bucket.burst == 1
    assert bucket.try_acquire(1, now_us=NOW) == Ticket(True, 0.0, NOW)
    assert bucket.try_acquire(1, now_us=NOW).seconds == 10.0


def test_beyond_the_horizon_nothing_is_reserved_and_the_hint_says_when_to_ask_again(client: redis.Redis) -> None:
    bucket = limiter(client, 60, horizon=3.0)  # one image a second, burst 1
    waits = [bucket.try_acquire(1, now_us=NOW) for _ in range(4)]
    assert [ticket.seconds for ticket in waits] == [0.0, 1.0, 2.0, 3.0]
    before = client.get(KEY)
    refused = bucket.try_acquire(1, now_us=NOW)
    assert refused == Ticket(False, 1.0, NOW + 1_000_000)
    assert client.get(KEY) == before, "a refused caller reserved nothing"
    # Asked again when the hint says, it gets in within the horizon.
    assert bucket.try_acquire(1, now_us=NOW + 1_000_000) == Ticket(True, 3.0, NOW + 4_000_000)


def test_a_request_larger_than_the_horizon_gets_in_once_nobody_is_ahead(client: redis.Redis) -> None:
    bucket = limiter(client, 60, horizon=3.0)
    first = bucket.try_acquire(15, now_us=NOW)  # a set of 15 at one image a second: 14 s of debt
    assert first.admitted
    assert first.seconds == 14.0
    assert not bucket.try_acquire(1, now_us=NOW).admitted
    # When its slots are all past, a set that long is admitted again (nobody ahead of it).
    assert bucket.try_acquire(15, now_us=NOW + 15_000_000).admitted


def test_refunds_give_slots_back_but_never_more_than_a_full_bucket(client: redis.Redis) -> None:
    bucket = limiter(client, 60, horizon=30.0)
    assert bucket.try_acquire(4, now_us=NOW).seconds == 3.0
    bucket.refund(3, now_us=NOW)  # a set of 4 billed 1
    assert bucket.try_acquire(1, now_us=NOW).seconds == 1.0
    bucket.refund(100, now_us=NOW)  # far more than is reserved: the bucket is just full
    assert client.get(KEY) is None
    waits = [bucket.try_acquire(1, now_us=NOW).seconds for _ in range(2)]
    assert waits == [0.0, 1.0], "a refund never makes room for more than the burst"


def test_the_key_expires_once_its_reservations_are_due(client: redis.Redis) -> None:
    bucket = limiter(client, 60, horizon=30.0)
    bucket.try_acquire(5, now_us=NOW)  # 5 s reserved ahead
    assert 5_000 < client.pttl(KEY) <= 6_000
    bucket.refund(2, now_us=NOW)
    assert 3_000 < client.pttl(KEY) <= 4_000


# ----------------------------------------------------------------------------------- atomicity
def _hammer(limiter_: AccountRateLimiter, calls: int, images: int = 1) -> list[tuple[int, int]]:
    dues = []
    for _ in range(calls):
        ticket = limiter_.try_acquire(images)
        if ticket.admitted:
            dues.append((ticket.due_us, images))
    return dues


def test_many_threads_on_the_server_clock_never_over_admit_in_any_window(client: redis.Redis) -> None:
    bucket = limiter(client, 6000, horizon=60.0)  # 100 images a second: many windows in a short run
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _hammer(bucket, 25, images=1 + _ % 3), range(16)))
    dues = [due for result in results for due in result]
    assert sum(images for _, images in dues) == sum(25 * (1 + i % 3) for i in range(16)), "everyone got in"
    ok, why = conforms(dues, 6000, bucket.burst)
    assert ok, why


def test_a_fixed_clock_shows_every_slot_handed_out_exactly_once(client: redis.Redis) -> None:
    """With "now" fixed, the slots form one chain: a lost update would hand out a slot twice."""
    bucket = limiter(client, 60, horizon=10_000.0)
    with ThreadPoolExecutor(16) as pool:
        tickets = list(pool.map(lambda _: bucket.try_acquire(1, now_us=NOW), range(400)))
    assert all(ticket.admitted for ticket in tickets)
    assert sorted(ticket.due_us for ticket in tickets) == [NOW] + [NOW + i * 1_000_000 for i in range(1, 400)]


def _process_hammer(url: str, calls: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    connection = redis.Redis.from_url(url)
    queue.put(_hammer(AccountRateLimiter(connection, KEY, 6000, horizon=60.0), calls, images=2))


def test_many_processes_never_over_admit_in_any_window(client: redis.Redis, redis_conn: RedisServer) -> None:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()  # type: ignore[type-arg]
    processes = [context.Process(target=_process_hammer, args=(redis_conn.url, 40, queue)) for _ in range(3)]
    for process in processes:
        process.start()
    dues = [due for _ in processes for due in queue.get(timeout=120)]
    for process in processes:
        process.join(timeout=30)
    assert len(dues) == 120
    ok, why = conforms(dues, 6000, 100)
    assert ok, why


# ------------------------------------------------------------------------------------ fairness
def test_two_workers_are_served_in_the_order_they_asked(client: redis.Redis) -> None:
    other = redis.Redis.from_url(_url(client))
    worker_a, worker_b = limiter(client, 60, horizon=100.0), limiter(other, 60, horizon=100.0)
    order = [worker_a, worker_b, worker_b, worker_a, worker_b, worker_a]
    dues = [worker.try_acquire(1, now_us=NOW).due_us for worker in order]
    assert dues == sorted(set(dues)), "first come, first served, across workers"
    other.close()


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def test_two_busy_workers_share_the_budget_evenly(client: redis.Redis) -> None:
    """Two threads of each worker ask in rounds until the horizon is full: both get a fair half.

    Each thread asks once a round and the round ends when all four have asked (a barrier): left free,
    one worker's threads could take every slot before the other's were scheduled on a busy machine,
    which would say nothing about the limiter.
    """
    other = redis.Redis.from_url(_url(client))
    workers = {"a": limiter(client, 60, horizon=40.0), "b": limiter(other, 60, horizon=40.0)}
    counts = {"a": 0, "b": 0}
    lock = threading.Lock()
    round_over = threading.Barrier(4)

    def ask(name: str) -> None:
        for _ in range(15):
            if workers[name].try_acquire(1, now_us=NOW).admitted:
                with lock:
                    counts[name] += 1
            round_over.wait()

    threads = [threading.Thread(target=ask, args=(name,)) for name in ("a", "a", "b", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counts["a"] + counts["b"] == 41  # the burst (1) and 40 s of slots: nobody over-admitted
    assert sorted(counts.values()) == [20, 21], counts  # 2 + 2 a round; round 11's one slot to either
    other.close()


# --------------------------------------------------------------------------------- separation
def test_keys_and_models_have_their_own_buckets(client: redis.Redis) -> None:
    model_a = limiter(client, 60, key=bucket_key("sk-one", "model-a"))
    model_b = limiter(client, 60, key=bucket_key("sk-one", "model-b"))
    other_key = limiter(client, 60, key=bucket_key("sk-two", "model-a"))
    assert model_a.try_acquire(30, now_us=NOW).seconds == 29.0
    assert model_b.try_acquire(1, now_us=NOW).seconds == 0.0
    assert other_key.try_acquire(1, now_us=NOW).seconds == 0.0
    assert len({model_a.key, model_b.key, other_key.key}) == 3


def test_the_key_holds_a_hash_of_the_api_key_never_the_key() -> None:
    api_key = "sk-live-0123456789abcdef0123456789abcdef"
    key = bucket_key(api_key, "doubao-seedream-4-0-250828")
    assert key.startswith(KEY_PREFIX)
    assert key.endswith(":doubao-seedream-4-0-250828")
    hashed = key[len(KEY_PREFIX) :].split(":")[0]
    assert len(hashed) == 32
    for piece in (api_key, api_key[:12], api_key[-12:], "0123456789abcdef"):
        assert piece not in key
    assert bucket_key(api_key, "m") != bucket_key(api_key + "x", "m")


# -------------------------------------------------------------------------------- stop, refund
def test_a_stopped_waiter_returns_at_once_and_gives_its_slots_back(client: redis.Redis) -> None:
    bucket = limiter(client, 60, horizon=30.0)
    for _ in range(5):
        bucket.try_acquire(1)  # 4 s of reservations ahead
    queued = int(client.get(KEY) or 0)
    stop = threading.Event()
    outcome: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: outcome.update(grant=bucket.acquire(2, stop)))
    waiter.start()
    assert wait_for(lambda: int(client.get(KEY) or 0) > queued), "the waiter reserved its slots"
    stop.set()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert outcome["grant"] is None
    assert int(client.get(KEY) or 0) == queued, "its two slots are free again"
    assert bucket.waited_seconds > 0


def test_a_caller_refused_by_the_horizon_stops_too(client: redis.Redis) -> None:
    bucket = limiter(client, 60, horizon=2.0)
    while bucket.try_acquire(1).admitted:
        pass
    stop = threading.Event()
    outcome: dict[str, object] = {}
    waiter = threading.Thread(target=lambda: outcome.update(grant=bucket.acquire(1, stop)))
    waiter.start()
    stop.set()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert outcome["grant"] is None


def test_a_grant_gives_back_only_once_and_never_more_than_it_holds(client: redis.Redis) -> None:
    bucket = limiter(client, 60, horizon=30.0)
    assert bucket.try_acquire(20).admitted  # 20 s of slots ahead, by the server's clock
    grant = Grant(bucket, images=4, due_us=0)
    tat = int(client.get(KEY) or 0)
    grant.refund(10)
    grant.refund(4)
    assert tat - int(client.get(KEY) or 0) == 4_000_000


# ---------------------------------------------------------------------------------- dead holder
def _greedy_holder(url: str, ready: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    """Reserve every slot the horizon allows, then wait for one more: killed while holding them."""
    bucket = AccountRateLimiter(redis.Redis.from_url(url), KEY, 60, horizon=3.0)
    while bucket.try_acquire(1).admitted:
        pass
    ready.set()
    bucket.acquire(1, threading.Event())


def test_a_worker_killed_holding_reservations_wastes_at_most_the_horizon(
    client: redis.Redis, redis_conn: RedisServer
) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    holder = context.Process(target=_greedy_holder, args=(redis_conn.url, ready))
    holder.start()
    try:
        assert ready.wait(60), "the holder reserved what it could"
    finally:
        holder.kill()
        holder.join(timeout=30)
    assert holder.exitcode is not None
    assert holder.exitcode < 0
    seconds, micros = client.time()
    held = int(client.get(KEY) or 0) - (seconds * 1_000_000 + micros)
    # What the dead holder reserved lies within the horizon (and one slot) of when it asked.
    assert held <= 4_000_000
    assert client.pttl(KEY) <= 4_000 + 1_000, "and the key goes once those slots are past"
    # The next worker is admitted, or told to ask again within one slot (to wait at most the horizon).
    ticket = limiter(client, 60, horizon=3.0).try_acquire(1)
    assert ticket.seconds <= (3.0 if ticket.admitted else 1.0)
