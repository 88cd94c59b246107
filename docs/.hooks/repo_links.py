"""MkDocs hook: turn links from a page to repository files outside ``docs/`` into links to the repository.

Pages written for GitHub (or generated, like the benchmark report) link to ``../bench/results/...``
or ``../airflow_provider_jimeng/...``; the site has no such files, so they point at ``repo_url``.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_LINK = re.compile(r"\]\((?P<target>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    repo_url = str(config.get("repo_url") or "").rstrip("/")
    if not repo_url:
        return markdown
    page_dir = posixpath.dirname(f"docs/{page.file.src_uri}")

    def rewrite(match: re.Match[str]) -> str:
        path = posixpath.normpath(posixpath.join(page_dir, match["target"]))
        if path.startswith("../") or path == "docs" or path.startswith("docs/"):
            return match[0]  # outside the repository, or a page of the site: leave it to MkDocs
        kind = "tree" if (ROOT / path).is_dir() or match["target"].endswith("/") else "blob"
        return f"]({repo_url}/{kind}/main/{path}{match['anchor'] or ''})"

    return _LINK.sub(rewrite, markdown)
