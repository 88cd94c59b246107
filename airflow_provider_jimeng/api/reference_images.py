"""Reference images: turn what a DAG author has (URL, data URI, bytes, a file) into what the API takes.

Formats and dimensions are read from the file header with the standard library only, so a missing,
truncated or non-image file is refused before any request is paid for, without Pillow at runtime.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from airflow_provider_jimeng.api.capabilities import (
    MAX_REFERENCE_IMAGE_ASPECT_RATIO,
    MAX_REFERENCE_IMAGE_BYTES,
    MAX_REFERENCE_IMAGE_PIXELS,
    MIN_REFERENCE_IMAGE_SIDE,
    REFERENCE_IMAGE_FORMATS,
)
from airflow_provider_jimeng.exceptions import JiMengConfigurationError

ImageInput = str | bytes | bytearray | os.PathLike[str]

_DATA_URI = re.compile(r"^data:image/([^;,]+);base64,(.*)$", re.DOTALL)


class CheckedDataUri(str):
    """A data URI already checked against the API's limits, made once per run and shared by every prompt.

    A 7.7 MB reference image is a 10 MB data URI: each prompt's body used to carry its own copy, all
    built before the first request (+417 MiB at 40 prompts). Bodies now hold this one object, which
    is not decoded and checked again for each of them. JSON encodes it as the string it is.
    """

    __slots__ = ()


def sniff_image(data: bytes) -> tuple[str, tuple[int, int] | None] | None:
    """Return ``(format, (width, height))`` from an image's header, or ``None`` if it is no image.

    Dimensions are ``None`` when the header is recognised but too short or corrupt to state them
    (a bare ``FF D8``, a TIFF header without its first directory): such data is refused, since the
    service's limits are on dimensions this provider could not check.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png", _pair(">II", data, 16)
    if data.startswith(b"\xff\xd8"):
        return "jpeg", _jpeg_dimensions(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif", _pair("<HH", data, 6)
    if data.startswith(b"BM") and len(data) >= 14:
        if len(data) < 26:
            return "bmp", None
        width, height = struct.unpack("<ii", data[18:26])
        return "bmp", (abs(width), abs(height))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", _webp_dimensions(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff", _tiff_dimensions(data)
    return None


def _pair(fmt: str, data: bytes, offset: int) -> tuple[int, int] | None:
    """Two integers at ``offset``, or ``None`` when the data ends before them."""
    end = offset + struct.calcsize(fmt)
    if len(data) < end:
        return None
    first, second = struct.unpack(fmt, data[offset:end])
    return int(first), int(second)


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    offset = 2
    while offset + 9 < len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            offset += 2
            continue
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[offset + 5 : offset + 9])
            return width, height
        offset += 2 + length
    return None


def _webp_dimensions(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def _tiff_dimensions(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (tag 256) and ImageLength (257) from the first image file directory."""
    order = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None
    (ifd,) = struct.unpack(order + "I", data[4:8])
    if ifd + 2 > len(data):
        return None
    (entries,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    found: dict[int, int] = {}
    for position in range(ifd + 2, min(ifd + 2 + entries * 12, len(data) - 11), 12):
        tag, kind = struct.unpack(order + "HH", data[position : position + 4])
        if tag in (256, 257):
            # SHORT (3) values sit in the first two bytes of the value field, LONG (4) in all four.
            fmt = "H" if kind == 3 else "I"
            (found[tag],) = struct.unpack(order + fmt, data[position + 8 : position + 8 + struct.calcsize(fmt)])
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def _check_image_bytes(parameter: str, data: bytes, declared_format: str | None = None) -> str:
    """Validate decoded image bytes against the API's limits; return the detected format."""
    if len(data) > MAX_REFERENCE_IMAGE_BYTES:
        raise JiMengConfigurationError(
            parameter,
            f"is {len(data)} bytes; reference images may be at most {MAX_REFERENCE_IMAGE_BYTES} bytes",
        )
    sniffed = sniff_image(data)
    if sniffed is None:
        raise JiMengConfigurationError(
            parameter, f"is not an image; allowed formats: {', '.join(REFERENCE_IMAGE_FORMATS)}"
        )
    image_format, dims = sniffed
    if declared_format is not None and declared_format != image_format:
        raise JiMengConfigurationError(parameter, f"declares image/{declared_format} but holds {image_format} data")
    if dims is None:
        raise JiMengConfigurationError(
            parameter,
            f"is {image_format} data whose dimensions cannot be read (truncated or corrupt); "
            "the service limits sides, pixels and aspect ratio, so it is refused before sending",
        )
    width, height = dims
    ratio = MAX_REFERENCE_IMAGE_ASPECT_RATIO
    if min(width, height) < MIN_REFERENCE_IMAGE_SIDE:
        raise JiMengConfigurationError(
            parameter, f"is {width}x{height}; sides must be > {MIN_REFERENCE_IMAGE_SIDE - 1} px"
        )
    if width * height > MAX_REFERENCE_IMAGE_PIXELS:
        raise JiMengConfigurationError(
            parameter,
            f"is {width}x{height} = {width * height} pixels; reference images may have at most "
            f"{MAX_REFERENCE_IMAGE_PIXELS} (6000x6000) pixels",
        )
    if not 1 / ratio <= width / height <= ratio:
        raise JiMengConfigurationError(
            parameter, f"is {width}x{height}; its aspect ratio W/H must be in [1/{ratio}, {ratio}]"
        )
    return image_format


def to_data_uri(data: bytes, image_format: str) -> CheckedDataUri:
    """Encode image bytes the way the API expects inline images (checked bytes: see the callers)."""
    return CheckedDataUri(f"data:image/{image_format};base64,{base64.b64encode(data).decode('ascii')}")


def normalize_reference_images(image: Any) -> str | list[str] | None:
    """One or several reference images (``image``) as URLs and checked data URIs; ``None`` for none.

    The operator calls it once per run, so that every prompt's body shares the same strings.
    """
    if image is None:
        return None
    if isinstance(image, (str, bytes, bytearray)) or not isinstance(image, Sequence):
        return normalize_reference_image("image", image)
    references = cast("Sequence[ImageInput]", image)  # bytes were handled above
    return [normalize_reference_image(f"image[{position}]", item) for position, item in enumerate(references)]


def validate_data_uri(parameter: str, value: str) -> None:
    """Check a ``data:image/<fmt>;base64,...`` reference: lower-case known format, decodable, an image."""
    match = _DATA_URI.match(value)
    if not match:
        raise JiMengConfigurationError(parameter, "a data URI must look like 'data:image/<format>;base64,<data>'")
    declared = match.group(1)
    if declared not in REFERENCE_IMAGE_FORMATS:
        hint = " (the format must be lower case)" if declared.lower() in REFERENCE_IMAGE_FORMATS else ""
        raise JiMengConfigurationError(
            parameter,
            f"data URI format 'image/{declared[:20]}' is not allowed{hint}; "
            f"allowed: {', '.join('image/' + f for f in REFERENCE_IMAGE_FORMATS)}",
        )
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise JiMengConfigurationError(parameter, "the data URI's base64 payload does not decode") from None
    _check_image_bytes(parameter, data, declared)


def normalize_reference_image(parameter: str, value: ImageInput) -> str:
    """Return a URL or data URI for one reference image, refusing anything the API would refuse."""
    if isinstance(value, CheckedDataUri):
        return value
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        return to_data_uri(data, _check_image_bytes(parameter, data))
    if isinstance(value, os.PathLike):
        return _file_to_data_uri(parameter, Path(value))
    if not isinstance(value, str):
        raise JiMengConfigurationError(
            parameter,
            f"got {type(value).__name__}; expected a URL, a data URI, bytes or a local file path",
        )
    text = value.strip()
    if not text:
        raise JiMengConfigurationError(parameter, "is empty; expected a URL, a data URI, bytes or a local file path")
    lowered = text[:8].lower()
    if lowered.startswith(("http://", "https://")):
        return text
    if lowered.startswith("data:"):
        validate_data_uri(parameter, text)
        return CheckedDataUri(text)
    if "://" in text[:16]:
        raise JiMengConfigurationError(
            parameter,
            f"URL scheme of {text.split('://')[0]!r} is not allowed; use http(s), a data URI or a local file",
        )
    return _file_to_data_uri(parameter, Path(text))


def _file_to_data_uri(parameter: str, path: Path) -> str:
    if not path.is_file():
        raise JiMengConfigurationError(
            parameter,
            f"file {str(path)[:200]!r} does not exist; expected a URL, a data URI, bytes or a local file",
        )
    size = path.stat().st_size
    if size > MAX_REFERENCE_IMAGE_BYTES:
        raise JiMengConfigurationError(
            parameter,
            f"file {path.name!r} is {size} bytes; reference images may be at most {MAX_REFERENCE_IMAGE_BYTES} bytes",
        )
    data = path.read_bytes()
    return to_data_uri(data, _check_image_bytes(parameter, data))
