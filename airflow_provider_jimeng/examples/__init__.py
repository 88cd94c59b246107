"""The example DAGs, shipped with the package so that a pip-only install can run them.

``python -m airflow_provider_jimeng.examples [DAGS_FOLDER]`` writes them, with the prompt and data
files they read, into ``<DAGS_FOLDER>/jimeng_examples/`` (Airflow's ``[core] dags_folder`` when no
folder is given). A wheel carries them in ``airflow_provider_jimeng/examples/dags/``; a checkout
(editable install included) reads ``dags_examples/`` directly.
"""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

#: The folder the examples are written to, inside the DAGs folder.
TARGET_FOLDER = "jimeng_examples"


def examples_dir() -> Path:
    """Where the examples are: inside the installed wheel, or ``dags_examples/`` of a checkout."""
    packaged = Path(__file__).resolve().parent / "dags"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "dags_examples"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        "the example DAGs are not in this installation (neither a wheel's examples/dags nor a checkout's "
        "dags_examples/); reinstall airflow-provider-jimeng from a wheel or a checkout"
    )


def example_files() -> list[Path]:
    """The files to copy, relative to :func:`examples_dir`: DAGs, prompts and data, no caches."""
    root = examples_dir()
    return sorted(
        path.relative_to(root)
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )


def copy_examples(dags_folder: Path, *, overwrite: bool = False) -> list[Path]:
    """Copy the examples into ``dags_folder/jimeng_examples/``; return the files written.

    Files already there with the same content are left alone; a file that differs (a user's edit) is
    only replaced with ``overwrite``, so running the command twice never loses work.
    """
    source = examples_dir()
    target = dags_folder / TARGET_FOLDER
    files = example_files()
    changed = [name for name in files if (target / name).exists() and not filecmp.cmp(source / name, target / name)]
    if changed and not overwrite:
        listing = ", ".join(str(name) for name in changed)
        raise FileExistsError(f"{target} already holds edited copies of: {listing} (pass --force to replace them)")
    written = []
    for name in files:
        destination = target / name
        if destination.exists() and name not in changed:
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, destination)
        written.append(destination)
    return written
