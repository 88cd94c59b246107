"""Helpers of the bad-input suite: reference files, a task context, connections that are wrong."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from tests.operators import conftest as operator_fixtures


def png(width: int, height: int) -> bytes:
    """A valid (black) PNG of the given size, without Pillow."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x00\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


#: The whole-DAG cases use the operator suite's emulator (hook retries off) and ``dag.test()`` runner.
emulator = operator_fixtures.emulator
run_dag = operator_fixtures.run_dag

PNG_DATA_URI = "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()


@dataclass
class TaskInstanceIdentity:
    dag_id: str = "bad_input"
    run_id: str = "manual__2025-01-01T00:00:00+00:00"
    task_id: str = "generate"
    map_index: int = -1

    def xcom_push(self, key: str, value: Any) -> None:
        raise AssertionError(f"nothing may be pushed for bad input, got {key}")


@pytest.fixture
def context() -> dict[str, Any]:
    return {"ti": TaskInstanceIdentity(), "params": {}, "ds": "2025-01-01"}


@pytest.fixture
def reference_files(tmp_path: Path) -> dict[str, str]:
    """``@name`` placeholders of the test tables, resolved to files of this test."""
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image at all")
    huge = tmp_path / "huge.png"
    with huge.open("wb") as handle:  # sparse: 10 MB + 1 byte without writing them
        handle.truncate(10 * 1024 * 1024 + 1)
    return {"@missing": str(tmp_path / "missing.png"), "@not_image": str(not_image), "@huge": str(huge)}


def resolve(value: Any, files: dict[str, str]) -> Any:
    if isinstance(value, str):
        return files.get(value, value)
    if isinstance(value, list):
        return [resolve(item, files) for item in value]
    if isinstance(value, dict):
        return {key: resolve(item, files) for key, item in value.items()}
    return value


def assert_refused(error: JiMengConfigurationError, parameter: str, allowed: str, emulator: JiMengEmulator) -> None:
    """The error names ``parameter`` first, says what is ``allowed``, and nothing reached the API."""
    message = str(error)
    assert error.parameter == parameter, message
    assert message.startswith(f"{parameter}: "), message
    assert allowed in message, message
    assert emulator.request_count == 0


@pytest.fixture
def bad_connections(jimeng_conn: JiMengEmulator, monkeypatch: pytest.MonkeyPatch) -> JiMengEmulator:
    """Connections ``jimeng_<problem>`` that are each wrong in one way; the emulator stays reachable."""
    base = jimeng_conn.base_url
    key = "sk-valid-looking"
    connections = {
        "no_key": {"host": base, "extra": {"allow_http": True}},
        "blank_key": {"host": base, "password": "   ", "extra": {"allow_http": True}},
        "no_scheme": {"host": "ark.example.com/api/v3", "password": key},
        "plain_http": {"host": base, "password": key},
        "ftp_url": {"host": "ftp://ark.example.com/api/v3", "password": key},
        "bad_timeout": {"host": base, "password": key, "extra": {"allow_http": True, "timeout": "soon"}},
        "bad_retries": {"host": base, "password": key, "extra": {"allow_http": True, "max_retries": -1}},
        "bad_watermark": {"host": base, "password": key, "extra": {"allow_http": True, "watermark": "maybe"}},
        # Pasted keys: a zero-width space, a Cyrillic "а" for the Latin one, a line break inside.
        "key_zero_width": {"host": base, "password": "sk-valid\u200b-looking", "extra": {"allow_http": True}},
        "key_cyrillic": {"host": base, "password": "sk-v\u0430lid-looking", "extra": {"allow_http": True}},
        "key_newline": {"host": base, "password": "sk-valid\n-looking", "extra": {"allow_http": True}},
    }
    for name, fields in connections.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_JIMENG_{name.upper()}", json.dumps({"conn_type": "jimeng", **fields}))
    return jimeng_conn
