"""Where a deferred run waits: an async trigger polling a run's Visual API tasks in the triggerer.

A deferrable task submits its prompts, journals the task ids, then hands the waiting to Airflow's
triggerer with :class:`JiMengVisualTrigger`. The trigger polls every task (polls are free), backs off on
rate limits (``50429``/``50430``), and fires **one** :class:`~airflow.triggers.base.TriggerEvent` when every
task is done, failed, not found, expired or past its deadline. The event carries states only (no image,
no URL): the task resumes on a worker and polls the done tasks again to fetch and store their images.

Its kwargs hold task ids, the connection id, deadlines and the poll's ``req_json`` (the watermark
choice), never the secret: the triggerer reads the connection itself, and a restarted triggerer starts
again from the same kwargs, polling the same ids (nothing is ever submitted here).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent
from asgiref.sync import sync_to_async

from airflow_provider_jimeng.exceptions import JiMengAPIError, JiMengError, JiMengRateLimitError
from airflow_provider_jimeng.hooks.retry import RetryPolicy
from airflow_provider_jimeng.hooks.visual import TASK_TTL_SECONDS, VisualClient, VisualTaskResult
from airflow_provider_jimeng.version_compat import BaseHook

__all__ = ["DEADLINE", "JiMengVisualTrigger", "resume_hold_off", "task_deadline"]

log = logging.getLogger(__name__)

#: The outcome of a task still unfinished when its deadline passed.
DEADLINE = "deadline"
#: What a task still unfinished when the trigger gave up (an ``error`` event) is reported as.
PENDING = "pending"
DEFAULT_POLL_INTERVAL = 10.0
DEFAULT_MAX_POLL_INTERVAL = 120.0
DEFAULT_CONCURRENCY = 8


def task_deadline(submitted_at: float, *, ttl: float = TASK_TTL_SECONDS) -> float:
    """When to stop waiting for a task submitted at ``submitted_at`` (epoch seconds): when it expires."""
    return submitted_at + ttl


def _now() -> float:
    return time.time()


def resume_hold_off() -> float:
    """Seconds after deferring before the trigger may fire: ``[workers] min_heartbeat_interval`` plus one.

    The worker's supervisor notices that a deferring task process exited up to one
    ``min_heartbeat_interval`` late (it waits on the process's sockets, and they can close before the
    process can be reaped). A trigger firing sooner lets the task resume (same try, same executor key)
    while that first workload is still open; the scheduler then takes the late "success" of the
    deferral for a task that died while running and fails the resumed try (P9 saw it in its quick runs).
    Waiting out that window costs only a run whose tasks all finish within seconds of the deferral.
    """
    from airflow.configuration import conf

    return conf.getfloat("workers", "min_heartbeat_interval", fallback=5.0) + 1.0


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r:.40}")
    return float(value)


class JiMengVisualTrigger(BaseTrigger):
    """Poll a run's Visual API task ids until each is finished or past its deadline; fire once.

    :param task_ids: the run's task ids (journaled before deferring).
    :param deadlines: epoch seconds after which a task still unfinished is given up (``deadline``): one
        number for all, or one per task id. :func:`task_deadline` gives a task's expiry (12 h after submit).
    :param jimeng_conn_id: the ``jimeng`` connection (``api: visual``), read again in the triggerer.
    :param req_json: the poll's choice (``logo_info``, ``aigc_meta``); the trigger asks for URLs, which it
        never fetches, so the triggerer holds no image data. ``None``: the connection's ``watermark``.
    :param poll_interval: seconds between rounds of polls; doubled (with jitter) on each rate-limited round,
        up to ``max_poll_interval`` (a ``Retry-After`` wins).
    :param concurrency: polls in flight at once.
    :param poll_anchor: epoch seconds the rounds are counted from (they fall on ``poll_anchor + k *
        poll_interval``): the operator passes the end of its submits, so the triggerer polls on the clock
        a worker polling the same tasks would use, whenever it picks the trigger up (or a restarted one
        does). ``None``: from the trigger's start.
    :param fire_after: epoch seconds before which the event is held back (the operator passes the deferral's
        time plus :func:`resume_hold_off`). ``None``: fire at once.

    The event's payload: ``status`` (``success``, or ``error`` when the connection or the key pair is
    refused: nothing more can be learnt), ``tasks`` (task id to :meth:`VisualTaskResult.summary`, status one
    of ``done``, ``failed``, ``not_found``, ``expired``, ``deadline``, or ``pending`` in an error event),
    ``message`` and ``polls`` (requests made).
    """

    def __init__(
        self,
        *,
        task_ids: Sequence[str],
        deadlines: float | Mapping[str, float],
        jimeng_conn_id: str = "jimeng_default",
        req_json: Mapping[str, Any] | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        concurrency: int = DEFAULT_CONCURRENCY,
        poll_anchor: float | None = None,
        fire_after: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        ids = list(task_ids)
        if not ids or not all(isinstance(task_id, str) and task_id for task_id in ids) or len(set(ids)) != len(ids):
            raise ValueError("task_ids must be a non-empty list of distinct task id strings")
        if isinstance(deadlines, Mapping):
            missing = [task_id for task_id in ids if task_id not in deadlines]
            if missing:
                raise ValueError(f"deadlines has no deadline for task id(s) {missing[:3]}")
            self.deadlines = {task_id: float(deadlines[task_id]) for task_id in ids}
        else:
            self.deadlines = dict.fromkeys(ids, float(deadlines))
        self.task_ids = ids
        self.jimeng_conn_id = jimeng_conn_id
        self.req_json = dict(req_json) if req_json is not None else None
        self.poll_interval = _positive("poll_interval", poll_interval)
        self.max_poll_interval = max(self.poll_interval, _positive("max_poll_interval", max_poll_interval))
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a whole number >= 1, got {concurrency!r:.40}")
        self.concurrency = concurrency
        if poll_anchor is not None and (isinstance(poll_anchor, bool) or not isinstance(poll_anchor, (int, float))):
            raise ValueError(f"poll_anchor must be epoch seconds or None, got {poll_anchor!r:.40}")
        self.poll_anchor = None if poll_anchor is None else float(poll_anchor)
        if fire_after is not None and (isinstance(fire_after, bool) or not isinstance(fire_after, (int, float))):
            raise ValueError(f"fire_after must be epoch seconds or None, got {fire_after!r:.40}")
        self.fire_after = None if fire_after is None else float(fire_after)
        self.polls = 0

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "task_ids": list(self.task_ids),
                "deadlines": dict(self.deadlines),
                "jimeng_conn_id": self.jimeng_conn_id,
                "req_json": self.req_json,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "concurrency": self.concurrency,
                "poll_anchor": self.poll_anchor,
                "fire_after": self.fire_after,
            },
        )

    async def _client(self) -> VisualClient:
        """The connection read in the triggerer (async where Airflow offers it), the client built off the loop."""
        aget_connection = getattr(BaseHook, "aget_connection", None)
        if aget_connection is not None:
            conn = await aget_connection(self.jimeng_conn_id)
        else:  # Airflow < 3.2
            conn = await sync_to_async(BaseHook.get_connection)(self.jimeng_conn_id)
        client: VisualClient = await sync_to_async(VisualClient.from_connection)(conn)
        return client

    async def _event(
        self, status: str, outcomes: Mapping[str, dict[str, Any]], message: str | None = None
    ) -> TriggerEvent:
        """The one event, once ``fire_after`` has passed (see :func:`resume_hold_off`)."""
        if self.fire_after is not None and (hold := self.fire_after - _now()) > 0:
            log.info("Holding the event %.1fs, until the deferring worker has surely let go of the task", hold)
            await asyncio.sleep(hold)
        tasks = {
            task_id: outcomes.get(task_id) or VisualTaskResult(task_id, PENDING).summary() for task_id in self.task_ids
        }
        payload = {"status": status, "tasks": tasks, "message": message, "polls": self.polls}
        return TriggerEvent(payload)  # type: ignore[no-untyped-call]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        outcomes: dict[str, dict[str, Any]] = {}
        try:
            client = await self._client()
        except JiMengError as error:  # a connection that cannot work: a retry of the task says so again
            yield await self._event("error", outcomes, f"connection {self.jimeng_conn_id!r}: {error}")
            return
        req_json = {**(self.req_json or client.default_req_json()), "return_url": True}
        backoff = RetryPolicy(max_retries=0, backoff=self.poll_interval, max_wait=self.max_poll_interval)
        rate_limited_rounds = 0
        anchor = _now() if self.poll_anchor is None else self.poll_anchor
        pending = list(self.task_ids)
        log.info("Polling %d JiMeng Visual API task(s) on connection %s", len(pending), self.jimeng_conn_id)
        try:
            while True:
                now = _now()
                for task_id in [task_id for task_id in pending if now >= self.deadlines[task_id]]:
                    log.warning("JiMeng Visual API task %s is past its deadline: given up", task_id)
                    outcomes[task_id] = VisualTaskResult(task_id, DEADLINE).summary()
                    pending.remove(task_id)
                if not pending:
                    break
                rate_limit, fatal = await self._poll_round(client, pending, req_json, outcomes)
                if fatal is not None:
                    log.error("Polling JiMeng Visual API tasks stopped: %s", fatal)
                    yield await self._event("error", outcomes, str(fatal))
                    return
                pending = [task_id for task_id in pending if task_id not in outcomes]
                if not pending:
                    break
                if rate_limit is not None:
                    rate_limited_rounds += 1
                    wait = backoff.wait_seconds(rate_limit, rate_limited_rounds)
                    log.info("JiMeng Visual API polls rate-limited (%s); next round in %.2fs", rate_limit.code, wait)
                else:
                    rate_limited_rounds = 0
                    wait = self._until_next_round(anchor, _now())
                next_deadline = min(self.deadlines[task_id] for task_id in pending)
                await asyncio.sleep(max(0.0, min(wait, next_deadline - _now())))
        finally:
            client.close()  # closes pooled sockets only: quick, and safe while a cancelled poll's thread ends
        done = sum(1 for outcome in outcomes.values() if outcome["status"] == "done")
        log.info("JiMeng Visual API: %d of %d task(s) done after %d poll(s)", done, len(self.task_ids), self.polls)
        yield await self._event("success", outcomes)

    def _until_next_round(self, anchor: float, now: float) -> float:
        """Seconds until the next ``anchor + k * poll_interval`` after ``now`` (a round that overran skips a tick)."""
        ticks = math.floor((now - anchor) / self.poll_interval) + 1
        return min(self.poll_interval, max(0.0, anchor + ticks * self.poll_interval - now))

    async def _poll_round(
        self,
        client: VisualClient,
        pending: Sequence[str],
        req_json: Mapping[str, Any],
        outcomes: dict[str, dict[str, Any]],
    ) -> tuple[JiMengRateLimitError | None, JiMengError | None]:
        """Poll each pending task once (``concurrency`` at a time); record the finished ones.

        Returns the rate limit met (the rest of the round is skipped) and the error that ends polling
        (authentication, an invalid request, the connection), if any. Other failures (timeouts, server
        errors, broken answers) leave the task pending for the next round.
        """
        gate = asyncio.Semaphore(self.concurrency)
        rate_limit: JiMengRateLimitError | None = None
        fatal: JiMengError | None = None

        async def poll(task_id: str) -> None:
            nonlocal rate_limit, fatal
            async with gate:
                if rate_limit is not None or fatal is not None:
                    return
                self.polls += 1
                try:
                    outcome = await asyncio.to_thread(client.poll_once, task_id, req_json)
                except JiMengRateLimitError as error:
                    rate_limit = rate_limit or error
                    return
                except JiMengAPIError as error:
                    if not error.retryable:
                        fatal = fatal or error
                        return
                    log.warning("Poll of JiMeng Visual API task %s failed (%s): polled again", task_id, error.code)
                    return
                except JiMengError as error:
                    fatal = fatal or error
                    return
                if outcome.finished:
                    log.info("JiMeng Visual API task %s: %s", task_id, outcome.status)
                    outcomes[task_id] = outcome.summary()

        await asyncio.gather(*(poll(task_id) for task_id in pending))
        return rate_limit, fatal
