"""Where one try of a task runs: :class:`GenerationRun` owns everything that lives for one try.

The run first decides, per prompt, what earlier tries left to reuse (:func:`~..storage.records.resume_plan`),
then generates on one pool and stores on another, so that storage never holds up generation. Every
answer is journaled the moment it arrives. Whatever ends the try early (a fatal API error, S3
failing, the task's ``execution_timeout``, ``on_kill`` or SIGTERM) stops sending at once: prompts
not yet sent are cancelled, requests already in flight are waited for and journaled (they are
paid for), what is finished is recorded, and the try fails so that a retry can finish the rest
without paying again.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

from airflow_provider_jimeng.api.request import reference_image_count
from airflow_provider_jimeng.api.response import GeneratedImage, GenerationResult
from airflow_provider_jimeng.budget import ByteBudget, SpendingCap
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengAuthenticationError,
    JiMengConfigurationError,
    JiMengContentPolicyError,
    JiMengDownloadError,
    JiMengDownloadInterruptedError,
    JiMengError,
    JiMengInvalidRequestError,
    JiMengQuotaExceededError,
    JiMengRunStoppedError,
    JiMengStorageError,
)
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.options import RunOptions
from airflow_provider_jimeng.run.outcome import Answer, PromptOutcome, Stored, describe_error, image_failure
from airflow_provider_jimeng.storage.base import ImageStore
from airflow_provider_jimeng.storage.journal import JournalWriter
from airflow_provider_jimeng.storage.keys import prompt_fingerprint
from airflow_provider_jimeng.storage.publications import publish
from airflow_provider_jimeng.storage.records import (
    DeliveredImage,
    FinishStoring,
    Generate,
    JournaledImage,
    JournalEntry,
    PromptRecord,
    ResumePlan,
    Reuse,
    StoredImage,
    TopUp,
    answer_from_stored_objects,
    answer_metadata,
    committed_images,
    gap_index,
    images_to_retry,
    resume_plan,
    sum_usage,
    try_usage,
)

#: Memory a b64_json answer takes per byte of body while parsed: the body, its text and the decoded
#: string coexist, and the C allocator keeps some of it (measured: ~4x the body's Content-Length).
B64_MEMORY_FACTOR = 4
#: What an answer or download without Content-Length is assumed to weigh.
UNKNOWN_BODY_BYTES = 8 * 1024 * 1024
#: Transient buffers of a streamed download on top of the image (one read chunk, copied once).
DOWNLOAD_READ_OVERHEAD = 2 * 1024 * 1024
#: Errors that no other prompt of the run could escape either: stop submitting work at once.
_FATAL_ERRORS = (JiMengAuthenticationError, JiMengQuotaExceededError, JiMengConfigurationError)


#: The image a failure line is about (``prompt 3 image 2: ...``, :func:`~.outcome.image_failure`).
_IMAGE_FAILURE = re.compile(r"^prompt \d+ image (\d+):")


def failed_image(line: str) -> int | None:
    """The image index a failure line names, or ``None`` for a line about the whole prompt."""
    match = _IMAGE_FAILURE.match(line)
    return int(match.group(1)) if match else None


def topup_body(body: Mapping[str, Any], images: int) -> dict[str, Any]:
    """The request for ``images`` more images of ``body``'s prompt: a set of at most that many (or ``n``)."""
    topup = dict(body)
    if topup.get("sequential_image_generation") == "auto":
        topup["sequential_image_generation_options"] = {
            **(topup.get("sequential_image_generation_options") or {}),
            "max_images": images,
        }
    elif isinstance(topup.get("n"), int) and not isinstance(topup.get("n"), bool) and topup["n"] > 1:
        topup["n"] = images
    return topup


def is_fatal(error: BaseException) -> bool:
    """Whether no other prompt of the run could escape this error (bad key, spending cap, bad request)."""
    if not isinstance(error, JiMengError):
        return True
    return isinstance(error, _FATAL_ERRORS) or (
        isinstance(error, JiMengInvalidRequestError) and not isinstance(error, JiMengContentPolicyError)
    )


#: Codes of the hook's errors raised before a request left: stopped while waiting, the limiter's Redis down.
_NOT_SENT_CODES = frozenset({"Stopped", "RateLimiterUnavailable"})


def never_sent(error: BaseException) -> bool:
    """Whether the prompt's request never left: it is no request in ``usage`` (it cost nothing).

    The run stopped before it was sent, the spending cap or a configuration check refused it, or the
    hook was stopped while it waited for its turn. Such an error carries no request id.
    """
    if isinstance(error, (CancelledError, JiMengConfigurationError)):
        return True
    return isinstance(error, JiMengAPIError) and error.code in _NOT_SENT_CODES and error.request_id is None


def _web_searches(usage: Mapping[str, Any]) -> int:
    tools = usage.get("tool_usage")
    count = tools.get("web_search") if isinstance(tools, Mapping) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


class GenerationRun:
    """One try of a task: its pools, its cancellation, its charges and its journal writer.

    :param hook: the JiMeng hook (shared HTTP session and pacer).
    :param bodies: one validated request body per prompt.
    :param store: the task's store, or ``None`` to hand signed URLs downstream.
    :param options: how to spend, store and fail.
    :param spending_cap: the images this try may bill, retries of possibly-billed requests included.
    :param try_number: Airflow's try number, written beside this try's counters in ``records.json``.
    :param budget_first_try: the first try of the series that shares ``spending_cap`` (Airflow's
        automatic retries; a cleared task starts a new series). What those earlier tries billed or
        possibly billed counts against the cap. ``None``: every earlier try counts.
    :param replace_from: with ``replace=True``, the try number that began this run of tries (the
        first try, or the first after the task was cleared): a later try (an automatic retry) reuses
        what tries from that one on paid for, as ``replace`` means once per run, not once per try.
    """

    def __init__(
        self,
        *,
        hook: JiMengHook,
        bodies: Sequence[dict[str, Any]],
        store: ImageStore | None,
        options: RunOptions,
        spending_cap: SpendingCap,
        log: Any,
        try_number: int | None = None,
        budget_first_try: int | None = None,
        replace_from: int | None = None,
    ) -> None:
        self.hook = hook
        self.bodies = list(bodies)
        self.store = store
        self.options = options
        self.spending_cap = spending_cap
        self.log = log
        self.fingerprints = [prompt_fingerprint(body) for body in self.bodies]
        self.outcomes = [PromptOutcome(prompt_index=index) for index in range(len(self.bodies))]
        #: The error that ended the run early, if one did (the first one).
        self.fatal: BaseException | None = None
        self._stop = threading.Event()
        self._stopped_by: str | None = None
        #: Caps the image bytes in memory (b64_json answers, downloads) whatever N and max_concurrency.
        self._budget = ByteBudget(stop=self._stop)
        #: Bytes of the budget each generated-but-unstored b64_json answer holds, by prompt.
        self._charges: dict[int, int] = {}
        self._storage_error: JiMengStorageError | None = None
        #: Set by a generation thread the moment an error stops the run, so that no queued prompt is sent.
        self._halted: BaseException | None = None
        self._journal_writer: JournalWriter | None = None
        self._b64 = any(body.get("response_format") == "b64_json" for body in self.bodies)
        self.try_number = try_number
        self.budget_first_try = budget_first_try
        #: What earlier tries paid for is reused only from this try number on (``None``: from any try).
        self.reuse_from: int | None = None
        #: replace=True and this try begins the run of tries: nothing earlier is reused.
        self.replacing = options.replace
        if options.replace and try_number is not None and replace_from is not None and try_number > replace_from:
            self.replacing, self.reuse_from = False, replace_from
        #: Tells this try's journal objects and counters apart from every other try's.
        self.try_token = uuid.uuid4().hex[:12]
        #: Earlier tries' counters by try token, read before the first request (``usage`` sums them).
        self.earlier_tries: dict[str, dict[str, Any]] = {}
        self._earlier_from_fallback = False
        #: Earlier records whose transiently failed images this try asks for again, by prompt.
        self._topups: dict[int, PromptRecord] = {}
        #: The images of each prompt's stored answer to ask for again (written to its record).
        self._retry_images: dict[int, tuple[int, ...]] = {}
        #: This try's own counts, kept on the generation threads as answers arrive (journal snapshots read them).
        self._counts_lock = threading.Lock()
        self._counts = {"requests": 0, "output_tokens": 0, "total_tokens": 0, "web_searches": 0}

    # ------------------------------------------------------------------------------------- control
    def stop(self, reason: str) -> None:
        """Send nothing more (``on_kill``, SIGTERM); answers in flight are still journaled. Any thread."""
        self._stopped_by = self._stopped_by or reason
        self._stop.set()
        self.hook.stop()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ----------------------------------------------------------------------------------------- run
    def execute(self) -> None:
        """Run the try to its end; ``fatal`` and the outcomes say how it went. Re-raises interruptions."""
        store = self.store
        existing: dict[str, int] = {}
        plans: dict[int, ResumePlan] = {}
        earlier_journals: dict[str, set[int]] = {}
        if store is not None:
            existing = store.existing_keys(first=True)
            earlier = store.read_earlier(existing, len(self.bodies))
            # Earlier tries count in this one's usage, replace=True or not: what they billed was billed.
            self.earlier_tries = earlier.tries
            self._earlier_from_fallback = earlier.fallback_usage
            self._carry_earlier_spending()
            if self.replacing:
                # Nothing earlier is reused; earlier tries' journals go once records.json is written.
                earlier_journals = {key: set() for key in earlier.journal_objects}
            else:
                records, journals, earlier_journals = earlier.records, earlier.journals, earlier.journal_objects
                if self.reuse_from is not None:
                    # A retry of a replacing try: reuse what this run of tries paid for, not what it replaces.
                    records = {i: r for i, r in records.items() if self._paid_since_replace(r.try_number)}
                    journals = {i: e for i, e in journals.items() if self._paid_since_replace(e.try_number)}
                now = time.time()
                keyspace = store.keyspace
                for index in range(len(self.bodies)):
                    plans[index] = resume_plan(
                        fingerprint=self.fingerprints[index],
                        record=records.get(index),
                        journal=journals.get(index),
                        stored_keys=existing,
                        image_key=functools.partial(keyspace.image_key, index),
                        now=now,
                    )
                    if isinstance(plans[index], Generate):
                        plans[index] = self._recognise_stored_answer(store, index, existing) or plans[index]
            self._journal_writer = JournalWriter(
                store,
                on_failure=self._on_storage_failure,
                usage=lambda: self._usage_document(final=False),
                try_token=self.try_token,
                # Paid answers not yet in S3 stay within about two rounds, however slowly S3 fails.
                max_unconfirmed=2 * self.options.max_concurrency,
            )
        interrupted: BaseException | None = None
        try:
            self._run(plans, existing)
        except BaseException as error:  # the timeout, after _run stopped sending and drained the pools
            interrupted = error
        finally:
            if self._journal_writer is not None:
                self._journal_writer.close()
        if store is not None:
            # Also when interrupted: what is finished gets its record, so a retry reuses it without a HEAD.
            self.fatal = self._write_records(store, earlier_journals) or self.fatal
        if interrupted is not None:
            raise interrupted
        if self._stopped_by is not None and self.fatal is None:
            self.fatal = JiMengRunStoppedError(self._stopped_by)

    def _carry_earlier_spending(self) -> None:
        """Charge the spending cap with what earlier tries of this budget committed, before any request."""
        spent = committed_images(self.earlier_tries.values(), self.budget_first_try)
        if not spent:
            return
        self.spending_cap.carry(spent)
        limit = self.spending_cap.limit
        self.log.info(
            "Earlier tries of this task instance billed or possibly billed %d image(s)%s",
            spent,
            f"; max_images_per_task={limit} leaves {max(0, limit - spent)}" if limit is not None else "",
        )

    def _recognise_stored_answer(
        self, store: ImageStore, index: int, existing: Mapping[str, int]
    ) -> FinishStoring | None:
        """An answer whose images were all stored by a try killed before its journal reached S3.

        Only prompts with images under their keys but no journal or record get here (a retry after a
        crash), so the ``HEAD`` requests cost nothing on a first try.
        """
        keyspace = store.keyspace
        candidates = {
            image: keyspace.image_key(index, image) for image in range(self.hook.images_billed(self.bodies[index]))
        }
        found = {image: key for image, key in candidates.items() if key in existing}
        if not found:
            return None
        answer = answer_from_stored_objects(
            self.fingerprints[index], {image: store.head(key) for image, key in found.items()}
        )
        if answer is None or not self._paid_since_replace(answer.try_number):
            return None
        self.log.info(
            "Prompt %d: %d image(s) an earlier try stored before its journal reached %s vouch for their answer; "
            "reusing them (no new request)",
            index,
            len(answer.images),
            store.storage_name,
        )
        entry = dataclasses.replace(answer, prompt_index=index)
        return FinishStoring(entry, stored=entry.images, missing=())

    def _paid_since_replace(self, try_number: int | None) -> bool:
        """Whether an earlier try's answer may be reused: always, unless this try retries a replacing one."""
        return self.reuse_from is None or (try_number is not None and try_number >= self.reuse_from)

    def _run(self, plans: Mapping[int, ResumePlan], existing: Mapping[str, int]) -> None:
        store = self.store
        generate_pool = ThreadPoolExecutor(self.options.max_concurrency, thread_name_prefix="jimeng-generate")
        # A publication (s3_key) adds a HEAD and a copy to each image's store: twice the threads keep the
        # canonical uploads, which a b64_json answer waits for in memory only, as quick as without one.
        publishing = 2 if store is not None and store.keyspace.key_template else 1
        store_pool = ThreadPoolExecutor(
            publishing * max(2, self.options.max_concurrency) if store is not None else 1,
            thread_name_prefix="jimeng-store",
        )
        generation: dict[Future[Any], int] = {}
        storing: dict[Future[Any], int] = {}
        # Futures report here as they finish: O(1) a completion, where wait() over every pending
        # future would cost O(N) each time, O(N^2) for a run of N prompts.
        finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()

        def track(table: dict[Future[Any], int], future: Future[Any], index: int) -> None:
            table[future] = index
            future.add_done_callback(finished.put)

        interrupted: BaseException | None = None
        try:
            for index in range(len(self.bodies)):
                plan = plans.get(index)
                outcome = self.outcomes[index]
                if isinstance(plan, Reuse):
                    self._reuse(outcome, plan)
                    continue
                if isinstance(plan, TopUp):
                    self._reuse(outcome, Reuse(plan.record))
                    lost = set(plan.record.retry_images)
                    # The lost images' failures are asked about again; the others (moderation) stay.
                    outcome.failures = [line for line in outcome.failures if failed_image(line) not in lost]
                    self._topups[index] = plan.record
                    self.log.info(
                        "Prompt %d: asking again for the %d image(s) an earlier try lost to a transient failure "
                        "(images %s), in a request of their own; the %d it kept are not paid again",
                        index,
                        len(lost),
                        sorted(lost),
                        len(plan.record.images),
                    )
                    track(generation, generate_pool.submit(self._generate, index), index)
                    continue
                if isinstance(plan, FinishStoring) and store is not None:
                    self.log.info(
                        "Prompt %d: finishing the storage of an earlier try's images (no new request): %d to download",
                        index,
                        len(plan.missing),
                    )
                    outcome.reused = True
                    outcome.usage = {"generated_images": 0, "resumed_images": len(plan.entry.images)}
                    self._retry_images[index] = images_to_retry(plan.entry, self.hook.images_billed(self.bodies[index]))
                    track(
                        storing,
                        store_pool.submit(self._store, index, plan.entry, plan.stored, plan.missing),
                        index,
                    )
                    continue
                if isinstance(plan, Generate) and plan.reason.startswith(("an earlier", "the journaled images")):
                    self.log.info("Prompt %d: %s; generating it again", index, plan.reason)
                track(generation, generate_pool.submit(self._generate, index), index)

            while generation or storing:
                try:
                    done = [finished.get(timeout=0.5)]
                except queue.Empty:
                    done = []
                if self._stop.is_set():
                    self._cancel(generation)
                for future in done:
                    if future in generation:
                        self._on_generated(generation.pop(future), future, generation, storing, store_pool, track)
                        if not generation and self._journal_writer is not None:
                            self._journal_writer.flush()  # the last answer is in: nothing to wait for
                    elif future in storing:
                        self._on_stored(storing.pop(future), future)
                if self._storage_error is not None and self.fatal is None:
                    self.fatal = self._storage_error
                    cancelled = self._cancel(generation)
                    self.log.error(
                        "Stopping: %s failed (%s); %d prompt(s) not sent, so nothing more is paid for until "
                        "storage works again",
                        store.storage_name if store is not None else "storage",
                        self._storage_error,
                        cancelled,
                    )
        except BaseException as error:  # execution_timeout (AirflowTaskTimeout), KeyboardInterrupt...
            interrupted = error
            self.stop(f"{type(error).__name__}")
            cancelled = self._cancel(generation)
            in_flight = sum(1 for future in generation if not future.done())
            self.log.error(
                "Stopping (%s): %d prompt(s) not sent; waiting for %d request(s) in flight, which are paid for, "
                "to journal their answers",
                type(error).__name__,
                cancelled,
                in_flight,
            )
            self._drain(generation, storing, store_pool, track, finished)
        finally:
            generate_pool.shutdown(wait=True, cancel_futures=True)
            store_pool.shutdown(wait=True, cancel_futures=True)
        if interrupted is not None:
            raise interrupted

    def _drain(
        self,
        generation: dict[Future[Any], int],
        storing: dict[Future[Any], int],
        store_pool: ThreadPoolExecutor,
        track: Callable[[dict[Future[Any], int], Future[Any], int], None],
        finished: queue.SimpleQueue[Future[Any]],
    ) -> None:
        """After an interruption: collect the answers in flight (journaled as they arrive).

        Nothing new is downloaded (a journaled URL serves the retry), but an answer that carries its
        images (``b64_json``) is stored: its data is nowhere else.

        The interruption can land anywhere in the run loop: just after it took a finished future from
        the queue, or between tracking a future and registering its callback. Such a future would never
        reach the queue again, so the futures themselves are looked at first and whenever the queue is
        quiet. Regression: the drain waited forever for a completion the interruption had consumed.
        """
        ready = [future for future in (*generation, *storing) if future.done()]
        while generation or storing:
            if not ready:
                try:
                    ready = [finished.get(timeout=0.5)]
                except queue.Empty:
                    ready = [future for future in (*generation, *storing) if future.done()]
                    continue
            future = ready.pop()
            if future in generation:
                index = generation.pop(future)
                answered = not future.cancelled() and future.exception() is None
                # A failure, an answer without storage, or one that carries its images (b64_json:
                # its data is nowhere else, the S3 journal never holds it) is handled as in a run.
                if not answered or self.store is None or future.result().entry.holds_data:
                    self._on_generated(index, future, generation, storing, store_pool, track)
                    continue
                result = future.result().result
                outcome = self.outcomes[index]
                outcome.requests += 1
                outcome.usage = result.usage.as_dict()
                outcome.incomplete = bool(result.succeeded)
                self._budget.release(self._charges.pop(index, 0))
                outcome.failures.append(
                    f"prompt {index}: answered (request id {result.request_id or 'n/a'}) but not stored "
                    "because the run stopped; kept in its journal for a retry, which needs no new request"
                )
            elif future in storing:
                self._on_stored(storing.pop(future), future)

    def _cancel(self, generation: Mapping[Future[Any], int]) -> int:
        return sum(future.cancel() for future in generation)

    # ---------------------------------------------------------------------------------- generation
    def _generate(self, index: int) -> Answer:
        """Send one prompt and hand its journal entry to the writer, before storage even starts.

        The journal is what lets a retry finish images this try paid for if the process dies now; the
        writer batches it off this thread, which goes on to its next prompt at once. A ``b64_json``
        answer waits for room in the memory budget before its body is read, and holds that room until
        its images are stored.
        """
        if self._must_not_send():
            # The run stopped while this prompt waited for a free slot: do not pay for it.
            raise CancelledError
        writer = self._journal_writer
        if writer is not None and not writer.reserve(self._must_not_send):
            raise CancelledError  # the run stopped while earlier answers waited for S3
        charge = 0

        def before_body(length: int | None) -> None:
            nonlocal charge
            self._budget.release(charge)  # an earlier attempt's, if it broke off
            charge = self._budget.acquire(B64_MEMORY_FACTOR * (length or UNKNOWN_BODY_BYTES))

        topup = self._topups.get(index)
        body = self.bodies[index] if topup is None else topup_body(self.bodies[index], len(topup.retry_images))
        try:
            result = self.hook.send(
                body,
                before_body=before_body if self._b64 else None,
                spending_cap=self.spending_cap,
            )
        except BaseException as error:
            self._budget.release(charge)
            if writer is not None:
                writer.release()
            if not never_sent(error):
                self._count(requests=1)
            if is_fatal(error):
                self._halted = self._halted or error
            raise
        usage = result.usage.as_dict()
        self._count(
            requests=1,
            output_tokens=int(usage.get("output_tokens") or 0),
            total_tokens=int(usage.get("total_tokens") or 0),
            web_searches=_web_searches(usage),
        )
        self._charges[index] = charge
        entry = JournalEntry.from_result(
            index, self.fingerprints[index], result, now=time.time(), try_number=self.try_number
        )
        retry_images = images_to_retry(entry, self.hook.images_billed(body)) if self.store is not None else ()
        if topup is not None:
            # The top-up's images fill the gaps of the earlier answer: the keys of the images it lost.
            entry = entry.at_indexes(topup.retry_images)
            retry_images = tuple(gap_index(topup.retry_images, image) for image in retry_images)
        if writer is not None:
            if entry.images:
                writer.add(index, entry)
            else:
                writer.release()
        return Answer(result, entry, retry_images)

    def _must_not_send(self) -> bool:
        return self._stop.is_set() or self._halted is not None or self._storage_error is not None

    def _on_generated(
        self,
        index: int,
        future: Future[Any],
        generation: dict[Future[Any], int],
        storing: dict[Future[Any], int],
        store_pool: ThreadPoolExecutor,
        track: Callable[[dict[Future[Any], int], Future[Any], int], None],
    ) -> None:
        outcome = self.outcomes[index]
        try:
            answer: Answer = future.result()
        except BaseException as error:
            # Record every failure, also those after the first fatal one (no short-circuit).
            stops_run = self._record_request_failure(outcome, error, generation)
            self.fatal = self.fatal or stops_run
            return
        result, entry = answer.result, answer.entry
        outcome.requests += 1
        outcome.usage = result.usage.as_dict()
        if self.store is None:
            self._keep_urls(outcome, result)
            return
        self._retry_images[index] = answer.retry_images
        track(storing, store_pool.submit(self._store, index, entry, (), entry.images), index)

    def _record_request_failure(
        self, outcome: PromptOutcome, error: BaseException, pending: Mapping[Future[Any], int]
    ) -> BaseException | None:
        if isinstance(error, CancelledError):
            outcome.failures.append(f"prompt {outcome.prompt_index}: not sent (the run stopped)")
            return None
        if not never_sent(error):
            outcome.requests += 1
        outcome.failures.append(f"prompt {outcome.prompt_index}: {describe_error(error)}")
        self.log.error("Prompt %d failed: %s", outcome.prompt_index, describe_error(error))
        if is_fatal(error):
            cancelled = self._cancel(pending)
            if cancelled:
                self.log.error("Stopping: %d prompt(s) not sent because this error affects every request", cancelled)
            return error
        return None

    def _keep_urls(self, outcome: PromptOutcome, result: GenerationResult) -> None:
        for image in result.images:
            if image.ok and image.url:
                outcome.delivered.append(
                    DeliveredImage(
                        prompt_index=outcome.prompt_index,
                        image_index=image.index,
                        size=image.size,
                        request_id=result.request_id,
                        model=result.model,
                        url=image.url,
                        details=image.details,
                    )
                )
            else:
                outcome.failures.append(image_failure(outcome.prompt_index, image, result.request_id))

    # ------------------------------------------------------------------------------------- storage
    def _reuse(self, outcome: PromptOutcome, plan: Reuse) -> None:
        outcome.reused = True
        outcome.record = plan.record
        outcome.stored = list(plan.record.images)
        outcome.failures = list(plan.record.failures)
        self.log.info(
            "Prompt %d: reusing %d image(s) stored by an earlier try", outcome.prompt_index, len(outcome.stored)
        )

    def _store(
        self, index: int, entry: JournalEntry, stored: Sequence[JournaledImage], missing: Sequence[JournaledImage]
    ) -> Stored:
        """On a storage thread: store an answer into an outcome of its own, returned to the loop as a value.

        The prompt's outcome is only ever changed by the engine's loop (:meth:`_on_stored`), never by
        a worker thread while the loop reads it.
        """
        scratch = PromptOutcome(prompt_index=index)
        self._store_entry(scratch, entry, stored, missing)
        return Stored(tuple(scratch.stored), tuple(scratch.failures), scratch.incomplete, scratch.record)

    def _store_entry(
        self,
        outcome: PromptOutcome,
        entry: JournalEntry,
        stored: Sequence[JournaledImage],
        missing: Sequence[JournaledImage],
    ) -> None:
        """Store an answer's images (``stored`` ones are checked, not stored again), then make its record.

        Fresh answers and journaled ones take this same path: what an image needs is in its
        :class:`JournaledImage` (a URL, or base64 data), never in the shape of the answer it came in.
        """
        store = self.store
        assert store is not None
        keyspace = store.keyspace
        index = outcome.prompt_index
        request_id = entry.request_id or "n/a"
        failures = [
            image_failure(
                index,
                GeneratedImage(index=f.index, error_code=f.error_code, error_message=f.error_message),
                entry.request_id,
            )
            for f in entry.failed
        ]
        kept: list[StoredImage] = []
        #: Paid images kept for a retry (their journal stays), one failure line each.
        unstored: list[str] = []
        check = {image.index for image in stored}
        metadata = {
            "jimeng-request-id": str(entry.request_id or ""),
            "jimeng-model": str(entry.model or ""),
            **answer_metadata(self.fingerprints[index], entry),
            "airflow-dag-id": keyspace.dag_id,
            "airflow-run-id": keyspace.run_id,
            "airflow-task-id": keyspace.task_id,
            "airflow-map-index": str(keyspace.map_index),
        }
        for image in sorted([*stored, *missing], key=lambda item: item.index):
            key = keyspace.image_key(index, image.index)
            not_stored = f"prompt {index} image {image.index}: not stored (request id {request_id}, kept for a retry)"
            # Once S3 has failed in this run, do not wait on it again for every image.
            if self._storage_error is not None:
                unstored.append(
                    f"{not_stored}: not attempted after an earlier {store.storage_name} failure ({self._storage_error})"
                )
                continue
            try:
                size_bytes, sha256 = None, None
                if image.index in check:
                    head = store.head(key)
                    if head.get("Metadata", {}).get("jimeng-request-id") == metadata["jimeng-request-id"]:
                        size_bytes = int(head.get("ContentLength", 0))
                if size_bytes is None:  # not stored yet, or an older answer's image under the same key
                    size_bytes, sha256 = self._store_image(
                        store, key, image, {**metadata, "jimeng-size": image.size or ""}
                    )
            except JiMengDownloadInterruptedError as error:
                unstored.append(f"{not_stored}: {error}")
                continue
            except JiMengDownloadError as error:
                failures.append(f"prompt {index} image {image.index}: ImageLost (request id {request_id}): {error}")
                continue
            except JiMengStorageError as error:
                self._on_storage_failure(error)
                unstored.append(f"{not_stored}: {error}")
                continue
            kept.append(
                StoredImage(
                    prompt_index=index,
                    image_index=image.index,
                    size=image.size,
                    request_id=entry.request_id,
                    model=entry.model,
                    bucket=store.bucket,
                    key=key,
                    uri=keyspace.uri(key),
                    bytes=size_bytes,
                    sha256=sha256,
                    details=image.details,
                )
            )
        if keyspace.key_template:
            kept = [
                self._publish(store, image, {**metadata, "jimeng-size": image.size or ""}, failures, unstored)
                for image in kept
            ]
        outcome.stored = kept
        outcome.failures.extend(failures + unstored)
        if unstored:
            # Keep the journal (and, when S3 is the problem, a local copy that holds base64 data too):
            # a retry stores what is missing instead of paying again.
            outcome.incomplete = True
            if self._storage_error is not None:
                store.save_local_journal(entry)
            return
        body = self.bodies[index]
        outcome.record = PromptRecord(
            prompt_index=index,
            fingerprint=self.fingerprints[index],
            prompt=body.get("prompt"),
            parameters={k: v for k, v in body.items() if k not in ("prompt", "image")},
            reference_images=reference_image_count(body),
            model=entry.model,
            created=entry.created,
            request_id=entry.request_id,
            usage=entry.usage,
            images=tuple(kept),
            failures=tuple(failures),
            try_number=entry.try_number,
        )

    def _publish(
        self,
        store: ImageStore,
        image: StoredImage,
        metadata: Mapping[str, str],
        failures: list[str],
        unstored: list[str],
    ) -> StoredImage:
        """Copy a stored image to its ``s3_key`` (:mod:`..storage.publications`); the image, published or not.

        A publication refused (its key holds another task instance's image) is a failure of the
        prompt, recorded; one that storage failed to make keeps the journal, for a retry to copy.
        """
        key = store.keyspace.publication_key(image.prompt_index, image.image_index)
        if key is None:
            return image
        not_published = (
            f"prompt {image.prompt_index} image {image.image_index}: stored at {image.uri} but not published to "
            f"{store.keyspace.uri(key)} (kept for a retry, which needs no new request)"
        )
        if self._storage_error is not None:
            unstored.append(f"{not_published}: not attempted after an earlier {store.storage_name} failure")
            return image
        try:
            result = publish(store, image, key, metadata)
        except JiMengStorageError as error:
            self._on_storage_failure(error)
            unstored.append(f"{not_published}: {error}")
            return image
        if isinstance(result, str):
            self.log.error("%s", result)
            failures.append(result)
            return image
        return result

    def _store_image(
        self, store: ImageStore, key: str, image: JournaledImage, metadata: dict[str, str]
    ) -> tuple[int, str]:
        if image.b64_json:
            try:
                data = base64.b64decode(image.b64_json, validate=True)
            except (binascii.Error, ValueError):
                raise JiMengDownloadError(f"image {image.index}'s base64 data does not decode") from None
            return store.upload_bytes(key, data, metadata)
        if not image.url:
            raise JiMengDownloadError(f"image {image.index} has neither data nor a URL")
        # Headers are in, the body is not: wait for memory there, while the image stays on the server.
        with (
            self.hook.open_image(image.url) as download,
            self._budget.hold((download.content_length or UNKNOWN_BODY_BYTES) + DOWNLOAD_READ_OVERHEAD),
        ):
            announced = download.content_type.split(";")[0].strip().lower()
            fallback = announced if announced in ("image/png", "image/jpeg") else "image/jpeg"
            return store.upload_stream(key, download, metadata, fallback)

    def _on_stored(self, index: int, future: Future[Any]) -> None:
        self._budget.release(self._charges.pop(index, 0))
        if future.cancelled():
            self.outcomes[index].incomplete = True
            self.outcomes[index].failures.append(
                f"prompt {index}: not stored because the run stopped; kept in its journal for a retry"
            )
            return
        try:
            done: Stored = future.result()
        except BaseException as error:
            self.outcomes[index].incomplete = True
            self.outcomes[index].failures.append(f"prompt {index}: not stored: {describe_error(error)}")
            return
        outcome = self.outcomes[index]
        outcome.stored = list(done.stored)
        outcome.failures.extend(done.failures)
        outcome.incomplete = outcome.incomplete or done.incomplete
        if done.record is not None:
            outcome.record = done.record
        self._settle_record(outcome)

    def _settle_record(self, outcome: PromptOutcome) -> None:
        """Give a stored answer's record the images to ask for again; join a top-up to the record it completes.

        On the engine's loop, once the prompt's images are stored: a top-up's record holds the earlier
        record's images and its own, the earlier failures that were final and its own.
        """
        index = outcome.prompt_index
        retry = self._retry_images.get(index, ())
        earlier = self._topups.get(index)
        if earlier is not None:
            outcome.stored = [*earlier.images, *(image for image in outcome.stored if image not in earlier.images)]
        record = outcome.record
        if record is None or record is earlier:
            return  # not all stored (a retry finishes it), or the top-up's request failed
        if earlier is not None:
            lost = set(earlier.retry_images)
            record = dataclasses.replace(
                earlier,
                images=tuple(outcome.stored),
                failures=(*(line for line in earlier.failures if failed_image(line) not in lost), *record.failures),
            )
        outcome.record = dataclasses.replace(record, retry_images=retry)

    def _on_storage_failure(self, error: JiMengStorageError) -> None:
        """Stop paying for prompts S3 cannot take (also called by the journal writer), at once.

        Prompts not yet sent are cancelled by the main loop; stopping the hook here as well ends, on
        every generation thread, the retry and pacing waits of requests not yet sent (a 429's backoff
        would otherwise send again after the refusal). Requests already in flight are paid for and
        still get their answer, which goes to the fallback journals.
        """
        self._storage_error = self._storage_error or error
        self.hook.stop()

    def _write_records(self, store: ImageStore, earlier_journals: Mapping[str, set[int]]) -> JiMengStorageError | None:
        """Write ``records.json`` with every try's counters, then drop the journals it supersedes.

        A refused write keeps the journals, and this try's counters go where the next try reads them
        (this worker's disk, the shared store). A try that finished no prompt still writes the file
        when it sent requests, or when earlier tries' counts are known only from snapshots: a run that
        fails on 429s is then counted too.
        """
        records = [outcome.record for outcome in self.outcomes if outcome.record is not None]
        this_try = self._usage_document(final=True)
        earlier = list(self.earlier_tries.values())
        if not records and not this_try["attempts"] and all(doc["final"] for doc in earlier):
            return None
        try:
            unrecorded = [text for outcome in self.outcomes if outcome.record is None for text in outcome.failures]
            store.write_records(records, [*earlier, this_try], unrecorded)
        except JiMengStorageError as error:
            self._on_storage_failure(error)
            store.save_fallback_usage(self.try_token, this_try)
            for outcome in self.outcomes:
                if outcome.record is not None and not (outcome.reused and not outcome.stored):
                    outcome.notes.append(
                        f"prompt {outcome.prompt_index}: {len(outcome.stored)} image(s) stored but not its record "
                        f"(kept for a retry, which needs no new request): {error}"
                    )
                    outcome.incomplete = True
            return error
        finished = {outcome.prompt_index for outcome in self.outcomes if outcome.record is not None}
        if self._journal_writer is not None and self._storage_error is not None:
            # S3 failed during the try and took records.json now: journal there what went to the fallback.
            self._journal_writer.write_diverted(index for index in range(len(self.bodies)) if index not in finished)
        # Prompts past the end of this try's list (the list shrank since an earlier try) are no one's.
        settled = finished | {
            index for prompts in earlier_journals.values() for index in prompts if index >= len(self.bodies)
        }
        written = self._journal_writer.written if self._journal_writer is not None else {}
        superseded = [key for key, prompts in {**earlier_journals, **written}.items() if prompts <= settled]
        store.discard_journals(superseded, sorted(settled))
        if self._earlier_from_fallback:
            store.discard_fallback_usage()  # records.json carries those tries now
        return None

    # ---------------------------------------------------------------------------------------- usage
    def _count(self, **amounts: int) -> None:
        with self._counts_lock:
            for name, amount in amounts.items():
                self._counts[name] += amount

    def this_try(self) -> dict[str, int]:
        """What this try alone cost and met (any thread: journal batches snapshot it)."""
        stats = self.hook.stats
        with self._counts_lock:
            counts = dict(self._counts)
        return {
            "generated_images": self.spending_cap.billed,
            "possibly_billed_images": self.spending_cap.possibly_billed,
            "output_tokens": counts["output_tokens"],
            "total_tokens": counts["total_tokens"],
            "requests": counts["requests"],
            "attempts": stats.get("attempts", 0),
            # Seedream 5.0's web search is billed per search, apart from images.
            "web_searches": counts["web_searches"],
            # What the API pushed back with: 429 answers received, and retries made for any cause.
            "rate_limited": stats.get("rate_limited", 0),
            "retries": stats.get("retries", 0),
        }

    def _usage_document(self, *, final: bool) -> dict[str, Any]:
        return try_usage(self.try_token, self.try_number, self.this_try(), final=final, now=time.time())

    def usage(self) -> dict[str, Any]:
        """What the task instance cost and met over all its tries, for the ``usage`` XCom.

        The counters sum every earlier try that left counts (``records.json``, a journal batch's
        snapshot, or a fallback when S3 failed) and this one; ``this_try`` holds this try's own,
        ``tries`` how many tries were summed. ``reused_prompts`` is this try's.
        """
        this_try = self.this_try()
        totals = sum_usage([*self.earlier_tries.values(), this_try])
        reused = sum(1 for o in self.outcomes if o.reused)
        return {
            "generated_images": totals["generated_images"],
            "possibly_billed_images": totals["possibly_billed_images"],
            "output_tokens": totals["output_tokens"],
            "total_tokens": totals["total_tokens"],
            "requests": totals["requests"],
            "attempts": totals["attempts"],
            "reused_prompts": reused,
            "web_searches": totals["web_searches"],
            "rate_limited": totals["rate_limited"],
            "retries": totals["retries"],
            "tries": len(self.earlier_tries) + 1,
            "this_try": {**this_try, "reused_prompts": reused},
        }
