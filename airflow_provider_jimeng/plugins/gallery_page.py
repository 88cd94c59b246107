"""The gallery's HTML: one server-rendered page, no script, no external asset, everything escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from airflow_provider_jimeng.plugins.gallery_store import Failure, TaskImages
from airflow_provider_jimeng.plugins.sheets import sheet_of

#: Prompts longer than this are shown clamped, the whole text one click away (``<details>``, no script).
PROMPT_PREVIEW_CHARS = 160

#: The page runs no script and loads nothing but its own images.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem;color:#1f2933;background:#fff}
h1{font-size:1.2rem;margin:0 0 .5rem}h2{font-size:1rem;margin:1.5rem 0 .5rem}
.meta{color:#52606d;font-size:.85rem}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:1rem}
figure{margin:0;border:1px solid #d9e2ec;border-radius:6px;overflow:hidden;background:#f5f7fa}
figure img{display:block;width:100%;height:220px;object-fit:contain;background:#e4e7eb}
figcaption{padding:.5rem;font-size:.8rem;line-height:1.35;word-break:break-word}
figcaption .prompt{font-weight:600;margin-bottom:.25rem}
figure.failed{border-color:#e12d39;background:#ffe3e3}
figure.failed .placeholder{height:220px;display:flex;align-items:center;justify-content:center;
font-weight:700;color:#a61b1b;padding:.5rem;text-align:center;overflow-wrap:anywhere}
figure.absent{border-style:dashed}
figure.absent .placeholder{height:220px;display:flex;align-items:center;justify-content:center;
color:#52606d;padding:.5rem;text-align:center;overflow-wrap:anywhere}
details.prompt summary{cursor:pointer}
.note{padding:.5rem;background:#fffbea;border:1px solid #f0b429;border-radius:4px}
figcaption .review{font-weight:600}figure[data-review=approved]{border:2px solid #2f8132}
figure[data-review=approved] .review{color:#2f8132}figure[data-review="not approved"]{opacity:.75}
@media (prefers-color-scheme:dark){body{background:#1f2933;color:#f5f7fa}
figure{background:#323f4b;border-color:#52606d}.meta{color:#9aa5b1}figure.failed{background:#5c1a1a}
figure.failed .placeholder{color:#ffbdbd}.note{background:#513c06;border-color:#8d6708}}
"""


def _usage_text(usage: Mapping[str, Any]) -> str:
    # Flat counters only: the usage XCom's ``this_try`` (one try's share of the sums) is not shown.
    return ", ".join(
        f"{key.replace('_', ' ')} {value}"
        for key, value in usage.items()
        if value not in (None, {}, []) and not isinstance(value, Mapping)
    )


def _image_url(dag_id: str, run_id: str, task_id: str, map_index: int, number: int, route: str = "image") -> str:
    query = urlencode({"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index, "n": number})
    return f"{route}?{query}"


def _sheet_url(dag_id: str, run_id: str, task_id: str, map_index: int, number: int, total: int) -> str:
    """The tile of image ``number`` drawn from its row's sheet: one URL for the whole row, a fragment per tile."""
    first, count = sheet_of(number, total)
    query = urlencode(
        {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": map_index, "first": first, "count": count}
    )
    return f"sheet?{query}#t{number}"


def _caption(lines: Sequence[tuple[str, str | None]]) -> str:
    parts = []
    for css, text in lines:
        if not text:
            continue
        if css == "prompt" and len(text) > PROMPT_PREVIEW_CHARS:
            preview = text[:PROMPT_PREVIEW_CHARS].rstrip() + "…"
            parts.append(
                f'<details class="prompt"><summary>{escape(preview)}</summary>'
                f'<div class="prompt">{escape(text)}</div></details>'
            )
        else:
            parts.append(f'<div class="{css}">{escape(text)}</div>')
    return "".join(parts)


def _absent_figure(kind: str, text: str, caption: str = "") -> str:
    """A tile for an image that is listed but not shown (unreadable entry, not allowed, deleted)."""
    return (
        f'<figure class="absent" data-absent="{kind}"><div class="placeholder">{escape(text)}</div>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


#: What each kind of absent image says.
ABSENT = {
    "unreadable": "Unreadable entry: the task's images XCom holds something that is not an image record.",
    "not-allowed": "Not shown: stored where this deployment does not allow the gallery to read.",
    "missing": "Deleted: the image is no longer in storage.",
}


def _failure_figure(failure: Failure, prompt: str | None) -> str:
    where = f"prompt {failure.prompt_index}" if failure.prompt_index is not None else "task"
    if failure.image_index is not None:
        where += f", image {failure.image_index}"
    caption = _caption([("prompt", prompt), ("meta", where), ("meta", failure.message)])
    code = failure.code or "Not produced"
    return (
        f'<figure class="failed" data-error-code="{escape(code)}"><div class="placeholder">{escape(code)}</div>'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _task_section(
    dag_id: str,
    run_id: str,
    task_id: str,
    task: TaskImages,
    *,
    mapped: bool,
    storage_configured: bool,
    thumbnails: bool = True,
    sheets: bool = False,
) -> str:
    parts = []
    if mapped:
        parts.append(f"<h2>Map index {task.map_index}</h2>")
    if task.usage:
        parts.append(f'<p class="meta">Usage: {escape(_usage_text(task.usage))}</p>')
    if task.storage is None:
        parts.append('<p class="note">This task instance did not store its images: nothing to show here.</p>')
    if not storage_configured and task.images:
        parts.append(
            '<p class="note">This deployment has not allowed the gallery to read any storage '
            "(<code>[jimeng] gallery_storage</code>): images are listed, not shown.</p>"
        )
    if task.records_note:
        parts.append(f'<p class="note">{escape(task.records_note)}</p>')
    if task.images_left_out:
        parts.append(
            f'<p class="note">{task.images_left_out} more image(s) are not listed '
            f"(the first {len(task.images)} are).</p>"
        )
    figures = []
    for number, image in enumerate(task.images):
        if image is None:
            figures.append(_absent_figure("unreadable", ABSENT["unreadable"], _caption([("meta", f"entry {number}")])))
            continue
        record = task.records.get(image.prompt_index)
        alt = f"prompt {image.prompt_index}, image {image.image_index}"
        verdicts = task.reviews.get(image.uri, [])
        caption = _caption(
            [
                *(("review", verdict.text) for verdict in verdicts),
                ("prompt", record.prompt if record else None),
                ("meta", f"{alt} · {image.size or 'size n/a'} · {image.model or 'model n/a'}"),
                ("meta", f"request id {image.request_id or 'n/a'}"),
                ("meta", f"usage: {_usage_text(record.usage)}" if record and record.usage else None),
            ]
        )
        if task.readable(number) is None:
            figures.append(_absent_figure("not-allowed", ABSENT["not-allowed"], caption))
            continue
        if number in task.missing:
            figures.append(_absent_figure("missing", ABSENT["missing"], caption))
            continue
        url = escape(_image_url(dag_id, run_id, task_id, task.map_index, number))
        # The tile loads the worker's stored thumbnail from its row's sheet, else a thumbnail of its own
        # (without Pillow: the full image, lazily); the link opens the full image.
        if sheets and number in task.thumbnails_stored:
            src = escape(_sheet_url(dag_id, run_id, task_id, task.map_index, number, len(task.images)))
        elif thumbnails:
            src = escape(_image_url(dag_id, run_id, task_id, task.map_index, number, "thumbnail"))
        else:
            src = url
        outcomes = [verdict.outcome for verdict in verdicts]
        shown = "approved" if "approved" in outcomes else (outcomes[0] if outcomes else None)
        reviewed = f' data-review="{escape(shown)}"' if shown else ""
        figures.append(
            f'<figure class="image"{reviewed}><a href="{url}" title="Open full size">'
            f'<img src="{src}" alt="{escape(alt)}" loading="lazy" decoding="async"></a>'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    for failure in task.failures:
        record = task.records.get(failure.prompt_index) if failure.prompt_index is not None else None
        figures.append(_failure_figure(failure, record.prompt if record else None))
    if figures:
        parts.append(f'<div class="grid">{"".join(figures)}</div>')
    elif task.storage is not None:
        parts.append('<p class="note">No images were stored by this task instance.</p>')
    return f'<section data-map-index="{task.map_index}">{"".join(parts)}</section>'


def _document(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def render_gallery(
    dag_id: str,
    run_id: str,
    task_id: str,
    tasks: Sequence[TaskImages],
    *,
    storage_configured: bool = True,
    thumbnails: bool = True,
    sheets: bool = False,
) -> str:
    """The gallery page of a task instance (or of every map index of a mapped task); tiles load thumbnails.

    With ``sheets``, a tile whose stored thumbnail was found loads from its row's sheet (:mod:`.sheets`).
    """
    title = f"JiMeng images · {task_id}"
    mapped = any(task.map_index >= 0 for task in tasks)
    if tasks:
        body = "".join(
            _task_section(
                dag_id,
                run_id,
                task_id,
                task,
                mapped=mapped,
                storage_configured=storage_configured,
                thumbnails=thumbnails,
                sheets=sheets,
            )
            for task in tasks
        )
    else:
        body = '<p class="note">This task instance has no JiMeng images (it has not run, or it stored nothing).</p>'
    return _document(title, f'<h1>{escape(title)}</h1><p class="meta">{escape(dag_id)} · {escape(run_id)}</p>{body}')


def render_refusal(status_code: int) -> str:
    """The page a user sees in the tab when Airflow refuses them (401: not signed in; 403: not allowed)."""
    if status_code == 401:
        text = "You are not signed in (or your session expired). Sign in to Airflow again to see this task's images."
    else:
        text = (
            "You are not allowed to see this task's images: that needs permission to read this DAG's task "
            "instances and their XComs. Ask an Airflow administrator if you need it."
        )
    return _document(
        "JiMeng images · not allowed",
        f'<h1>JiMeng images</h1><p class="note" data-refused="{status_code}">{escape(text)}</p>',
    )
