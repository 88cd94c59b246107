"""The account-wide rate limiter: one images-per-minute budget for every task that uses an API key.

The service limits images per minute per account and model (500 by default; a set counts each
image). A per-task pacer can only divide that budget statically among pool slots, which wastes the
share of every idle slot. This limiter keeps the budget in the deployment's Redis instead, so a task
running alone gets all of it and many tasks on many workers together never exceed it.

It is GCRA (virtual scheduling) in one Lua script, timed by the Redis server's clock: the key holds
the theoretical arrival time (TAT) of the next image. :meth:`AccountRateLimiter.acquire` reserves a
request's images as consecutive time slots, in arrival order across every worker (FIFO), and the
caller waits until its slot is due. About one second's worth of images may go at once (the burst),
like :class:`~airflow_provider_jimeng.hooks.pacing.ImageRatePacer`, so throughput reaches the cap
without tripping the server's own token bucket.

Nobody reserves more than ``horizon`` seconds ahead (or one request's own length, for a set larger
than that): a worker killed while holding reservations wastes at most that much of the budget, and
the key expires once its reservations are past. A waiter that is stopped gives its slots back, and a
request that billed fewer images than it reserved (a set stops early) returns the difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from redis import Redis
    from redis.commands.core import Script

KEY_PREFIX = "jimeng:ratelimit:"
#: The furthest ahead one caller may reserve: what a worker killed while waiting can waste at most.
DEFAULT_HORIZON_SECONDS = 10.0
#: A refused caller asks again after at least this long (and at most the horizon).
MIN_RETRY_SECONDS = 0.01
#: Kept after the last reservation is due: the key then means "bucket full" and may go.
KEY_TTL_MARGIN_MS = 1000

# The server's clock in microseconds (worker clocks never matter); a trailing "now" argument (tests
# only) replaces it. ``SET ... PX`` keeps a key until its last reservation is due, and a little more.
_PROLOGUE = """
-- Redis 3.2-4 replicate a script that reads TIME and then writes only as its effects, when asked.
if redis.replicate_commands then redis.replicate_commands() end
local now
if ARGV[{index}] and ARGV[{index}] ~= '' then
  now = tonumber(ARGV[{index}])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function store(tat)
  local ttl = math.ceil((tat - now) / 1000) + {margin}
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl))
end
"""

#: KEYS[1] the bucket; ARGV: images, interval (us per image), burst (images), horizon (us), [now].
#: Returns {admitted (1/0), wait or retry-after (us), the TAT (us) after it, the server's now (us)}.
ACQUIRE_SCRIPT = (
    _PROLOGUE.format(index=5, margin=KEY_TTL_MARGIN_MS)
    + """
local images = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local cost = images * interval
local new_tat = tat + cost
local wait = new_tat - burst * interval - now
if wait < 0 then wait = 0 end
-- A request longer than the horizon still gets in once nobody is ahead of it.
local reach = horizon
if cost > reach then reach = cost end
if wait > reach and tat > now then
  return {0, math.ceil(wait - reach), math.floor(tat), math.floor(now)}
end
store(new_tat)
return {1, math.ceil(wait), math.floor(new_tat), math.floor(now)}
"""
)

#: KEYS[1] the bucket; ARGV: images to give back, interval (us per image), [now]. Returns the new TAT.
#: The TAT never goes below now: a bucket holds at most its burst, as the server's does.
REFUND_SCRIPT = (
    _PROLOGUE.format(index=3, margin=KEY_TTL_MARGIN_MS)
    + """
local images = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local tat = tonumber(current) - images * interval
if tat <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
store(tat)
return math.floor(tat)
"""
)


class RateLimiterUnavailableError(RuntimeError):
    """Redis could not be reached or refused the script; the caller decides what to do instead."""


def bucket_key(api_key: str, model: str) -> str:
    """The Redis key of one account and model: a hash of the API key (never the key) and the model id."""
    digest = hashlib.sha256(b"airflow-provider-jimeng ratelimit\0" + api_key.encode("utf-8")).hexdigest()[:32]
    return f"{KEY_PREFIX}{digest}:{model}"


class Ticket(NamedTuple):
    """One answer of the acquire script."""

    admitted: bool
    #: Admitted: seconds to wait before sending; refused: seconds after which to ask again.
    seconds: float
    #: Admitted: when the request may be sent, by the Redis server's clock (microseconds).
    due_us: int


@dataclass
class Grant:
    """Images reserved on the shared bucket by one request; give back what it did not use, once."""

    limiter: AccountRateLimiter
    images: int
    #: When the request was allowed to go, by the Redis server's clock (microseconds).
    due_us: int
    waited: float = 0.0
    _open: bool = True

    def refund(self, images: int) -> None:
        """Give ``images`` back (not sent, or not billed); later calls do nothing."""
        if not self._open:
            return
        self._open = False
        if images > 0:
            self.limiter.refund(min(images, self.images))

    def keep(self) -> None:
        """The images were (or may have been) used: nothing to give back."""
        self._open = False


class AccountRateLimiter:
    """A GCRA bucket on Redis for one account and model, shared by every task and worker using it.

    :param client: the deployment's Redis (:func:`~airflow_provider_jimeng.coordination.redis_client.shared_redis`).
    :param key: from :func:`bucket_key`.
    :param images_per_minute: the account's limit for the model.
    :param horizon: how far ahead one caller may reserve, in seconds.
    """

    def __init__(
        self,
        client: Redis,
        key: str,
        images_per_minute: float,
        *,
        horizon: float = DEFAULT_HORIZON_SECONDS,
    ) -> None:
        if images_per_minute <= 0:
            raise ValueError("images_per_minute must be positive")
        self.key = key
        self.images_per_minute = images_per_minute
        self.interval_us = 60_000_000.0 / images_per_minute
        #: About one second's worth, never less than one image (the local pacer's burst).
        self.burst = max(1.0, images_per_minute / 60.0)
        self.horizon_us = horizon * 1_000_000
        self._acquire: Script = client.register_script(ACQUIRE_SCRIPT)
        self._refund: Script = client.register_script(REFUND_SCRIPT)
        self._lock = threading.Lock()
        self.waited_seconds = 0.0

    def _run(self, script: Script, args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return script(keys=[self.key], args=args)
        except RedisError as exc:
            raise RateLimiterUnavailableError(f"its Redis failed: {type(exc).__name__}") from None

    def try_acquire(self, images: int, *, now_us: int | None = None) -> Ticket:
        """Reserve ``images`` if the wait stays within the horizon; else reserve nothing (see :class:`Ticket`)."""
        args: list[Any] = [images, repr(self.interval_us), repr(self.burst), repr(self.horizon_us)]
        if now_us is not None:
            args.append(now_us)
        admitted, micros, _, now = self._run(self._acquire, args)
        return Ticket(bool(admitted), int(micros) / 1_000_000, int(now) + int(micros))

    def acquire(self, images: int, stop: threading.Event) -> Grant | None:
        """Reserve ``images`` and wait until they are due; ``None`` if ``stop`` was set first.

        A stopped waiter gives its slots back. Raises :class:`RateLimiterUnavailableError` when Redis
        fails (nothing is then reserved, or what was is lost: never more than the horizon).
        """
        started = time.monotonic()
        while not (ticket := self.try_acquire(images)).admitted:
            if stop.wait(min(max(ticket.seconds, MIN_RETRY_SECONDS), self.horizon_us / 1_000_000)):
                self._add_wait(time.monotonic() - started)
                return None
        grant = Grant(self, images, ticket.due_us)
        if ticket.seconds > 0 and stop.wait(ticket.seconds):
            self._add_wait(time.monotonic() - started)
            # If Redis fails now, the slots stay reserved: at most the horizon is lost, and the key expires.
            with contextlib.suppress(RateLimiterUnavailableError):
                grant.refund(images)
            return None
        grant.waited = time.monotonic() - started
        self._add_wait(grant.waited)
        return grant

    def refund(self, images: int, *, now_us: int | None = None) -> None:
        """Give back ``images`` that were reserved and never sent (or not billed)."""
        args: list[Any] = [images, repr(self.interval_us)]
        if now_us is not None:
            args.append(now_us)
        self._run(self._refund, args)

    def _add_wait(self, seconds: float) -> None:
        with self._lock:
            self.waited_seconds += seconds
