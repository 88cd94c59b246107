"""Without Pillow the emulator refuses to start and says what to install.

It used to start and answer every generation with a retryable 500, so a DAG retried for a minute
before failing with an error that did not name the cause.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_jimeng.emulator.images import PILLOW_MISSING, require_pillow


@pytest.fixture
def without_pillow(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import PIL (a package on the path that refuses to import)."""
    shadow = tmp_path / "PIL"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named PIL (hidden by the test)')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}


def test_the_command_refuses_to_start_and_names_the_install_command(without_pillow: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "airflow_provider_jimeng.emulator", "--port", "0"],
        env=without_pillow,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "pip install 'airflow-provider-jimeng[emulator]'" in result.stderr
    assert "listening" not in result.stdout


def test_the_package_still_imports_without_pillow(without_pillow: dict[str, str]) -> None:
    # Only serving images needs Pillow: code that imports the emulator (fixtures, faults) must not.
    code = "import airflow_provider_jimeng.emulator as e; print(e.JiMengEmulator.__name__)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=without_pillow, capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("JiMengEmulator")  # Airflow may log a line first


def test_require_pillow_passes_where_pillow_is_installed() -> None:
    pytest.importorskip("PIL.Image")
    require_pillow()
    assert "pip install" in PILLOW_MISSING
