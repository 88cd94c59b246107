"""The emulator: a threaded HTTP/1.1 server on loopback that answers like the JiMeng / Seedream API.

It exists so the provider can be developed, tested, demonstrated and benchmarked without a key, a
network or a bill, while still exercising everything that matters on the wire: auth and validation
errors with request ids, real JPEGs of the requested size, signed URLs that expire, server-sent
events, rate limits, and scripted faults (:class:`~airflow_provider_jimeng.emulator.faults.Fault`)
for the retry and billing paths. A ledger records what the real service would have billed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any

from airflow_provider_jimeng.emulator.faults import Fault
from airflow_provider_jimeng.emulator.images import RenderCache, require_pillow
from airflow_provider_jimeng.emulator.ledger import LedgerEntry
from airflow_provider_jimeng.emulator.routes import GENERATION_PATHS, MODELS_PATHS, Handler
from airflow_provider_jimeng.emulator.runtime import MAX_REQUEST_RECORDS, TOS_BUCKET, TOS_PREFIX, Runtime
from airflow_provider_jimeng.emulator.visual import DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY, TASK_TTL
from airflow_provider_jimeng.emulator.wire import EVENT_STREAM_CONTENT_TYPE

log = logging.getLogger(__name__)

#: The key the emulator accepts unless told otherwise (``Authorization: Bearer emulator-key``).
DEFAULT_API_KEY = "emulator-key"

__all__ = [
    "DEFAULT_API_KEY",
    "GENERATION_PATHS",
    "MAX_REQUEST_RECORDS",
    "MODELS_PATHS",
    "TOS_BUCKET",
    "TOS_PREFIX",
    "JiMengEmulator",
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], emulator: JiMengEmulator) -> None:
        self.emulator = emulator
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall for seconds without DNS.
        TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called by socketserver while it handles the exception: clients hanging up are routine,
        # anything else is a bug worth a traceback.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("JiMeng emulator: connection from %s failed: %r", client_address, error)
        else:
            log.error("JiMeng emulator: error serving %s:\n%s", client_address, traceback.format_exc())


class JiMengEmulator:
    """An offline JiMeng API on ``http://host:port``; use as a context manager or start()/stop().

    ``latency`` (seconds per generated image), ``images_per_minute`` (``None`` = unlimited),
    ``rate_limit_burst`` (``None``: the limit is a sliding 60 s window; a number: a token bucket of
    that many images, refilled evenly over the minute), ``url_ttl``, ``moderation_marker`` and
    ``stream_content_type`` (the label of event streams: ``"application/json"`` plays a gateway that
    mislabels them) and ``images_per_request`` (answer every request with at least that many images,
    all billed, as some gateways do) may be changed while it runs. A prompt containing
    ``moderation_marker`` is refused as sensitive (400); ``FAIL_IMAGE_<k>`` in a prompt makes image
    ``k`` (0-based) of the answer fail moderation while the others succeed (and are billed).

    ``GET {base_url}/models`` lists the known models and requires the key, so a connection test can
    check the key without paying for an image. That route is an emulator convenience: the real
    Ark endpoint is not guaranteed to offer it, so the hook must probe the real service differently.

    The Visual API (``POST {root_url}/?Action=CVSync2AsyncSubmitTask&Version=2022-08-31`` and
    ``...GetResult...``, :mod:`.visual`) takes requests signed with ``access_key_id`` and
    ``secret_access_key`` (``access_key_id=None``: any signature, or none). A task waits in the queue
    ``visual_queue_delay`` seconds, generates ``latency`` seconds per image, and expires
    ``visual_task_ttl`` seconds after its submit, all on ``clock`` (``time.time`` unless a test
    injects one); ``visual_max_concurrent_tasks`` unfinished tasks at most (``None`` = unlimited),
    more answer ``50430``; ``visual_parallelism`` tasks generate at once, the others wait ``in_queue``
    first come first served (``None`` = all at once). ``images_per_minute`` limits its submits too (``50429``).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = DEFAULT_API_KEY,
        latency: float = 0.0,
        images_per_minute: int | None = None,
        url_ttl: float = 86400.0,
        moderation_marker: str = "FORBIDDEN",
        rate_limit_burst: int | None = None,
        access_key_id: str | None = DEFAULT_ACCESS_KEY_ID,
        secret_access_key: str | None = DEFAULT_SECRET_ACCESS_KEY,
        clock: Callable[[], float] = time.time,
        visual_queue_delay: float = 0.0,
        visual_task_ttl: float = TASK_TTL,
        visual_max_concurrent_tasks: int | None = None,
        visual_parallelism: int | None = None,
        images_per_request: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.latency = latency
        self.images_per_minute = images_per_minute
        self.rate_limit_burst = rate_limit_burst
        self.url_ttl = url_ttl
        self.moderation_marker = moderation_marker
        #: The label of event streams; some gateways send ``application/json`` (clients must read the body).
        self.stream_content_type = EVENT_STREAM_CONTENT_TYPE
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.clock = clock
        self.visual_queue_delay = visual_queue_delay
        self.visual_task_ttl = visual_task_ttl
        self.visual_max_concurrent_tasks = visual_max_concurrent_tasks
        self.visual_parallelism = visual_parallelism
        #: Behave as a gateway that answers (and bills) at least this many images per request.
        self.images_per_request = images_per_request
        #: What the requests share (faults, ledger, rate limiter, images, URL signing, counters).
        self.runtime = Runtime()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> JiMengEmulator:
        """Bind and serve in a daemon thread; a second call does nothing."""
        if self._server is not None:
            return self
        require_pillow()  # without it every request would fail with a retryable 500
        self.runtime.stopping.clear()
        server = _Server((self.host, self.port), self)
        self._server = server
        self._bound_port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"jimeng-emulator-{self._bound_port}",
            daemon=True,
        )
        self._thread.start()
        log.info("JiMeng emulator serving %s (and %s)", self.base_url, self.openai_base_url)
        return self

    def stop(self) -> None:
        """Stop serving, break open keep-alive connections and wake requests sleeping on latency."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self.runtime.stopping.set()
        # shutdown() waits for the serve loop to wake up; a throwaway connection wakes it at once.
        stopper = threading.Thread(target=server.shutdown, name="jimeng-emulator-stop", daemon=True)
        stopper.start()
        with contextlib.suppress(OSError):
            socket.create_connection(self._connect_address(), timeout=0.5).close()
        stopper.join()
        for connection in self.runtime.stats.connections():
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None
        log.info("JiMeng emulator on port %s stopped", self._bound_port)

    def __enter__(self) -> JiMengEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------------

    def _connect_address(self) -> tuple[str, int]:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return host, self._bound_port or 0

    @property
    def root_url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("the emulator is not started: call start() or use it as a context manager")
        host = self._connect_address()[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._bound_port}"

    @property
    def base_url(self) -> str:
        """Base URL in the official style (``.../api/v3``)."""
        return f"{self.root_url}/api/v3"

    @property
    def visual_host(self) -> str:
        """``host:port`` for the official ``volcengine`` SDK's ``VisualService.set_host`` (with scheme ``http``)."""
        return self.root_url.removeprefix("http://")

    @property
    def openai_base_url(self) -> str:
        """Base URL in the OpenAI-compatible gateway style (``.../v1``)."""
        return f"{self.root_url}/v1"

    # -- scripting and inspection ----------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each matching request consumes one use of the first matching fault (FIFO).

        Generation faults are consumed only by authenticated requests whose body is valid (those the
        service would have started to process).
        """
        self.runtime.faults.push(*faults)

    def clear_faults(self) -> None:
        self.runtime.faults.clear()

    @property
    def pending_faults(self) -> int:
        return len(self.runtime.faults)

    @property
    def ledger(self) -> list[LedgerEntry]:
        return self.runtime.ledger.entries()

    @property
    def billed_images(self) -> int:
        return self.runtime.ledger.billed_images()

    @property
    def billed_web_searches(self) -> int:
        """Web searches billed (Seedream 5.0's web-search tool, charged apart from images)."""
        return self.runtime.ledger.billed_web_searches()

    @property
    def request_count(self) -> int:
        return self.runtime.stats.request_count

    @property
    def requests(self) -> list[dict[str, Any]]:
        """One record per generation POST (newest last, at most 10,000), bodies with images redacted."""
        return self.runtime.stats.records()

    @property
    def rate_limited_count(self) -> int:
        return self.runtime.stats.rate_limited

    @property
    def downloads(self) -> int:
        return self.runtime.stats.downloads

    def reset(self) -> None:
        """Forget ledger, counters, request records, faults and the rate-limit window."""
        self.runtime.reset()

    # -- used by the request modules -------------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """Wait out emulated latency; :meth:`stop` wakes it. Benchmarks time it by wrapping ``_sleep``."""
        self._sleep(seconds)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.runtime.stopping.wait(seconds)

    @property
    def _cache(self) -> RenderCache:
        """The render cache (benchmarks size it and read its ``renders``)."""
        return self.runtime.cache
