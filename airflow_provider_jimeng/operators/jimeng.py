"""``JiMengGenerateOperator``: prompts in, durable images out.

The operator renders prompts (Jinja, prompt files, XCom), refuses bad input and over-budget runs
before spending anything, generates with bounded concurrency over one hook, and streams every
image into S3 on a separate pool so that storage never holds up generation. Downstream tasks get
small things only: ``s3://`` URIs (or, without storage, the image URLs) and per-image records.
"""

from __future__ import annotations

import base64
import binascii
import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jinja2
from airflow.sdk import BaseOperator

from airflow_provider_jimeng.api.request import check_prompt, max_images_billed, reference_image_count
from airflow_provider_jimeng.api.response import GeneratedImage, GenerationResult, Usage, redact_url
from airflow_provider_jimeng.budget import ByteBudget, return_image_blocks_to_the_os
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengAuthenticationError,
    JiMengConfigurationError,
    JiMengContentPolicyError,
    JiMengDownloadError,
    JiMengDownloadInterruptedError,
    JiMengError,
    JiMengGenerationIncompleteError,
    JiMengInvalidRequestError,
    JiMengQuotaExceededError,
    JiMengRunAbortedError,
    JiMengStorageError,
)
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.links.jimeng import JiMengImagesLink
from airflow_provider_jimeng.storage.journal import JournalWriter
from airflow_provider_jimeng.storage.s3 import (
    JOURNAL_MAX_AGE_SECONDS,
    S3ImageStore,
    TaskKeyspace,
    check_bucket_name,
    check_key_template,
    prompt_fingerprint,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

ON_PARTIAL_FAILURE = ("fail", "continue")
#: Memory a b64_json answer takes per byte of body while parsed: the body, its text and the decoded
#: string coexist, and the C allocator keeps some of it (measured: ~4x the body's Content-Length).
B64_MEMORY_FACTOR = 4
#: What an answer or download without Content-Length is assumed to weigh.
UNKNOWN_BODY_BYTES = 8 * 1024 * 1024
#: Transient buffers of a streamed download on top of the image (one read chunk, copied once).
DOWNLOAD_READ_OVERHEAD = 2 * 1024 * 1024
RESPONSE_FORMATS = ("url", "b64_json")
#: Errors that no other prompt of the run could escape either: stop submitting work at once.
_FATAL_ERRORS = (JiMengAuthenticationError, JiMengQuotaExceededError, JiMengConfigurationError)


@dataclass
class PromptOutcome:
    """What happened to one prompt: images kept (stored or URL) and failures, in order."""

    prompt_index: int
    records: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    reused: bool = False
    #: Paid images not stored yet (S3 failed, download broke off): a retry stores them without paying.
    incomplete: bool = False
    #: The prompt's entry of ``records.json`` once it is finished (stored, or reused from an earlier try).
    record: dict[str, Any] | None = None


def _describe_error(error: BaseException) -> str:
    if isinstance(error, JiMengAPIError):
        code = error.code or type(error).__name__
        return f"{code} (request id {error.request_id or 'n/a'}): {error.api_message}"
    return f"{type(error).__name__}: {error}"


class JiMengGenerateOperator(BaseOperator):
    """Generate images with JiMeng 4.0 / Seedream from templated prompts and hand downstream their keys.

    :param prompt: a prompt, a list of prompts, a prompt file (``.txt``, ``.j2``, ``.jinja``, read and
        rendered by Airflow) or an XComArg resolving to a string or list of strings. (templated)
    :param jimeng_conn_id: the ``jimeng`` connection. (templated)
    :param model: model or endpoint id; the connection's default when ``None``. (templated)
    :param size: ``1K``/``2K``/``4K`` or ``WxH`` as the model allows. (templated)
    :param response_format: ``url`` or ``b64_json`` (``b64_json`` needs ``s3_bucket``).
    :param watermark: add the "AI generated" mark; the connection's default (true) when ``None``.
    :param image: reference image(s) for edits: URLs, data URIs or local files. (templated)
    :param seed: integer seed in [-1, 2147483647]. (templated)
    :param sequential_image_generation: ``auto`` to let the model return a set of related images.
    :param max_images: the most images of a set (1-15, minus reference images); billed per image.
    :param optimize_prompt_mode: let the service rewrite the prompt before generating: ``standard``
        (better prompts, slower) or ``fast``, as the model allows (Seedream 4.5: ``standard`` only);
        ``None`` sends no option.
    :param max_concurrency: requests in flight at once (the API's latency is seconds per image).
    :param max_images_per_minute: client-side pacing; the connection's extra when ``None``.
    :param aws_conn_id: the AWS connection for S3. (templated)
    :param s3_bucket: store images in this bucket and push ``s3://`` URIs; without it the task returns
        the signed image URLs (valid 24 hours). (templated)
    :param s3_key_prefix: prefix of the default keys. (templated)
    :param s3_key: key template with ``{dag_id}``, ``{run_id}``, ``{task_id}``, ``{map_index}``,
        ``{prompt_index}``, ``{image_index}``, ``{ext}``; Jinja renders first, then these fields are filled
        with key-safe values. (templated)
    :param replace: regenerate and overwrite even what an earlier try already stored.
    :param on_partial_failure: ``fail`` (default: store what succeeded, then fail listing each failed
        image's code and request id) or ``continue`` (store what succeeded and succeed with a warning).
    :param dry_run: render and validate everything and log what would be sent; call nothing billable.
    :param max_images_per_task: refuse, before any request, a run that could bill more images.
    :param extra_body: extra JSON fields for gateways (for example ``n``); named fields cannot be overridden.
    """

    template_fields: Sequence[str] = (
        "prompt",
        "model",
        "size",
        "image",
        "seed",
        "s3_bucket",
        "s3_key_prefix",
        "s3_key",
        "jimeng_conn_id",
        "aws_conn_id",
    )
    template_ext: Sequence[str] = (".txt", ".j2", ".jinja")
    # Prompts are prose: highlight them as text with Jinja, never as Python.
    template_fields_renderers = {"prompt": "jinja"}
    ui_color = "#f3e8ff"
    operator_extra_links = (JiMengImagesLink(),)
    # Threading primitives cannot be deep-copied; Airflow deep-copies operators (DAG.partial_subset, and
    # Airflow 3.0 when converting a DAG for dag.test()), so these are shared with the copy instead.
    shallow_copy_attrs: Sequence[str] = ("_stop", "_hook", "_budget")

    def __init__(
        self,
        *,
        prompt: str | Sequence[str] | Any,
        jimeng_conn_id: str = JiMengHook.default_conn_name,
        model: str | None = None,
        size: str | None = None,
        response_format: str = "url",
        watermark: bool | None = None,
        image: Any = None,
        seed: int | str | None = None,
        sequential_image_generation: str | None = None,
        max_images: int | None = None,
        optimize_prompt_mode: str | None = None,
        max_concurrency: int = 4,
        max_images_per_minute: float | None = None,
        aws_conn_id: str | None = "aws_default",
        s3_bucket: str | None = None,
        s3_key_prefix: str = "jimeng",
        s3_key: str | None = None,
        replace: bool = False,
        on_partial_failure: str = "fail",
        dry_run: bool = False,
        max_images_per_task: int | None = None,
        extra_body: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prompt = prompt
        self.jimeng_conn_id = jimeng_conn_id
        self.model = model
        self.size = size
        self.response_format = response_format
        self.watermark = watermark
        self.image = image
        self.seed = seed
        self.sequential_image_generation = sequential_image_generation
        self.max_images = max_images
        self.optimize_prompt_mode = optimize_prompt_mode
        self.max_concurrency = max_concurrency
        self.max_images_per_minute = max_images_per_minute
        self.aws_conn_id = aws_conn_id
        self.s3_bucket = s3_bucket
        self.s3_key_prefix = s3_key_prefix
        self.s3_key = s3_key
        self.replace = replace
        self.on_partial_failure = on_partial_failure
        # Shadows BaseOperator.dry_run(), a method Airflow itself never calls.
        self.dry_run = dry_run  # type: ignore[method-assign,assignment]
        self.max_images_per_task = max_images_per_task
        self.extra_body = extra_body
        self._stop = threading.Event()
        #: Caps the image bytes in memory (b64_json answers, downloads) whatever N and max_concurrency.
        self._budget = ByteBudget(stop=self._stop)
        self._hook: JiMengHook | None = None
        #: The first image of a successful run, for the "JiMeng images" link (``None`` until then).
        self.images_link_target: str | None = None
        self._storage_error: JiMengStorageError | None = None
        self._halted: BaseException | None = None

    # ---------------------------------------------------------------------------------- templating
    def _do_render_template_fields(
        self,
        parent: Any,
        template_fields: Iterable[str],
        context: Context,
        jinja_env: jinja2.Environment,
        seen_oids: set[int],
    ) -> None:
        """Render as Airflow does, field by field, so that a Jinja error names the field it is in.

        Airflow re-raises the bare Jinja error (``'topic' is undefined``) and names the field only in
        a log line; this is the one method both plain and mapped tasks render through.
        """
        if parent is not self:
            super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
            return
        for name in template_fields:
            try:
                super()._do_render_template_fields(parent, (name,), context, jinja_env, seen_oids)
            except jinja2.TemplateError as error:
                raise JiMengConfigurationError(
                    name,
                    f"its Jinja template does not render ({type(error).__name__}: {str(error)[:200]}); allowed: "
                    "a valid template over the task's context, e.g. {{ params.topic }}, {{ ds }} or "
                    "{{ ti.xcom_pull(task_ids='...') }}, or a prompt file (.txt, .j2, .jinja) next to the DAG",
                ) from None

    # ---------------------------------------------------------------------------------- validation
    def _prompts(self) -> list[str]:
        """The rendered prompt(s) as a list, refusing what upstream data can get wrong."""
        prompt = self.prompt
        if prompt is None:
            raise JiMengConfigurationError(
                "prompt",
                "rendered to None; allowed: a string or a list of strings (did the upstream task push a value? "
                "check the XCom key and task id)",
            )
        if isinstance(prompt, Mapping):
            raise JiMengConfigurationError(
                "prompt",
                "got a dict; pass a string or a list of strings (@task.jimeng may return a dict of parameters)",
            )
        prompts: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise JiMengConfigurationError("prompt", "is an empty list; at least one prompt is needed")
        for position, item in enumerate(prompts):
            if not isinstance(item, str):
                raise JiMengConfigurationError(
                    f"prompt[{position}]", f"must be a string, got {type(item).__name__}: {str(item)[:60]!r}"
                )
            check_prompt(item, f"prompt[{position}]" if len(prompts) > 1 else "prompt")
        return prompts

    def _seed(self) -> int | None:
        if self.seed is None or self.seed == "":
            return None
        if isinstance(self.seed, bool):
            raise JiMengConfigurationError("seed", f"{self.seed!r} is not an integer")
        try:
            return int(self.seed)
        except (TypeError, ValueError):
            raise JiMengConfigurationError("seed", f"{self.seed!r} is not an integer in [-1, 2147483647]") from None

    def _check_options(self) -> None:
        if self.on_partial_failure not in ON_PARTIAL_FAILURE:
            raise JiMengConfigurationError(
                "on_partial_failure", f"{self.on_partial_failure!r} is not allowed; allowed: 'fail' or 'continue'"
            )
        if self.response_format not in RESPONSE_FORMATS:
            raise JiMengConfigurationError(
                "response_format", f"{self.response_format!r} is not allowed; allowed: 'url' or 'b64_json'"
            )
        if self.response_format == "b64_json" and not self.s3_bucket:
            raise JiMengConfigurationError(
                "response_format", "'b64_json' needs s3_bucket: image data is never pushed to XCom"
            )
        if (
            not isinstance(self.max_concurrency, int)
            or isinstance(self.max_concurrency, bool)
            or not (1 <= self.max_concurrency <= 64)
        ):
            raise JiMengConfigurationError(
                "max_concurrency", f"{self.max_concurrency!r} is not allowed; allowed: an integer in [1, 64]"
            )
        if self.max_images_per_task is not None and (
            not isinstance(self.max_images_per_task, int) or self.max_images_per_task < 1
        ):
            raise JiMengConfigurationError(
                "max_images_per_task", f"{self.max_images_per_task!r} is not allowed; allowed: a positive integer"
            )
        if self.s3_bucket:
            check_bucket_name(self.s3_bucket)

    def _build_bodies(self, hook: JiMengHook, prompts: list[str]) -> list[dict[str, Any]]:
        seed = self._seed()
        bodies = []
        for position, prompt in enumerate(prompts):
            try:
                bodies.append(
                    hook.build_body(
                        prompt,
                        model=self.model or None,
                        size=self.size or None,
                        response_format=self.response_format,
                        watermark=self.watermark,
                        image=self.image or None,
                        seed=seed,
                        sequential_image_generation=self.sequential_image_generation,
                        max_images=self.max_images,
                        optimize_prompt_mode=self.optimize_prompt_mode,
                        extra_body=self.extra_body,
                    )
                )
            except JiMengConfigurationError as error:
                if error.parameter == "prompt" and len(prompts) > 1:
                    raise JiMengConfigurationError(f"prompt[{position}]", str(error).split(": ", 1)[1]) from None
                raise
        return bodies

    # ------------------------------------------------------------------------------------- execute
    def execute(self, context: Context) -> list[str]:
        self._check_options()
        prompts = self._prompts()
        if self.response_format == "b64_json":
            return_image_blocks_to_the_os()
        with ThreadPoolExecutor(1, thread_name_prefix="jimeng-s3-setup") as setup:
            # The S3 client takes 0.1-0.5 s to build (botocore loads S3's service model; the amazon
            # provider walks the caller's stack, with source lines, for its user agent): build it
            # beside the JiMeng hook and the request bodies, on a thread whose stack is short.
            opening = setup.submit(S3ImageStore, self._s3_hook(), self._keyspace(context)) if self.s3_bucket else None
            hook = JiMengHook(
                self.jimeng_conn_id,
                max_images_per_minute=self.max_images_per_minute,
                pool_maxsize=max(8, self.max_concurrency * 2),
            )
            self._hook = hook
            bodies = self._build_bodies(hook, prompts)
            planned = sum(max_images_billed(body) for body in bodies)
            if self.max_images_per_task is not None and planned > self.max_images_per_task:
                raise JiMengConfigurationError(
                    "max_images_per_task",
                    f"this run could bill up to {planned} images ({len(prompts)} prompt(s) x up to "
                    f"{planned // len(prompts)} each), above the limit of {self.max_images_per_task}; "
                    "lower max_images, split the prompts, or raise the limit",
                )
            if self.s3_key:
                check_key_template(self.s3_key, images_per_task=planned)
            store = opening.result() if opening is not None else None
        if self.dry_run:  # type: ignore[truthy-function]
            return self._dry_run(bodies, store)

        self.log.info(
            "Generating %d prompt(s), up to %d image(s), %d at a time, into %s",
            len(prompts),
            planned,
            self.max_concurrency,
            f"s3://{store.bucket}/{store.keyspace.task_prefix}/" if store else "XCom (URLs, valid 24 h)",
        )
        try:
            outcomes, fatal = self._run(hook, bodies, store)
        finally:
            hook.close()
        return self._finish(context, prompts, bodies, outcomes, fatal, store)

    def _keyspace(self, context: Context) -> TaskKeyspace:
        ti = context["ti"]
        return TaskKeyspace(
            bucket=str(self.s3_bucket),
            prefix=self.s3_key_prefix or "",
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            map_index=getattr(ti, "map_index", -1) if getattr(ti, "map_index", -1) is not None else -1,
            key_template=self.s3_key,
        )

    def _s3_hook(self) -> Any:
        """The amazon provider's hook, its connection looked up here: only this thread talks to Airflow."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        s3_hook = S3Hook(aws_conn_id=self.aws_conn_id)
        s3_hook.conn_config  # noqa: B018  # cached; the client is built from it on the set-up thread
        return s3_hook

    def _dry_run(self, bodies: list[dict[str, Any]], store: S3ImageStore | None) -> list[str]:
        for index, body in enumerate(bodies):
            shown = {key: value for key, value in body.items() if key != "image"}
            if "image" in body:
                images = body["image"] if isinstance(body["image"], list) else [body["image"]]
                shown["image"] = [redact_url(item) if item.startswith("http") else "data:<redacted>" for item in images]
            self.log.info("Dry run, prompt %d would send: %s", index, shown)
            if store is not None:
                self.log.info(
                    "Dry run, prompt %d would store under %s",
                    index,
                    store.keyspace.uri(store.keyspace.image_key(index, 0)),
                )
        self.log.info("Dry run: nothing was sent and nothing was billed")
        return []

    # ---------------------------------------------------------------------------- the concurrent run
    def _run(
        self, hook: JiMengHook, bodies: list[dict[str, Any]], store: S3ImageStore | None
    ) -> tuple[list[PromptOutcome], BaseException | None]:
        outcomes = [PromptOutcome(prompt_index=index) for index in range(len(bodies))]
        fingerprints = [prompt_fingerprint(body) for body in bodies]
        fatal: BaseException | None = None
        #: The first S3 failure of the run: once S3 fails, nothing more is generated (paid for).
        self._storage_error = None
        #: Set by a generation thread the moment an error stops the run, so that no queued prompt is sent.
        self._halted = None
        #: Bytes of the budget each generated-but-unstored b64_json answer holds, by prompt.
        self._charges: dict[int, int] = {}
        existing: dict[str, int] = {}
        earlier_records: dict[int, dict[str, Any]] = {}
        earlier_journals: dict[int, dict[str, Any]] = {}
        journal_objects: dict[str, set[int]] = {}
        if store is not None:
            existing = store.existing_keys()
            if self.replace:
                # Nothing earlier is reused; earlier tries' journals go with this try's once records.json is written.
                journal_objects = {key: set() for key in store.journal_keys(existing)}
            else:
                earlier_records = store.read_records(existing)
                earlier_journals, journal_objects = store.read_journals(existing, len(bodies))
        self._journal_writer = JournalWriter(store, on_failure=self._on_storage_failure) if store is not None else None
        storage_workers = max(2, self.max_concurrency) if store is not None else 1
        try:
            with (
                ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="jimeng-generate") as generate_pool,
                ThreadPoolExecutor(storage_workers, thread_name_prefix="jimeng-store") as store_pool,
            ):
                generation: dict[Future[Any], int] = {}
                storing: dict[Future[Any], int] = {}
                # Futures report here as they finish: O(1) a completion, where wait() over every pending
                # future would cost O(N) each time, O(N^2) for a run of N prompts.
                finished: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()

                def track(table: dict[Future[Any], int], future: Future[Any], index: int) -> None:
                    table[future] = index
                    future.add_done_callback(finished.put)

                for index, body in enumerate(bodies):
                    if store is not None and not self.replace:
                        resumed = self._resume(
                            store,
                            index,
                            fingerprints[index],
                            earlier_records.get(index),
                            earlier_journals.get(index),
                            existing,
                            outcomes[index],
                        )
                        if isinstance(resumed, tuple):
                            journaled, images = resumed
                            task = store_pool.submit(
                                self._store_result,
                                store,
                                body,
                                fingerprints[index],
                                outcomes[index],
                                journaled,
                                images,
                                existing,
                            )
                            track(storing, task, index)
                        if resumed is not None:
                            continue
                    track(
                        generation,
                        generate_pool.submit(self._generate, hook, store, index, body, fingerprints[index]),
                        index,
                    )

                while generation or storing:
                    try:
                        done = [finished.get(timeout=1.0)]
                    except queue.Empty:
                        done = []
                    if self._stop.is_set():
                        for future in generation:
                            future.cancel()
                    for future in done:
                        if future in generation:
                            index = generation.pop(future)
                            if not generation and self._journal_writer is not None:
                                self._journal_writer.flush()  # the last answer is in: nothing to wait for
                            try:
                                result: GenerationResult = future.result()
                            except BaseException as error:
                                # Record every failure, also those after the first fatal one (no short-circuit).
                                stops_run = self._record_request_failure(outcomes[index], error, generation)
                                fatal = fatal or stops_run
                                continue
                            outcomes[index].requests += 1
                            outcomes[index].usage = result.usage.as_dict()
                            if store is None:
                                self._keep_urls(outcomes[index], result)
                            else:
                                task = store_pool.submit(
                                    self._store_result,
                                    store,
                                    bodies[index],
                                    fingerprints[index],
                                    outcomes[index],
                                    result,
                                    result.succeeded,
                                )
                                track(storing, task, index)
                        elif future in storing:
                            index = storing.pop(future)
                            self._budget.release(self._charges.pop(index, 0))
                            try:
                                future.result()
                            except BaseException as error:
                                outcomes[index].incomplete = True
                                outcomes[index].failures.append(f"prompt {index}: not stored: {_describe_error(error)}")
                    if self._storage_error is not None and fatal is None:
                        fatal = self._storage_error
                        cancelled = sum(future.cancel() for future in generation)
                        self.log.error(
                            "Stopping: S3 failed (%s); %d prompt(s) not sent, so nothing more is paid for until "
                            "storage works again",
                            self._storage_error,
                            cancelled,
                        )
        finally:
            if self._journal_writer is not None:
                self._journal_writer.close()
        if store is not None:
            fatal = self._write_records(store, outcomes, journal_objects) or fatal
        return outcomes, fatal

    def _on_storage_failure(self, error: JiMengStorageError) -> None:
        """Stop paying for prompts S3 cannot take (called by the journal writer)."""
        self._storage_error = self._storage_error or error

    def _write_records(
        self, store: S3ImageStore, outcomes: list[PromptOutcome], earlier_journals: dict[str, set[int]]
    ) -> JiMengStorageError | None:
        """Write ``records.json``, then drop the journals it supersedes; a refused write keeps them all."""
        records = [outcome.record for outcome in outcomes if outcome.record is not None]
        if not records:
            return None
        try:
            store.write_records(records)
        except JiMengStorageError as error:
            self._storage_error = self._storage_error or error
            for outcome in outcomes:
                if outcome.record is not None and not outcome.reused:
                    outcome.failures.append(
                        f"prompt {outcome.prompt_index}: {len(outcome.records)} image(s) stored but not its record "
                        f"(kept for a retry, which needs no new request): {error}"
                    )
                    outcome.incomplete = True
            return error
        finished = {outcome.prompt_index for outcome in outcomes if outcome.record is not None}
        written = self._journal_writer.written if self._journal_writer is not None else {}
        superseded = [key for key, prompts in {**earlier_journals, **written}.items() if prompts <= finished]
        store.discard_journals(superseded, sorted(finished))
        return None

    @staticmethod
    def _journal(fingerprint: str, result: GenerationResult, *, with_data: bool = False) -> dict[str, Any]:
        """What a retry needs to finish a response's images without a new request (base64 data only locally)."""
        images = []
        for image in result.succeeded:
            item: dict[str, Any] = {"index": image.index, "url": image.url, "size": image.size}
            if with_data and image.b64_json:
                item["b64_json"] = image.b64_json
            images.append(item)
        failed = [
            {"index": image.index, "error_code": image.error_code, "error_message": image.error_message}
            for image in result.failed
        ]
        return {
            "fingerprint": fingerprint,
            "written_at": time.time(),
            "model": result.model,
            "created": result.created,
            "request_id": result.request_id,
            "usage": result.usage.as_dict(),
            "images": images,
            "failed": failed,
        }

    def _generate(
        self, hook: JiMengHook, store: S3ImageStore | None, index: int, body: dict[str, Any], fingerprint: str
    ) -> GenerationResult:
        """Send one prompt and hand its journal entry to the journal writer, before storage even starts.

        The journal is what lets a retry finish images this try paid for if the process dies now; the
        writer batches it off this thread, which goes on to its next prompt at once. A refused journal
        write stops the run before further prompts are sent. A ``b64_json`` answer waits for room in
        the memory budget before its body is read, and holds that room until its images are stored.
        """
        if self._halted is not None or self._storage_error is not None:
            # The run stopped while this prompt waited for a free slot: do not pay for it.
            raise CancelledError
        charge = 0

        def before_body(length: int | None) -> None:
            nonlocal charge
            self._budget.release(charge)  # an earlier attempt's, if it broke off
            charge = self._budget.acquire(B64_MEMORY_FACTOR * (length or UNKNOWN_BODY_BYTES))

        try:
            result = hook.send(body, before_body=before_body if self.response_format == "b64_json" else None)
        except BaseException as error:
            self._budget.release(charge)
            if self._is_fatal(error):
                self._halted = self._halted or error
            raise
        self._charges[index] = charge
        if self._journal_writer is not None and result.succeeded:
            self._journal_writer.add(index, self._journal(fingerprint, result))
        return result

    @staticmethod
    def _is_fatal(error: BaseException) -> bool:
        """Whether no other prompt of the run could escape this error (bad key, spending cap, bad request)."""
        if not isinstance(error, JiMengError):
            return True
        return isinstance(error, _FATAL_ERRORS) or (
            isinstance(error, JiMengInvalidRequestError) and not isinstance(error, JiMengContentPolicyError)
        )

    def _record_request_failure(
        self, outcome: PromptOutcome, error: BaseException, pending: dict[Future[Any], int]
    ) -> BaseException | None:
        if isinstance(error, CancelledError):
            outcome.failures.append(f"prompt {outcome.prompt_index}: not sent (the run stopped)")
            return None
        outcome.requests += 1
        outcome.failures.append(f"prompt {outcome.prompt_index}: {_describe_error(error)}")
        self.log.error("Prompt %d failed: %s", outcome.prompt_index, _describe_error(error))
        if self._is_fatal(error):
            cancelled = sum(future.cancel() for future in pending)
            if cancelled:
                self.log.error("Stopping: %d prompt(s) not sent because this error affects every request", cancelled)
            return error
        return None

    def _keep_urls(self, outcome: PromptOutcome, result: GenerationResult) -> None:
        for image in result.images:
            if image.ok and image.url:
                outcome.outputs.append(image.url)
                outcome.records.append(self._image_record(outcome.prompt_index, image, result, url=image.url))
            else:
                outcome.failures.append(self._image_failure(outcome.prompt_index, image, result))

    @staticmethod
    def _image_failure(prompt_index: int, image: GeneratedImage, result: GenerationResult) -> str:
        return (
            f"prompt {prompt_index} image {image.index}: {image.error_code} "
            f"(request id {result.request_id or 'n/a'}): {image.error_message or ''}".rstrip(": ")
        )

    def _image_record(
        self,
        prompt_index: int,
        image: GeneratedImage,
        result: GenerationResult,
        *,
        url: str | None = None,
        store: S3ImageStore | None = None,
        key: str | None = None,
        size_bytes: int | None = None,
        sha256: str | None = None,
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "prompt_index": prompt_index,
            "image_index": image.index,
            "size": image.size,
            "request_id": result.request_id,
            "model": result.model,
        }
        if store is not None and key is not None:
            record.update(
                {
                    "uri": store.keyspace.uri(key),
                    "bucket": store.bucket,
                    "key": key,
                    "bytes": size_bytes,
                    "sha256": sha256,
                }
            )
        else:
            record["url"] = redact_url(url)
        return record

    # ------------------------------------------------------------------------------------- storage
    def _resume(
        self,
        store: S3ImageStore,
        index: int,
        fingerprint: str,
        record: Mapping[str, Any] | None,
        journal: Mapping[str, Any] | None,
        existing: Mapping[str, int],
        outcome: PromptOutcome,
    ) -> tuple[GenerationResult, list[GeneratedImage]] | bool | None:
        """Reuse what an earlier try stored: ``True`` (all done), the journaled answer and its images for
        ``_store_result`` to finish (no new request), or ``None`` (the prompt must be generated)."""
        if record is not None and record.get("fingerprint") == fingerprint:
            if not record.get("images") and record.get("failures"):
                # Nothing of it was stored (lost at download, or refused by moderation, which is not billed):
                # generating it again cannot pay twice for anything this task kept.
                self.log.info("Prompt %d: an earlier try stored none of its images; generating it again", index)
                return None
            outcome.reused = True
            outcome.record = dict(record)
            outcome.records = list(record.get("images", []))
            outcome.outputs = [item["uri"] for item in outcome.records]
            outcome.failures = list(record.get("failures", []))
            self.log.info("Prompt %d: reusing %d image(s) stored by an earlier try", index, len(outcome.records))
            return True
        if journal is None or journal.get("fingerprint") != fingerprint:
            return None
        images = [
            GeneratedImage(
                index=int(item["index"]), url=item.get("url"), b64_json=item.get("b64_json"), size=item.get("size")
            )
            for item in journal.get("images", [])
        ]
        missing = [image for image in images if store.keyspace.image_key(index, image.index) not in existing]
        fresh = time.time() - float(journal.get("written_at", 0)) < JOURNAL_MAX_AGE_SECONDS
        if not all(image.b64_json or (fresh and image.url) for image in missing):
            return None  # what is missing cannot be fetched any more (expired URLs, or base64 data lost)
        self.log.info(
            "Prompt %d: finishing the storage of an earlier try's images (no new request): %d to download",
            index,
            len(missing),
        )
        failed = [GeneratedImage(**item) for item in journal.get("failed", [])]
        result = GenerationResult(
            model=journal.get("model"),
            created=journal.get("created"),
            images=[*images, *failed],
            usage=Usage.from_json(journal.get("usage") if isinstance(journal.get("usage"), Mapping) else None),
            request_id=journal.get("request_id"),
        )
        outcome.usage = {"generated_images": 0, "resumed_images": len(images)}
        outcome.reused = True
        return result, images

    def _store_result(
        self,
        store: S3ImageStore,
        body: Mapping[str, Any] | None,
        fingerprint: str,
        outcome: PromptOutcome,
        result: GenerationResult,
        images: list[GeneratedImage],
        existing: Mapping[str, int] | None = None,
    ) -> None:
        """Store ``images`` of one response (those in ``existing`` are checked, not stored again), then
        make the prompt's record; ``records.json`` is written once for the whole run."""
        keyspace = store.keyspace
        index = outcome.prompt_index
        records: list[dict[str, Any]] = []
        failures = [self._image_failure(index, image, result) for image in result.failed]
        #: Paid images kept for a retry (their journal stays), one failure line each.
        unstored: list[str] = []
        # Once S3 has failed in this run, do not wait on it again for every image.
        storage_error: JiMengStorageError | None = self._storage_error
        request_id = result.request_id or "n/a"
        for image in images:
            key = keyspace.image_key(index, image.index)
            metadata = {
                "jimeng-request-id": str(result.request_id or ""),
                "jimeng-model": str(result.model or ""),
                "jimeng-size": str(image.size or ""),
                "airflow-dag-id": keyspace.dag_id,
                "airflow-run-id": keyspace.run_id,
                "airflow-task-id": keyspace.task_id,
                "airflow-map-index": str(keyspace.map_index),
            }
            not_stored = f"prompt {index} image {image.index}: not stored (request id {request_id}, kept for a retry)"
            if storage_error is not None:
                unstored.append(f"{not_stored}: not attempted after an earlier S3 failure ({storage_error})")
                continue
            try:
                head = store.head(key) if existing and key in existing else None
                stored_by = (head or {}).get("Metadata", {}).get("jimeng-request-id")
                if head is not None and stored_by == metadata["jimeng-request-id"]:
                    size_bytes, sha256 = int(head.get("ContentLength", 0)), None
                else:  # not stored yet, or an older answer's image under the same key
                    size_bytes, sha256 = self._store_image(store, key, image, metadata)
            except JiMengDownloadInterruptedError as error:
                unstored.append(f"{not_stored}: {error}")
                continue
            except JiMengDownloadError as error:
                failures.append(f"prompt {index} image {image.index}: ImageLost (request id {request_id}): {error}")
                continue
            except JiMengStorageError as error:
                storage_error = error
                unstored.append(f"{not_stored}: {error}")
                continue
            records.append(
                self._image_record(index, image, result, store=store, key=key, size_bytes=size_bytes, sha256=sha256)
            )
        outcome.records = records
        outcome.outputs = [record["uri"] for record in records]
        outcome.failures.extend(failures + unstored)
        if unstored:
            # Keep the journal (and, when S3 is the problem, a local copy that holds base64 data too):
            # a retry stores what is missing instead of paying again.
            outcome.incomplete = True
            if storage_error is not None:
                self._storage_error = self._storage_error or storage_error
                store.save_local_journal(index, self._journal(fingerprint, result, with_data=True))
            return
        outcome.record = self._prompt_record(store, index, body, fingerprint, result, records, failures)

    @staticmethod
    def _prompt_record(
        store: S3ImageStore,
        index: int,
        body: Mapping[str, Any] | None,
        fingerprint: str,
        result: GenerationResult,
        records: list[dict[str, Any]],
        failures: list[str],
    ) -> dict[str, Any]:
        """A prompt's entry of ``records.json``: that it is done, with everything needed to audit it."""
        return {
            "prompt_index": index,
            "fingerprint": fingerprint,
            "prompt": body.get("prompt") if body else None,
            "parameters": {k: v for k, v in (body or {}).items() if k not in ("prompt", "image")},
            "reference_images": reference_image_count(body or {}),
            "model": result.model,
            "created": result.created,
            "request_id": result.request_id,
            "usage": result.usage.as_dict(),
            "images": records,
            "failures": failures,
        }

    def _store_image(
        self, store: S3ImageStore, key: str, image: GeneratedImage, metadata: dict[str, str]
    ) -> tuple[int, str]:
        if image.b64_json:
            try:
                data = base64.b64decode(image.b64_json, validate=True)
            except (binascii.Error, ValueError):
                raise JiMengDownloadError(f"image {image.index}'s base64 data does not decode") from None
            return store.upload_bytes(key, data, metadata)
        if self._hook is None or not image.url:
            raise JiMengDownloadError(f"image {image.index} has neither data nor a URL")
        # Headers are in, the body is not: wait for memory there, while the image stays on the server.
        with (
            self._hook.open_image(image.url) as download,
            self._budget.hold((download.content_length or UNKNOWN_BODY_BYTES) + DOWNLOAD_READ_OVERHEAD),
        ):
            size_bytes, sha256 = store.upload_stream(key, download, metadata)
        return size_bytes, sha256

    # ------------------------------------------------------------------------------------- results
    def _finish(
        self,
        context: Context,
        prompts: list[str],
        bodies: list[dict[str, Any]],
        outcomes: list[PromptOutcome],
        fatal: BaseException | None,
        store: S3ImageStore | None,
    ) -> list[str]:
        outputs = [output for outcome in outcomes for output in outcome.outputs]
        records = [record for outcome in outcomes for record in outcome.records]
        failures = [failure for outcome in outcomes for failure in outcome.failures]
        usage = {
            "generated_images": sum(int(o.usage.get("generated_images") or 0) for o in outcomes),
            "output_tokens": sum(int(o.usage.get("output_tokens") or 0) for o in outcomes),
            "total_tokens": sum(int(o.usage.get("total_tokens") or 0) for o in outcomes),
            "requests": sum(o.requests for o in outcomes),
            "reused_prompts": sum(1 for o in outcomes if o.reused),
            # What the API pushed back with: 429 answers received, and retries made for any cause.
            "rate_limited": self._hook.stats["rate_limited"] if self._hook else 0,
            "retries": self._hook.stats["retries"] if self._hook else 0,
        }
        ti = context["ti"]
        ti.xcom_push(key="images", value=records)
        ti.xcom_push(key="usage", value=usage)
        if store is not None:
            self._emit_asset_events(context, store, len(records))
        self.log.info(
            "JiMeng: %d image(s) kept, %d failure(s); billed %d image(s) in %d request(s)",
            len(outputs),
            len(failures),
            usage["generated_images"],
            usage["requests"],
        )
        unstored = [outcome.prompt_index for outcome in outcomes if outcome.incomplete]
        if unstored:
            # Whatever on_partial_failure says: succeeding now would leave paid images unstored for good.
            self.log.error(
                "Prompt(s) %s: generated and paid for but not stored; a retry of this task stores them "
                "without a new request",
                unstored,
            )
        if (
            isinstance(fatal, (JiMengConfigurationError, JiMengInvalidRequestError))
            and not isinstance(fatal, JiMengContentPolicyError)
            and not unstored
        ):
            # The service called the request itself invalid (unknown model, bad parameter): every try
            # would send the same request, so do not retry. A bad key or a spending cap can be fixed
            # between tries, so those keep the task's retries.
            raise JiMengRunAbortedError(failures, stored=len(outputs)) from None
        if fatal is not None or unstored:
            raise JiMengGenerationIncompleteError(failures, stored=len(outputs)) from None
        if failures:
            if self.on_partial_failure == "fail":
                raise JiMengGenerationIncompleteError(failures, stored=len(outputs))
            for failure in failures:
                self.log.warning("Image not produced: %s", failure)
        self.images_link_target = outputs[0] if outputs else None
        return outputs

    def _emit_asset_events(self, context: Context, store: S3ImageStore, count: int) -> None:
        """Attach what was stored to declared outlets; an AssetAlias outlet gets the task's prefix as an Asset."""
        from airflow.sdk import Asset, AssetAlias

        outlet_events = context.get("outlet_events")
        if outlet_events is None:
            return
        extra: dict[str, Any] = {"prefix": store.keyspace.uri(store.keyspace.task_prefix + "/"), "images": count}
        for outlet in self.outlets or []:
            if isinstance(outlet, AssetAlias):
                outlet_events[outlet].add(Asset(extra["prefix"]), extra=extra)
            elif isinstance(outlet, Asset):
                outlet_events[outlet].extra = extra

    def on_kill(self) -> None:
        """Cancel prompts not yet sent, stop retry waits and close connections."""
        self._stop.set()
        if self._hook is not None:
            self._hook.close()
