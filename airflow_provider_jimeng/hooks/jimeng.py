"""The Ark API's hook: :class:`JiMengHook` holds the ``jimeng`` connection and generates images.

It is thin: how a connection is read (:mod:`.connection_config`), a request sent (:mod:`.sending`), an
answer read (:mod:`.answer_body`), retried (:mod:`.retry`), paced (:mod:`.pacing`), charged
(:mod:`.charges`) and an image downloaded (:mod:`.downloads`) live in their own modules, shared with the
Visual API's client (:mod:`.visual`). What is the Ark API's own stays here: the body sent, the answer's
statuses, and ``test_connection``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import requests

from airflow_provider_jimeng.api.request import max_images_billed
from airflow_provider_jimeng.api.response import (
    GenerationResult,
    api_error_from_payload,
    parse_event_stream,
    parse_generation,
)
from airflow_provider_jimeng.budget import SpendingCap
from airflow_provider_jimeng.connections import missing_connection
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengConfigurationError,
    JiMengDownloadInterruptedError,
    JiMengResponseError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.answer_body import ERROR_BODY_MAX_BYTES, AnswerBody
from airflow_provider_jimeng.hooks.charges import Charge
from airflow_provider_jimeng.hooks.connection_config import (
    JiMengConnectionConfig,
    ark_config,
    refused_key_message,
    wrong_path_message,
)
from airflow_provider_jimeng.hooks.connection_form import CONNECTION_EXTRAS, UI_FIELD_BEHAVIOUR
from airflow_provider_jimeng.hooks.downloads import (
    DEFAULT_DOWNLOAD_MAX_BYTES,
    ImageDownload,
    check_download_url,
    download_session,
    open_image_once,
)
from airflow_provider_jimeng.hooks.pacing import ImageRatePacer, Pacing
from airflow_provider_jimeng.hooks.retry import RetryPolicy, call_with_retries, parse_retry_after
from airflow_provider_jimeng.hooks.sending import pooled_session, post_streamed, send_attempt
from airflow_provider_jimeng.options import GenerationOptions, as_int
from airflow_provider_jimeng.redaction import redact_url
from airflow_provider_jimeng.version_compat import AirflowNotFoundException, BaseHook

if TYPE_CHECKING:
    from airflow_provider_jimeng.coordination.ratelimit import AccountRateLimiter, Grant

_T = TypeVar("_T")


class JiMengHook(BaseHook):
    """Generate images with JiMeng 4.0 / Seedream through a ``jimeng`` connection.

    One pooled :class:`requests.Session` serves every call of a hook, including calls from several
    threads at once. Retryable failures (rate limits, 5xx, timeouts) are repeated with backoff inside
    the hook; invalid input is refused before a request is sent.

    :param jimeng_conn_id: connection holding the base URL (host) and API key (password).
    :param timeout: read timeout in seconds; overrides the connection's ``timeout`` extra.
    :param max_retries: overrides the connection's ``max_retries`` extra.
    :param retry_backoff: first backoff wait in seconds (doubles each retry); overrides the
        connection's ``retry_backoff`` extra (default 2).
    :param retry_max_wait: longest single wait, also the cap on a server's ``Retry-After``; overrides
        the connection's ``retry_max_wait`` extra (default 120).
    :param max_images_per_minute: client-side pacing; overrides the connection's extra.
    :param pool_maxsize: HTTP connections kept per host; at least the number of concurrent calls.
    """

    conn_name_attr = "jimeng_conn_id"
    default_conn_name = "jimeng_default"
    conn_type = "jimeng"
    hook_name = "JiMeng (Seedream)"

    def __init__(
        self,
        jimeng_conn_id: str = default_conn_name,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry_backoff: float | None = None,
        retry_max_wait: float | None = None,
        max_images_per_minute: float | None = None,
        pool_maxsize: int = 32,
        logger_name: str | None = None,
    ) -> None:
        super().__init__(logger_name=logger_name)
        self.jimeng_conn_id = jimeng_conn_id
        self._timeout_override = timeout
        self._max_retries_override = max_retries
        self._retry_backoff = retry_backoff
        self._retry_max_wait = retry_max_wait
        self._max_images_per_minute_override = max_images_per_minute
        self._pool_maxsize = pool_maxsize
        self._session: requests.Session | None = None
        self._downloads: requests.Session | None = None
        self._pacing: Pacing | None = None
        self._session_lock = threading.Lock()
        #: Set by close(): reads in progress end too.
        self._stop = threading.Event()
        #: Set by stop() and close(): no new attempt, no retry, no more waiting.
        self._sending_stopped = threading.Event()
        self._counter_lock = threading.Lock()
        self._counts: dict[str, int] = {
            "attempts": 0,
            "rate_limited": 0,
            "retries": 0,
            "download_retries": 0,
            "rate_limit_wait_ms": 0,
        }
        #: Every attempt of this hook counted, whichever cap a caller passed to :meth:`send`: never refuses.
        self._tally = SpendingCap(None)

    @property
    def stats(self) -> dict[str, int]:
        """Counters for reports and benchmarks (a snapshot).

        ``attempts`` sent, ``rate_limited`` (429) answers, generation ``retries`` and
        ``download_retries`` made, images ``billed`` (as the answers said) and ``possibly_billed``
        (attempts that timed out or broke off: the service may have generated their images), and
        ``rate_limit_wait_ms``: how long attempts waited for the pace (the task's own and the account's).
        """
        with self._counter_lock:
            counts = dict(self._counts)
        counts["billed"] = self._tally.billed
        counts["possibly_billed"] = self._tally.possibly_billed
        return counts

    def _count(self, counter: str, amount: int = 1) -> None:
        with self._counter_lock:
            self._counts[counter] += amount

    # ----------------------------------------------------------------------------------- UI metadata
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Relabel and hide connection form fields (Airflow < 3.2 reads this; later, provider info)."""
        return UI_FIELD_BEHAVIOUR

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form for Airflow < 3.2 (later releases read provider info)."""
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import BooleanField, SelectField, StringField

        widgets: dict[str, Any] = {}
        for name, spec in CONNECTION_EXTRAS.items():
            schema = spec["schema"]
            types = schema["type"]
            if "enum" in schema:
                # A select whose untouched value says what it means ("true (default)"), never a bare "off".
                shown = schema.get("values_display", {})
                choices = [
                    ("" if value is None else value, shown.get("null" if value is None else value, value or ""))
                    for value in schema["enum"]
                ]
                widgets[name] = SelectField(
                    lazy_gettext(spec["label"]), choices=choices, default="", description=spec["description"]
                )
            elif types == ["boolean", "null"]:
                widgets[name] = BooleanField(lazy_gettext(spec["label"]), description=spec["description"])
            else:
                widgets[name] = StringField(
                    lazy_gettext(spec["label"]), widget=BS3TextFieldWidget(), description=spec["description"]
                )
        return widgets

    # -------------------------------------------------------------------------------- configuration
    @cached_property
    def config(self) -> JiMengConnectionConfig:
        """The connection, resolved and checked once (:func:`.connection_config.ark_config`); the API key is
        registered with the secret maskers.

        Every extra is checked here, before any request: a bad value raises
        :class:`JiMengConfigurationError` naming the extra and what it allows. An empty string,
        ``"None"`` or ``"null"`` (what a template renders for nothing) means the default.
        """
        try:
            conn = self.get_connection(self.jimeng_conn_id)
        except AirflowNotFoundException:  # Airflow would retry it: every try would look in vain
            raise missing_connection("jimeng_conn_id", self.jimeng_conn_id) from None
        return ark_config(
            conn,
            self.jimeng_conn_id,
            timeout=self._timeout_override,
            max_retries=self._max_retries_override,
            retry_backoff=self._retry_backoff,
            retry_max_wait=self._retry_max_wait,
            max_images_per_minute=self._max_images_per_minute_override,
        )

    @cached_property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_retries=self.config.max_retries,
            backoff=self.config.retry_backoff,
            max_wait=self.config.retry_max_wait,
        )

    @property
    def pacing(self) -> Pacing:
        """What every attempt waits for before it is sent; one per hook, shared by its threads."""
        with self._session_lock:
            if self._pacing is None:
                config = self.config
                self._pacing = Pacing(
                    images_per_minute=config.max_images_per_minute,
                    stop=self._sending_stopped,
                    log=self.log,
                    redis_conn_id=config.redis_conn_id,
                    account_images_per_minute=config.account_images_per_minute,
                    api_key=config.api_key,
                    on_wait=lambda milliseconds: self._count("rate_limit_wait_ms", milliseconds),
                )
            return self._pacing

    @property
    def pacer(self) -> ImageRatePacer | None:
        """The task's own pace (``max_images_per_minute``), if the connection or the hook asks for one."""
        return self.pacing.pacer

    def account_limiter(self, model: str) -> AccountRateLimiter | None:
        """The account-wide limiter of ``model`` (:meth:`.pacing.Pacing.account_limiter`), or ``None``."""
        return self.pacing.account_limiter(model)

    def get_conn(self) -> requests.Session:
        """The hook's pooled session, created once even when threads race for it."""
        with self._session_lock:
            if self._session is None:
                config = self.config
                self._session = pooled_session(
                    pool_maxsize=self._pool_maxsize,
                    headers={
                        "Authorization": f"Bearer {config.api_key}",
                        "Content-Type": "application/json",
                        "Accept": "application/json",
                    },
                    proxies=config.proxies,
                    verify=config.verify,
                )
            return self._session

    def _download_session(self) -> requests.Session:
        with self._session_lock:
            if self._downloads is None:
                self._downloads = download_session(self._pool_maxsize)
            return self._downloads

    def close(self) -> None:
        """Stop waiting and retrying, and close pooled connections (in-flight reads then fail)."""
        self._sending_stopped.set()
        self._stop.set()
        with self._session_lock:
            for session in (self._session, self._downloads):
                if session is not None:
                    session.close()
            self._session = None
            self._downloads = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ----------------------------------------------------------------------------------- generation
    def build_body(self, prompt: str, options: GenerationOptions | None = None, **fields: Any) -> dict[str, Any]:
        """Validate arguments and return the request body, filling model/watermark from the connection.

        ``options`` is a checked :class:`~airflow_provider_jimeng.options.GenerationOptions`; keyword
        ``fields`` (``size="2K"``, ``seed=7``...) are checked into one when it is not given.
        """
        if options is None:
            options = GenerationOptions.parse(**fields)
        elif fields:
            raise TypeError("pass either options or keyword fields, not both")
        return options.body(prompt, default_model=self.config.model, default_watermark=self.config.watermark)

    def generate_images(
        self,
        prompt: str,
        options: GenerationOptions | None = None,
        *,
        max_images_per_task: int | None = None,
        **fields: Any,
    ) -> GenerationResult:
        """Generate one image, or a set with ``sequential_image_generation="auto"``.

        Takes the fields of :class:`~airflow_provider_jimeng.options.GenerationOptions` as keywords:
        ``image`` takes reference images as URLs, data URIs, bytes or local file paths (a list for
        several). Per-image failures inside a set are returned in the result, not raised.
        ``max_images_per_task`` caps what this call may bill, retries included.
        """
        body = self.build_body(prompt, options, **fields)
        limit = as_int("max_images_per_task", max_images_per_task, minimum=1, optional=True)
        return self.send(body, spending_cap=SpendingCap(limit) if limit is not None else None)

    def send(
        self,
        body: Mapping[str, Any],
        *,
        before_body: Callable[[int | None], None] | None = None,
        spending_cap: SpendingCap | None = None,
    ) -> GenerationResult:
        """Send a validated body, pacing and retrying; the single path every generation takes.

        ``before_body`` is called with the Content-Length (``None`` if unknown) of each successful
        non-streamed answer before its body is read; it may block, to bound the memory that large
        ``b64_json`` bodies take (the unread body waits in the socket), or raise to abandon the attempt.

        ``spending_cap`` (one per run, shared by its threads): every attempt, retries included, first
        reserves the most images it could bill; a refusal raises
        :class:`~airflow_provider_jimeng.exceptions.JiMengSpendingCapError` and nothing is sent. The
        hook counts on its own uncapped tally as well (``stats["billed"]``, ``stats["possibly_billed"]``).
        """
        images = self.images_billed(body)

        def attempt(number: int) -> GenerationResult:
            charge = Charge.reserve(images, spending_cap, self._tally)
            grant: Grant | None = None
            try:
                grant = self.pacing.wait(str(body.get("model") or self.config.model), images)
                if self._sending_stopped.is_set():
                    raise JiMengTimeoutError("the task was stopped before the request was sent", code="Stopped")
            except BaseException:
                charge.release()
                if grant is not None:
                    self.pacing.give_back(grant, images)  # never sent
                raise
            try:
                result = self._send_once(body, number, before_body, charge)
            except BaseException:
                if grant is not None:
                    grant.keep()  # sent: an error answer or a 429 may still have counted on the server
                raise
            finally:
                charge.keep_as_possible()  # a no-op once settled: only an unforeseen failure gets here unsettled
            if grant is not None:
                # A set that ended early billed fewer than it reserved; a broken answer may have billed all.
                self.pacing.give_back(grant, 0 if result.truncated else images - result.billed_images)
            return result

        # A set is never sent again blind: with no idempotency key, a set that timed out or broke off
        # may have billed every image, and a repeat pays for all of them again.
        return self._with_retries(
            attempt, subject="JiMeng", counter="retries", max_billed_retries=0 if images > 1 else None
        )

    def images_billed(self, body: Mapping[str, Any]) -> int:
        """The most images one request with ``body`` can bill on this connection: what reservations take.

        What the body asks (:func:`~airflow_provider_jimeng.api.request.max_images_billed`), or the
        connection's ``images_per_request`` when a gateway answers (and bills) more than asked.
        """
        return max(max_images_billed(body), self.config.images_per_request or 1)

    def _with_retries(
        self, attempt: Callable[[int], _T], *, subject: str, counter: str, max_billed_retries: int | None = None
    ) -> _T:
        """The hook's attempts through the one retry loop (:func:`.retry.call_with_retries`).

        An attempt that may have been billed is retried at most ``max_billed_retries`` times in all (the
        connection's extra unless given; ``0`` for a set, which is never sent again blind).
        """
        return call_with_retries(
            attempt,
            policy=self.retry_policy,
            stop=self._sending_stopped,
            log=self.log,
            subject=subject,
            on_retry=lambda: self._count(counter),
            max_billed_retries=self.config.max_billed_retries if max_billed_retries is None else max_billed_retries,
            billed_refusal=None
            if max_billed_retries is None
            else "a set of images is never sent again blind (each image may be billed again)",
            stopped_message="the task was stopped before the request was sent",
        )

    def stop(self) -> None:
        """Send nothing more: retry and pacing waits end at once, while requests in flight still get
        their answer (it is paid for; the caller journals it). :meth:`close` also breaks those reads."""
        self._sending_stopped.set()

    def _send_once(
        self,
        body: Mapping[str, Any],
        attempt: int,
        before_body: Callable[[int | None], None] | None,
        charge: Charge,
    ) -> GenerationResult:
        """One attempt; settles ``charge`` by what became of it (billed, nothing, or possibly billed)."""
        config = self.config
        client_request_id = uuid.uuid4().hex
        stream = bool(body.get("stream"))
        self._count("attempts")
        # A first attempt is said by the result line that follows; a retry is worth a line of its own.
        (self.log.info if attempt > 1 else self.log.debug)(
            "JiMeng request attempt %d: model=%s size=%s images<=%d stream=%s client request id %s",
            attempt,
            body.get("model"),
            body.get("size", "default"),
            charge.images,
            stream,
            client_request_id,
        )
        read_timeout = self._read_timeout(charge.images, stream)
        started = time.monotonic()
        try:
            response = send_attempt(
                self.get_conn(),
                config.generations_url,
                data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                settings=config,
                read_timeout=read_timeout,
                request_id=client_request_id,
                headers={"X-Client-Request-Id": client_request_id},
            )
        except (JiMengTimeoutError, JiMengConfigurationError) as failure:
            if isinstance(failure, JiMengAPIError) and failure.possibly_billed:
                charge.keep_as_possible()
            else:
                charge.release()
            raise
        request_id = response.headers.get("x-request-id") or client_request_id
        try:
            if response.status_code != 200:
                raise self._error_from_response(response, request_id)
            answer = AnswerBody(
                response,
                max_bytes=config.max_response_bytes,
                deadline_seconds=config.response_deadline,
                request_id=request_id,
                stop=self._stop,
            )
            # The body says which it is, not its label: some gateways label a stream application/json.
            if answer.is_event_stream():
                result = parse_event_stream(answer.lines(), request_id, expected_images=charge.images)
            else:
                if before_body is not None:
                    before_body(answer.content_length)
                result = parse_generation(self._json(answer, request_id), request_id)
        except JiMengAPIError as error:
            # An error the service answered (any status, or an error envelope in a 200) billed nothing.
            (charge.keep_as_possible if error.possibly_billed else charge.release)()
            raise
        except BaseException:
            charge.keep_as_possible()  # a 200 came (its images were generated) and the attempt was abandoned
            raise
        finally:
            response.close()
        billed = result.billed_images
        charge.settle(billed, max(0, charge.images - billed) if result.truncated else 0)
        self._log_result(result, time.monotonic() - started)
        return result

    def _read_timeout(self, images: int, stream: bool) -> float:
        """How long to wait for an answer's first byte: the ``timeout`` per image for a set not streamed.

        A non-streamed set answers only once every image is made (tens of seconds per 2K image): a
        15-image set would outlast one read timeout after it was billed. A stream sends each image as
        it is ready, so one ``timeout`` bounds each wait.
        """
        return self.config.timeout * (1 if stream else max(1, images))

    def _log_result(self, result: GenerationResult, seconds: float) -> None:
        self.log.info(
            "JiMeng request %s: %d image(s) ok, %d failed, billed %d, %.1fs",
            result.request_id,
            len(result.succeeded),
            len(result.failed),
            result.billed_images,
            seconds,
        )
        if result.truncated:
            self.log.warning(
                "JiMeng request %s broke off after %d image(s) (%s): they are kept and the request is not sent "
                "again; the image(s) not delivered may still have been billed",
                result.request_id,
                len(result.succeeded),
                result.interrupted_by,
            )
        elif result.interrupted_by:
            self.log.warning(
                "JiMeng request %s: the service stopped the set with %s after %d image(s); they are kept and "
                "the request is not sent again",
                result.request_id,
                result.interrupted_by,
                len(result.succeeded),
            )

    def _json(self, answer: AnswerBody, request_id: str) -> Any:
        content = answer.read_all()
        try:
            return json.loads(content)
        except ValueError as exc:
            raise JiMengResponseError(
                f"the response body is not valid JSON ({type(exc).__name__}); the request may still be billed",
                status_code=200,
                code="MalformedResponse",
                request_id=request_id,
            ) from None

    def _error_from_response(self, response: requests.Response, request_id: str) -> JiMengAPIError:
        payload: Any = None
        try:
            body = AnswerBody(
                response,
                max_bytes=ERROR_BODY_MAX_BYTES,
                deadline_seconds=self.config.timeout,
                request_id=request_id,
            )
            payload = json.loads(body.read_all())
        except (ValueError, JiMengAPIError):
            pass
        error = api_error_from_payload(
            response.status_code,
            payload,
            request_id=request_id,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            fallback_message=response.reason or "",
        )
        if response.status_code == 429:
            self._count("rate_limited")
        return error

    # ------------------------------------------------------------------------------------ downloads
    def check_download_url(self, url: str) -> None:
        """Refuse image URLs that are not https (plain http only with ``allow_http`` or on loopback)."""
        check_download_url(url, allow_http=self.config.allow_http)

    def open_image(self, url: str, *, max_bytes: int = DEFAULT_DOWNLOAD_MAX_BYTES) -> ImageDownload:
        """Start streaming an image URL; transient failures are retried, expiry and 404 are not."""
        self.check_download_url(url)
        label = redact_url(url)
        try:
            return self._with_retries(
                lambda attempt: open_image_once(
                    self._download_session(),
                    url,
                    label=label,
                    max_bytes=max_bytes,
                    settings=self.config,
                    timeout=self.config.timeout,
                    stop=self._stop,
                ),
                subject=f"Download of {label}",
                counter="download_retries",
            )
        except JiMengAPIError as error:
            raise JiMengDownloadInterruptedError(f"download of image {label} failed: {error}") from None

    # ------------------------------------------------------------------------------ test connection
    def test_connection(self) -> tuple[bool, str]:
        """Check reachability, base URL and key without generating (or paying for) an image.

        Sends a generation request with no prompt: a valid key gets a free 400 asking for the prompt,
        a bad key 401/403, a wrong base URL 404.
        """
        try:
            config = self.config
        except JiMengConfigurationError as exc:
            return False, str(exc)
        host = urlsplit(config.base_url).netloc
        timeout = min(config.timeout, 30.0)
        try:
            response = post_streamed(
                self.get_conn(),
                config.generations_url,
                data=json.dumps({"model": config.model}).encode("utf-8"),
                settings=config,
                read_timeout=timeout,
            )
        except requests.exceptions.SSLError as exc:
            return (
                False,
                f"TLS handshake with {host} failed ({type(exc).__name__}); check the base URL and 'verify'",
            )
        except OSError as exc:
            return False, f"Cannot reach {host} ({type(exc).__name__}); check the base URL and network/proxy"
        try:
            reader = AnswerBody(
                response, max_bytes=ERROR_BODY_MAX_BYTES, deadline_seconds=timeout, request_id="test_connection"
            )
            payload = json.loads(reader.read_all())
        except (ValueError, JiMengAPIError):
            payload = None
        finally:
            response.close()
        error = payload.get("error") if isinstance(payload, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        status = response.status_code
        if status == 400 and code:
            return True, f"Connection OK: {host} accepted the API key (model {config.model})"
        if status in (401, 403):
            return False, refused_key_message(host, status, code)
        # "InvalidEndpointOrModel.NotFound" also answers a wrong path: blame the model only when the error names it.
        names_model = isinstance(error, dict) and (
            error.get("param") == "model" or config.model in str(error.get("message") or "")
        )
        if status == 404 and code and "Model" in code and names_model:
            return False, f"{host} accepted the key but model {config.model!r} is not available ({code})"
        if status in (404, 405):
            return False, wrong_path_message(config.generations_url, status)
        if status == 200:
            return True, f"Connection OK: {host} answered"
        return False, f"Unexpected answer from {host}: HTTP {status} {code or ''}".rstrip()
