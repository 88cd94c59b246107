"""MkDocs hook: fill tables from the code so the docs cannot drift from it.

* The table between ``<!-- connection-extras:start -->`` and ``<!-- connection-extras:end -->`` in
  ``connection.md`` must be the one made from ``CONNECTION_EXTRAS``: the Markdown carries it (so it reads
  on the code host too), the build warns when it drifts, and ``python docs/.hooks/generated.py``
  rewrites it (``tests/packaging/test_docs_read_as_written.py`` checks it in ``make test``).
* A page that starts with ``<!-- include: FILE -->`` (``changelog.md``, ``contributing.md``) is that
  repository file on the site, and a link to it on the code host.
* ``operator.md`` must mention every parameter of ``JiMengGenerateOperator.__init__``: a missing one
  is a warning, which fails the strict build.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.jimeng")

ROOT = Path(__file__).resolve().parents[2]
_INCLUDE = re.compile(r"\A<!-- include: (?P<path>[\w./-]+) -->")
EXTRAS_START = "<!-- connection-extras:start -->"
EXTRAS_END = "<!-- connection-extras:end -->"
CONNECTION_PAGE = ROOT / "docs" / "connection.md"


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


def extras_table_in(markdown: str) -> str | None:
    """The table between the markers, or ``None`` when the page has no markers."""
    if EXTRAS_START not in markdown:
        return None
    return markdown.split(EXTRAS_START, 1)[1].split(EXTRAS_END, 1)[0].strip()


def with_extras_table(markdown: str) -> str:
    """``markdown`` with the table between the markers made from the code."""
    head, rest = markdown.split(EXTRAS_START, 1)
    tail = rest.split(EXTRAS_END, 1)[1]
    return f"{head}{EXTRAS_START}\n{_extras_table()}\n{EXTRAS_END}{tail}"


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
    include = _INCLUDE.match(markdown)
    if include:
        return (ROOT / include["path"]).read_text(encoding="utf-8")
    table = extras_table_in(markdown)
    if table is not None and table != _extras_table():
        log.warning(
            "connection.md: the extras table differs from CONNECTION_EXTRAS; run python docs/.hooks/generated.py"
        )
    if page.file.src_uri == "operator.md":
        missing = [name for name in _operator_parameters() if f"`{name}`" not in markdown]
        if missing:
            log.warning("operator.md does not document JiMengGenerateOperator parameter(s): %s", ", ".join(missing))
    return markdown


if __name__ == "__main__":
    CONNECTION_PAGE.write_text(with_extras_table(CONNECTION_PAGE.read_text(encoding="utf-8")), encoding="utf-8")
