"""Types after rendering: every parameter, rendered natively and as text, refused before any request.

A value reaches the operator through a template (``"{{ params.x }}"``, an XCom pull), ``expand()`` or
a ``@task.jimeng`` dict, so its type is whatever upstream produced. With native rendering on, the
template yields the Python value itself; with it off, Jinja renders it to text: ``None`` -> ``"None"``,
``[]`` -> ``"[]"``, ``3.7`` -> ``"3.7"``, ``True`` -> ``"True"``, ``float("nan")`` -> ``"nan"``.
:data:`REFUSED` is one table rendered both ways (``native`` and ``text``), plus ``direct`` rows for
the parameters that are not templated (they arrive typed, from ``expand()`` or a returned dict).

Every refused case asserts that the error is a ``JiMengConfigurationError``, that ``error.parameter``
names the parameter (``prompt[1]``, ``extra_body.n``, ``s3_key``), that the message starts with it
and says what is allowed, and that the emulator received zero requests.

Counts (``test_the_tables_are_as_large_as_documented`` keeps them honest):

* refused, operator in-process: 434 (native 201, text 211, direct 22)
* accepted coercions, operator in-process: 30 (native 14, text 14, direct 2)
* the other front ends and whole DAGs are in ``test_rendered_types_front_ends.py``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from tests.bad_input.conftest import TaskInstanceIdentity, assert_refused, resolve

NAN = float("nan")
INF = float("inf")
BOOL = "allowed: true or false"
PROMPT = "allowed: a non-empty string or a list of non-empty strings"
SEED = "allowed: an integer in [-1, 2147483647]"
MAX_IMAGES = "allowed: an integer in [1, 15]"
PER_TASK = "allowed: an integer >= 1"
CONCURRENCY = "allowed: an integer in [1, 64]"
PER_MINUTE = "allowed: a finite number >= 1"
N = "allowed: an integer in [1, 15]"
EXTRA = "allowed: a JSON object"
CLASH = "pass them as named parameters instead"
BUCKET = "allowed: 3-63 characters of lower-case"
KEY_FIELDS = "allowed fields: {dag_id}, {run_id}"
KEY_TEXT = "allowed: a key template such as"
IMAGE = "allowed: a URL, data URI, file path or bytes, or a list of them"
NO_FILE = "does not exist; expected a URL, a data URI"
UTF8 = "allowed: text that encodes as UTF-8"
NOT_BLANK = "must be a non-empty string"
AUTO = {"sequential_image_generation": "auto"}
STORE = {"s3_bucket": "good-bucket"}
MODEL_5_0 = "doubao-seedream-5-0-260128"
#: A family the API documents ``seed`` for (3.0 text-to-image; 4.x and 5.0 refuse it).
SEEDED = {"model": "doubao-seedream-3-0-t2i-250415", "size": None}
BOTH = ("native", "text")
NATIVE = ("native",)
TEXT = ("text",)
DIRECT = ("direct",)
#: A run id the default one is; the second is short, as a run triggered through the API may be.
SHORT_RUN_ID = "r1"


@dataclass(frozen=True)
class Case:
    """One refused input: ``values`` go through ``"{{ params.<name> }}"`` (or, ``direct``, as they are).

    ``parameter``/``allowed`` are what the error must say; ``text``/``native`` override them for one
    rendering where the rendered value differs in kind (``[""]`` natively is ``prompt[0]``; as the
    text ``"['']"`` it is the whole ``prompt``).
    """

    id: str
    values: dict[str, Any]
    parameter: str
    allowed: str
    modes: tuple[str, ...] = BOTH
    static: dict[str, Any] = field(default_factory=dict)
    text: tuple[str, str] | None = None
    native: tuple[str, str] | None = None
    map_index: int = -1
    run_id: str | None = None

    def expected(self, mode: str) -> tuple[str, str]:
        override = {"text": self.text, "native": self.native}.get(mode)
        return override or (self.parameter, self.allowed)


def bools(name: str, *, optional: bool) -> list[Case]:
    cases = [
        Case(f"{name}-maybe", {name: "maybe"}, name, BOOL),
        Case(f"{name}-2", {name: 2}, name, BOOL),
        Case(f"{name}-list", {name: []}, name, BOOL),
        Case(f"{name}-half", {name: 0.5}, name, BOOL),
        Case(f"{name}-dict", {name: {"on": True}}, name, BOOL),
    ]
    if optional:
        # Unset is allowed, so only the text rendering of None is wrong.
        cases.append(Case(f"{name}-None", {name: None}, name, BOOL, modes=TEXT))
    else:
        cases += [
            Case(f"{name}-None", {name: None}, name, BOOL),
            Case(f"{name}-None-text", {name: "None"}, name, BOOL),
            Case(f"{name}-nan", {name: "nan"}, name, BOOL),
            Case(f"{name}-empty", {name: ""}, name, BOOL),
        ]
    return cases


def ints(name: str, allowed: str, *, low: Any, high: Any, static: dict[str, Any] | None = None) -> list[Case]:
    """The integer rules; ``None`` rendered as text is wrong for every integer (they are optional)."""
    extra = static or {}
    return [
        Case(f"{name}-3.7", {name: 3.7}, name, allowed, static=extra),
        Case(f"{name}-3.7-text", {name: "3.7"}, name, allowed, static=extra),
        Case(f"{name}-nan", {name: NAN}, name, allowed, static=extra),
        Case(f"{name}-inf", {name: INF}, name, allowed, static=extra),
        Case(f"{name}-nan-text", {name: "nan"}, name, allowed, static=extra),
        Case(f"{name}-inf-text", {name: "inf"}, name, allowed, static=extra),
        Case(f"{name}-true", {name: True}, name, allowed, static=extra),
        Case(f"{name}-below", {name: low}, name, allowed, static=extra),
        Case(f"{name}-above", {name: high}, name, allowed, static=extra) if high is not None else None,
        Case(f"{name}-None", {name: None}, name, allowed, static=extra, modes=TEXT),
        Case(f"{name}-null", {name: "null"}, name, allowed, static=extra),
        Case(f"{name}-list", {name: [1]}, name, allowed, static=extra),
        Case(f"{name}-words", {name: "seven"}, name, allowed, static=extra),
    ]


def direct_ints(name: str, allowed: str, *, low: Any, high: Any) -> list[Case]:
    """A parameter that is not templated: the value arrives typed (``expand()``, a returned dict)."""
    values = [("3.7", 3.7), ("3.7-text", "3.7"), ("nan", NAN), ("inf", INF), ("nan-text", "nan")]
    values += [("inf-text", "inf"), ("true", True), ("below", low), ("None", None), ("None-text", "None")]
    values += [("list", [2]), ("words", "abc")] + ([("above", high)] if high is not None else [])
    return [Case(f"{name}-{label}", {}, name, allowed, modes=DIRECT, static={name: value}) for label, value in values]


def choices(name: str, allowed: str, bad: list[Any], *, optional: bool = False) -> list[Case]:
    cases = [Case(f"{name}-{value!r}", {name: value}, name, allowed) for value in bad]
    cases.append(Case(f"{name}-None", {name: None}, name, allowed, modes=TEXT if optional else BOTH))
    return cases


def key(case_id: str, template: str, allowed: str = KEY_FIELDS, **kwargs: Any) -> Case:
    """A key template refused as the author wrote it (passed as is, so Jinja in it renders too)."""
    static = {**STORE, "s3_key": template, **kwargs.pop("static", {})}
    return Case(case_id, kwargs.pop("values", {}), "s3_key", allowed, static=static, **kwargs)


_REFUSED: list[Case | None] = [
    # ---------------------------------------------------------------- booleans
    *bools("replace", optional=False),
    *bools("dry_run", optional=False),
    *bools("watermark", optional=True),
    *bools("web_search", optional=True),
    # ---------------------------------------------------------------- integers
    *ints("seed", SEED, low=-2, high=2**31),
    *ints("max_images", MAX_IMAGES, low=0, high=16, static=AUTO),
    Case("max-images-without-a-set", {"max_images": 3}, "max_images", "set sequential_image_generation='auto'"),
    *ints("max_images_per_task", PER_TASK, low=0, high=None),
    # Text native rendering would literal_eval into 16, 1000.0 and 1000: it stays the text written.
    *[
        Case(f"max_images_per_task-{label}", {"max_images_per_task": text}, "max_images_per_task", PER_TASK)
        for label, text in [("hex", "0x10"), ("exponent", "1e3"), ("underscores", "1_000")]
    ],
    *direct_ints("max_concurrency", CONCURRENCY, low=0, high=65),
    # ---------------------------------------------------------------- numbers (not templated)
    *[
        Case(f"max_images_per_minute-{label}", {}, "max_images_per_minute", PER_MINUTE, modes=DIRECT, static=static)
        for label, static in [
            ("nan", {"max_images_per_minute": NAN}),
            ("inf", {"max_images_per_minute": INF}),
            ("nan-text", {"max_images_per_minute": "nan"}),
            ("inf-text", {"max_images_per_minute": "inf"}),
            ("true", {"max_images_per_minute": True}),
            ("half", {"max_images_per_minute": 0.5}),
            ("None-text", {"max_images_per_minute": "None"}),
            ("list", {"max_images_per_minute": [60]}),
            ("words", {"max_images_per_minute": "fast"}),
        ]
    ],
    # ---------------------------------------------------------------- choices
    *choices("response_format", "allowed: 'url' or 'b64_json'", ["png", "URL", 1, ["url"]]),
    *choices("sequential_image_generation", "allowed: 'auto' or 'disabled'", ["sometimes", True], optional=True),
    *choices("optimize_prompt_mode", "allowed: 'standard' or 'fast'", ["turbo", 1], optional=True),
    *choices("on_partial_failure", "allowed: 'fail' or 'continue'", ["ignore", False, ["fail"]]),
    *choices("output_format", "allowed: 'jpeg' or 'png'", ["gif", "PNG"], optional=True),
    Case("png-on-4.0", {"output_format": "png"}, "output_format", "(Seedream 5.0 only)"),
    Case("web-search-on-4.0", {"web_search": "true"}, "web_search", "(Seedream 5.0 only)"),
    # ---------------------------------------------------------------- text
    Case("model-None", {"model": None}, "model", "allowed: a model id", modes=TEXT),
    Case("model-null", {"model": "null"}, "model", "allowed: a model id"),
    Case("model-nan", {"model": "nan"}, "model", "allowed: a model id"),
    Case("model-int", {"model": 42}, "model", "allowed: a model id", modes=NATIVE),
    Case("model-list", {"model": ["doubao-seedream-4-0-250828"]}, "model", "allowed: a model id"),
    Case("size-None", {"size": None}, "size", "allowed: '1K', '2K', '4K'", modes=TEXT),
    Case("size-null", {"size": "null"}, "size", "allowed: '1K', '2K', '4K'"),
    Case("size-int", {"size": 2048}, "size", "'4K' or 'WxH'"),
    Case("size-list", {"size": [2048, 2048]}, "size", "'4K' or 'WxH'"),
    Case("size-3K", {"size": "3K"}, "size", "allowed: '1K' / '2K' / '4K'"),
    Case("s3_key_prefix-None", {"s3_key_prefix": None}, "s3_key_prefix", "allowed: a string", modes=TEXT),
    Case("s3_key_prefix-null", {"s3_key_prefix": "null"}, "s3_key_prefix", "allowed: a string"),
    Case("s3_key_prefix-int", {"s3_key_prefix": 42}, "s3_key_prefix", "allowed: a string", modes=NATIVE),
    Case("s3_key_prefix-list", {"s3_key_prefix": ["team"]}, "s3_key_prefix", "allowed: a string", modes=NATIVE),
    Case("jimeng_conn_id-empty", {"jimeng_conn_id": ""}, "jimeng_conn_id", "allowed: a connection id"),
    Case("jimeng_conn_id-None", {"jimeng_conn_id": None}, "jimeng_conn_id", "allowed: a connection id", modes=NATIVE),
    Case("aws_conn_id-empty", {"aws_conn_id": ""}, "aws_conn_id", "allowed: a connection id"),
    # ---------------------------------------------------------------- prompt
    Case("prompt-None", {"prompt": None}, "prompt", PROMPT),
    Case("prompt-None-text", {"prompt": "None"}, "prompt", PROMPT),
    Case("prompt-null", {"prompt": "null"}, "prompt", PROMPT),
    Case("prompt-nan", {"prompt": NAN}, "prompt", PROMPT),
    Case("prompt-undefined", {"prompt": "undefined"}, "prompt", PROMPT),
    Case("prompt-empty-list", {"prompt": []}, "prompt", PROMPT),
    Case("prompt-empty-list-text", {"prompt": "[]"}, "prompt", PROMPT),
    Case("prompt-list", {"prompt": ["a", "b"]}, "prompt", PROMPT, modes=TEXT),
    Case("prompt-list-text", {"prompt": "['a', 'b']"}, "prompt", PROMPT, modes=TEXT),
    Case("prompt-dict", {"prompt": {"k": 1}}, "prompt", PROMPT),
    Case("prompt-dict-text", {"prompt": "{'k': 1}"}, "prompt", PROMPT),
    Case("prompt-set", {"prompt": {"a fox"}}, "prompt", PROMPT),
    Case("prompt-int", {"prompt": 42}, "prompt", PROMPT, modes=NATIVE),
    Case("prompt-true", {"prompt": True}, "prompt", PROMPT, modes=NATIVE),
    Case("prompt-float", {"prompt": 3.7}, "prompt", PROMPT, modes=NATIVE),
    Case("prompt-bytes", {"prompt": b"a fox"}, "prompt", PROMPT, modes=NATIVE),
    Case("prompt-nested", {"prompt": [["a"]]}, "prompt[0]", PROMPT, text=("prompt", PROMPT)),
    Case("prompt-int-in-list", {"prompt": ["a fox", 42]}, "prompt[1]", PROMPT, text=("prompt", PROMPT)),
    Case("prompt-None-in-list", {"prompt": ["a fox", None]}, "prompt[1]", PROMPT, text=("prompt", PROMPT)),
    Case("prompt-None-text-in-list", {"prompt": ["a fox", "None"]}, "prompt[1]", PROMPT, text=("prompt", PROMPT)),
    Case("prompt-empty-in-list", {"prompt": [""]}, "prompt[0]", NOT_BLANK, text=("prompt", PROMPT)),
    Case("prompt-blank-in-list", {"prompt": ["a fox", " "]}, "prompt[1]", NOT_BLANK, text=("prompt", PROMPT)),
    Case("prompt-whitespace", {"prompt": " \n\t "}, "prompt", NOT_BLANK),
    Case("prompt-surrogate", {"prompt": "a \ud800 fox"}, "prompt", UTF8),
    Case("prompt-surrogate-in-list", {"prompt": ["a fox", "\udcff"]}, "prompt[1]", UTF8, modes=NATIVE),
    # ---------------------------------------------------------------- image
    Case("image-None", {"image": None}, "image", IMAGE, modes=TEXT),
    Case("image-empty-list", {"image": []}, "image", IMAGE, modes=TEXT),
    Case("image-list-text", {"image": "['a.png', 'b.png']"}, "image", IMAGE, modes=TEXT),
    Case("image-list", {"image": ["a.png", "b.png"]}, "image", IMAGE, modes=TEXT),
    Case("image-None-in-list", {"image": ["@missing", None]}, "image[1]", IMAGE, text=("image", IMAGE)),
    Case("image-int", {"image": 42}, "image", IMAGE, text=("image", NO_FILE)),
    Case("image-dict", {"image": {"url": "https://example.com/a.png"}}, "image", IMAGE),
    Case("image-missing-file", {"image": "@missing"}, "image", NO_FILE),
    Case("image-not-an-image", {"image": "@not_image"}, "image", "allowed formats: jpeg, png"),
    Case("image-2-byte-jpeg", {"image": b"\xff\xd8"}, "image", "dimensions cannot be read", text=("image", NO_FILE)),
    Case("image-bare-tiff", {"image": b"II*\x00"}, "image", "dimensions cannot be read", text=("image", NO_FILE)),
    Case("image-2-byte-jpeg-uri", {"image": "data:image/jpeg;base64,/9g="}, "image", "dimensions cannot be read"),
    Case("image-surrogate", {"image": "\ud800.png"}, "image", UTF8),
    # ---------------------------------------------------------------- extra_body
    Case("extra_body-words", {"extra_body": "abc"}, "extra_body", EXTRA),
    Case("extra_body-set", {"extra_body": {"n", "seed"}}, "extra_body", EXTRA),
    Case("extra_body-pairs", {"extra_body": [("n", 2)]}, "extra_body", EXTRA),
    Case("extra_body-pairs-clash", {"extra_body": [("model", "x")]}, "extra_body", EXTRA),
    Case("extra_body-json-list", {"extra_body": "[1, 2]"}, "extra_body", EXTRA),
    Case("extra_body-int", {"extra_body": 42}, "extra_body", EXTRA),
    Case("extra_body-null", {"extra_body": "null"}, "extra_body", EXTRA),
    Case("extra_body-None", {"extra_body": None}, "extra_body", EXTRA, modes=TEXT),
    Case("extra_body-nan", {"extra_body": {"x": NAN}}, "extra_body", EXTRA),
    Case("extra_body-nan-json", {"extra_body": '{"x": NaN}'}, "extra_body", EXTRA),
    Case("extra_body-nested-nan", {"extra_body": {"x": [1, INF]}}, "extra_body", EXTRA),
    Case("extra_body-bytes-value", {"extra_body": {"x": b"raw"}}, "extra_body", EXTRA),
    Case("extra_body-empty-key", {"extra_body": '{"": 1}'}, "extra_body", EXTRA),
    Case("extra_body-int-key", {"extra_body": {1: "x"}}, "extra_body", EXTRA),
    Case("extra_body-size", {"extra_body": {"size": "2K"}}, "extra_body", CLASH, text=("extra_body", EXTRA)),
    *[
        Case(f"extra_body-sets-{name}", {"extra_body": json.dumps({name: value})}, "extra_body", CLASH)
        for name, value in [
            ("model", "x"),
            ("prompt", "x"),
            ("size", "2K"),
            ("seed", 1),
            ("output_format", "png"),
            ("tools", []),
            ("watermark", False),
            ("image", "https://example.com/a.png"),
            ("sequential_image_generation_options", {"max_images": 15}),
            ("response_format", "b64_json"),
        ]
    ],
    *[
        Case(f"extra_body-n-{label}", {"extra_body": text}, "extra_body.n", N)
        for label, text in [
            ("many", '{"n": "many"}'),
            ("1.5", '{"n": 1.5}'),
            ("0", '{"n": 0}'),
            ("16", '{"n": 16}'),
            ("true", '{"n": true}'),
            ("null", '{"n": null}'),
            ("list", '{"n": [2]}'),
        ]
    ],
    # ---------------------------------------------------------------- s3_bucket (asked for: must render to one)
    *[
        Case(f"s3_bucket-{label}", {"s3_bucket": value}, "s3_bucket", allowed)
        for label, value, allowed in [
            ("None", None, "allowed: "),
            ("None-text", "None", "allowed: "),
            ("null", "null", "allowed: "),
            ("empty", "", BUCKET),
            ("blank", "   ", BUCKET),
            ("upper-case", "My_Bucket", BUCKET),
            ("int", 42, BUCKET),
            ("list", ["good-bucket"], BUCKET),
            ("url", "s3://good-bucket", BUCKET),
            ("ip-address", "10.0.0.1", "not an IP address"),
        ]
    ],
    Case("b64-without-bucket", {"response_format": "b64_json"}, "response_format", "'b64_json' needs s3_bucket"),
    # ---------------------------------------------------------------- s3_key (every billable image, every run)
    key("s3_key-empty-field", "{}/{run_id}/{prompt_index}", text=("s3_key", KEY_FIELDS)),
    key("s3_key-positional", "{0}/{run_id}/{prompt_index}"),
    key("s3_key-bare-braces", "{}", KEY_TEXT),
    key("s3_key-bare-positional", "{0}", KEY_TEXT),
    key("s3_key-attribute", "{run_id.upper}/{prompt_index}"),
    key("s3_key-index", "{run_id[0]}/{prompt_index}"),
    key("s3_key-unknown-field", "{date}/{run_id}/{prompt_index}"),
    key("s3_key-string-format", "{run_id}/{prompt_index:s}", "allowed: fields such as {prompt_index:03d}"),
    key("s3_key-bad-conversion", "{run_id}/{prompt_index!z}", "allowed: fields such as {prompt_index:03d}"),
    key("s3_key-int-precision", "{run_id}/{prompt_index:.1}", "allowed: fields such as {prompt_index:03d}"),
    key("s3_key-unbalanced", "{run_id/{prompt_index}", "allowed fields:"),
    key("s3_key-no-run-id", "images/{prompt_index}-{image_index}.{ext}", "allowed: a template with {run_id}"),
    key("s3_key-truncated-run-id", "{run_id:.3}/{prompt_index}-{image_index}", "{run_id} unabridged"),
    key(
        "s3_key-truncated-short-run-id",
        "{run_id:.3}/{prompt_index}-{image_index}",
        "{run_id} unabridged",
        run_id=SHORT_RUN_ID,
    ),
    key("s3_key-nested-precision", "{run_id:.{prompt_index}}/{image_index}", "{run_id} unabridged"),
    key("s3_key-mapped-no-map-index", "{run_id}/{prompt_index}-{image_index}", "{map_index}", map_index=2),
    key(
        "s3_key-issue-repro",
        "products/{{ ds }}/{prompt_index:03d}-{image_index}.{ext}",
        "allowed: a template with {run_id}",
        map_index=0,
    ),
    key(
        "s3_key-prompts-share-a-key",
        "{run_id}/{image_index}.{ext}",
        "{prompt_index} and {image_index} tell every image apart",
        static={"prompt": ["a fox", "a cat"]},
    ),
    key(
        "s3_key-set-shares-a-key",
        "{run_id}/{prompt_index}.{ext}",
        "{prompt_index} and {image_index} tell every image apart",
        static={**AUTO, "max_images": 2},
    ),
    key(
        "s3_key-extra-n-shares-a-key",
        "{run_id}/{prompt_index}.{ext}",
        "{prompt_index} and {image_index} tell every image apart",
        static={"extra_body": {"n": 2}},
    ),
    key("s3_key-records", "jimeng/{dag_id}/{run_id}/{task_id}/records.json", "keeps for its records"),
    key("s3_key-journal", "jimeng/{dag_id}/{run_id}/{task_id}/_pending/{prompt_index}", "keeps for its records"),
    key("s3_key-too-long", "x" * 1100 + "/{run_id}/{prompt_index}", "longer than 1024 bytes"),
    key("s3_key-surrogate", "\ud800/{run_id}/{prompt_index}", UTF8),
    Case("s3_key-None", {"s3_key": None}, "s3_key", KEY_TEXT, modes=TEXT, static=STORE),
    Case("s3_key-null", {"s3_key": "null"}, "s3_key", KEY_TEXT, static=STORE),
    Case("s3_key-dict", {"s3_key": {"k": 1}}, "s3_key", KEY_TEXT, static=STORE),
    # ---------------------------------------------------------------- max_images_per_task (before any request)
    Case(
        "budget-sets",
        {"max_images_per_task": 7},
        "max_images_per_task",
        "could bill up to 8 images",
        static={"prompt": ["a", "b"], **AUTO, "max_images": 4},
    ),
    Case(
        "budget-extra-n",
        {"max_images_per_task": "3"},
        "max_images_per_task",
        "could bill up to 4 images",
        static={"extra_body": {"n": 4}},
    ),
    Case(
        "budget-extra-n-json",
        {"extra_body": '{"n": 2}'},
        "max_images_per_task",
        "could bill up to 4 images",
        static={"prompt": ["a", "b"], "max_images_per_task": 3},
    ),
]
REFUSED: list[Case] = [case for case in _REFUSED if case is not None]
REFUSED_PARAMS = [pytest.param(case, mode, id=f"{case.id}-{mode}") for case in REFUSED for mode in case.modes]


def build(
    values: dict[str, Any], static: dict[str, Any], mode: str, *, map_index: int = -1, run_id: str | None = None
) -> tuple[JiMengGenerateOperator, dict[str, Any]]:
    """The operator with ``values`` behind ``{{ params.<name> }}`` in a DAG rendering natively or not."""
    from airflow.sdk import DAG

    templated = {name: f"{{{{ params.{name} }}}}" for name in values}
    with DAG(
        f"rendered_types_{mode}",
        schedule=None,
        start_date=datetime.datetime(2024, 1, 1),
        render_template_as_native_obj=mode == "native",
    ):
        operator = JiMengGenerateOperator(task_id="generate", **{"prompt": "a red fox", **static, **templated})
    identity = TaskInstanceIdentity(map_index=map_index, run_id=run_id or TaskInstanceIdentity.run_id)
    context = {"ti": identity, "params": dict(values), "ds": "2025-01-01"}
    operator.render_template_fields(context)  # type: ignore[arg-type]
    return operator, context


@pytest.mark.parametrize(("case", "mode"), REFUSED_PARAMS)
def test_refused_after_rendering(
    jimeng_conn: JiMengEmulator, reference_files: dict[str, str], case: Case, mode: str
) -> None:
    operator, context = build(
        resolve(case.values, reference_files),
        resolve(case.static, reference_files),
        mode,
        map_index=case.map_index,
        run_id=case.run_id,
    )
    with pytest.raises(JiMengConfigurationError) as raised:
        operator.execute(context)  # type: ignore[arg-type]
    parameter, allowed = case.expected(mode)
    assert_refused(raised.value, parameter, allowed, jimeng_conn)


# ------------------------------------------------------------------------------------- accepted
class RecordingIdentity(TaskInstanceIdentity):
    """A task instance whose pushes are kept (accepted runs push their records and usage)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def run_operator(values: dict[str, Any], static: dict[str, Any], mode: str) -> list[str]:
    operator, context = build(values, static, mode)
    context["ti"] = RecordingIdentity()
    return operator.execute(context)  # type: ignore[arg-type]


def sent(emulator: JiMengEmulator) -> list[dict[str, Any]]:
    return [record["body"] for record in emulator.requests]


@dataclass(frozen=True)
class Accepted:
    """A value the model coerces: ``check`` reads the result off the emulator after one run."""

    id: str
    values: dict[str, Any]
    check: Callable[[JiMengEmulator, list[str]], None]
    modes: tuple[str, ...] = BOTH
    static: dict[str, Any] = field(default_factory=dict)


def _one_request_with(**expected: Any) -> Callable[[JiMengEmulator, list[str]], None]:
    def check(emulator: JiMengEmulator, outputs: list[str]) -> None:
        (body,) = sent(emulator)
        for name, value in expected.items():
            assert body.get(name) == value, (name, body)
        assert outputs, "the run was real and kept its image(s)"

    return check


def _nothing_sent(emulator: JiMengEmulator, outputs: list[str]) -> None:
    assert emulator.request_count == 0
    assert outputs == []


def _two_requests(emulator: JiMengEmulator, outputs: list[str]) -> None:
    assert emulator.request_count == 2
    assert len(outputs) == 2


ACCEPTED = [
    # ``"False"`` is false: the run is real (a truthy string would have made it a silent dry run).
    Accepted("dry_run-False", {"dry_run": "False"}, _one_request_with(prompt="a red fox")),
    Accepted("dry_run-false", {"dry_run": False}, _one_request_with(prompt="a red fox")),
    Accepted("dry_run-true", {"dry_run": "true"}, _nothing_sent),
    Accepted("dry_run-yes", {"dry_run": " YES "}, _nothing_sent),
    # Native rendering keeps what only looks like a number as the text written.
    Accepted("prompt-hex", {"prompt": "0x10"}, _one_request_with(prompt="0x10")),
    Accepted("prompt-underscores", {"prompt": "1_000"}, _one_request_with(prompt="1_000")),
    Accepted("seed-7", {"seed": "7"}, _one_request_with(seed=7), static=SEEDED),
    Accepted("seed-padded", {"seed": " 7 "}, _one_request_with(seed=7), static=SEEDED),
    Accepted("seed-4.0", {"seed": 4.0}, _one_request_with(seed=4), static=SEEDED),
    Accepted("seed-minus-1", {"seed": "-1"}, _one_request_with(seed=-1), static=SEEDED),
    Accepted("watermark-off", {"watermark": "off"}, _one_request_with(watermark=False)),
    Accepted("watermark-unset", {"watermark": ""}, _one_request_with(watermark=True)),
    Accepted(
        "extra_body-json-n", {"extra_body": '{"n": 2}'}, _one_request_with(n=2), static={"max_images_per_task": 2}
    ),
    Accepted(
        "max_images-4.0",
        {"max_images": 4.0},
        _one_request_with(sequential_image_generation_options={"max_images": 4}),
        static={**AUTO, "max_images_per_task": 4},
    ),
    Accepted(
        "max_concurrency-text", {}, _two_requests, modes=DIRECT, static={"prompt": ["a", "b"], "max_concurrency": "2"}
    ),
    Accepted(
        "max_images_per_minute-text", {}, _one_request_with(), modes=DIRECT, static={"max_images_per_minute": "600"}
    ),
]
ACCEPTED_PARAMS = [pytest.param(case, mode, id=f"{case.id}-{mode}") for case in ACCEPTED for mode in case.modes]


@pytest.mark.parametrize(("case", "mode"), ACCEPTED_PARAMS)
def test_accepted_after_rendering(jimeng_conn: JiMengEmulator, case: Accepted, mode: str) -> None:
    outputs = run_operator(case.values, case.static, mode)
    case.check(jimeng_conn, outputs)


def test_the_tables_are_as_large_as_documented() -> None:
    """The counts in the module docstring, and the issue's floor of 150 refused cases."""
    modes = [mode for _, mode in (param.values for param in REFUSED_PARAMS)]
    accepted = [mode for _, mode in (param.values for param in ACCEPTED_PARAMS)]
    documented = __doc__ or ""
    for label, table in (("refused", modes), ("accepted coercions", accepted)):
        by_mode = ", ".join(f"{mode} {table.count(mode)}" for mode in ("native", "text", "direct"))
        assert f"{label}, operator in-process: {len(table)} ({by_mode})" in documented
    assert len(modes) >= 150
