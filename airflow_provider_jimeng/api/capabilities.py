"""What each Seedream model family accepts, as the official image generation API page documents it.

One table serves the hook (to refuse bad input before paying for a request) and the emulator (to
answer like the real service), so the two can never disagree about the rules. Sources, rule by rule:
docs/api-fidelity.md (the Volcengine Ark "图片生成 API" page, 82379/1541523, and its BytePlus ModelArk
twin, 1541523; the Seedream 4.0-5.0 tutorial, 82379/1824121; the official ``volcenginesdkarkruntime``
types).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Largest number of images (reference + generated) a single request may involve.
MAX_IMAGES_PER_REQUEST = 15
MAX_SEED = 2_147_483_647
MAX_REFERENCE_IMAGE_BYTES = 10 * 1024 * 1024
MIN_REFERENCE_IMAGE_SIDE = 15  # sides must be > 14 px
#: Reference images are bounded by their pixel count (6000x6000), not by each side.
MAX_REFERENCE_IMAGE_PIXELS = 36_000_000
#: Reference images' W/H must lie in [1/16, 16] (4.x and 5.0; 3.0 takes no reference image).
MAX_REFERENCE_IMAGE_ASPECT_RATIO = 16
REFERENCE_IMAGE_FORMATS = ("jpeg", "png", "webp", "bmp", "tiff", "gif")
RESPONSE_FORMATS = ("url", "b64_json")
OUTPUT_FORMATS = ("jpeg", "png")
SEQUENTIAL_MODES = ("auto", "disabled")
#: The tools of the ``tools`` field (``[{"type": "web_search"}]``), Seedream 5.0 only.
TOOL_TYPES = ("web_search",)
WEB_SEARCH_TOOL = "web_search"
#: Recommended maximum prompt length: exceeding it only earns a warning.
SOFT_PROMPT_MAX_CJK_CHARS = 300
SOFT_PROMPT_MAX_WORDS = 600

DEFAULT_MODEL = "doubao-seedream-4-0-250828"
DEFAULT_BYTEPLUS_MODEL = "seedream-4-0-250828"

#: The documentation's recommended WxH for each size keyword, by aspect ratio (the same for every
#: family that offers the keyword). A keyword lets the model pick the aspect ratio from the prompt
#: ("a 16:9 poster"); without one it renders 1:1.
_KEYWORD_TABLES: dict[str, dict[str, tuple[int, int]]] = {
    "1K": {
        "1:1": (1024, 1024),
        "4:3": (1152, 864),
        "3:4": (864, 1152),
        "16:9": (1280, 720),
        "9:16": (720, 1280),
        "3:2": (1248, 832),
        "2:3": (832, 1248),
        "21:9": (1512, 648),
    },
    "2K": {
        "1:1": (2048, 2048),
        "4:3": (2304, 1728),
        "3:4": (1728, 2304),
        "16:9": (2848, 1600),
        "9:16": (1600, 2848),
        "3:2": (2496, 1664),
        "2:3": (1664, 2496),
        "21:9": (3136, 1344),
    },
    "3K": {
        "1:1": (3072, 3072),
        "4:3": (3456, 2592),
        "3:4": (2592, 3456),
        "16:9": (4096, 2304),
        "9:16": (2304, 4096),
        "3:2": (3744, 2496),
        "2:3": (2496, 3744),
        "21:9": (4704, 2016),
    },
    "4K": {
        "1:1": (4096, 4096),
        "4:3": (4704, 3520),
        "3:4": (3520, 4704),
        "16:9": (5504, 3040),
        "9:16": (3040, 5504),
        "3:2": (4992, 3328),
        "2:3": (3328, 4992),
        "21:9": (6240, 2656),
    },
}
_ASPECT_IN_PROMPT = re.compile(r"(?<!\d)(1:1|4:3|3:4|16:9|9:16|3:2|2:3|21:9)(?!\d)")


@dataclass(frozen=True)
class ModelFamily:
    """The rules of one model family. ``None`` for a bound means "not checked"."""

    name: str
    size_keywords: tuple[str, ...]
    min_pixels: int | None
    max_pixels: int | None
    max_aspect_ratio: float | None
    sequential: bool
    stream: bool
    reference_images: bool
    max_reference_images: int
    optimize_prompt_modes: tuple[str, ...]
    guidance_scale: bool
    #: The ``size`` the service uses when the body has none.
    default_size: tuple[int, int] = (2048, 2048)
    #: Values of ``output_format``; every family produces JPEG, only 5.0 can be asked for PNG.
    output_formats: tuple[str, ...] = ("jpeg",)
    #: Whether ``tools: [{"type": "web_search"}]`` is accepted.
    web_search: bool = False
    #: Whether ``seed`` is documented: for 3.0 text-to-image and SeedEdit 3.0 only.
    seed: bool = False

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
        if self.max_aspect_ratio is not None:
            rules.append(f"W/H in [1/{self.max_aspect_ratio:g}, {self.max_aspect_ratio:g}]")
        parts.append("'WxH'" + (f" with {', '.join(rules)}" if rules else ""))
        return " or ".join(parts)


SEEDREAM_5_0 = ModelFamily(
    name="Seedream 5.0 lite",
    size_keywords=("2K", "3K"),
    min_pixels=3_686_400,  # 2560x1440
    max_pixels=10_404_496,  # 3072x3072x1.1025
    max_aspect_ratio=16,
    sequential=True,
    stream=True,
    reference_images=True,
    max_reference_images=14,
    optimize_prompt_modes=("standard",),
    guidance_scale=False,
    output_formats=("jpeg", "png"),
    web_search=True,
)
SEEDREAM_4_5 = ModelFamily(
    name="Seedream 4.5",
    size_keywords=("2K", "4K"),
    min_pixels=3_686_400,
    max_pixels=16_777_216,
    max_aspect_ratio=16,
    sequential=True,
    stream=True,
    reference_images=True,
    max_reference_images=14,
    optimize_prompt_modes=("standard",),
    guidance_scale=False,
)
SEEDREAM_4_0 = ModelFamily(
    name="Seedream 4.0",
    size_keywords=("1K", "2K", "4K"),
    min_pixels=921_600,
    max_pixels=16_777_216,
    max_aspect_ratio=16,
    sequential=True,
    stream=True,
    reference_images=True,
    max_reference_images=14,
    optimize_prompt_modes=("standard", "fast"),
    guidance_scale=False,
)
SEEDREAM_3_0 = ModelFamily(
    name="Seedream 3.0 (text-to-image)",
    size_keywords=(),
    # The total pixel count, not each side: 2560x1440 (3,686,400) is allowed.
    min_pixels=512 * 512,
    max_pixels=2048 * 2048,
    max_aspect_ratio=None,
    sequential=False,
    stream=False,
    reference_images=False,
    max_reference_images=0,
    optimize_prompt_modes=(),
    guidance_scale=True,
    default_size=(1024, 1024),
    seed=True,
)
#: Endpoint ids (``ep-...``) and ids this provider does not know (Seedream 5.0 pro among them): only
#: the shape of values is checked, the service has the last word.
PERMISSIVE = ModelFamily(
    name="unrecognised model or endpoint id",
    size_keywords=("1K", "2K", "3K", "4K"),
    min_pixels=None,
    max_pixels=None,
    max_aspect_ratio=None,
    sequential=True,
    stream=True,
    reference_images=True,
    max_reference_images=14,
    optimize_prompt_modes=("standard", "fast"),
    guidance_scale=True,
    output_formats=OUTPUT_FORMATS,
    web_search=True,
    seed=True,
)

_FAMILY_PATTERNS: tuple[tuple[re.Pattern[str], ModelFamily], ...] = (
    # doubao-seedream-5-0-260128, its alias doubao-seedream-5-0-lite-260128 (BytePlus: no "doubao-"),
    # and gateways' "doubao-seedream-5.0-lite"; not 5.0 pro, whose rules differ.
    (re.compile(r"seedream-5[-.]0(?:-lite)?(?:-\d|$)", re.IGNORECASE), SEEDREAM_5_0),
    (re.compile(r"seedream-4[-.]5", re.IGNORECASE), SEEDREAM_4_5),
    (re.compile(r"seedream-4[-.]0", re.IGNORECASE), SEEDREAM_4_0),
    (re.compile(r"seedream-3[-.]0", re.IGNORECASE), SEEDREAM_3_0),
)

_SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[x×X*]\s*(\d+)\s*$")
_KEYWORD_PATTERN = re.compile(r"^\s*([1-4])[kK]\s*$")


def family_for_model(model: str) -> ModelFamily:
    """Find the rules for a model id; unknown ids and endpoint ids get the permissive family."""
    for pattern, family in _FAMILY_PATTERNS:
        if pattern.search(model):
            return family
    return PERMISSIVE


def parse_dimensions(size: str) -> tuple[int, int] | None:
    """Read ``WxH`` (also written with ``×`` or ``*``) into integers; ``None`` when it is not of that form."""
    match = _SIZE_PATTERN.match(size)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2))


def normalize_size(size: str) -> str:
    """Write a size the way the documentation does: ``WxH`` (not ``W×H``/``W*H``), keywords upper case."""
    if dims := parse_dimensions(size):
        return f"{dims[0]}x{dims[1]}"
    if keyword := _KEYWORD_PATTERN.match(size):
        return f"{keyword.group(1)}K"
    return size


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
        ratio = family.max_aspect_ratio
        if ratio is not None and not (1 / ratio <= width / height <= ratio):
            problems.append(f"aspect ratio {width}/{height} is outside [1/{ratio:g}, {ratio:g}]")
    if not problems:
        return None
    return f"{size!r} is not allowed for {family.name} ({'; '.join(problems)}); allowed: {family.describe_sizes()}"


def rendered_dimensions(size: str | None, family: ModelFamily, prompt: str = "") -> tuple[int, int]:
    """Pixel dimensions of the image a valid ``size`` produces for ``family``.

    Keywords follow the documentation's table (the aspect ratio the prompt names, else 1:1); no size
    is the family's default.
    """
    if not size:
        return family.default_size
    if size in _KEYWORD_TABLES:
        table = _KEYWORD_TABLES[size]
        match = _ASPECT_IN_PROMPT.search(prompt)
        return table[match.group(1)] if match else table["1:1"]
    dims = parse_dimensions(size)
    if dims is None:
        raise ValueError(f"not a size: {size!r}")
    return dims
