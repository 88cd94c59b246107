"""Deterministic JPEG/PNG rendering, a byte-bounded render cache and the store behind signed image URLs.

Images are real JPEGs (PNGs when Seedream 5.0 is asked for ``output_format="png"``) of exactly the
requested dimensions, so clients can check sizes and decode them;
the picture itself is a cheap function of (prompt, seed, index): a small canvas upscaled with
nearest-neighbour, which renders even 4K images in tens of milliseconds and compresses well.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, NamedTuple

DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_URLS = 200_000
JPEG_QUALITY = 80
_CANVAS_WIDTH = 64

PILLOW_MISSING = (
    "The JiMeng emulator renders images with Pillow, which is not installed: "
    "pip install 'airflow-provider-jimeng[emulator]' (or: pip install pillow)"
)


def require_pillow() -> None:
    """Refuse to start without Pillow: every request would otherwise fail with a retryable 500."""
    try:
        import PIL.Image  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(PILLOW_MISSING) from exc


class ImageKey(NamedTuple):
    """Everything an emulated image depends on; equal keys give byte-identical images."""

    prompt: str
    seed: int
    image_index: int
    width: int
    height: int
    watermark: bool
    image_format: str = "jpeg"


def _palette(digest: bytes, count: int) -> list[tuple[int, int, int]]:
    stream = digest
    while len(stream) < count * 3:
        stream += hashlib.sha256(stream).digest()
    return [(stream[i * 3], stream[i * 3 + 1], stream[i * 3 + 2]) for i in range(count)]


def render_image(key: ImageKey) -> bytes:
    """Encode ``key`` in its format (module-level names, so benchmarks can wrap ``render_jpeg``)."""
    return render_png(key) if key.image_format == "png" else render_jpeg(key)


def render_jpeg(key: ImageKey) -> bytes:
    """Render the JPEG for ``key``."""
    buffer = io.BytesIO()
    _draw(key).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def render_png(key: ImageKey) -> bytes:
    """Render the PNG for ``key`` (fastest compression: the flat picture compresses well anyway)."""
    buffer = io.BytesIO()
    _draw(key).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _draw(key: ImageKey) -> Any:
    """The picture of ``key`` at full size (needs Pillow, imported here so the emulator imports without it)."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(PILLOW_MISSING) from exc

    digest = hashlib.sha256(f"{key.prompt}\x00{key.seed}\x00{key.image_index}".encode()).digest()
    colours = _palette(digest, 6)
    width = _CANVAS_WIDTH
    height = max(4, min(1024, round(_CANVAS_WIDTH * key.height / key.width)))

    mask = Image.linear_gradient("L").rotate(digest[0] * 360 / 256).resize((width, height))
    canvas = Image.composite(
        Image.new("RGB", (width, height), colours[0]), Image.new("RGB", (width, height), colours[1]), mask
    )
    draw = ImageDraw.Draw(canvas)
    for shape in range(3):
        x0 = digest[4 + shape * 4] * width // 256
        y0 = digest[5 + shape * 4] * height // 256
        x1 = x0 + 4 + digest[6 + shape * 4] * width // 512
        y1 = y0 + 4 + digest[7 + shape * 4] * height // 512
        if shape % 2:
            draw.ellipse((x0, y0, x1, y1), fill=colours[2 + shape])
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colours[2 + shape])
    # The image's position in its set, readable after upscaling.
    draw.rectangle((1, 1, 13, 13), fill=(255, 255, 255))
    draw.text((3, 1), str(key.image_index + 1), fill=(0, 0, 0))
    if key.watermark:
        draw.rectangle((width - 12, height - 4, width - 2, height - 2), fill=(235, 235, 235))

    from PIL.Image import Resampling

    return canvas.resize((key.width, key.height), Resampling.NEAREST)


class RenderCache:
    """LRU of encoded JPEGs bounded by total bytes; concurrent requests for one key render it once.

    Renders also run under a semaphore, because a 4K canvas costs ~50 MB of memory while it exists.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, max_concurrent_renders: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[ImageKey, bytes] = OrderedDict()
        self._bytes = 0
        self._inflight: dict[ImageKey, threading.Event] = {}
        self._renders = threading.BoundedSemaphore(max_concurrent_renders or max(2, min(8, os.cpu_count() or 2)))
        self.renders = 0

    def get(self, key: ImageKey) -> bytes:
        while True:
            with self._lock:
                data = self._entries.get(key)
                if data is not None:
                    self._entries.move_to_end(key)
                    return data
                waiting = self._inflight.get(key)
                if waiting is None:
                    done = self._inflight[key] = threading.Event()
                    break
            waiting.wait()
        try:
            with self._renders:
                data = render_image(key)
            with self._lock:
                self.renders += 1
                self._store(key, data)
            return data
        finally:
            with self._lock:
                del self._inflight[key]
            done.set()

    def _store(self, key: ImageKey, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        self._entries[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


class StoredImage(NamedTuple):
    key: ImageKey
    expires_at: float  # time.time() after which downloads answer 403


class ImageStore:
    """Image ids behind signed URLs; keeps only keys (bytes live in the render cache), bounded LRU."""

    def __init__(self, max_ids: int = DEFAULT_MAX_URLS) -> None:
        self.max_ids = max_ids
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, StoredImage] = OrderedDict()

    def put(self, key: ImageKey, expires_at: float) -> str:
        image_id = f"{int(time.time() * 1000):x}{secrets.token_hex(12)}"
        with self._lock:
            self._ids[image_id] = StoredImage(key, expires_at)
            while len(self._ids) > self.max_ids:
                self._ids.popitem(last=False)
        return image_id

    def get(self, image_id: str) -> StoredImage | None:
        with self._lock:
            stored = self._ids.get(image_id)
            if stored is not None:
                self._ids.move_to_end(image_id)
            return stored

    def clear(self) -> None:
        with self._lock:
            self._ids.clear()
