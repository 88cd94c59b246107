"""The hook and the operator on the account-wide limiter: when it applies, what the extras accept, what
stopping, refunds and a Redis outage do, and two operator runs that together stay under the cap."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from airflow_provider_jimeng.coordination.ratelimit import KEY_PREFIX, AccountRateLimiter
from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError, JiMengTimeoutError
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.testing import RedisServer, jimeng_connection_json, redis_connection_json
from tests.hooks.conftest import CapturedLogs, logs, make_hook, wait_for  # noqa: F401  (fixtures)
from tests.operators.conftest import RecordingTaskInstance

SHARED = {"redis_conn_id": "redis_shared", "account_images_per_minute": 600}


def connect(monkeypatch: pytest.MonkeyPatch, emulator: JiMengEmulator, **extras: Any) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(emulator.base_url, **extras))


def limiter_keys(server: RedisServer) -> list[str]:
    return [key.decode() for key in redis.Redis.from_url(server.url).scan_iter(f"{KEY_PREFIX}*")]


def warnings_of(logs: CapturedLogs) -> list[str]:  # noqa: F811
    return [str(entry["event"]) for entry in logs.hook_events if entry.get("log_level") == "warning"]


# ------------------------------------------------------------------------------- when it applies
def test_both_extras_pace_every_request_on_the_shared_bucket_keyed_by_a_hash(
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    logs: CapturedLogs,  # noqa: F811
) -> None:
    connect(monkeypatch, jimeng_conn, **SHARED)
    hook = make_hook()
    hook.generate_images("a lighthouse")
    hook.generate_images("a lighthouse", model="doubao-seedream-4-5-251128")

    assert hook.pacer is None, "no per-task pace unless max_images_per_minute asks for one"
    keys = limiter_keys(redis_conn)
    assert sorted(key.rsplit(":", 1)[1] for key in keys) == ["doubao-seedream-4-0-250828", "doubao-seedream-4-5-251128"]
    for key in keys:
        assert DEFAULT_API_KEY not in key
    assert DEFAULT_API_KEY not in logs.text
    assert "rate_limit_wait_ms" in hook.stats


def test_a_redis_conn_id_without_an_account_limit_does_not_limit(
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connect(monkeypatch, jimeng_conn, redis_conn_id="redis_shared")
    hook = make_hook()
    hook.generate_images("a lighthouse")
    assert hook.account_limiter("doubao-seedream-4-0-250828") is None
    assert limiter_keys(redis_conn) == []


def test_a_task_pace_and_the_account_limit_both_apply(
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connect(monkeypatch, jimeng_conn, max_images_per_minute=300, **SHARED)
    hook = make_hook()
    hook.generate_images("a lighthouse")
    assert hook.pacer is not None
    assert hook.pacer.rate == 5.0
    assert len(limiter_keys(redis_conn)) == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [("None", None), ("", None), (" null ", None), ("1e3", 1000.0), (250, 250.0)],
)
def test_account_limit_values_a_template_renders(
    value: Any,
    expected: float | None,
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connect(monkeypatch, jimeng_conn, redis_conn_id="redis_shared", account_images_per_minute=value)
    assert JiMengHook().config.account_images_per_minute == expected


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "[500]", "500 ipm", 0.5, True])
def test_account_limit_values_that_are_refused_name_the_extra(
    value: Any, jimeng_conn: JiMengEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect(monkeypatch, jimeng_conn, redis_conn_id="redis_shared", account_images_per_minute=value)
    with pytest.raises(JiMengConfigurationError) as raised:
        _ = JiMengHook().config
    assert raised.value.parameter == "account_images_per_minute"


@pytest.mark.parametrize(
    "value", ["['redis_shared']", "{{ var.value.redis }}", "redis shared", 7, ["redis_shared"], {"id": "redis"}]
)
def test_redis_conn_id_values_that_are_refused_name_the_extra(
    value: Any, jimeng_conn: JiMengEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    connect(monkeypatch, jimeng_conn, redis_conn_id=value, account_images_per_minute=500)
    with pytest.raises(JiMengConfigurationError) as raised:
        _ = JiMengHook().config
    assert raised.value.parameter == "redis_conn_id"


def test_a_redis_connection_that_does_not_exist_fails_the_task_before_sending(
    jimeng_conn: JiMengEmulator,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connect(monkeypatch, jimeng_conn, redis_conn_id="redis_nowhere", account_images_per_minute=500)
    with pytest.raises(JiMengConfigurationError) as raised:
        make_hook().generate_images("a lighthouse")
    assert raised.value.parameter == "redis_conn_id"
    assert jimeng_conn.request_count == 0


# --------------------------------------------------------------------------------- stop, refund
def test_stop_interrupts_a_request_waiting_on_the_account_limit_and_frees_its_slots(
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connect(monkeypatch, jimeng_conn, redis_conn_id="redis_shared", account_images_per_minute=60)
    hook = make_hook()
    bucket = hook.account_limiter("doubao-seedream-4-0-250828")
    assert bucket is not None
    for _ in range(6):
        assert bucket.try_acquire(1).admitted  # another worker holds the next 5 s
    client = redis.Redis.from_url(redis_conn.url)
    queued = int(client.get(bucket.key) or 0)
    outcome: dict[str, Any] = {}

    def send() -> None:
        try:
            hook.generate_images("a lighthouse")
        except JiMengTimeoutError as error:
            outcome["error"] = error

    sender = threading.Thread(target=send)
    sender.start()
    assert wait_for(lambda: int(client.get(bucket.key) or 0) > queued), "the request took its slot"
    # Its slot is 5 s away, so it is still waiting: holding the stop back 20 ms gives the wait a floor
    # the stats must show (stopped at once, a fast Redis made the whole wait round to 0 ms on CI).
    time.sleep(0.02)
    hook.stop()
    sender.join(timeout=5)

    assert not sender.is_alive()
    assert outcome["error"].code == "Stopped"
    assert jimeng_conn.request_count == 0
    assert int(client.get(bucket.key) or 0) == queued, "its slot was given back"
    assert hook.stats["rate_limit_wait_ms"] >= 20


@pytest.fixture
def refunds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The images each refund gives back to the account limiter, in order (the refunds still happen)."""
    given_back: list[int] = []
    original = AccountRateLimiter.refund

    def spy(self: AccountRateLimiter, images: int, **kwargs: Any) -> None:
        given_back.append(images)
        original(self, images, **kwargs)

    monkeypatch.setattr(AccountRateLimiter, "refund", spy)
    return given_back


def test_a_set_that_billed_fewer_images_than_reserved_gives_the_rest_back(
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    refunds: list[int],
) -> None:
    connect(monkeypatch, jimeng_conn, **SHARED)
    hook = make_hook()
    result = hook.generate_images("a set of pictures", sequential_image_generation="auto", max_images=6)
    assert result.billed_images == 3  # the emulator makes 3 when the prompt names no number
    hook.generate_images("one picture")
    assert refunds == [3], "the set's 3 unbilled images; a single image billed what it reserved"


def test_a_set_that_broke_off_keeps_every_slot(
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    refunds: list[int],
) -> None:
    """The images a broken-off stream did not deliver may have been generated (the emulator bills the
    whole set): nothing goes back to the shared bucket. Regression (issue 20, mutation 17): refunding
    ``images - billed`` for a broken set passed the suite."""
    connect(monkeypatch, jimeng_conn, **SHARED)
    jimeng_conn.inject(Fault("truncated"))  # half the set streamed, then the stream ends early
    result = make_hook().generate_images(
        "a comic in 4 images", sequential_image_generation="auto", max_images=4, stream=True, size="1K"
    )
    assert result.truncated
    assert result.billed_images == 2
    assert wait_for(lambda: jimeng_conn.billed_images == 4)  # the service billed the whole set
    assert refunds == [], "a set that broke off keeps its slots: its undelivered images were billed"


def test_a_gateway_of_four_images_reserves_four_slots_per_request(
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    refunds: list[int],
) -> None:
    """Regression (issue 20, break 6): the limiter took 1 slot for the 4 images such a gateway bills."""
    reserved: list[int] = []
    original = AccountRateLimiter.try_acquire

    def spy(self: AccountRateLimiter, images: int, **kwargs: Any) -> Any:
        reserved.append(images)
        return original(self, images, **kwargs)

    monkeypatch.setattr(AccountRateLimiter, "try_acquire", spy)
    jimeng_conn.images_per_request = 4
    connect(monkeypatch, jimeng_conn, images_per_request=4, **SHARED)
    result = make_hook().generate_images("a lighthouse")
    assert len(result.succeeded) == jimeng_conn.billed_images == 4
    assert reserved == [4]
    assert refunds == []


def test_an_error_answer_keeps_its_slots(
    jimeng_conn: JiMengEmulator,
    redis_conn: RedisServer,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    refunds: list[int],
) -> None:
    """A 429 may mean others use the key outside the limiter: giving its slots back would feed a storm."""
    connect(monkeypatch, jimeng_conn, **SHARED)
    jimeng_conn.inject(Fault("rate_limit", times=2, retry_after=0.01))
    make_hook().generate_images("a lighthouse")
    assert refunds == []


# ------------------------------------------------------------------------------------ Redis down
@pytest.fixture
def doomed_redis(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Redis of the test's own (the test stops it), under a connection id no other test caches."""
    server = RedisServer().start()
    conn_id = f"redis_doomed_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", redis_connection_json(server.url))
    yield server, conn_id
    server.stop()


@pytest.mark.parametrize("own_pace", [False, True])
def test_redis_going_down_mid_run(
    own_pace: bool,
    doomed_redis: Any,
    jimeng_conn: JiMengEmulator,
    make_hook: Callable[..., JiMengHook],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    logs: CapturedLogs,  # noqa: F811
) -> None:
    """Without its own pace a task sends nothing (each attempt fails before sending and is retried);
    with one it goes on at that pace. Either way the outage is logged once, not per request."""
    server, conn_id = doomed_redis
    extras: dict[str, Any] = {"redis_conn_id": conn_id, "account_images_per_minute": 600}
    if own_pace:
        extras["max_images_per_minute"] = 600
    connect(monkeypatch, jimeng_conn, **extras)
    hook = make_hook(max_retries=2)
    hook.generate_images("before the outage")
    server.stop()

    if own_pace:
        with ThreadPoolExecutor(4) as pool:  # the task's threads all meet the outage
            list(pool.map(lambda index: hook.generate_images(f"during the outage {index}"), range(4)))
        assert jimeng_conn.request_count == 5
    else:
        with pytest.raises(JiMengTimeoutError) as raised:
            hook.generate_images("during the outage")
        assert raised.value.code == "RateLimiterUnavailable"
        assert not raised.value.possibly_billed
        assert hook.stats["retries"] == 2
        assert jimeng_conn.request_count == 1, "nothing was sent unpaced"
    outage = [line for line in warnings_of(logs) if "rate limiter is unavailable" in line]
    assert len(outage) == 1, outage


# ------------------------------------------------------------------------------------ operators
@pytest.mark.parametrize("shared", [True, False])
def test_two_operator_runs_on_one_account_get_no_429s(
    shared: bool, jimeng_conn: JiMengEmulator, redis_conn: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tasks (as on two workers), each free to use the whole cap, against a token bucket of 120
    images a minute: together they keep to it. Without the limiter (the control) the same runs get 429s."""
    jimeng_conn.images_per_minute = 120
    jimeng_conn.rate_limit_burst = 4
    jimeng_conn.latency = 0.1
    extras: dict[str, Any] = {"retry_backoff": 0.05, "max_retries": 10}
    if shared:
        extras.update(redis_conn_id="redis_shared", account_images_per_minute=120)
    connect(monkeypatch, jimeng_conn, **extras)
    results: dict[str, Any] = {}

    def run(name: str) -> None:
        operator = JiMengGenerateOperator(
            task_id=name, prompt=[f"{name} picture {index}" for index in range(6)], size="1K", max_concurrency=4
        )
        ti = RecordingTaskInstance(task_id=name)
        try:
            operator.execute({"ti": ti})  # type: ignore[typeddict-item]
        except BaseException as error:
            results[name] = error
        else:
            results[name] = ti.pushed["usage"]

    threads = [threading.Thread(target=run, args=(name,)) for name in ("task_a", "task_b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert all(isinstance(usage, dict) for usage in results.values()), results
    assert jimeng_conn.billed_images == 12
    if shared:
        assert [results[name]["rate_limited"] for name in ("task_a", "task_b")] == [0, 0]
        assert jimeng_conn.rate_limited_count == 0
    else:
        assert jimeng_conn.rate_limited_count > 0
