"""Thumbnails of stored images: a 440-pixel JPEG for each of the gallery's 220-pixel tiles.

Made in two places, by one function: by the worker right after it stores an image, when the
deployment asks for it (``[jimeng] store_thumbnails = True`` and Pillow on the workers), as a second
object next to the image (:func:`thumbnail_key`); otherwise by the API server on a tile's first
request (:mod:`airflow_provider_jimeng.plugins.thumbnails`). A stored thumbnail costs the worker ~20 ms
of CPU and one small PUT per image, and spares the API server reading the full image (1-4 MB) and
decoding it: the gallery's first view of 64 images moves ~1 MB instead of ~110 MB.

The gallery finds a stored thumbnail by the image's own URI, never by anything else a task wrote, and
reads it under the same allowed storage roots as the image itself.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import mmap
import posixpath

#: The longest side of a thumbnail: twice the grid's 220-pixel tiles, for HiDPI screens.
THUMBNAIL_PX = 440
JPEG_QUALITY = 80
#: Images with more pixels than this are not decoded for a thumbnail (the tile shows the full image).
MAX_SOURCE_PIXELS = 64 * 1024 * 1024
#: The folder, next to the images, that holds their stored thumbnails.
THUMBNAIL_FOLDER = "_thumbnails"


@functools.cache
def pillow_available() -> bool:
    """Whether Pillow can be imported (the ``gallery`` extra)."""
    return importlib.util.find_spec("PIL") is not None


def store_thumbnails_enabled() -> bool:
    """Whether this worker stores a thumbnail next to each image (``[jimeng] store_thumbnails``, and Pillow)."""
    from airflow.configuration import conf

    return conf.getboolean("jimeng", "store_thumbnails", fallback=False) and pillow_available()


def thumbnail_key(key: str) -> str:
    """Where the thumbnail of the image at ``key`` (a key or a URI) is stored: ``<folder>/_thumbnails/<name>``."""
    folder, name = posixpath.split(key)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{folder}/{THUMBNAIL_FOLDER}/{stem}.jpeg" if folder else f"{THUMBNAIL_FOLDER}/{stem}.jpeg"


class NotThumbnailable(Exception):
    """Not an image Pillow can decode within the bounds: the tile shows the full image."""


def make_thumbnail(data: bytes | bytearray | memoryview | mmap.mmap, px: int = THUMBNAIL_PX) -> bytes:
    """A JPEG of ``data`` whose longest side is at most ``px`` (never enlarged)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_SOURCE_PIXELS:
                raise NotThumbnailable(f"{width}x{height} pixels")
            # A JPEG is decoded at 1/2, 1/4 or 1/8 of its size straight from the DCT: a 2048x2048
            # image at 512x512, several times faster than decoding it whole and shrinking it.
            opened.draft("RGB", (px, px))
            image = opened.convert("RGBA") if "A" in opened.getbands() or opened.mode == "P" else opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise NotThumbnailable(type(error).__name__) from None
    if image.mode == "RGBA":  # JPEG has no alpha: transparent areas become white
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        image = background
    image.thumbnail((px, px), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, progressive=True)
    return out.getvalue()
