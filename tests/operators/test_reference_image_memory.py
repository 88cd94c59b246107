"""A reference image is held once per run, whatever the number of prompts (issue 20 #12).

Before: each prompt's body carried its own copy of the image's data URI, all built before the first
request: one 7.7 MB PNG cost +417 MiB at 40 prompts (~10 GiB at 1,000).
"""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

#: Big enough to stand out of every other allocation, small enough to build quickly.
IMAGE_BYTES = 3 * 1024 * 1024


def big_png(path: Path) -> Path:
    """A PNG header the API's checks accept (1024x1024), padded to IMAGE_BYTES with an ancillary chunk."""
    header = struct.pack(">IIBBBBB", 1024, 1024, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    padding = bytes(range(256)) * (IMAGE_BYTES // 256)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"teXt", padding) + chunk(b"IEND", b""))
    return path


def build(prompts: int, image: Any) -> tuple[list[dict[str, Any]], int, int]:
    """The operator's bodies for ``prompts`` prompts, with the memory they hold and the peak of building them."""
    operator = JiMengGenerateOperator(task_id="generate", prompt=[f"prompt {n}" for n in range(prompts)], image=image)
    texts, generation, _run = operator.checked_parameters()
    hook = JiMengHook()
    _ = hook.config  # the connection, looked up before measuring
    tracemalloc.start()
    try:
        bodies = operator._build_bodies(hook, generation, texts)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return bodies, held, peak


def test_forty_prompts_hold_one_copy_of_the_reference_image(jimeng_conn: JiMengEmulator, tmp_path: Path) -> None:
    path = big_png(tmp_path / "reference.png")
    one_body, _held_one, peak_one = build(1, str(path))
    bodies, held, peak = build(40, str(path))
    uri = len(bodies[0]["image"])
    assert uri > IMAGE_BYTES
    assert all(body["image"] is bodies[0]["image"] for body in bodies), "one object shared by every body"
    assert held < 1.5 * uri, f"held {held / uri:.1f} copies of the data URI (before: 40)"
    assert peak - peak_one < 0.5 * uri, "building 40 bodies costs what building one does"
    # What is sent is the data URI itself: JSON encodes the shared object as the string it is.
    assert json.loads(json.dumps(bodies[39]))["image"] == one_body[0]["image"]


def test_a_data_uri_given_in_a_list_is_checked_once_and_shared(jimeng_conn: JiMengEmulator, tmp_path: Path) -> None:
    path = big_png(tmp_path / "reference.png")
    data_uri = build(1, str(path))[0][0]["image"]
    bodies, held, _peak = build(40, [str(data_uri), "https://example.com/a.png?X-Tos-Signature=s"])
    first = bodies[0]["image"]
    assert all(body["image"][0] is first[0] for body in bodies)
    assert held < 2.5 * len(first[0]), "the data URI given, and one checked copy shared by the 40 bodies"
