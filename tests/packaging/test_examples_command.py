"""``python -m airflow_provider_jimeng.examples``: a pip-only user gets the example DAGs into a DAGs folder.

The wheel itself, installed into a fresh venv and run as docs/getting-started.md says, is checked by
``make package-check`` (scripts/package-check.sh); this covers the command's behaviour.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_jimeng.examples import TARGET_FOLDER, copy_examples, example_files, examples_dir

REPO = Path(__file__).resolve().parents[2]


def test_the_examples_are_the_checkouts_dags_examples() -> None:
    names = {str(name) for name in example_files()}
    expected = {
        str(path.relative_to(REPO / "dags_examples"))
        for path in (REPO / "dags_examples").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert names == expected
    assert {"jimeng_hello.py", "prompts/hello.j2"} <= names


def test_copy_writes_dags_prompts_and_data_into_a_subfolder(tmp_path: Path) -> None:
    written = copy_examples(tmp_path)

    target = tmp_path / TARGET_FOLDER
    assert sorted(written) == sorted(target / name for name in example_files())
    assert (target / "jimeng_hello.py").read_bytes() == (examples_dir() / "jimeng_hello.py").read_bytes()
    assert (target / "prompts" / "hello.j2").is_file()


def test_copy_again_writes_nothing_and_never_overwrites_an_edit(tmp_path: Path) -> None:
    copy_examples(tmp_path)
    assert copy_examples(tmp_path) == []

    edited = tmp_path / TARGET_FOLDER / "jimeng_hello.py"
    edited.write_text("# my changes\n")
    with pytest.raises(FileExistsError, match=r"jimeng_hello\.py.*--force"):
        copy_examples(tmp_path)
    assert edited.read_text() == "# my changes\n"

    assert copy_examples(tmp_path, overwrite=True) == [edited]
    assert edited.read_bytes() == (examples_dir() / "jimeng_hello.py").read_bytes()


def test_the_command_defaults_to_airflows_dags_folder(tmp_path: Path) -> None:
    dags_folder = tmp_path / "dags"
    env = {"AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder), "AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "airflow_provider_jimeng.examples"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert (dags_folder / TARGET_FOLDER / "jimeng_hello.py").is_file()
    assert f"The examples are in {dags_folder / TARGET_FOLDER}" in result.stdout
    # The mapped example waits for its pool forever, silently, where the pool does not exist: say so.
    assert 'airflow pools set jimeng 4 "JiMeng API calls"' in result.stdout
    assert 'pool="jimeng"' in (dags_folder / TARGET_FOLDER / "jimeng_mapped_generation.py").read_text()


def test_the_command_reports_an_edited_copy_instead_of_overwriting(tmp_path: Path) -> None:
    copy_examples(tmp_path)
    (tmp_path / TARGET_FOLDER / "jimeng_hello.py").write_text("# mine\n")

    result = subprocess.run(
        [sys.executable, "-m", "airflow_provider_jimeng.examples", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "--force" in result.stderr
