"""Where a Visual API run submits, journals and collects: the asynchronous half of a generation run.

A Visual API try has two phases. :func:`submit_prompts` submits every prompt that has no usable task
id yet (paced, within the spending cap) and journals each task id in the task's storage keyspace
(``<task prefix>/_visual/tasks.json``) the moment it is known, before anything waits on it. Then the
tasks are *collected*: :class:`VisualTaskSource` stands in for the Ark hook inside a
:class:`~airflow_provider_jimeng.run.engine.GenerationRun`, answering each prompt's ``send`` with its
journaled task's images (a poll is free), so records, journals, downloads, XComs, assets and lineage
are exactly the Ark path's.

A retry, a cleared task or a resumed deferral reads the journal first and never submits a prompt
that has a journaled task id. A task that ended ``expired`` or ``not_found``, or failed for good
(moderation), is not submitted again either: its prompt fails with that state (``replace=True`` on
a cleared task starts over). A task that failed with a retryable code (``50511``) made no images and
is submitted again by the next try; so is a submit whose answer never came (possibly billed, counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_jimeng.api.response import GenerationResult
from airflow_provider_jimeng.budget import SpendingCap
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengConfigurationError,
    JiMengContentPolicyError,
    JiMengError,
    JiMengServerError,
    JiMengStorageError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.connection_config import JiMengConnectionConfig
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.hooks.visual import (
    DONE,
    EXPIRED,
    FAILED,
    NOT_FOUND,
    REQ_KEY,
    TASK_TTL_SECONDS,
    VisualClient,
    VisualConnectionConfig,
    VisualTaskResult,
    max_images_billed_visual,
    validate_submit_body,
)
from airflow_provider_jimeng.options import GenerationOptions
from airflow_provider_jimeng.storage.base import ImageStore
from airflow_provider_jimeng.storage.keys import prompt_fingerprint

__all__ = [
    "JOURNAL_NAME",
    "TaskEntry",
    "VisualJournal",
    "VisualTaskSource",
    "submit_prompts",
    "visual_submit_bodies",
]

#: The journal's key under the task's prefix.
JOURNAL_NAME = "_visual/tasks.json"
#: ``size`` presets of the Ark API, as the Visual API's pixel areas.
_SIZE_AREAS = {"1K": 1024 * 1024, "2K": 2048 * 2048, "4K": 4096 * 4096}


# -- the submit bodies ----------------------------------------------------------------------------------


def visual_submit_bodies(prompts: Sequence[str], options: GenerationOptions) -> list[dict[str, Any]]:
    """One checked submit body per prompt, from the operator's options; what the Visual API cannot take
    is refused by parameter before any request.

    One image per prompt unless ``sequential_image_generation='auto'`` (then up to 15 minus the
    references, each billed; ``max_images=1`` keeps it at one): ``force_single`` is what stops the
    model from returning (and billing) a set.
    """
    if options.model not in (None, REQ_KEY):
        raise JiMengConfigurationError(
            "model", f"{options.model!r:.60} is not served by the Visual API; allowed: None or {REQ_KEY!r}"
        )
    refused = {
        "optimize_prompt_mode": options.optimize_prompt_mode is not None,
        "optimize_prompt_thinking": options.optimize_prompt_thinking is not None,
        "guidance_scale": options.guidance_scale is not None,
        "output_format": options.output_format not in (None, "jpeg"),
        "web_search": options.web_search,
        "stream": options.stream,
        "extra_body": bool(options.extra_body),
    }
    for name, given in refused.items():
        if given:
            raise JiMengConfigurationError(
                name, "is not a Visual API option (JiMeng 4.0 through api: visual); allowed: leave it unset"
            )
    if options.max_images not in (None, 1):
        raise JiMengConfigurationError(
            "max_images",
            f"{options.max_images} given; the Visual API cannot cap a set: allowed: 1 (force_single) or None "
            "(up to 15 minus the reference images, each billed)",
        )
    common: dict[str, Any] = {"req_key": REQ_KEY}
    size = options.size
    if size is not None:
        if size.upper() in _SIZE_AREAS:
            common["size"] = _SIZE_AREAS[size.upper()]
        else:
            width, _, height = size.lower().partition("x")
            if not (width.isdigit() and height.isdigit()):
                raise JiMengConfigurationError(
                    "size", f"{size!r:.40} is not a Visual API size; allowed: 1K, 2K, 4K or WxH (e.g. 2048x2048)"
                )
            common["width"], common["height"] = int(width), int(height)
    if options.image is not None:
        references = [options.image] if isinstance(options.image, str) else options.image
        if not isinstance(references, Sequence) or not all(
            isinstance(item, str) and item.startswith(("https://", "http://")) for item in references
        ):
            raise JiMengConfigurationError(
                "image", "the Visual API takes reference images as http(s) URLs only; allowed: a URL or a list of URLs"
            )
        common["image_urls"] = list(references)
    if options.seed is not None:
        common["seed"] = options.seed
    common["force_single"] = options.sequential_image_generation != "auto" or options.max_images == 1
    bodies = []
    for position, prompt in enumerate(prompts):
        try:
            bodies.append(validate_submit_body({**common, "prompt": prompt}))
        except JiMengConfigurationError as error:
            name = {"image_urls": "image", "width": "size", "height": "size"}.get(error.parameter, error.parameter)
            if name == "prompt" and len(prompts) > 1:
                name = f"prompt[{position}]"
            raise JiMengConfigurationError(name, error.detail) from None
    return bodies


# -- the journal ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskEntry:
    """One prompt's submit, as journaled: its task id (``None`` when the submit's answer never came)."""

    prompt_index: int
    fingerprint: str
    task_id: str | None
    submitted_at: float
    deadline: float
    images: int
    try_number: int | None = None
    #: Images a submit without an answer may have billed (its task id is unknown).
    possibly_billed: int = 0
    #: Why the submit failed, when it did.
    error: str | None = None
    #: The task failed with a retryable code (it made no images): the next try submits the prompt again.
    resubmit: bool = False

    def usable(self, fingerprint: str, reuse_from: int | None) -> bool:
        """Whether this entry answers for the prompt now: same work, not superseded, and a task to wait on."""
        if self.fingerprint != fingerprint or self.task_id is None or self.resubmit:
            return False
        return reuse_from is None or (self.try_number is not None and self.try_number >= reuse_from)


class VisualJournal:
    """The task ids of a task instance's prompts, in its storage keyspace (or in memory without storage).

    Written whole after each change with the store's ``write_json``: a few hundred bytes per prompt.
    """

    def __init__(self, store: ImageStore | None) -> None:
        self.store = store
        self.entries: dict[int, TaskEntry] = {}
        self._lock = threading.Lock()

    @property
    def key(self) -> str | None:
        return None if self.store is None else f"{self.store.keyspace.task_prefix}/{JOURNAL_NAME}"

    def load(self, existing: Mapping[str, int] | None = None) -> VisualJournal:
        """Read the journal: only when it is listed in ``existing`` (the task prefix's keys), or listing first."""
        if self.store is not None and self.key is not None:
            if existing is None:
                existing = self.store.existing_keys(first=True)
            data = (self.store.read_json(self.key) if self.key in existing else None) or {}
            tasks = data.get("tasks") if isinstance(data, Mapping) else None
            names = {item.name for item in dataclasses.fields(TaskEntry)}
            for raw in (tasks or {}).values():
                if isinstance(raw, Mapping) and set(raw) <= names:
                    entry = TaskEntry(**raw)
                    self.entries[entry.prompt_index] = entry
        return self

    def record(self, entry: TaskEntry) -> None:
        """Journal one prompt's submit durably (raises :class:`JiMengStorageError` when storage refuses)."""
        with self._lock:
            self.entries[entry.prompt_index] = entry
            if self.store is not None and self.key is not None:
                document = {
                    "version": 1,
                    "tasks": {str(index): dataclasses.asdict(item) for index, item in sorted(self.entries.items())},
                }
                self.store.write_json(self.key, document)

    def mark_resubmit(self, index: int) -> None:
        entry = self.entries.get(index)
        if entry is not None and not entry.resubmit:
            # Should storage refuse, the next try polls the task again and finds it failed again: nothing is paid.
            with contextlib.suppress(JiMengStorageError):
                self.record(dataclasses.replace(entry, resubmit=True))

    def submitted_by(self, try_number: int | None) -> int:
        """Prompts submitted by try ``try_number`` (a task id or a failed submit journaled)."""
        return sum(1 for entry in self.entries.values() if try_number is not None and entry.try_number == try_number)

    def usable(self, index: int, fingerprint: str, reuse_from: int | None) -> TaskEntry | None:
        entry = self.entries.get(index)
        return entry if entry is not None and entry.usable(fingerprint, reuse_from) else None


def submit_prompts(
    client: VisualClient,
    bodies: Sequence[Mapping[str, Any]],
    journal: VisualJournal,
    *,
    skip: Callable[[int, str], bool],
    spending_cap: SpendingCap,
    try_number: int | None,
    reuse_from: int | None,
    poll_timeout: float | None,
    log: Any,
) -> list[TaskEntry]:
    """Submit each prompt without a usable journaled task (nor a record: ``skip``), journaling each task id
    at once; the entries to wait on, in prompt order.

    Stops at the first error every prompt would meet (a refused key pair, the spending cap); a submit
    whose answer never came is journaled as possibly billed and the others go on.
    """
    ttl = TASK_TTL_SECONDS if poll_timeout is None else min(poll_timeout, TASK_TTL_SECONDS)
    waiting: list[TaskEntry] = []
    for index, body in enumerate(bodies):
        fingerprint = prompt_fingerprint(body)
        existing = journal.usable(index, fingerprint, reuse_from)
        if existing is not None:
            log.info("Prompt %d: waiting on its journaled task %s (not submitted again)", index, existing.task_id)
            waiting.append(existing)
            continue
        if skip(index, fingerprint):
            continue
        images = max_images_billed_visual(body)
        reservation = spending_cap.reserve(images)  # may refuse: nothing sent
        submitted_at = time.time()
        entry = TaskEntry(
            prompt_index=index,
            fingerprint=fingerprint,
            task_id=None,
            submitted_at=submitted_at,
            deadline=submitted_at + ttl,
            images=images,
            try_number=try_number,
        )
        try:
            task_id = client.submit(body)
        except JiMengAPIError as error:
            if error.code == "Stopped":  # on_kill closed the client before this submit was sent
                reservation.release()
                raise
            if error.possibly_billed or error.code in ("50500", "50501"):
                reservation.keep_as_possible()
                journal.record(dataclasses.replace(entry, possibly_billed=images, error=str(error)[:300]))
                log.error("Prompt %d: submit failed and may have started a billed task: %s", index, error)
                continue
            reservation.release()
            if isinstance(error, JiMengContentPolicyError) or error.retryable:
                journal.record(dataclasses.replace(entry, error=str(error)[:300]))
                log.error("Prompt %d: submit failed: %s", index, error)
                continue
            raise
        except BaseException:
            reservation.release()
            raise
        reservation.keep_as_possible()  # started: counted until the poll says what it made
        entry = dataclasses.replace(entry, task_id=task_id)
        try:
            journal.record(entry)
        except JiMengStorageError:
            log.error("Prompt %d: task %s submitted but not journaled; storage refused the journal", index, task_id)
            raise
        waiting.append(entry)
    return waiting


# -- collecting -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SourceConfig:
    """What the run and the operator read of a hook's config."""

    base_url: str
    generations_url: str
    redis_conn_id: str | None = None


class _ImageDownloads(JiMengHook):
    """The Ark hook's bounded, retried image downloads, configured from a Visual API connection."""

    def __init__(self, config: VisualConnectionConfig) -> None:
        super().__init__()
        self.__dict__["config"] = JiMengConnectionConfig(
            base_url=config.endpoint,
            api_key="",
            model=REQ_KEY,
            timeout=config.timeout,
            connect_timeout=config.connect_timeout,
            max_retries=config.max_retries,
            retry_backoff=config.retry_backoff,
            retry_max_wait=config.retry_max_wait,
            watermark=config.watermark,
            max_images_per_minute=None,
            proxies=config.proxies,
            verify=config.verify,
            allow_http=config.allow_http,
        )


class VisualTaskSource:
    """Answers a :class:`GenerationRun`'s ``send`` with the prompt's journaled Visual API task.

    ``wait=True`` (on a worker without a triggerer) polls every ``poll_interval`` until the task is finished
    or its deadline has passed; ``wait=False`` (resumed after the trigger fired) polls once. Never submits.
    """

    def __init__(
        self,
        client: VisualClient,
        journal: VisualJournal,
        bodies: Sequence[Mapping[str, Any]],
        *,
        req_json: Mapping[str, Any],
        reuse_from: int | None,
        wait: bool,
        poll_interval: float = 10.0,
        earlier_submits: int = 0,
    ) -> None:
        self.client = client
        #: Submits this try made before it deferred (another process's client counted them).
        self.earlier_submits = earlier_submits
        self.journal = journal
        self.req_json = dict(req_json)
        self.reuse_from = reuse_from
        self.wait = wait
        self.poll_interval = poll_interval
        self._indexes = {id(body): index for index, body in enumerate(bodies)}
        self._stop = threading.Event()
        self._downloads = _ImageDownloads(client.config)
        self.config = _SourceConfig(base_url=client.config.endpoint, generations_url=client.config.endpoint)

    @property
    def stats(self) -> dict[str, int]:
        stats = self.client.stats
        return {
            "attempts": stats["submit_attempts"] + self.earlier_submits,
            "rate_limited": stats["rate_limited"],
            "retries": stats["retries"],
        }

    def images_billed(self, body: Mapping[str, Any]) -> int:
        return max_images_billed_visual(body)

    def open_image(self, url: str) -> Any:
        return self._downloads.open_image(url)

    def stop(self) -> None:
        self._stop.set()
        self._downloads.stop()

    def close(self) -> None:
        self.stop()
        self._downloads.close()
        self.client.close()

    def send(
        self,
        body: Mapping[str, Any],
        *,
        before_body: Callable[[int | None], None] | None = None,
        spending_cap: SpendingCap | None = None,
    ) -> GenerationResult:
        index = self._indexes.get(id(body))
        if self._stop.is_set():
            raise JiMengTimeoutError("the task was stopped before the poll", code="Stopped")
        if index is None:
            raise JiMengTimeoutError("no Visual API task for this request (not submitted)", code="NotSubmitted")
        cap = spending_cap or SpendingCap()
        fingerprint = prompt_fingerprint(body)
        entry = self.journal.entries.get(index)
        if entry is not None and entry.fingerprint == fingerprint and entry.task_id is None and entry.error is not None:
            # This try's submit failed (possibly billed when its answer never came): the prompt's failure.
            cap.reserve(0).settle(0, entry.possibly_billed)
            raise JiMengTimeoutError(
                f"the submit failed: {entry.error}", code="SubmitFailed", possibly_billed=entry.possibly_billed > 0
            )
        entry = self.journal.usable(index, fingerprint, self.reuse_from)
        if entry is None or entry.task_id is None:
            raise JiMengTimeoutError(
                "no journaled Visual API task for this prompt (not submitted)", code="NotSubmitted"
            )
        reservation = cap.reserve(entry.images)
        try:
            outcome = self._poll(entry)
        except BaseException:
            reservation.release()
            raise
        task = entry.task_id
        if outcome.status == DONE and outcome.result is not None:
            result = outcome.result
            reservation.settle(result.billed_images)
            return result
        if outcome.status == FAILED:
            reservation.release()  # a failed task made no images
            message = f"task {task} failed ({outcome.error_code}): {outcome.error_message or ''}".strip()
            if outcome.retryable:
                self.journal.mark_resubmit(index)
                raise JiMengServerError(message, code=outcome.error_code, request_id=outcome.request_id)
            raise JiMengContentPolicyError(message, code=outcome.error_code, request_id=outcome.request_id)
        reservation.keep_as_possible()
        if outcome.status in (EXPIRED, NOT_FOUND):
            code = "TaskExpired" if outcome.status == EXPIRED else "TaskNotFound"
            raise JiMengTimeoutError(
                f"task {task} is {outcome.status} (submitted {time.time() - entry.submitted_at:.0f}s ago; tasks "
                "expire 12 h after submit); not submitted again",
                code=code,
                possibly_billed=True,
            )
        raise JiMengTimeoutError(
            f"task {task} still {outcome.status} past its deadline; a retry polls it again (never re-submits)",
            code="TaskDeadline",
            possibly_billed=True,
        )

    def _poll(self, entry: TaskEntry) -> VisualTaskResult:
        assert entry.task_id is not None
        while True:
            try:
                outcome = self.client.poll(entry.task_id, self.req_json)
            except JiMengError:
                if self._stop.is_set():
                    raise JiMengTimeoutError("the task was stopped while polling", code="Stopped") from None
                raise
            remaining = entry.deadline - time.time()
            if outcome.finished or not self.wait or remaining <= 0:
                return outcome
            # Every poll_interval, as the trigger does (polls are free; the client backs off on 50429/50430).
            if self._stop.wait(min(self.poll_interval, remaining)):
                raise JiMengTimeoutError("the task was stopped while polling", code="Stopped")
