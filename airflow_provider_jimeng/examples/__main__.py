"""``python -m airflow_provider_jimeng.examples [DAGS_FOLDER]``: write the example DAGs into a DAGs folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from airflow_provider_jimeng.examples import TARGET_FOLDER, copy_examples, example_files

#: The pool the mapped example runs in (dags_examples/jimeng_mapped_generation.py).
EXAMPLE_POOL = "jimeng"


def _airflow_dags_folder() -> Path:
    # Imported only when needed: Airflow's configuration takes seconds to load.
    from airflow.configuration import conf

    return Path(conf.get("core", "dags_folder")).expanduser()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_jimeng.examples",
        description=f"Write the JiMeng example DAGs, prompts and data files into <DAGS_FOLDER>/{TARGET_FOLDER}/.",
    )
    parser.add_argument(
        "dags_folder", nargs="?", type=Path, help="the DAGs folder (default: Airflow's [core] dags_folder)"
    )
    parser.add_argument("--force", action="store_true", help="replace copies you have edited")
    parser.add_argument("--list", action="store_true", help="list the files and write nothing")
    args = parser.parse_args(argv)

    if args.list:
        for name in example_files():
            print(name)
        return 0
    dags_folder: Path = args.dags_folder or _airflow_dags_folder()
    try:
        written = copy_examples(dags_folder, overwrite=args.force)
    except (FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    print(f"The examples are in {dags_folder / TARGET_FOLDER} ({len(written)} file(s) written, the rest up to date).")
    # A task in a pool that does not exist stays scheduled, and the UI says nothing about it.
    print(f'jimeng_mapped_generation runs in the pool "{EXAMPLE_POOL}": create it once with')
    print(f'  airflow pools set {EXAMPLE_POOL} 4 "JiMeng API calls"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
