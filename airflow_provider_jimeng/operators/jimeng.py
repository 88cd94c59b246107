"""``JiMengGenerateOperator``: prompts in, durable images out.

The operator is the Airflow front end of a generation run: it renders prompts (Jinja, prompt files,
XCom), checks every parameter after rendering (:mod:`airflow_provider_jimeng.options`), refuses a run
that could bill more than allowed or write two images to one key, then hands the try to a
:class:`~airflow_provider_jimeng.run.engine.GenerationRun` and turns its outcome into XComs, asset
events and the task's final state. Downstream tasks get small things only: ``s3://`` URIs (or,
without storage, the image URLs) and per-image records.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.nativetypes
from airflow.sdk import BaseOperator, XComArg

from airflow_provider_jimeng.api.reference_images import normalize_reference_images
from airflow_provider_jimeng.api.response import redact_url
from airflow_provider_jimeng.budget import SpendingCap, return_image_blocks_to_the_os
from airflow_provider_jimeng.connections import get_connection
from airflow_provider_jimeng.coordination.redis_client import interrupt_shared_redis
from airflow_provider_jimeng.exceptions import (
    JiMengAuthenticationError,
    JiMengConfigurationError,
    JiMengContentPolicyError,
    JiMengGenerationIncompleteError,
    JiMengInvalidRequestError,
    JiMengRunAbortedError,
    JiMengRunStoppedError,
)
from airflow_provider_jimeng.hooks.connection_config import refused_key_message, wrong_path_message
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.hooks.visual import (
    VISUAL_API,
    VisualClient,
    build_req_json,
    connection_api,
    max_images_billed_visual,
    visual_config,
)
from airflow_provider_jimeng.lineage import RunLineage, find_prompt_file, group_images
from airflow_provider_jimeng.links.jimeng import JiMengImagesLink
from airflow_provider_jimeng.options import (
    GENERATION_PARAMETERS,
    RUN_PARAMETERS,
    GenerationOptions,
    RunOptions,
    as_prompts,
    as_text,
    parse_output_path,
)
from airflow_provider_jimeng.redaction import redact_value
from airflow_provider_jimeng.run.engine import GenerationRun
from airflow_provider_jimeng.run.visual import (
    VisualJournal,
    VisualTaskSource,
    submit_prompts,
    visual_submit_bodies,
)
from airflow_provider_jimeng.storage.base import ImageStore
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.objstore import ObjectImageStore
from airflow_provider_jimeng.storage.records import DeliveredImage, StoredImage, committed_images
from airflow_provider_jimeng.storage.s3 import S3ImageStore, bounded_s3_hook
from airflow_provider_jimeng.triggers.visual import DEFAULT_POLL_INTERVAL, JiMengVisualTrigger, resume_hold_off

#: What native rendering may turn into a number: decimal digits, a sign, a point (no 0x, e, _).
_PLAIN_DECIMAL = re.compile(r"^\s*[+-]?[0-9]+(\.[0-9]*)?\s*$", re.ASCII)

if TYPE_CHECKING:
    from airflow.sdk import Context


class JiMengGenerateOperator(BaseOperator):
    """Generate images with JiMeng / Seedream from templated prompts and hand downstream their keys.

    Every parameter is checked after rendering, before any request (:mod:`airflow_provider_jimeng.options`):
    text a template renders (``"False"``, ``"7"``, ``'{"n": 2}'``) is read as meant, and what is
    ambiguous (``"None"``, ``"3.7"`` for an integer, a list rendered to text) is refused.

    :param prompt: a prompt, a list of prompts, a prompt file (``.txt``, ``.j2``, ``.jinja``, read and
        rendered by Airflow) or an XComArg resolving to a string or list of strings. (templated)
    :param jimeng_conn_id: the ``jimeng`` connection. (templated)
    :param model: model or endpoint id; the connection's default when ``None``. (templated)
    :param size: ``1K``/``2K``/``4K`` (``3K`` on Seedream 5.0) or ``WxH`` as the model allows. (templated)
    :param response_format: ``url`` or ``b64_json`` (``b64_json`` needs ``s3_bucket`` or ``output_path``). (templated)
    :param watermark: add the "AI generated" mark; the connection's default (true) when ``None``. (templated)
    :param image: reference image(s) for edits: URLs, data URIs or local files. (templated)
    :param seed: integer seed in [-1, 2147483647]. (templated)
    :param sequential_image_generation: ``auto`` to let the model return a set of related images. (templated)
    :param max_images: the most images of a set (1-15, minus reference images); billed per image. (templated)
    :param optimize_prompt_mode: let the service rewrite the prompt before generating: ``standard``
        (better prompts, slower) or ``fast``, as the model allows (Seedream 4.5 and 5.0: ``standard``
        only); ``None`` sends no option. (templated)
    :param optimize_prompt_thinking: ``optimize_prompt_options.thinking`` as the official SDK knows it,
        sent as given, with or without a mode (not for Seedream 3.0). (templated)
    :param guidance_scale: how closely Seedream 3.0 follows the prompt, in [1, 10]. (templated)
    :param output_format: ``jpeg`` or ``png`` (Seedream 5.0); PNG images are stored as ``.png``. (templated)
    :param web_search: let Seedream 5.0 search the web for the prompt (billed per search, see the
        ``usage`` XCom). (templated)
    :param stream: receive a set's images as they are made (server-sent events). A set that breaks
        off keeps what it delivered, records the rest as failed with the service's code, and is never
        sent again by the hook. (templated)
    :param max_concurrency: requests in flight at once (the API's latency is seconds per image).
    :param max_images_per_minute: client-side pacing; the connection's extra when ``None``.
    :param aws_conn_id: the AWS connection for S3. (templated)
    :param s3_bucket: store images in this bucket and push ``s3://`` URIs; without it the task returns
        the signed image URLs (valid 24 hours). Once given, it must render to a valid bucket name:
        never quietly to no storage. (templated)
    :param s3_key_prefix: prefix of the default keys under ``s3_bucket``. (templated)
    :param output_path: store images under this object-storage URL instead of ``s3_bucket`` (one of the
        two): ``gs://bucket/prefix``, ``abfs://container/prefix``, ``file:///data/images`` or any scheme
        Airflow's ``ObjectStoragePath`` knows, through the backend's provider; the URL's path is the
        prefix of the default keys and the root of ``s3_key``. Keys, records, journals and resuming
        without paying twice are the same as on S3 (see docs/storage.md). An ``s3://`` URL takes the
        fast S3 path. (templated)
    :param output_conn_id: the connection of ``output_path`` (for an ``s3://`` URL, in place of
        ``aws_conn_id``); ``None``: the backend's default credentials. (templated)
    :param s3_key: where to publish a copy of each image (the canonical copy stays under the default
        keys): a template with ``{dag_id}``, ``{run_id}``, ``{task_id}``, ``{map_index}``,
        ``{prompt_index}``, ``{image_index}``, ``{ext}``; Jinja renders first, then these fields are filled
        with key-safe values. Every key the run can bill is rendered and proved unique, across runs, map
        indexes, tasks and DAGs too, before the first request. (templated)
    :param replace: regenerate and overwrite what an earlier run of the task stored: once per run (the
        first try, or the first after a clear); an automatic retry reuses what its failed try paid for.
        (templated)
    :param on_partial_failure: ``fail`` (default: store what succeeded, then fail listing each failed
        image's code and request id) or ``continue`` (store what succeeded and succeed with a warning).
        (templated)
    :param dry_run: render and validate everything and log what would be sent; call nothing billable.
        (templated)
    :param max_images_per_task: refuse, before any request, a run that could bill more images, and send
        no attempt (hook retries included) that could take what was billed or possibly billed over it.
        (templated)
    :param extra_body: extra JSON fields for gateways (for example ``n``, counted as images per request);
        named fields cannot be overridden. (templated)
    :param deferrable: on a Visual API connection (extra ``api: visual``): submit every prompt, journal
        the task ids in the task's storage, then free the worker slot while Airflow's triggerer waits
        (:class:`~airflow_provider_jimeng.triggers.visual.JiMengVisualTrigger`); the task resumes to store
        the images. Needs ``s3_bucket`` or ``output_path``. ``None``: Airflow's ``[operators]
        default_deferrable`` on a Visual API connection, ``False`` on an Ark one (whose answer carries the
        images: it cannot be deferred). See docs/visual-api.md.
    :param poll_interval: Visual API: seconds between polls of the tasks (on the worker or the triggerer).
    :param poll_timeout: Visual API: give up on a task this many seconds after its submit (default: its
        12 h expiry); a retry polls it again, never re-submits it.
    """

    template_fields: Sequence[str] = (
        "prompt",
        *GENERATION_PARAMETERS,
        "s3_bucket",
        # Pacing and concurrency size the pools: they are plain values, not templates.
        *(name for name in RUN_PARAMETERS if name not in ("max_concurrency", "max_images_per_minute")),
        "jimeng_conn_id",
        "aws_conn_id",
    )
    template_ext: Sequence[str] = (".txt", ".j2", ".jinja")
    # Prompts are prose: highlight them as text with Jinja, never as Python.
    template_fields_renderers = {"prompt": "jinja", "extra_body": "json"}
    ui_color = "#f3e8ff"
    operator_extra_links = (JiMengImagesLink(),)
    # The active run holds threads and locks, which cannot be deep-copied; Airflow deep-copies operators
    # (DAG.partial_subset, and Airflow 3.0 when converting a DAG for dag.test()).
    shallow_copy_attrs: Sequence[str] = ("_active_run", "_submitting", "_jimeng_conn")
    # Not shown in the UI: what the try wrote, kept for the OpenLineage methods (docs/lineage.md).
    _lineage: RunLineage | None = None
    #: Template fields shown redacted between rendering and execute: name -> (real value, shown value).
    _hidden_rendered: dict[str, tuple[Any, Any]] = {}  # always replaced, never mutated

    def __init__(
        self,
        *,
        prompt: str | Sequence[str] | Any,
        jimeng_conn_id: str = JiMengHook.default_conn_name,
        model: str | None = None,
        size: str | None = None,
        response_format: str = "url",
        watermark: bool | str | None = None,
        image: Any = None,
        seed: int | str | None = None,
        sequential_image_generation: str | None = None,
        max_images: int | str | None = None,
        optimize_prompt_mode: str | None = None,
        optimize_prompt_thinking: str | None = None,
        guidance_scale: float | str | None = None,
        output_format: str | None = None,
        web_search: bool | str = False,
        stream: bool | str = False,
        max_concurrency: int = 4,
        max_images_per_minute: float | None = None,
        aws_conn_id: str | None = "aws_default",
        s3_bucket: str | None = None,
        s3_key_prefix: str = "jimeng",
        s3_key: str | None = None,
        output_path: str | None = None,
        output_conn_id: str | None = None,
        replace: bool | str = False,
        on_partial_failure: str = "fail",
        dry_run: bool | str = False,
        max_images_per_task: int | str | None = None,
        extra_body: Mapping[str, Any] | str | None = None,
        deferrable: bool | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        poll_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prompt = prompt
        #: Where the prompt comes from, before rendering replaces a prompt file by its text (lineage).
        self.prompt_source = _prompt_source(prompt, self.template_ext)
        self._prompt_template: str | None = prompt if isinstance(prompt, str) and self.prompt_source == "file" else None
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
        self.optimize_prompt_thinking = optimize_prompt_thinking
        self.guidance_scale = guidance_scale
        self.output_format = output_format
        self.web_search = web_search
        self.stream = stream
        self.max_concurrency = max_concurrency
        self.max_images_per_minute = max_images_per_minute
        self.aws_conn_id = aws_conn_id
        self.s3_bucket = s3_bucket
        #: Storage was asked for: a bucket that renders empty is then an error, never URLs in XCom.
        self.storage_requested = s3_bucket is not None
        self.s3_key_prefix = s3_key_prefix
        self.s3_key = s3_key
        self.output_path = output_path
        self.output_conn_id = output_conn_id
        #: An output_path was given: it must render to a URL, never quietly to no storage.
        self.output_requested = output_path is not None
        self.replace = replace
        self.on_partial_failure = on_partial_failure
        # Shadows BaseOperator.dry_run(), a method Airflow itself never calls.
        self.dry_run = dry_run  # type: ignore[method-assign,assignment]
        self.max_images_per_task = max_images_per_task
        self.extra_body = extra_body
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.poll_timeout = poll_timeout
        #: Fields ``@task.jimeng``'s function set, carried through a deferral to ``execute_complete``.
        self._deferred_fields: dict[str, Any] = {}
        #: The ``jimeng`` connection, once looked up by execute.
        self._jimeng_conn: Any = None
        #: The Visual API client while it submits, so that on_kill can stop it.
        self._submitting: VisualClient | None = None
        #: The first image of a successful run, for the "JiMeng images" link (``None`` until then).
        self.images_link_target: str | None = None
        #: The try in progress, so that on_kill can stop it (``None`` outside execute).
        self._active_run: GenerationRun | None = None

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
        self._hide_rendered_secrets()

    def _hide_rendered_secrets(self) -> None:
        """Show the template fields redacted until ``execute``: signed URLs, credentials, image data.

        Airflow stores the rendered fields (the UI's Rendered Template tab) by reading these attributes
        right after rendering, through a secrets masker that knows registered secrets only: a signed
        reference-image URL (``X-Tos-Signature``) was kept verbatim. Each field whose redacted form
        differs holds that form until :meth:`execute`, which takes the real value back.
        """
        hidden: dict[str, tuple[Any, Any]] = {}
        for name in self.template_fields:
            value = getattr(self, name, None)
            shown = redact_value(value)
            if shown is not value:
                hidden[name] = (value, shown)
                setattr(self, name, shown)
        self._hidden_rendered = hidden

    def _reveal_rendered_secrets(self) -> None:
        """The real values back, for the task's own use (a field set anew since, by ``@task.jimeng``, stays)."""
        for name, (value, shown) in self._hidden_rendered.items():
            if getattr(self, name, None) is shown:
                setattr(self, name, value)
        self._hidden_rendered = {}

    def _renders_native(self, dag: Any) -> bool:
        """Airflow's choice of native rendering: the operator's own setting (3.2+), else the DAG's.

        Airflow 3.2's ``_should_render_native``, which 3.0 and 3.1 do not have (they read the DAG's only).
        """
        own = getattr(self, "render_template_as_native_obj", None)
        if own is not None:
            return bool(own)
        return bool(dag is not None and dag.render_template_as_native_obj)

    def _render(self, template: jinja2.Template, context: Any, dag: Any = None) -> Any:
        """Airflow's rendering, except that native rendering makes numbers of plain decimals only.

        Jinja's native rendering ``literal_eval``s the text: ``'0x10'``, ``'1e3'`` or ``'1_000'`` (a
        prompt, an id, a typo) would become 16, 1000.0 and 1000. Such text stays text, to be checked as
        written; a real number (``{{ params.seed }}`` holding 7) and ``'7'`` or ``'2.5'`` stay numbers.
        Rendered as Airflow's ``render_template(native=True)`` does, with that one difference.
        """
        if dag is None:
            dag = self.get_dag()
        if not self._renders_native(dag):
            return super()._render(template, context, dag)
        context = copy.copy(context)
        env = template.environment
        if template.globals:
            context.update((k, v) for k, v in template.globals.items() if k not in context)
        try:
            nodes = list(template.root_render_func(env.context_class(env, context, template.name, template.blocks)))
        except Exception:
            env.handle_exception()  # the traceback points at the template
        if not nodes:
            return None
        if len(nodes) == 1 and not isinstance(nodes[0], str):
            return nodes[0]  # a value itself (a param, an XCom), not text
        text = "".join(str(node) for node in nodes)
        rendered = jinja2.nativetypes.native_concat([text])
        if isinstance(rendered, (int, float, complex)) and not isinstance(rendered, bool):
            return rendered if _PLAIN_DECIMAL.match(text) else text
        return rendered

    # ---------------------------------------------------------------------------------- validation
    def checked_parameters(self) -> tuple[list[str], GenerationOptions, RunOptions]:
        """Every parameter, as rendered, coerced and checked: the prompts and the two option models."""
        prompts = as_prompts(self.prompt)
        generation = GenerationOptions.parse(**{name: getattr(self, name) for name in GENERATION_PARAMETERS})
        run = RunOptions.parse(
            storage_requested=self.storage_requested,
            s3_bucket=self.s3_bucket,
            **{name: getattr(self, name) for name in RUN_PARAMETERS},
        )
        if self.output_requested and run.output_path is None and run.s3_bucket is None:
            raise JiMengConfigurationError(
                "output_path", f"rendered to {self.output_path!r}; allowed: an object-storage URL such as 'gs://b/p'"
            )
        for name in ("jimeng_conn_id", "aws_conn_id"):
            value = getattr(self, name)
            if name == "aws_conn_id" and value is None:
                continue  # boto3's own credential chain
            # A connection that does not exist would fail the lookup with a retried AirflowNotFoundException.
            as_text(name, value, allowed="a connection id", optional=False)
        if generation.response_format == "b64_json" and not run.stores:
            raise JiMengConfigurationError(
                "response_format", "'b64_json' needs s3_bucket or output_path: image data is never pushed to XCom"
            )
        return prompts, generation, run

    def _build_bodies(self, hook: JiMengHook, options: GenerationOptions, prompts: list[str]) -> list[dict[str, Any]]:
        """One body per prompt; reference images are read, encoded and checked once, and shared by all."""
        if options.image is not None:
            options = dataclasses.replace(options, image=normalize_reference_images(options.image))
        bodies = []
        for position, prompt in enumerate(prompts):
            try:
                bodies.append(hook.build_body(prompt, options))
            except JiMengConfigurationError as error:
                if error.parameter == "prompt" and len(prompts) > 1:
                    raise JiMengConfigurationError(f"prompt[{position}]", error.detail) from None
                raise
        return bodies

    # ------------------------------------------------------------------------------------- execute
    def execute(self, context: Context) -> list[str]:
        self._reveal_rendered_secrets()
        try:
            return self._execute(context)
        finally:
            # What Airflow stores after the task (``@task.jimeng`` stores the fields it set) stays redacted.
            self._hide_rendered_secrets()

    def _execute(self, context: Context) -> list[str]:
        self._lineage = None
        prompts, generation, options = self.checked_parameters()
        if self._speaks_visual_api():
            return self._execute_visual(context, prompts, generation, options)
        if generation.response_format == "b64_json":
            return_image_blocks_to_the_os()
        keyspace = self._keyspace(context, options, generation) if options.stores else None
        with ThreadPoolExecutor(1, thread_name_prefix="jimeng-s3-setup") as setup:
            opening = self._open_store(setup, options, keyspace)
            hook = JiMengHook(
                self.jimeng_conn_id,
                max_images_per_minute=options.max_images_per_minute,
                pool_maxsize=max(8, options.max_concurrency * 2),
            )
            bodies = self._build_bodies(hook, generation, prompts)
            per_prompt = [hook.images_billed(body) for body in bodies]
            planned = self._check_planned(per_prompt, options)
            if keyspace is not None:
                keyspace.check_image_keys(per_prompt)
            store = opening.result() if opening is not None else None
        if store is not None and hook.config.redis_conn_id is not None and not options.dry_run:
            store.shared_journal = self._shared_journal(hook.config.redis_conn_id, store.keyspace)
        if options.dry_run:
            return self._dry_run(bodies, keyspace)

        self.log.info(
            "Generating %d prompt(s), up to %d image(s), %d at a time, into %s",
            len(prompts),
            planned,
            options.max_concurrency,
            keyspace.uri(keyspace.task_prefix + "/") if keyspace else "XCom (URLs, valid 24 h)",
        )
        return self._run_generation(context, hook, bodies, store, options)

    def _run_generation(
        self, context: Context, hook: Any, bodies: list[dict[str, Any]], store: ImageStore | None, options: RunOptions
    ) -> list[str]:
        """Run the engine over ``bodies`` with ``hook`` (the Ark hook, or the Visual API's task source), then finish."""
        run = GenerationRun(
            hook=hook,
            bodies=bodies,
            store=store,
            options=options,
            spending_cap=SpendingCap(options.max_images_per_task),
            log=self.log,
            try_number=getattr(context["ti"], "try_number", None),
            budget_first_try=self._first_try_of_run(context),
            replace_from=self._first_try_of_run(context) if options.replace else None,
        )
        self._active_run = run
        try:
            run.execute()
        finally:
            self._active_run = None
            hook.close()
        return self._finish(context, run, options)

    # ---------------------------------------------------------------------------------- Visual API
    def _speaks_visual_api(self) -> bool:
        """Whether the connection speaks the Visual API; ``deferrable=True`` on an Ark one is refused here."""
        if self.deferrable is not None and not isinstance(self.deferrable, bool):
            raise JiMengConfigurationError(
                "deferrable", f"{self.deferrable!r:.40} is not a boolean; allowed: True, False, None"
            )
        conn = get_connection("jimeng_conn_id", self.jimeng_conn_id)
        extras = conn.extra_dejson if conn.extra else {}
        visual = isinstance(extras, Mapping) and connection_api(extras) == VISUAL_API
        if not visual and self.deferrable:
            raise JiMengConfigurationError(
                "deferrable",
                f"connection {self.jimeng_conn_id!r} speaks the Ark API, whose one answer carries the images and "
                "has no idempotency key: a triggerer restart would have to send (and pay for) the request again. "
                'Allowed: deferrable=False, or a Visual API connection (extra {"api": "visual"})',
            )
        self._jimeng_conn = conn
        return visual

    def _visual_deferrable(self) -> bool:
        if self.deferrable is not None:
            return self.deferrable
        from airflow.configuration import conf

        return conf.getboolean("operators", "default_deferrable", fallback=False)

    def _visual_setup(
        self, context: Context, prompts: list[str], generation: GenerationOptions, options: RunOptions, deferrable: bool
    ) -> tuple[list[dict[str, Any]], TaskKeyspace | None, ImageStore | None, VisualClient]:
        """Bodies, keyspace, store and client of a Visual API try: every check before any request."""
        if deferrable and not options.stores:
            raise JiMengConfigurationError(
                "deferrable",
                "needs s3_bucket or output_path: the task ids are journaled in the task's storage before the "
                "worker slot is freed, so that a retry or a restarted triggerer never submits (and pays) twice; "
                "allowed: storage, or deferrable=False",
            )
        if generation.response_format == "b64_json":
            return_image_blocks_to_the_os()
        keyspace = self._keyspace(context, options, generation) if options.stores else None
        with ThreadPoolExecutor(1, thread_name_prefix="jimeng-s3-setup") as setup:
            opening = self._open_store(setup, options, keyspace)
            bodies = visual_submit_bodies(prompts, generation)
            per_prompt = [max_images_billed_visual(body) for body in bodies]
            self._check_planned(per_prompt, options)
            if keyspace is not None:
                keyspace.check_image_keys(per_prompt)
            config = visual_config(self._jimeng_conn)
            if options.max_images_per_minute is not None:
                config = dataclasses.replace(config, max_images_per_minute=options.max_images_per_minute)
            client = VisualClient(config, pool_maxsize=max(8, options.max_concurrency * 2))
            store = opening.result() if opening is not None else None
        return bodies, keyspace, store, client

    def _visual_reuse_from(self, context: Context, options: RunOptions) -> int | None:
        """From which try journaled tasks count (``None``: any): with ``replace``, this run of tries only."""
        if not options.replace:
            return None
        try_number = getattr(context["ti"], "try_number", None)
        first = self._first_try_of_run(context)
        if isinstance(try_number, int) and first is not None and try_number > first:
            return first
        return try_number if isinstance(try_number, int) else None

    def _visual_req_json(self, generation: GenerationOptions, client: VisualClient) -> dict[str, Any]:
        """The poll's choice, made at poll time as the API requires: URLs or base64, and the logo."""
        add_logo = client.config.watermark if generation.watermark is None else generation.watermark
        return build_req_json(return_url=generation.response_format == "url", add_logo=add_logo)

    def _execute_visual(
        self, context: Context, prompts: list[str], generation: GenerationOptions, options: RunOptions
    ) -> list[str]:
        deferrable = self._visual_deferrable()
        bodies, keyspace, store, client = self._visual_setup(context, prompts, generation, options, deferrable)
        if options.dry_run:
            client.close()
            shown = [
                {**body, "image_urls": [redact_url(url) for url in body["image_urls"]]}
                if "image_urls" in body
                else body
                for body in bodies
            ]
            return self._dry_run(shown, keyspace)
        reuse_from = self._visual_reuse_from(context, options)
        self._submitting = client  # on_kill stops the submits at once
        try:
            existing = store.existing_keys(first=True) if store is not None else {}
            journal = VisualJournal(store).load(existing)
            replacing = options.replace and reuse_from == getattr(context["ti"], "try_number", None)
            stored = {} if store is None or replacing else self._stored_prompts(store, existing, reuse_from)
            cap = SpendingCap(options.max_images_per_task)
            if store is not None and options.max_images_per_task is not None:
                # What earlier tries of this budget billed or possibly billed counts, as on the Ark path.
                earlier = store.read_earlier(existing, len(bodies)).tries.values()
                cap.carry(committed_images(earlier, self._first_try_of_run(context)))
            self.log.info(
                "Submitting %d prompt(s) to the Visual API (%s), into %s",
                len(prompts),
                "deferrable" if deferrable else "polled on this worker",
                keyspace.uri(keyspace.task_prefix + "/") if keyspace else "XCom (URLs, valid 24 h)",
            )
            waiting = submit_prompts(
                client,
                bodies,
                journal,
                skip=lambda index, fingerprint: stored.get(index) == fingerprint,
                spending_cap=cap,
                try_number=getattr(context["ti"], "try_number", None),
                reuse_from=reuse_from,
                poll_timeout=self.poll_timeout,
                log=self.log,
            )
        except BaseException:
            client.close()
            raise
        finally:
            self._submitting = None
        if deferrable and waiting:
            req_json = self._visual_req_json(generation, client)
            client.close()
            self.log.info("Deferring: %d task(s) journaled under %s", len(waiting), journal.key)
            self.defer(
                trigger=JiMengVisualTrigger(
                    task_ids=[str(entry.task_id) for entry in waiting],
                    deadlines={str(entry.task_id): entry.deadline for entry in waiting},
                    jimeng_conn_id=self.jimeng_conn_id,
                    req_json=req_json,
                    poll_interval=self.poll_interval,
                    max_poll_interval=max(self.poll_interval, 120.0),
                    # Rounds counted from the submits, as a worker would poll: not from the triggerer's pick-up.
                    poll_anchor=time.time(),
                    # Not before the worker that defers has surely let go of the task (an Airflow race).
                    fire_after=time.time() + resume_hold_off(),
                ),
                method_name="execute_complete",
                kwargs={"fields": self._deferred_fields} if self._deferred_fields else None,
            )
        return self._collect_visual(context, generation, options, bodies, store, journal, client, wait=not deferrable)

    @staticmethod
    def _stored_prompts(store: ImageStore, existing: Mapping[str, int], reuse_from: int | None) -> dict[int, str]:
        """Prompts an earlier try stored (their fingerprints, by index): never submitted again."""
        records = store.read_records(existing)
        return {
            index: record.fingerprint
            for index, record in records.items()
            if reuse_from is None or (record.try_number is not None and record.try_number >= reuse_from)
        }

    def _collect_visual(
        self,
        context: Context,
        generation: GenerationOptions,
        options: RunOptions,
        bodies: list[dict[str, Any]],
        store: ImageStore | None,
        journal: VisualJournal,
        client: VisualClient,
        *,
        wait: bool,
    ) -> list[str]:
        """Fetch and store the journaled tasks' images through the Ark path's run: same records and XComs."""
        try_number = getattr(context["ti"], "try_number", None)
        source = VisualTaskSource(
            client,
            journal,
            bodies,
            req_json=self._visual_req_json(generation, client),
            reuse_from=self._visual_reuse_from(context, options),
            wait=wait,
            poll_interval=self.poll_interval,
            # Resumed from a deferral: this try's submits were made (and counted) before it deferred.
            earlier_submits=0 if wait else journal.submitted_by(try_number),
        )
        # The source answers send/open_image/stats as the hook does, from the journaled task ids.
        return self._run_generation(context, source, bodies, store, options)

    def execute_complete(
        self, context: Context, event: Mapping[str, Any] | None = None, fields: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Resumed after the trigger fired: poll the done tasks once more (free), store their images, finish."""
        for name, value in (fields or {}).items():
            setattr(self, name, value)
        self._reveal_rendered_secrets()
        try:
            self._lineage = None
            prompts, generation, options = self.checked_parameters()
            if not self._speaks_visual_api():
                raise JiMengConfigurationError(
                    "jimeng_conn_id",
                    f"connection {self.jimeng_conn_id!r} no longer speaks the Visual API; its journaled tasks "
                    'cannot be collected: restore the extra {"api": "visual"} and clear the task',
                )
            if event is not None:
                tasks = event.get("tasks") or {}
                states: dict[str, int] = {}
                for summary in tasks.values():
                    states[str(summary.get("status"))] = states.get(str(summary.get("status")), 0) + 1
                log = self.log.error if event.get("status") == "error" else self.log.info
                log(
                    "The Visual API trigger fired (%s): %s%s",
                    event.get("status"),
                    states,
                    f"; {event.get('message')}" if event.get("message") else "",
                )
            bodies, _, store, client = self._visual_setup(context, prompts, generation, options, deferrable=True)
            journal = VisualJournal(store).load()
            return self._collect_visual(context, generation, options, bodies, store, journal, client, wait=False)
        finally:
            self._hide_rendered_secrets()

    def _open_store(
        self, setup: ThreadPoolExecutor, options: RunOptions, keyspace: TaskKeyspace | None
    ) -> Future[ImageStore] | None:
        """Start building the task's store on ``setup``, beside the API client and the request bodies.

        The S3 client takes 0.1-0.5 s to build (botocore loads S3's service model; the amazon provider
        walks the caller's stack, with source lines, for its user agent): on a thread whose stack is short.
        """
        if keyspace is not None and options.output_path is not None:
            # The filesystem (and its connection) is looked up here: only this thread talks to Airflow.
            return setup.submit(ObjectImageStore, self._filesystem(options), keyspace, conn_id=options.output_conn_id)
        if keyspace is not None:
            return setup.submit(S3ImageStore, self._s3_hook(options), keyspace)
        return None

    @staticmethod
    def _check_planned(per_prompt: Sequence[int], options: RunOptions) -> int:
        """The most images the run could bill, refused above ``max_images_per_task`` before any request."""
        planned = sum(per_prompt)
        if options.max_images_per_task is not None and planned > options.max_images_per_task:
            raise JiMengConfigurationError(
                "max_images_per_task",
                f"this run could bill up to {planned} images ({len(per_prompt)} prompt(s) x up to "
                f"{max(per_prompt)} each), above the limit of {options.max_images_per_task}; "
                "lower max_images (or extra_body n), split the prompts, or raise the limit",
            )
        return planned

    def _first_try_of_run(self, context: Context) -> int | None:
        """The try number that began this run of tries: 1, or the first try after the task was cleared.

        Clearing sets ``max_tries`` to the last try number plus ``retries`` (Airflow's own reckoning
        of a reschedule's first try); ``None`` when the task instance does not say.
        """
        max_tries = getattr(context["ti"], "max_tries", None)
        retries = self.retries or 0
        if not isinstance(max_tries, int) or isinstance(max_tries, bool) or max_tries < retries:
            return None
        return max_tries - retries + 1

    def _keyspace(self, context: Context, options: RunOptions, generation: GenerationOptions) -> TaskKeyspace:
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        scheme, bucket, prefix, key_root = "s3", str(options.s3_bucket), options.s3_key_prefix, ""
        if options.output_path is not None:
            scheme, bucket, prefix = parse_output_path(options.output_path)
            key_root = prefix
        return TaskKeyspace(
            bucket=bucket,
            prefix=prefix,
            scheme=scheme,
            key_root=key_root,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            map_index=map_index if map_index is not None else -1,
            key_template=options.s3_key,
            image_ext="png" if generation.output_format == "png" else "jpeg",
        )

    @staticmethod
    def _shared_journal(redis_conn_id: str, keyspace: TaskKeyspace) -> Any:
        """Journals a retry on any worker reads, in the connection's shared Redis (built on this thread,
        which alone talks to Airflow: the connection is looked up here)."""
        from airflow_provider_jimeng.coordination.journals import SharedJournal
        from airflow_provider_jimeng.coordination.redis_client import shared_redis

        return SharedJournal(shared_redis(redis_conn_id), keyspace)

    def _storage_conn_id(self, options: RunOptions) -> str | None:
        """The connection the images are stored through: ``output_conn_id`` for ``output_path`` (and for an
        ``s3://`` one where given), else ``aws_conn_id``."""
        if options.output_path is not None or options.output_conn_id is not None:
            return options.output_conn_id
        return self.aws_conn_id

    def _storage_conn_parameter(self, options: RunOptions) -> str:
        """The parameter that names the storage connection, for errors."""
        return (
            "output_conn_id" if options.output_path is not None or options.output_conn_id is not None else "aws_conn_id"
        )

    def _s3_hook(self, options: RunOptions) -> Any:
        """The amazon provider's hook, its connection looked up here: only this thread talks to Airflow.

        A named connection that does not exist is a configuration error (``aws_default`` excepted): the
        amazon provider would fall back to the worker's ambient credentials and store elsewhere. The
        client's timeouts and retries are bounded (:func:`~airflow_provider_jimeng.storage.s3.bounded_client_config`)
        under the connection's own ``config_kwargs``.
        """
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        conn_id = self._storage_conn_id(options)
        parameter = self._storage_conn_parameter(options)
        if conn_id is not None and not (parameter == "aws_conn_id" and conn_id == S3Hook.default_conn_name):
            # An undefined aws_default keeps meaning boto3's own credential chain (an instance role), as
            # in the amazon provider; a connection named on purpose must exist.
            get_connection(parameter, conn_id)
        return bounded_s3_hook(conn_id)  # the client is built from it on the set-up thread

    def _filesystem(self, options: RunOptions) -> Any:
        """The fsspec filesystem of ``output_path`` through its connection, or a configuration error.

        A scheme whose provider is not installed (``gs://`` without the google provider), or a
        connection that does not exist, fails here: before any request, without retries.
        """
        from airflow.sdk import ObjectStoragePath

        if options.output_conn_id is not None:
            get_connection("output_conn_id", options.output_conn_id)
        try:
            return ObjectStoragePath(str(options.output_path), conn_id=options.output_conn_id).fs
        except Exception as error:
            raise JiMengConfigurationError(
                "output_path",
                f"{options.output_path!r} has no usable filesystem ({type(error).__name__}: {str(error)[:200]}); "
                "allowed: a scheme whose Airflow provider is installed (gs: google, abfs/wasb: microsoft-azure, "
                "file: built in) and an existing output_conn_id",
            ) from None

    def _dry_run(self, bodies: list[dict[str, Any]], keyspace: TaskKeyspace | None) -> list[str]:
        for index, body in enumerate(bodies):
            shown = {key: value for key, value in body.items() if key != "image"}
            if "image" in body:
                images = body["image"] if isinstance(body["image"], list) else [body["image"]]
                shown["image"] = [redact_url(item) if item.startswith("http") else "data:<redacted>" for item in images]
            self.log.info("Dry run, prompt %d would send: %s", index, shown)
            if keyspace is not None:
                self.log.info(
                    "Dry run, prompt %d would store under %s", index, keyspace.uri(keyspace.image_key(index, 0))
                )
                if (published := keyspace.publication_key(index, 0)) is not None:
                    self.log.info("Dry run, prompt %d would publish to %s", index, keyspace.uri(published))
        self.log.info("Dry run: nothing was sent and nothing was billed")
        return []

    # ------------------------------------------------------------------------------------- results
    def _finish(self, context: Context, run: GenerationRun, options: RunOptions) -> list[str]:
        outcomes = run.outcomes
        outputs = [output for outcome in outcomes for output in outcome.outputs]
        records = [record for outcome in outcomes for record in outcome.image_records]
        failures = [failure for outcome in outcomes for failure in outcome.failures]
        # Kept images whose record is not written: the error lists them, the count of failures does not.
        notes = [note for outcome in outcomes for note in outcome.notes]
        usage = run.usage()
        ti = context["ti"]
        ti.xcom_push(key="images", value=records)
        ti.xcom_push(key="usage", value=usage)
        if run.store is not None:
            keyspace = run.store.keyspace
            # Where this task instance's objects are, and through which connection: what a reader
            # (the UI's gallery, a downstream task) needs to find its records without the DAG's code.
            ti.xcom_push(
                key="storage",
                value={
                    "prefix": keyspace.uri(keyspace.task_prefix + "/"),
                    "records": keyspace.uri(keyspace.records_key),
                    "conn_id": self._storage_conn_id(options),
                },
            )
            self._emit_asset_events(context, keyspace, sum(len(o.stored) for o in outcomes))
        self._lineage = self._run_lineage(run, len(outputs), len(failures), usage)
        self.log.info(
            "JiMeng: %d image(s) kept, %d failure(s); billed %d image(s) (%d possibly more) in %d request(s)",
            len(outputs),
            len(failures),
            usage["generated_images"],
            usage["possibly_billed_images"],
            usage["requests"],
        )
        fatal = run.fatal
        unstored = [outcome.prompt_index for outcome in outcomes if outcome.incomplete]
        if unstored:
            # Whatever on_partial_failure says: succeeding now would leave paid images unstored for good.
            self.log.error(
                "Prompt(s) %s: generated and paid for but not stored; a retry of this task stores them "
                "without a new request",
                unstored,
            )
        if isinstance(fatal, JiMengRunStoppedError):
            self.log.error("%s", fatal)
        hint: str | None = None
        if isinstance(fatal, JiMengAuthenticationError) and not unstored:
            # Retrying a key the service refused only waits (retry_delay x retries) to fail again.
            hint = refused_key_message(redact_url(run.hook.config.base_url), fatal.status_code, fatal.code)
            hint += f" Not retried: fix the connection {self.jimeng_conn_id!r} (key or host), then clear the task."
            raise JiMengRunAbortedError(failures, stored=len(outputs), hint=hint) from None
        if isinstance(fatal, JiMengInvalidRequestError) and fatal.status_code in (404, 405):
            # "Not Found" alone sends a new user hunting; say what a 404 of the generations URL means.
            hint = wrong_path_message(run.hook.config.generations_url, fatal.status_code)
        if (
            isinstance(fatal, (JiMengConfigurationError, JiMengInvalidRequestError))
            and not isinstance(fatal, JiMengContentPolicyError)
            and not unstored
        ):
            # The service called the request itself invalid (unknown model, bad parameter), or the
            # spending cap is reached: every try would do the same, so do not retry.
            raise JiMengRunAbortedError(failures + notes, stored=len(outputs), hint=hint) from None
        if fatal is not None or unstored:
            raise JiMengGenerationIncompleteError(failures + notes, stored=len(outputs)) from None
        if failures:
            if options.on_partial_failure == "fail":
                raise JiMengGenerationIncompleteError(failures, stored=len(outputs))
            for failure in failures:
                self.log.warning("Image not produced: %s", failure)
        self.images_link_target = outputs[0] if outputs else None
        return outputs

    def _run_lineage(self, run: GenerationRun, kept: int, failed: int, usage: Mapping[str, Any]) -> RunLineage:
        """What this try wrote, for OpenLineage: set before the task fails too, since stored images stay stored."""
        stored = [image for outcome in run.outcomes for image in outcome.stored]
        kept_images: list[StoredImage | DeliveredImage] = [
            *stored,
            *(image for outcome in run.outcomes for image in outcome.delivered),
        ]
        locations: tuple[Any, ...] = ()
        records_uri = None
        if run.store is not None:
            keyspace = run.store.keyspace
            locations = group_images(keyspace.uri(keyspace.task_prefix + "/"), stored)
            records_uri = keyspace.uri(keyspace.records_key)
        models = {image.model for image in kept_images if image.model}
        if not models:
            models = {str(body["model"]) for body in run.bodies if body.get("model")}
        return RunLineage(
            prompt_source=self.prompt_source,
            prompt_count=len(run.outcomes),
            images=kept,
            failed_images=failed,
            billed_images=int(usage.get("generated_images") or 0),
            requests=int(usage.get("requests") or 0),
            models=tuple(sorted(models)),
            sizes=tuple(sorted({image.size for image in kept_images if image.size})),
            image_format="png" if run.store is not None and run.store.keyspace.image_ext == "png" else "jpeg",
            locations=locations,
            records_uri=records_uri,
        )

    # ----------------------------------------------------------------------------------- lineage
    def _prompt_file_path(self) -> str | None:
        """The prompt file as Airflow's template loader finds it: the DAG's folder, then its searchpath."""
        if self._prompt_template is None:
            return None
        dag = self.dag if self.has_dag() else None  # type: ignore[no-untyped-call]
        searchpath: list[str] = []
        if dag is not None:
            searchpath.append(dag.folder)
            searchpath.extend(
                [dag.template_searchpath] if isinstance(dag.template_searchpath, str) else dag.template_searchpath or []
            )
        return find_prompt_file(self._prompt_template, searchpath)

    def get_openlineage_facets_on_start(self) -> Any:
        """Before ``execute``: the prompt file as input (outputs are known once the images are stored)."""
        from airflow_provider_jimeng.lineage import operator_lineage

        return operator_lineage(None, self._prompt_file_path(), complete=False)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """After ``execute`` (also on failure): the prompt file as input, the stored images as outputs.

        One output dataset per folder written, normally the task instance's prefix; none when the task
        returned URLs instead of storing the images. See docs/lineage.md.
        """
        from airflow_provider_jimeng.lineage import operator_lineage

        return operator_lineage(self._lineage, self._prompt_file_path(), complete=True)

    def _emit_asset_events(self, context: Context, keyspace: TaskKeyspace, count: int) -> None:
        """Attach what was stored to declared outlets; an AssetAlias outlet gets the task's prefix as an Asset."""
        from airflow.sdk import Asset, AssetAlias

        outlet_events = context.get("outlet_events")
        if outlet_events is None:
            return
        extra: dict[str, Any] = {"prefix": keyspace.uri(keyspace.task_prefix + "/"), "images": count}
        for outlet in self.outlets or []:
            if isinstance(outlet, AssetAlias):
                outlet_events[outlet].add(Asset(extra["prefix"]), extra=extra)
            elif isinstance(outlet, Asset):
                outlet_events[outlet].extra = extra

    def on_kill(self) -> None:
        """Stop sending at once; requests in flight are paid for, so their answers are still journaled.

        A command waiting on a shared Redis that stopped answering ends at once too; S3 calls under way
        end within their bounds, and later ones get one short attempt each (docs/faults.md).
        """
        submitting = self._submitting
        if submitting is not None:
            submitting.close()  # no further Visual API submit; those journaled are waited on by a retry
        run = self._active_run
        if run is not None:
            run.stop("on_kill")
            interrupt_shared_redis()
            hurry = getattr(run.store, "hurry", None)
            if callable(hurry):
                hurry()


def _prompt_source(prompt: Any, template_ext: Sequence[str]) -> str:
    """``file`` for a prompt file, ``xcom`` for an upstream task's result, ``text`` otherwise."""
    if isinstance(prompt, XComArg):
        return "xcom"
    if isinstance(prompt, str) and prompt.endswith(tuple(template_ext)):
        return "file"
    return "text"
