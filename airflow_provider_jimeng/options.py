"""Where parameters are checked: one model of what a generation run was asked to do.

Every value a DAG author can pass reaches the provider through templating, XCom, ``expand()`` or a
``@task.jimeng`` dict, so it may arrive as the wrong type: ``"False"`` (truthy), ``"None"``, ``""``,
``"nan"``, ``"3.7"``, a list rendered to text. :class:`GenerationOptions` (the request fields) and
:class:`RunOptions` (how the run spends, stores and fails) are built once, after rendering, from a
single table of fields (:data:`FIELDS`): each value is coerced to its type or refused with an error
naming the parameter and what is allowed, before any request is sent. The operator, ``@task.jimeng``,
the hook's ``generate_images`` and the budget guard all read these models; adding an API field is
one row of the table and one attribute.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from airflow_provider_jimeng.api.capabilities import OUTPUT_FORMATS, RESPONSE_FORMATS, SEQUENTIAL_MODES
from airflow_provider_jimeng.api.request import KNOWN_FIELDS, build_request_body, check_prompt, max_images_billed
from airflow_provider_jimeng.exceptions import JiMengConfigurationError

ON_PARTIAL_FAILURE = ("fail", "continue")
OPTIMIZE_PROMPT_MODES = ("standard", "fast")
MAX_CONCURRENCY = 64
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
#: What a template renders for a missing value: never a value the author meant.
_RENDERED_NOTHING = frozenset({"none", "null", "nan", "undefined"})
#: Decimal text of an integer, as templates render one (``"7"``, ``"4.0"``): ASCII digits, no exponent.
_INTEGER = re.compile(r"^[+-]?([0-9]+)(\.0*)?$", re.ASCII)
NATIVE_HINT = (
    "a template rendered a Python value as text: pass the value itself (an XComArg, a param), "
    "or set render_template_as_native_obj=True on the DAG"
)


def _fail(parameter: str, message: str) -> JiMengConfigurationError:
    return JiMengConfigurationError(parameter, message)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _refuse_rendered_nothing(parameter: str, value: str, allowed: str) -> None:
    if value.strip().lower() in _RENDERED_NOTHING:
        raise _fail(parameter, f"{_show(value)} is not allowed ({NATIVE_HINT}); allowed: {allowed}")


# ------------------------------------------------------------------------------------- coercers
def as_bool(parameter: str, value: Any, *, optional: bool = False) -> bool | None:
    """A real boolean, or the text a template renders for one (``"False"`` is false)."""
    allowed = "true or false" + (" (or leave it unset)" if optional else "")
    if optional and _unset(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        _refuse_rendered_nothing(parameter, value, allowed)
    raise _fail(parameter, f"{_show(value)} is not a boolean; allowed: {allowed}")


def as_int(
    parameter: str, value: Any, *, minimum: int, maximum: int | None = None, optional: bool = False
) -> int | None:
    """An integer in range; integral floats and decimal text are accepted, ``3.7``/NaN/inf/bools are not."""
    bounds = f"[{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
    allowed = f"an integer {'in ' if maximum is not None else ''}{bounds}" + (
        " (or leave it unset)" if optional else ""
    )
    if optional and _unset(value):
        return None
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if match := _INTEGER.match(text):
            number = int(text[: match.end(1)])
        else:
            _refuse_rendered_nothing(parameter, value, allowed)
    if number is None:
        raise _fail(parameter, f"{_show(value)} is not an integer; allowed: {allowed}")
    if number < minimum or (maximum is not None and number > maximum):
        raise _fail(parameter, f"{number} is not allowed; allowed: {allowed}")
    return number


def as_number(
    parameter: str, value: Any, *, minimum: float, maximum: float | None = None, optional: bool = False
) -> float | None:
    """A finite number in range (text accepted); NaN, infinities and bools are refused."""
    bounds = f"[{minimum:g}, {maximum:g}]" if maximum is not None else "> 0" if minimum == 0 else f">= {minimum:g}"
    allowed = f"a finite number {bounds}" + (" (or leave it unset)" if optional else "")
    if optional and _unset(value):
        return None
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        _refuse_rendered_nothing(parameter, value, allowed)
        with contextlib.suppress(ValueError):
            number = float(value.strip())
    if not math.isfinite(number):
        raise _fail(parameter, f"{_show(value)} is not a finite number; allowed: {allowed}")
    if number < minimum or (minimum == 0 and number == 0) or (maximum is not None and number > maximum):
        raise _fail(parameter, f"{number:g} is not allowed; allowed: {allowed}")
    return number


def as_choice(parameter: str, value: Any, choices: Sequence[str], *, optional: bool = False) -> str | None:
    allowed = " or ".join(repr(choice) for choice in choices) + (" (or leave it unset)" if optional else "")
    if optional and _unset(value):
        return None
    if isinstance(value, str) and value.strip() in choices:
        return value.strip()
    raise _fail(parameter, f"{_show(value)} is not allowed; allowed: {allowed}")


def as_text(parameter: str, value: Any, *, allowed: str, optional: bool = True) -> str | None:
    """A non-empty string (stripped); empty means unset where the parameter is optional."""
    if optional and _unset(value):
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(parameter, f"{_show(value)} is not allowed; allowed: {allowed}")
    _refuse_rendered_nothing(parameter, value, allowed)
    if _looks_like_rendered_python(value):
        # "['doubao-seedream-4-0-250828']": a list rendered to text would be sent as the model id.
        raise _fail(parameter, f"{_show(value)} is not allowed ({NATIVE_HINT}); allowed: {allowed}")
    _check_encodable(parameter, value)
    return value.strip()


def _check_encodable(parameter: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _fail(
            parameter,
            f"contains a character UTF-8 cannot encode (a lone surrogate at position {error.start}); "
            "allowed: text that encodes as UTF-8 (check how the upstream data was decoded)",
        ) from None


def _looks_like_rendered_python(text: str) -> bool:
    """``"None"``, ``"[]"``, ``"['a', 'b']"``, ``"{'k': 1}"``: a Python value a template turned into text."""
    stripped = text.strip()
    if stripped.lower() in _RENDERED_NOTHING:
        return True
    if not stripped or stripped[0] not in "[({":
        return False
    try:
        parsed = ast.literal_eval(stripped)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return False
    return isinstance(parsed, (list, tuple, dict, set))


def as_prompts(value: Any) -> list[str]:
    """The rendered prompt(s) as a list of strings, refusing what upstream data can get wrong."""
    allowed = "a non-empty string or a list of non-empty strings"
    if value is None:
        raise _fail(
            "prompt",
            "rendered to None (did the upstream task push a value? check the XCom key and task id); "
            f"allowed: {allowed}",
        )
    if isinstance(value, Mapping):
        raise _fail("prompt", f"got a dict; allowed: {allowed} (@task.jimeng may return a dict of parameters)")
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _fail("prompt", f"got {type(value).__name__} {_show(value)}; allowed: {allowed}")
    if not items:
        raise _fail("prompt", f"is an empty list; allowed: {allowed}")
    prompts = []
    for position, item in enumerate(items):
        parameter = f"prompt[{position}]" if len(items) > 1 or not isinstance(value, str) else "prompt"
        prompts.append(as_prompt(item, parameter, allowed=allowed))
    return prompts


def as_prompt(value: Any, parameter: str = "prompt", *, allowed: str = "a non-empty string") -> str:
    """One prompt: a string that is not a rendered Python value, encodes as UTF-8 and is not blank."""
    if not isinstance(value, str):
        raise _fail(parameter, f"must be a string, got {type(value).__name__} {_show(value)}; allowed: {allowed}")
    if _looks_like_rendered_python(value):
        raise _fail(parameter, f"{_show(value)} is not a prompt ({NATIVE_HINT}); allowed: {allowed}")
    _check_encodable(parameter, value)
    return check_prompt(value, parameter)


def as_reference_images(value: Any) -> Any:
    """Reference image(s) as given (URL, data URI, file path, bytes, or a list); text renderings refused."""
    allowed = "a URL, data URI, file path or bytes, or a list of them"
    if _unset(value) or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, str):
        if _looks_like_rendered_python(value):
            raise _fail("image", f"{_show(value)} is not an image ({NATIVE_HINT}); allowed: {allowed}")
        _check_encodable("image", value)
        return value.strip()
    if isinstance(value, (bytes, bytearray, os.PathLike)):
        return value
    if isinstance(value, (list, tuple)):
        for position, item in enumerate(value):
            if not isinstance(item, (str, bytes, bytearray, os.PathLike)):
                raise _fail(f"image[{position}]", f"got {type(item).__name__}; allowed: {allowed}")
            if isinstance(item, str):
                if _unset(item) or _looks_like_rendered_python(item):
                    raise _fail(f"image[{position}]", f"{_show(item)} is not an image; allowed: {allowed}")
                _check_encodable(f"image[{position}]", item)
        return [item.strip() if isinstance(item, str) else item for item in value]
    raise _fail("image", f"got {type(value).__name__}; allowed: {allowed}")


def as_extra_body(value: Any) -> dict[str, Any] | None:
    """Extra JSON fields for gateways: an object of JSON values that sets none of the named fields."""
    allowed = 'a JSON object (a dict, or its JSON text) such as {"n": 2}, setting no named parameter'
    if _unset(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _fail("extra_body", f"{_show(value)} is not a JSON object; allowed: {allowed}") from None
    if not isinstance(value, Mapping):
        raise _fail("extra_body", f"got {type(value).__name__} {_show(value)}; allowed: {allowed}")
    if not all(isinstance(key, str) and key for key in value):
        raise _fail("extra_body", f"has a key that is not a non-empty string; allowed: {allowed}")
    clashes = sorted(KNOWN_FIELDS.intersection(value))
    if clashes:
        raise _fail("extra_body", f"sets {', '.join(clashes)}: pass them as named parameters instead")
    if nested_deeper_than(value, MAX_EXTRA_BODY_DEPTH):
        raise _fail(
            "extra_body",
            f"is nested deeper than {MAX_EXTRA_BODY_DEPTH} levels; allowed: {allowed}, at most "
            f"{MAX_EXTRA_BODY_DEPTH} levels of objects and lists",
        )
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as error:
        raise _fail(
            "extra_body", f"is not JSON ({type(error).__name__}: {str(error)[:80]}); allowed: {allowed}"
        ) from None
    body = dict(value)
    if "n" in body:
        # Gateways read ``n`` as images per request: it must be countable for the budget guard.
        body["n"] = as_int("extra_body.n", body["n"], minimum=1, maximum=15)
    return body


#: How deep ``extra_body`` (or any parameter) may nest: gateways' fields are flat; thousands of levels
#: crash encoders and Airflow's own walks over a task's attributes.
MAX_EXTRA_BODY_DEPTH = 32


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether objects and lists in ``value`` nest deeper than ``limit``; iterative, so any depth is safe."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, (list, tuple)) else ()
        if children and depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


# ------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Field:
    """How one parameter is checked: its coercer, given the raw value."""

    coerce: Callable[[Any], Any]
    templated: bool = True


def _optional_text(name: str, allowed: str) -> Field:
    return Field(lambda value: as_text(name, value, allowed=allowed))


FIELDS: dict[str, Field] = {
    # ---- the request (GenerationOptions)
    "model": _optional_text("model", "a model id such as 'doubao-seedream-4-0-250828' or an endpoint id 'ep-...'"),
    "size": _optional_text("size", "'1K', '2K', '4K' or 'WxH' as the model allows"),
    "response_format": Field(lambda value: as_choice("response_format", value, RESPONSE_FORMATS)),
    "watermark": Field(lambda value: as_bool("watermark", value, optional=True)),
    "image": Field(as_reference_images),
    "seed": Field(lambda value: as_int("seed", value, minimum=-1, maximum=2_147_483_647, optional=True)),
    "sequential_image_generation": Field(
        lambda value: as_choice("sequential_image_generation", value, SEQUENTIAL_MODES, optional=True)
    ),
    "max_images": Field(lambda value: as_int("max_images", value, minimum=1, maximum=15, optional=True)),
    "optimize_prompt_mode": Field(
        lambda value: as_choice("optimize_prompt_mode", value, OPTIMIZE_PROMPT_MODES, optional=True)
    ),
    "optimize_prompt_thinking": _optional_text(
        "optimize_prompt_thinking", "the official SDK's optimize_prompt_options.thinking value, as text"
    ),
    "guidance_scale": Field(lambda value: as_number("guidance_scale", value, minimum=1, maximum=10, optional=True)),
    "stream": Field(lambda value: bool(as_bool("stream", value, optional=True))),
    "output_format": Field(lambda value: as_choice("output_format", value, OUTPUT_FORMATS, optional=True)),
    "web_search": Field(lambda value: bool(as_bool("web_search", value, optional=True))),
    "extra_body": Field(as_extra_body),
    # ---- the run (RunOptions)
    "max_concurrency": Field(lambda value: as_int("max_concurrency", value, minimum=1, maximum=MAX_CONCURRENCY)),
    "max_images_per_minute": Field(lambda value: as_number("max_images_per_minute", value, minimum=1, optional=True)),
    "s3_key_prefix": Field(lambda value: _key_prefix(value)),
    "s3_key": _optional_text("s3_key", "a key template such as 'images/{run_id}/{prompt_index}-{image_index}.{ext}'"),
    "output_path": _optional_text("output_path", "an object-storage URL such as 'gs://bucket/prefix'"),
    "output_conn_id": _optional_text("output_conn_id", "a connection id"),
    "replace": Field(lambda value: as_bool("replace", value)),
    "on_partial_failure": Field(lambda value: as_choice("on_partial_failure", value, ON_PARTIAL_FAILURE)),
    "dry_run": Field(lambda value: as_bool("dry_run", value)),
    "max_images_per_task": Field(lambda value: as_int("max_images_per_task", value, minimum=1, optional=True)),
}


def _key_prefix(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail("s3_key_prefix", f"got {type(value).__name__} {_show(value)}; allowed: a string (may be empty)")
    if value.strip():
        _refuse_rendered_nothing("s3_key_prefix", value, "a string (may be empty)")
    _check_encodable("s3_key_prefix", value)
    return value.strip()


#: A URL scheme as RFC 3986 spells it.
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
OUTPUT_PATH_ALLOWED = (
    "an object-storage URL with a scheme, such as 'gs://bucket/prefix', 'abfs://container/prefix' or "
    "'file:///data/images' (an absolute path), without a query, a fragment, '.' or '..' segments or a "
    "user in it (the connection is output_conn_id)"
)


def parse_output_path(value: str) -> tuple[str, str, str]:
    """``(scheme, bucket, path)`` of a checked ``output_path`` (``bucket`` is empty for ``file://``)."""
    from urllib.parse import urlsplit

    def refuse(why: str) -> JiMengConfigurationError:
        return _fail("output_path", f"{_show(value)} {why}; allowed: {OUTPUT_PATH_ALLOWED}")

    try:
        parts = urlsplit(value)
    except ValueError:
        raise refuse("is not a URL") from None
    scheme = parts.scheme.lower()
    if not scheme or not _SCHEME.match(scheme) or "://" not in value:
        raise refuse("has no scheme")
    if parts.query or parts.fragment or value.rstrip().endswith(("?", "#")):
        raise refuse("has a query or a fragment")
    if "@" in parts.netloc:
        raise refuse("names a user or connection in the URL")
    path = parts.path
    segments = [segment for segment in path.strip("/").split("/") if segment]
    if any(segment in (".", "..") for segment in segments) or "//" in path.strip("/"):
        raise refuse("has '.', '..' or empty path segments")
    if scheme in ("file", "local"):
        if parts.netloc:
            raise refuse("names a host: a local path is file:///absolute/path")
        if not segments:
            raise refuse("is the filesystem's root")
    elif not parts.netloc:
        raise refuse("names no bucket or container")
    return scheme, parts.netloc, "/".join(segments)


def _coerce_all(names: Sequence[str], values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: FIELDS[name].coerce(values[name]) for name in names if name in values}


@dataclass(frozen=True)
class GenerationOptions:
    """The request fields of every prompt of a run, checked: one source for body, guard and records."""

    model: str | None = None
    size: str | None = None
    response_format: str = "url"
    watermark: bool | None = None
    image: Any = None
    seed: int | None = None
    sequential_image_generation: str | None = None
    max_images: int | None = None
    optimize_prompt_mode: str | None = None
    #: ``optimize_prompt_options.thinking``, known to the official SDK; sent as given.
    optimize_prompt_thinking: str | None = None
    guidance_scale: float | None = None
    stream: bool = False
    output_format: str | None = None
    web_search: bool = False
    extra_body: dict[str, Any] | None = None

    @classmethod
    def parse(cls, **values: Any) -> GenerationOptions:
        """Coerce and check rendered values; an unknown name (a typo in a keyword) is refused by name."""
        names = [item.name for item in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise _fail(
                unknown[0],
                f"is not a generation parameter{f' (nor {unknown[1:]})' if unknown[1:] else ''}; "
                f"allowed: {', '.join(names)}",
            )
        options = cls(**_coerce_all(names, values))
        if options.max_images is not None and options.sequential_image_generation != "auto":
            raise _fail(
                "max_images", "only applies to sets of images: set sequential_image_generation='auto' to use it"
            )
        return options

    def body(self, prompt: str, *, default_model: str, default_watermark: bool) -> dict[str, Any]:
        """The validated JSON body for one prompt (reference files are read here)."""
        # The hook's prompt reaches here unchecked: the operator's rules apply to it too, so a lone
        # surrogate is refused instead of crashing the JSON encoder mid-request (None stays "missing").
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values.update(
            model=self.model or default_model,
            watermark=default_watermark if self.watermark is None else self.watermark,
        )
        return build_request_body(as_prompt(prompt) if prompt is not None else prompt, **values)


@dataclass(frozen=True)
class RunOptions:
    """How a run spends, stores and fails, checked once after rendering."""

    max_concurrency: int = 4
    max_images_per_minute: float | None = None
    #: ``None``: no storage (URLs go to XCom); otherwise a checked bucket name.
    s3_bucket: str | None = None
    s3_key_prefix: str = "jimeng"
    s3_key: str | None = None
    #: ``None``, or where images go as an object-storage URL (``gs://``, ``file://`` ...), in place of
    #: ``s3_bucket``. An ``s3://`` URL is parsed into ``s3_bucket`` and ``s3_key_prefix`` (the fast path).
    output_path: str | None = None
    #: The connection of ``output_path`` (for an ``s3://`` URL, in place of ``aws_conn_id``).
    output_conn_id: str | None = None
    replace: bool = False
    on_partial_failure: str = "fail"
    dry_run: bool = False
    max_images_per_task: int | None = None

    @classmethod
    def parse(cls, *, storage_requested: bool, s3_bucket: Any, **values: Any) -> RunOptions:
        """Coerce and check; ``storage_requested`` says the author named a bucket (even one that rendered empty).

        One destination at most: ``s3_bucket`` (with ``s3_key_prefix``) or ``output_path`` (with
        ``output_conn_id``); an ``s3://`` ``output_path`` becomes ``s3_bucket`` and ``s3_key_prefix``.
        """
        from airflow_provider_jimeng.storage.keys import check_bucket_name

        names = [item.name for item in fields(cls) if item.name != "s3_bucket"]
        unknown = set(values) - set(names)
        if unknown:
            raise TypeError(f"unknown run option(s): {sorted(unknown)}")
        coerced = _coerce_all(names, values)
        output_path = coerced.get("output_path")
        if "output_path" in values and values["output_path"] is not None and output_path is None:
            raise _fail("output_path", f"{_show(values['output_path'])} is empty; allowed: {OUTPUT_PATH_ALLOWED}")
        if output_path is not None and s3_bucket is not None:
            raise _fail(
                "output_path", "and s3_bucket were both given; allowed: one destination, s3_bucket or output_path"
            )
        bucket: str | None = None
        if output_path is not None:
            scheme, netloc, path = parse_output_path(output_path)
            if coerced.get("s3_key_prefix", "jimeng") != "jimeng":
                raise _fail(
                    "s3_key_prefix",
                    "applies to s3_bucket only; allowed with output_path: the prefix as the URL's path "
                    f"({scheme}://{netloc or ''}/<prefix>)",
                )
            if scheme in ("s3", "s3a"):
                # The fast path: the same store as s3_bucket, through output_conn_id's connection.
                try:
                    bucket = check_bucket_name(netloc)
                except JiMengConfigurationError as error:
                    raise _fail("output_path", error.detail) from None
                coerced.update(output_path=None, s3_key_prefix=path)
            else:
                coerced["output_path"] = f"{scheme}://{netloc}/{path}"
        elif storage_requested or s3_bucket is not None:
            # Storage asked for means storage or an error: a bucket that rendered empty must not
            # quietly turn into signed URLs in XCom.
            if isinstance(s3_bucket, str) and s3_bucket.strip():
                _refuse_rendered_nothing("s3_bucket", s3_bucket, "an S3 bucket name")
            bucket = check_bucket_name(s3_bucket.strip() if isinstance(s3_bucket, str) else s3_bucket)
        return cls(s3_bucket=bucket, **coerced)

    @property
    def stores(self) -> bool:
        """Whether images are stored (on S3 or through ``output_path``), rather than handed over as URLs."""
        return self.s3_bucket is not None or self.output_path is not None


#: The operator's parameters that are request fields (all of them), and those that shape the run.
GENERATION_PARAMETERS: tuple[str, ...] = tuple(item.name for item in fields(GenerationOptions))
RUN_PARAMETERS: tuple[str, ...] = tuple(item.name for item in fields(RunOptions) if item.name != "s3_bucket")


def billable_images(bodies: Sequence[Mapping[str, Any]]) -> int:
    """The most images a run of these bodies can bill with one attempt each."""
    return sum(max_images_billed(body) for body in bodies)
