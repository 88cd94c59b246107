"""Thumbnail sheets: one SVG per row of the gallery's grid, holding up to :data:`SHEET_MAX` stored thumbnails.

Every tile request costs the API server the same fixed work (two permission checks, an XCom query,
the middleware, a response) whatever its size: with thumbnails the worker stored (~16 KB each), that
fixed cost is most of it, and 64 of them slowed Airflow's own API (P8). A sheet pays it once for a
row of up to eight tiles: the page shows each tile with ``<img src="sheet?...#t<n>">``, and the
fragment names the sheet's ``<view>`` of image ``n`` (an SVG view fragment). The browser fetches the
sheet once per page and draws each tile from it.

The document is made by the server from numbers and base64 alone: each stored thumbnail is checked
to be a JPEG (its first bytes, its size bound), never decoded or re-encoded, and embedded as a
``data:image/jpeg`` URI. Nothing a task wrote (a prompt, a key, a URI) goes into it. A cell whose
thumbnail could not be read (none stored, deleted, not a JPEG, refused) shows a fixed "No thumbnail"
placeholder; the tile still links to the full image.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import TypeGuard

from airflow_provider_jimeng.storage.thumbnails import THUMBNAIL_PX

#: Tiles per sheet: one row of the grid at most (a 1920-pixel-wide window shows eight 220-pixel tiles).
SHEET_MAX = 8
#: One cell per thumbnail (a thumbnail's longest side is at most this), and the gap between cells:
#: nothing of a neighbour shows at a view's edge when the browser rounds the scaled view.
CELL_PX = THUMBNAIL_PX
GAP_PX = 16
#: An SVG image runs no script in an ``<img>``; opened on its own, it may load nothing but its data URIs.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
#: What a stored thumbnail starts with (a JPEG's SOI marker and the first marker's FF).
JPEG_MAGIC = b"\xff\xd8\xff"


def sheet_of(number: int, total: int) -> tuple[int, int]:
    """The sheet that holds image ``number`` of ``total``: its first image number and its size."""
    first = number - number % SHEET_MAX
    return first, min(SHEET_MAX, total - first)


def is_jpeg(data: bytes | None) -> TypeGuard[bytes]:
    """Whether ``data`` starts as a JPEG does (all that is checked of a stored thumbnail: it is never decoded)."""
    return data is not None and data.startswith(JPEG_MAGIC)


def render_sheet(first: int, cells: Sequence[bytes | None]) -> bytes:
    """The SVG of images ``first`` to ``first + len(cells) - 1``: each a JPEG (embedded) or ``None`` (placeholder)."""
    stride = CELL_PX + GAP_PX
    width = len(cells) * stride - GAP_PX
    parts = [
        # width/height: a view's 1:1 box; the <img> then has a 440x440 natural size, as a thumbnail has.
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{CELL_PX}" height="{CELL_PX}" '
        f'viewBox="0 0 {width} {CELL_PX}" preserveAspectRatio="xMidYMid meet">'
    ]
    for offset, data in enumerate(cells):
        x = offset * stride
        parts.append(f'<view id="t{first + offset}" viewBox="{x} 0 {CELL_PX} {CELL_PX}"/>')
        if is_jpeg(data):
            encoded = base64.b64encode(data).decode("ascii")
            parts.append(
                f'<image x="{x}" y="0" width="{CELL_PX}" height="{CELL_PX}" '
                f'preserveAspectRatio="xMidYMid meet" href="data:image/jpeg;base64,{encoded}"/>'
            )
        else:
            middle = x + CELL_PX // 2
            parts.append(
                f'<g data-empty="1"><rect x="{x}" y="0" width="{CELL_PX}" height="{CELL_PX}" fill="#e4e7eb"/>'
                f'<text x="{middle}" y="{CELL_PX // 2}" text-anchor="middle" dominant-baseline="middle" '
                'font-family="sans-serif" font-size="28" fill="#52606d">No thumbnail</text></g>'
            )
    parts.append("</svg>")
    return "".join(parts).encode("ascii")
