"""MkDocs hook: fill tables from the code so the docs cannot drift from it.

* ``<!-- connection-extras -->`` becomes a table of every connection extra (``CONNECTION_EXTRAS``).
* ``operator.md`` must mention every parameter of ``JiMengGenerateOperator.__init__``: a missing one
  is a warning, which fails the strict build.
"""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.jimeng")

ROOT = Path(__file__).resolve().parents[2]
EXTRAS_MARKER = "<!-- connection-extras -->"


def _extras_table() -> str:
    from airflow_provider_jimeng.hooks.connection_form import CONNECTION_EXTRAS

    rows = ["| extra | UI label | type | meaning |", "|---|---|---|---|"]
    for name, spec in CONNECTION_EXTRAS.items():
        choices = [value for value in spec["schema"].get("enum", []) if value is not None]
        types = " or ".join(f"`{value}`" for value in choices) or " or ".join(
            t for t in spec["schema"]["type"] if t != "null"
        )
        rows.append(f"| `{name}` | {spec['label']} | {types} | {spec['description'].replace('|', '&#124;')} |")
    return "\n".join(rows)


def _operator_parameters() -> list[str]:
    # Read the signature statically: importing the operator would import Airflow.
    source = (ROOT / "airflow_provider_jimeng" / "operators" / "jimeng.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "JiMengGenerateOperator":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    return [a.arg for a in [*args.args, *args.kwonlyargs] if a.arg != "self"]
    return []


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if EXTRAS_MARKER in markdown:
        markdown = markdown.replace(EXTRAS_MARKER, _extras_table())
    if page.file.src_uri == "operator.md":
        missing = [name for name in _operator_parameters() if f"`{name}`" not in markdown]
        if missing:
            log.warning("operator.md does not document JiMengGenerateOperator parameter(s): %s", ", ".join(missing))
    return markdown
