"""Where a generation request is built and checked, before anything is sent or paid for.

:func:`build_request_body` turns Python arguments into the JSON body; :func:`validate_body` checks a
body against the rules of its model family. The emulator runs the same :func:`validate_body` on what
it receives, so client and emulator agree on every rule.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from airflow_provider_jimeng.api.capabilities import (
    MAX_IMAGES_PER_REQUEST,
    MAX_SEED,
    OUTPUT_FORMATS,
    RESPONSE_FORMATS,
    SEQUENTIAL_MODES,
    SOFT_PROMPT_MAX_CJK_CHARS,
    SOFT_PROMPT_MAX_WORDS,
    TOOL_TYPES,
    WEB_SEARCH_TOOL,
    ModelFamily,
    family_for_model,
    normalize_size,
    size_error,
)
from airflow_provider_jimeng.api.reference_images import (
    CheckedDataUri,
    ImageInput,
    normalize_reference_images,
    validate_data_uri,
)
from airflow_provider_jimeng.exceptions import JiMengConfigurationError

log = logging.getLogger(__name__)

#: Body fields this provider sets from named parameters; ``extra_body`` may not override them.
KNOWN_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "image",
        "size",
        "seed",
        "sequential_image_generation",
        "sequential_image_generation_options",
        "stream",
        "response_format",
        "watermark",
        "optimize_prompt_options",
        "guidance_scale",
        "output_format",
        "tools",
    }
)

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


class MissingParameterError(JiMengConfigurationError):
    """A required body field is absent: the service answers ``MissingParameter`` (not ``InvalidParameter``)."""


def _fail(parameter: str, message: str) -> JiMengConfigurationError:
    return JiMengConfigurationError(parameter, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_prompt(prompt: Any, parameter: str = "prompt") -> str:
    """Refuse a prompt the API would refuse; warn about one longer than recommended."""
    if prompt is None:
        raise MissingParameterError(parameter, "is required: a non-empty string, got NoneType")
    if not isinstance(prompt, str):
        raise _fail(parameter, f"must be a non-empty string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise _fail(parameter, "must be a non-empty string, got an empty or whitespace-only prompt")
    if not any(unicodedata.category(char)[0] in "LNPS" for char in prompt):
        # A BOM, NULs, zero-width or control characters, combining marks alone: nothing to draw, still paid for.
        raise _fail(
            parameter,
            "must be a non-empty string with a visible character, got only control characters, format "
            "characters (a BOM, zero-width spaces) or combining marks",
        )
    cjk_chars = len(_CJK.findall(prompt))
    words = len(prompt.split())
    if cjk_chars > SOFT_PROMPT_MAX_CJK_CHARS or words > SOFT_PROMPT_MAX_WORDS:
        log.warning(
            "%s is longer than recommended (%d Chinese characters, %d words; recommended at most %d or %d): "
            "the model may ignore part of it",
            parameter,
            cjk_chars,
            words,
            SOFT_PROMPT_MAX_CJK_CHARS,
            SOFT_PROMPT_MAX_WORDS,
        )
    return prompt


def reference_image_count(body: Mapping[str, Any]) -> int:
    image = body.get("image")
    if image is None:
        return 0
    return 1 if isinstance(image, str) else len(image)


def max_images_billed(body: Mapping[str, Any]) -> int:
    """The most images one request with this body can generate (and bill).

    The service caps a set at 15 images minus the reference images, whatever ``max_images`` says
    ("输入的参考图数量+最终生成的图片数量≤15张": a cap on what is generated, not a refusal).
    """
    per_set = 1
    if body.get("sequential_image_generation") == "auto":
        room = max(1, MAX_IMAGES_PER_REQUEST - reference_image_count(body))
        options = body.get("sequential_image_generation_options") or {}
        per_set = min(int(options.get("max_images", room)), room)
    # Gateways read ``n`` (not an official field) as images per request: each one is billed.
    count = body.get("n")
    return per_set * (count if isinstance(count, int) and not isinstance(count, bool) and count > 1 else 1)


def validate_body(body: Mapping[str, Any]) -> ModelFamily:
    """Check a request body against its model family's rules; raise naming the first bad field."""
    model = body.get("model")
    if model is None:
        raise MissingParameterError(
            "model", "is required: a model id such as 'doubao-seedream-4-0-250828' or an endpoint id 'ep-...'"
        )
    if not isinstance(model, str) or not model.strip():
        raise _fail("model", "is required: a model id such as 'doubao-seedream-4-0-250828' or an endpoint id 'ep-...'")
    family = family_for_model(model)
    check_prompt(body.get("prompt"))

    size = body.get("size")
    if size is not None:
        if not isinstance(size, str):
            raise _fail("size", f"must be a string, got {type(size).__name__}; allowed: {family.describe_sizes()}")
        if problem := size_error(family, size):
            raise _fail("size", problem)

    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -1 <= seed <= MAX_SEED):
        raise _fail("seed", f"{seed!r} is not allowed; allowed: an integer in [-1, {MAX_SEED}]")

    response_format = body.get("response_format")
    if response_format is not None and response_format not in RESPONSE_FORMATS:
        raise _fail("response_format", f"{response_format!r} is not allowed; allowed: 'url' or 'b64_json'")

    _validate_output(body, family)

    for flag in ("watermark", "stream"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise _fail(flag, f"must be true or false, got {body[flag]!r}")
    if body.get("stream") and not family.stream:
        raise _fail("stream", f"streaming is not supported by {family.name}")

    _validate_images(body, family)
    _validate_sequential(body, family)

    options = body.get("optimize_prompt_options")
    if options is not None:
        mode = options.get("mode") if isinstance(options, Mapping) else None
        thinking = options.get("thinking") if isinstance(options, Mapping) else None
        if not family.optimize_prompt_modes:
            name = "optimize_prompt_mode" if mode is not None or thinking is None else "optimize_prompt_thinking"
            raise _fail(name, f"is not supported by {family.name}")
        if thinking is not None and (not isinstance(thinking, str) or not thinking.strip()):
            raise _fail("optimize_prompt_thinking", f"{thinking!r} is not allowed; allowed: a non-empty string")
        if (mode is not None or thinking is None) and mode not in family.optimize_prompt_modes:
            raise _fail(
                "optimize_prompt_mode",
                f"{mode!r} is not allowed for {family.name}; allowed: "
                + " or ".join(repr(m) for m in family.optimize_prompt_modes),
            )

    guidance = body.get("guidance_scale")
    if guidance is not None:
        if not family.guidance_scale:
            raise _fail("guidance_scale", f"is not supported by {family.name} (Seedream 3.0 only)")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 1 <= guidance <= 10:
            raise _fail("guidance_scale", f"{guidance!r} is not allowed; allowed: a number in [1, 10]")
    return family


def _validate_output(body: Mapping[str, Any], family: ModelFamily) -> None:
    """``output_format`` and the web-search tool: both exist on Seedream 5.0 only."""
    output_format = body.get("output_format")
    if output_format is not None:
        if output_format not in OUTPUT_FORMATS:
            raise _fail("output_format", f"{output_format!r} is not allowed; allowed: 'jpeg' or 'png'")
        if output_format not in family.output_formats:
            raise _fail(
                "output_format",
                f"{output_format!r} is not supported by {family.name}, which produces jpeg only (Seedream 5.0 only)",
            )
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list) or not all(
        isinstance(tool, Mapping) and tool.get("type") in TOOL_TYPES for tool in tools
    ):
        raise _fail("tools", f"must be a list like [{{'type': '{WEB_SEARCH_TOOL}'}}]; allowed types: {TOOL_TYPES}")
    if tools and not family.web_search:
        raise _fail("web_search", f"is not supported by {family.name} (Seedream 5.0 only)")


def _validate_images(body: Mapping[str, Any], family: ModelFamily) -> None:
    image = body.get("image")
    if image is None:
        return
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise _fail("image", "must be a URL or data URI string, or a list of them")
    if not family.reference_images and images:
        raise _fail("image", f"reference images are not supported by {family.name}")
    if len(images) > family.max_reference_images:
        raise _fail(
            "image",
            f"{len(images)} reference images given; {family.name} allows at most {family.max_reference_images}",
        )
    for position, item in enumerate(images):
        parameter = f"image[{position}]"
        lowered = item[:8].lower()
        if isinstance(item, CheckedDataUri):
            continue  # checked when it was made, once for every prompt of the run
        if lowered.startswith("data:"):
            validate_data_uri(parameter, item)
        elif not lowered.startswith(("http://", "https://")):
            raise _fail(parameter, "must be an http(s) URL or a 'data:image/<format>;base64,...' URI")


def _validate_sequential(body: Mapping[str, Any], family: ModelFamily) -> None:
    mode = body.get("sequential_image_generation")
    options = body.get("sequential_image_generation_options")
    if mode is not None:
        if mode not in SEQUENTIAL_MODES:
            raise _fail("sequential_image_generation", f"{mode!r} is not allowed; allowed: 'auto' or 'disabled'")
        if mode == "auto" and not family.sequential:
            raise _fail("sequential_image_generation", f"'auto' is not supported by {family.name}")
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise _fail("sequential_image_generation_options", "must be an object like {'max_images': 4}")
    max_images = options.get("max_images")
    if max_images is None:
        return
    # [1, 15] whatever the reference images: they cap what is generated, the value is not refused.
    if not _is_int(max_images) or not 1 <= max_images <= MAX_IMAGES_PER_REQUEST:
        raise _fail(
            "max_images", f"{max_images!r} is not allowed; allowed: an integer in [1, {MAX_IMAGES_PER_REQUEST}]"
        )


def build_request_body(
    prompt: str,
    *,
    model: str,
    size: str | None = None,
    response_format: str = "url",
    watermark: bool = True,
    image: ImageInput | Sequence[ImageInput] | None = None,
    seed: int | None = None,
    sequential_image_generation: str | None = None,
    max_images: int | None = None,
    optimize_prompt_mode: str | None = None,
    optimize_prompt_thinking: str | None = None,
    guidance_scale: float | None = None,
    stream: bool = False,
    output_format: str | None = None,
    web_search: bool = False,
    extra_body: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and validate the JSON body of ``POST /images/generations``.

    ``output_format`` (``"jpeg"``/``"png"``) and ``web_search`` (``tools: [{"type": "web_search"}]``)
    are Seedream 5.0 fields; other families refuse them.
    """
    body: dict[str, Any] = {"model": model, "prompt": prompt}
    images = normalize_reference_images(image)
    if images:
        body["image"] = images
    if size is not None:
        body["size"] = normalize_size(size) if isinstance(size, str) else size
    if seed is not None:
        family = family_for_model(model)
        if not family.seed:
            # Not sent where the API does not document it: a fixed seed the service ignores would
            # promise reproducible images that are not (and gateways may refuse the field).
            raise _fail(
                "seed",
                f"is not a parameter of {family.name}; allowed: a seed with Seedream 3.0 text-to-image or "
                "SeedEdit 3.0 (the families the API documents it for), or an endpoint id; else leave it unset",
            )
        body["seed"] = seed
    if max_images is not None and sequential_image_generation != "auto":
        raise _fail(
            "max_images",
            "only applies to sets of images: set sequential_image_generation='auto' to use it",
        )
    if sequential_image_generation is not None:
        body["sequential_image_generation"] = sequential_image_generation
        if sequential_image_generation == "auto":
            # Always explicit: the upstream default would be up to 15 billed images.
            if max_images is None:
                max_images = MAX_IMAGES_PER_REQUEST - reference_image_count(body)
            body["sequential_image_generation_options"] = {"max_images": max_images}
    body["response_format"] = response_format
    body["watermark"] = watermark
    if stream:
        body["stream"] = True
    if optimize_prompt_mode is not None or optimize_prompt_thinking is not None:
        options = {"mode": optimize_prompt_mode, "thinking": optimize_prompt_thinking}
        body["optimize_prompt_options"] = {key: value for key, value in options.items() if value is not None}
    if guidance_scale is not None:
        body["guidance_scale"] = guidance_scale
    if output_format is not None:
        body["output_format"] = output_format
    if web_search:
        body["tools"] = [{"type": WEB_SEARCH_TOOL}]
    if extra_body:
        clashes = sorted(KNOWN_FIELDS.intersection(extra_body))
        if clashes:
            raise _fail("extra_body", f"sets {', '.join(clashes)}: pass them as named parameters instead")
        body.update(extra_body)
    validate_body(body)
    return body
