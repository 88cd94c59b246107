"""What each Seedream model family accepts, as documented in the API fact sheet.

One table serves the hook (to refuse bad input before paying for a request) and the emulator (to
answer like the real service), so the two can never disagree about the rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Pixel dimensions the emulator renders for each size keyword (the real service may pick another
#: aspect ratio from the prompt; the total stays on the same order).
SIZE_KEYWORDS: dict[str, tuple[int, int]] = {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (4096, 4096)}

#: Largest number of images (reference + generated) a single request may involve.
MAX_IMAGES_PER_REQUEST = 15
MAX_SEED = 2_147_483_647
MAX_REFERENCE_IMAGE_BYTES = 10 * 1024 * 1024
MIN_REFERENCE_IMAGE_SIDE = 15  # sides must be > 14 px
MAX_REFERENCE_IMAGE_SIDE = 6000
REFERENCE_IMAGE_FORMATS = ("jpeg", "png", "webp", "bmp", "tiff", "gif")
RESPONSE_FORMATS = ("url", "b64_json")
SEQUENTIAL_MODES = ("auto", "disabled")
#: Recommended maximum prompt length: exceeding it only earns a warning.
SOFT_PROMPT_MAX_CJK_CHARS = 300
SOFT_PROMPT_MAX_WORDS = 600

DEFAULT_MODEL = "doubao-seedream-4-0-250828"
DEFAULT_BYTEPLUS_MODEL = "seedream-4-0-250828"


@dataclass(frozen=True)
class ModelFamily:
    """The rules of one model family. ``None`` for a bound means "not checked"."""

    name: str
    size_keywords: tuple[str, ...]
    min_pixels: int | None
    max_pixels: int | None
    min_side: int | None
    max_side: int | None
    max_aspect_ratio: float | None
    sequential: bool
    stream: bool
    reference_images: bool
    max_reference_images: int
    optimize_prompt_modes: tuple[str, ...]
    guidance_scale: bool

    def describe_sizes(self) -> str:
        """Say in words which sizes are allowed, for error messages."""
        parts = []
        if self.size_keywords:
            parts.append(" / ".join(repr(k) for k in self.size_keywords))
        rules = []
        if self.min_pixels is not None:
            rules.append(f"W*H >= {self.min_pixels}")
        if self.max_pixels is not None:
            rules.append(f"W*H <= {self.max_pixels}")
        if self.min_side is not None and self.max_side is not None:
            rules.append(f"each side in [{self.min_side}, {self.max_side}]")
        if self.max_aspect_ratio is not None:
            rules.append(f"W/H in [1/{self.max_aspect_ratio:g}, {self.max_aspect_ratio:g}]")
        parts.append("'WxH'" + (f" with {', '.join(rules)}" if rules else ""))
        return " or ".join(parts)


SEEDREAM_4_0 = ModelFamily(
    name="Seedream 4.0",
    size_keywords=("1K", "2K", "4K"),
    min_pixels=921_600,
    max_pixels=16_777_216,
    min_side=None,
    max_side=None,
    max_aspect_ratio=16,
    sequential=True,
    stream=True,
    reference_images=True,
    max_reference_images=10,
    optimize_prompt_modes=("standard", "fast"),
    guidance_scale=False,
)
SEEDREAM_4_5 = ModelFamily(
    name="Seedream 4.5",
    size_keywords=("2K", "4K"),
    min_pixels=3_686_400,
    max_pixels=16_777_216,
    min_side=None,
    max_side=None,
    max_aspect_ratio=16,
    sequential=True,
    stream=True,
    reference_images=True,
    max_reference_images=14,
    optimize_prompt_modes=("standard",),
    guidance_scale=False,
)
SEEDREAM_3_0 = ModelFamily(
    name="Seedream 3.0 (text-to-image)",
    size_keywords=(),
    min_pixels=None,
    max_pixels=None,
    min_side=512,
    max_side=2048,
    max_aspect_ratio=None,
    sequential=False,
    stream=False,
    reference_images=False,
    max_reference_images=0,
    optimize_prompt_modes=(),
    guidance_scale=True,
)
#: Endpoint ids (``ep-...``) and ids this provider does not know: only the shape of values is checked,
#: the service has the last word.
PERMISSIVE = ModelFamily(
    name="unrecognised model or endpoint id",
    size_keywords=("1K", "2K", "4K"),
    min_pixels=None,
    max_pixels=None,
    min_side=1,
    max_side=None,
    max_aspect_ratio=None,
    sequential=True,
    stream=True,
    reference_images=True,
    max_reference_images=14,
    optimize_prompt_modes=("standard", "fast"),
    guidance_scale=True,
)

_FAMILY_PATTERNS: tuple[tuple[re.Pattern[str], ModelFamily], ...] = (
    (re.compile(r"seedream-4[-.]5", re.IGNORECASE), SEEDREAM_4_5),
    (re.compile(r"seedream-4[-.]0", re.IGNORECASE), SEEDREAM_4_0),
    (re.compile(r"seedream-3[-.]0", re.IGNORECASE), SEEDREAM_3_0),
)

_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[x×X*]\s*(\d+)\s*$")


def family_for_model(model: str) -> ModelFamily:
    """Find the rules for a model id; unknown ids and endpoint ids get the permissive family."""
    for pattern, family in _FAMILY_PATTERNS:
        if pattern.search(model):
            return family
    return PERMISSIVE


def parse_dimensions(size: str) -> tuple[int, int] | None:
    """Read ``WxH`` (also written with ``×``) into integers; ``None`` when it is not of that form."""
    match = _SIZE_PATTERN.match(size)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2))


def size_error(family: ModelFamily, size: str) -> str | None:
    """Say why ``size`` is not allowed for ``family``, or ``None`` when it is."""
    if size in family.size_keywords:
        return None
    dims = parse_dimensions(size)
    if dims is None:
        return f"{size!r} is not allowed for {family.name}; allowed: {family.describe_sizes()}"
    width, height = dims
    pixels = width * height
    problems = []
    if width <= 0 or height <= 0:
        problems.append("sides must be positive")
    else:
        if family.min_pixels is not None and pixels < family.min_pixels:
            problems.append(f"W*H = {pixels} is below {family.min_pixels}")
        if family.max_pixels is not None and pixels > family.max_pixels:
            problems.append(f"W*H = {pixels} is above {family.max_pixels}")
        if family.min_side is not None and min(width, height) < family.min_side:
            problems.append(f"a side is below {family.min_side}")
        if family.max_side is not None and max(width, height) > family.max_side:
            problems.append(f"a side is above {family.max_side}")
        ratio = family.max_aspect_ratio
        if ratio is not None and not (1 / ratio <= width / height <= ratio):
            problems.append(f"aspect ratio {width}/{height} is outside [1/{ratio:g}, {ratio:g}]")
    if not problems:
        return None
    return f"{size!r} is not allowed for {family.name} ({'; '.join(problems)}); allowed: {family.describe_sizes()}"


def rendered_dimensions(size: str | None, default: tuple[int, int] = (2048, 2048)) -> tuple[int, int]:
    """Pixel dimensions of the image a valid ``size`` produces (keywords render square)."""
    if not size:
        return default
    if size in SIZE_KEYWORDS:
        return SIZE_KEYWORDS[size]
    dims = parse_dimensions(size)
    if dims is None:
        raise ValueError(f"not a size: {size!r}")
    return dims
