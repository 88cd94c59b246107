"""Thumbnails for the gallery's grid: made by the API server on first request, kept in a bounded LRU.

A JiMeng image is 1-4 MB (2048x2048 and up) while a tile of the grid is 220 CSS pixels: the grid
loads a 440-pixel JPEG (sharp on HiDPI screens, ~30-60 KB) and the tile links to the full image.

Why the API server, not the worker: the worker's store path stays what it is (one object per image,
nothing more to pay for or to clean up, no format the gallery would then have to trust), and tasks
stored before this feature get thumbnails too. Each thumbnail is made once per API server process and
kept in memory, in an LRU bounded in bytes, keyed by the object's URI and size. Every request still
goes through the image route's own lookup (permission, the task's XComs, the trust checks) and opens
the object, so a cached thumbnail is never served for an image the request may not read, nor for an
object that was deleted.

Serving must not slow Airflow's own API, which shares the API server's event loop and its thread
pool (Airflow's sync routes run there): the route is ``async`` and runs its blocking parts on this
module's own small thread limiters, so 64 requests at once wait as coroutines, not as pool threads;
decoding and resizing (CPU) run at most :data:`DECODE_WORKERS` at a time.

Pillow is an optional dependency (the ``gallery`` extra): without it the grid shows the full images,
loaded lazily, and this route redirects to the full image.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow_provider_jimeng.storage.thumbnails import (
    THUMBNAIL_PX,
    NotThumbnailable,
    make_thumbnail,
    pillow_available,
)

if TYPE_CHECKING:
    from airflow_provider_jimeng.plugins.gallery_access import StorageRoot
    from airflow_provider_jimeng.plugins.gallery_store import ObjectStream

log = logging.getLogger(__name__)

#: Objects bigger than this are not read for a thumbnail on the API server: the tile shows the full image.
MAX_SOURCE_BYTES = 48 * 1024 * 1024
#: A thumbnail the worker stored is read only up to this size (they are ~16-60 KB).
MAX_STORED_THUMBNAIL_BYTES = 2 * 1024 * 1024
#: Default bound of the in-memory cache (``[jimeng] gallery_thumbnail_cache_mb``): ~1,500 thumbnails.
CACHE_BYTES = 64 * 1024 * 1024
#: Thumbnails decoded at once (CPU), and objects read at once (I/O), per API server process. One decode
#: at a time (~25 ms of CPU for a 2048x2048 JPEG) leaves the other cores to Airflow's own API: with two,
#: P8 (per-connection S3 client, 2 cores) measured /api/v2/dags p95 at 919 ms while 64 thumbnails were made,
#: with one at 163 ms.
DECODE_WORKERS = 1
READ_WORKERS = 8
#: How many thumbnail URIs without a stored object each API server process remembers.
NONE_STORED_REMEMBERED = 10_000
#: Tile requests handled at once per API server process (``[jimeng] gallery_tiles_at_once``, see
#: :class:`TileAdmission`); the pause after each before the next starts (longer than most of Airflow's
#: own requests take, ~5-15 ms); and how long one waits for its turn before it goes ahead anyway (a
#: tile held up by a slow storage read).
TILES_AT_ONCE = 1
TILE_GAP_S = 0.015
TILE_TURN_WAIT_S = 1.0


@dataclass(frozen=True)
class ThumbnailSettings:
    """What the deployment chose (``[jimeng]`` in airflow.cfg); thumbnails need Pillow as well."""

    enabled: bool
    cache_bytes: int
    #: Tile requests handled at once (0: no limit).
    tiles_at_once: int = TILES_AT_ONCE
    #: Tiles whose thumbnail the worker stored load from sheets (:mod:`.sheets`); no Pillow needed for them.
    sheets: bool = False

    @classmethod
    def from_config(cls) -> ThumbnailSettings:
        from airflow.configuration import conf

        enabled = conf.getboolean("jimeng", "gallery_thumbnails", fallback=True)
        cache_mb = conf.getint("jimeng", "gallery_thumbnail_cache_mb", fallback=CACHE_BYTES // 2**20)
        tiles = conf.getint("jimeng", "gallery_tiles_at_once", fallback=TILES_AT_ONCE)
        sheets = conf.getboolean("jimeng", "gallery_sheets", fallback=False)
        return cls(
            enabled=enabled and pillow_available(),
            cache_bytes=max(0, cache_mb) * 2**20,
            tiles_at_once=max(0, tiles),
            sheets=enabled and sheets,
        )


class ThumbnailCache:
    """A thread-safe LRU of thumbnails, bounded by the bytes it holds."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.made = 0
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[str, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        with self._lock:
            self.made += 1
            if len(data) > self.max_bytes:
                return
            previous = self._items.pop(key, None)
            self.bytes += len(data) - (len(previous) if previous is not None else 0)
            self._items[key] = data
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= len(evicted)


def _read_all(stream: ObjectStream, limit: int = MAX_SOURCE_BYTES) -> bytes:
    """The object's bytes, up to ``limit`` (closed either way)."""
    parts: list[bytes] = []
    total = 0
    try:
        for chunk in stream.chunks:
            total += len(chunk)
            if total > limit:
                raise NotThumbnailable(f"more than {limit} bytes")
            parts.append(chunk)
    finally:
        stream.close()
    return b"".join(parts)


def _validator(key: tuple[str, int]) -> str:
    """A strong validator of one thumbnail: the object's URI and size (never shown to the page)."""
    digest = hashlib.sha256(f"{THUMBNAIL_PX}|{key[1]}|{key[0]}".encode()).hexdigest()[:32]
    return f'"{digest}"'


@dataclass
class Thumbnail:
    """What the route answers: a JPEG and its validator, or ``None`` (show the full image)."""

    data: bytes | None
    etag: str | None
    cached: bool = False


class Thumbnailer:
    """Makes and caches thumbnails off the event loop, on its own bounded threads."""

    def __init__(self, settings: ThumbnailSettings) -> None:
        self.settings = settings
        self.cache = ThumbnailCache(settings.cache_bytes)
        self._limiters: dict[str, Any] = {}
        #: Thumbnail URIs known to have no stored object: asked once, not on every tile request.
        self._none_stored: OrderedDict[str, None] = OrderedDict()
        self._none_stored_lock = threading.Lock()

    def none_stored(self, uri: str) -> bool:
        """Whether ``uri`` was already found to hold no stored thumbnail (the worker stores it with the image)."""
        with self._none_stored_lock:
            return uri in self._none_stored

    def remember_none_stored(self, uri: str) -> None:
        with self._none_stored_lock:
            self._none_stored[uri] = None
            if len(self._none_stored) > NONE_STORED_REMEMBERED:
                self._none_stored.popitem(last=False)

    def _limiter(self, name: str, total: int) -> Any:
        # Created on first use, inside the API server's event loop.
        from anyio import CapacityLimiter

        if name not in self._limiters:
            self._limiters[name] = CapacityLimiter(total)
        return self._limiters[name]

    async def run_io(self, function: Callable[[], Any]) -> Any:
        """``function()`` (a lookup, an object read) on one of :data:`READ_WORKERS` threads."""
        from anyio import to_thread

        return await to_thread.run_sync(function, limiter=self._limiter("read", READ_WORKERS))

    def stored_thumbnail(self, location: tuple[str, StorageRoot] | None) -> bytes | None:
        """The JPEG the worker stored at ``location`` (checked under the roots), read whole.

        ``None``: none stored, or not readable (the tile may make one); ``b""``: one is stored but is
        no JPEG or is larger than any thumbnail should be (never served, nor decoded here). Blocking
        (call it through :meth:`run_io`). A missing one is remembered, so it is asked once.
        """
        from airflow_provider_jimeng.plugins.gallery_access import ConnectionMissing
        from airflow_provider_jimeng.plugins.gallery_store import open_object
        from airflow_provider_jimeng.plugins.sheets import is_jpeg

        if location is None or self.none_stored(location[0]):
            return None
        try:
            data = _read_all(open_object(*location), MAX_STORED_THUMBNAIL_BYTES)
        except (FileNotFoundError, ConnectionMissing):
            self.remember_none_stored(location[0])
            return None
        except NotThumbnailable:
            return b""
        except Exception as error:
            log.warning("JiMeng gallery: a stored thumbnail not read (%s)", type(error).__name__)
            return None
        return data if is_jpeg(data) else b""

    def validator(self, uri: str, stream: ObjectStream) -> str | None:
        """The ETag the thumbnail of this object has (``None``: the object's size is unknown)."""
        return None if stream.size is None else _validator((uri, stream.size))

    async def thumbnail(self, uri: str, stream: ObjectStream) -> Thumbnail:
        """The thumbnail of the opened object ``stream`` (``uri``); the stream is closed."""
        from anyio import to_thread

        if stream.size is None:  # no size to key the cache on (``file://``): made each time
            key = None
        else:
            key = (uri, stream.size)
            cached = self.cache.get(key)
            if cached is not None:
                stream.close()
                return Thumbnail(cached, _validator(key), cached=True)
        try:
            data = await self.run_io(lambda: _read_all(stream))
            small = await to_thread.run_sync(make_thumbnail, data, limiter=self._limiter("decode", DECODE_WORKERS))
        except NotThumbnailable as error:
            log.info("JiMeng gallery: no thumbnail for an image (%s); the tile shows it whole", error)
            return Thumbnail(None, None)
        if key is None:
            return Thumbnail(small, None)
        self.cache.put(key, small)
        return Thumbnail(small, _validator(key))


#: The pause after a sheet's turn, in turns: a grid's sheets then take a third of the process's time.
SHEET_GAP_FACTOR = 2.0
#: The routes whose requests take turns (:class:`TileAdmission`): a grid's tiles and its sheets.
TILE_ROUTES = ("/thumbnail", "/sheet")


class TileAdmission:
    """ASGI middleware: tile and sheet requests take turns, so a grid of 64 tiles cannot crowd out Airflow's own API.

    A tile request is cheap (~6-10 ms of CPU: two permission checks, an XCom lookup, a storage read)
    but pure Python: all of it holds the API server process's one GIL. A browser sends six at once per
    page, and a ``GET /api/v2/dags`` arriving then shares the GIL with all six (P8: p95 13x idle).
    One at a time, back to back, tiles still hold the GIL all through a grid's load, and every Airflow
    request shares it (P8: p95 3.8x). So tiles take turns with a pause of :data:`TILE_GAP_S` after
    each: an Airflow request then overlaps at most the end of one tile. A turn is awaited as a
    coroutine, never on a thread, and for :data:`TILE_TURN_WAIT_S` at most: a tile stuck on a slow
    storage read delays the others by that, not by the storage's timeout. The pause comes after the
    response is sent: it delays the next tile, not this one.
    """

    def __init__(
        self, app: Any, *, at_once: int = TILES_AT_ONCE, wait_s: float = TILE_TURN_WAIT_S, gap_s: float = TILE_GAP_S
    ) -> None:
        self.app = app
        self.at_once = at_once
        self.wait_s = wait_s
        self.gap_s = gap_s
        self._turns: Any = None
        #: Requests that went ahead without a turn (their wait ran out).
        self.overtaken = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.at_once <= 0 or scope["type"] != "http" or not scope["path"].endswith(TILE_ROUTES):
            await self.app(scope, receive, send)
            return
        import anyio

        if self._turns is None:  # created inside the API server's event loop
            self._turns = anyio.Semaphore(self.at_once)
        turn = False
        with anyio.move_on_after(self.wait_s):
            await self._turns.acquire()
            turn = True
        if not turn:
            self.overtaken += 1
        try:
            from airflow_provider_jimeng.plugins.priority import AIRFLOW_REQUESTS

            await AIRFLOW_REQUESTS.await_quiet()  # and Airflow's own requests before any tile
            started = time.monotonic()
            await self.app(scope, receive, send)
            if turn:
                gap = self.gap_s
                if scope["path"].endswith("/sheet"):
                    # Eight tiles' work in one turn: the pause is twice as long as the turn was, so a
                    # grid's sheets hold the process a third of the time (the browser draws them meanwhile).
                    gap = min(max(gap, SHEET_GAP_FACTOR * (time.monotonic() - started)), self.wait_s)
                await anyio.sleep(gap)
        finally:
            if turn:
                self._turns.release()
