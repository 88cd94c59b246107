"""Thumbnail sheets: a row of the grid's stored thumbnails in one SVG, through the tiles' own lookup and checks."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest

from airflow_provider_jimeng.plugins import priority, thumbnails
from airflow_provider_jimeng.plugins.priority import AIRFLOW_REQUESTS
from airflow_provider_jimeng.plugins.sheets import SHEET_MAX, render_sheet, sheet_of
from airflow_provider_jimeng.plugins.thumbnails import Thumbnailer
from airflow_provider_jimeng.storage.thumbnails import thumbnail_key
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS
from tests.dags import jimeng_test_generate
from tests.gallery.conftest import Gallery, StoredRun
from tests.gallery.test_priority import LONG_S, waiting
from tests.gallery.test_thumbnails import _tile_traffic
from tests.gallery.test_trust import FORGED, JPEG, _entry, forge

pytestmark = pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="the gallery needs Airflow 3.1 or later")

SVG = "{http://www.w3.org/2000/svg}"
#: Three prompts of a set of three: nine images, so two sheets (eight, then one).
PROMPTS = ["a red fox in the snow", "a blue whale", "a green parrot"]


@pytest.fixture(scope="module")
def run(store_run: Any) -> Iterator[StoredRun]:
    """A run whose worker stored a thumbnail next to each of its nine images (``[jimeng] store_thumbnails``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__JIMENG__STORE_THUMBNAILS", "True")
        yield store_run(jimeng_test_generate.set_continue_dag, prompts=PROMPTS)


@pytest.fixture
def thumbnailer(gallery: Gallery) -> Thumbnailer:
    from starlette.routing import Mount

    mounted = next(route for route in gallery.client.app.routes if isinstance(route, Mount) and route.path == "/jimeng")
    found: Thumbnailer = mounted.app.app.state.thumbnailer
    assert found.settings.sheets, "on for these tests ([jimeng] gallery_sheets, see conftest)"
    found._none_stored.clear()  # each test asks storage afresh
    return found


def _sheet(run: StoredRun, first: int | str, count: int | str, task_id: str = "gen") -> dict[str, Any]:
    ti = {"dag_id": run.dag_id, "run_id": run.run_id, "task_id": task_id, "map_index": -1}
    return {**ti, "first": first, "count": count}


def _stored(run: StoredRun, image: dict[str, Any]) -> bytes:
    return bytes(run.s3.get_object(Bucket=run.bucket, Key=thumbnail_key(image["key"]))["Body"].read())


def _cells(body: bytes) -> tuple[dict[str, str], list[bytes | None]]:
    """A sheet's views (id: viewBox) and its cells in order: the embedded JPEG, or ``None`` for a placeholder."""
    root = ET.fromstring(body)
    assert root.tag == f"{SVG}svg"
    views = {view.get("id", ""): view.get("viewBox", "") for view in root.iter(f"{SVG}view")}
    cells: list[bytes | None] = []
    for element in root:
        if element.tag == f"{SVG}image":
            href = element.get("href", "")
            assert href.startswith("data:image/jpeg;base64,")
            cells.append(base64.b64decode(href.removeprefix("data:image/jpeg;base64,"), validate=True))
        elif element.tag == f"{SVG}g":
            assert element.get("data-empty") == "1"
            cells.append(None)
    return views, cells


# ---------------------------------------------------------------------------------------------- the route
def test_a_sheet_holds_a_row_of_stored_thumbnails_as_they_were_stored(
    gallery: Gallery, run: StoredRun, thumbnailer: Thumbnailer
) -> None:
    images = run.xcom("gen", "images")
    assert len(images) == 9

    answer = gallery.get("sheet", **_sheet(run, 0, 8))

    assert answer.status_code == 200
    assert answer.headers["content-type"] == "image/svg+xml"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-security-policy"].startswith("default-src 'none'; img-src data:")
    assert answer.headers["cache-control"] == "private, no-cache"
    # Compressed on the route's own thread (the client accepts gzip), with a validator of its own.
    assert answer.headers["content-encoding"] == "gzip"
    assert answer.headers["etag"] == f'"{hashlib.sha256(answer.content).hexdigest()[:32]}-gzip"'
    plain = gallery.client.get(
        "/jimeng/sheet",
        params=_sheet(run, 0, 8),
        headers={"Authorization": f"Bearer {gallery.tokens['reader']}", "Accept-Encoding": "identity"},
    )
    assert "content-encoding" not in plain.headers
    assert plain.content == answer.content
    assert plain.headers["etag"] == f'"{hashlib.sha256(plain.content).hexdigest()[:32]}"'
    views, cells = _cells(answer.content)
    assert cells == [_stored(run, image) for image in images[:8]], "the worker's bytes, neither decoded nor re-encoded"
    assert list(views) == [f"t{number}" for number in range(8)]
    assert thumbnailer.cache.made == 0, "nothing was decoded on the API server"
    # The last row: one image, its view named by its own number.
    views, cells = _cells(gallery.get("sheet", **_sheet(run, 8, 1)).content)
    assert (list(views), cells) == (["t8"], [_stored(run, images[8])])


def test_a_sheet_is_revalidated_so_a_revoked_permission_applies(gallery: Gallery, run: StoredRun) -> None:
    first = gallery.get("sheet", **_sheet(run, 0, 8))
    for user, status in (("reader", 304), ("outsider", 403), ("noxcom", 403)):
        headers = {"Authorization": f"Bearer {gallery.tokens[user]}", "If-None-Match": first.headers["etag"]}
        again = gallery.client.get("/jimeng/sheet", params=_sheet(run, 0, 8), headers=headers)
        assert again.status_code == status, user
        assert b"data:image" not in again.content
    assert gallery.get("sheet", user=None, **_sheet(run, 0, 8)).status_code == 401


@pytest.mark.parametrize(
    ("first", "count"),
    [(0, 9), (0, 0), (8, 2), (9, 1), (-1, 2), ("0x1", 1), (0, "1e0"), ("", 1), (0, -8), (10_000, 1), (0, 10**6)],
)
def test_bad_numbers_are_the_404_of_an_unknown_image(gallery: Gallery, run: StoredRun, first: Any, count: Any) -> None:
    unknown = gallery.get("image", **{**_sheet(run, 0, 0), "n": 999_999})
    answer = gallery.get("sheet", **_sheet(run, first, count))
    assert (answer.status_code, answer.content) == (404, unknown.content)


def test_a_missing_or_forged_thumbnail_leaves_its_cell_empty(
    gallery: Gallery, run: StoredRun, thumbnailer: Thumbnailer
) -> None:
    # Image 0 has a stored "thumbnail" that is not a JPEG, image 1 has none: neither is embedded.
    run.s3.put_object(Bucket=run.bucket, Key="sheets/_thumbnails/0.jpeg", Body=b"<svg onload='alert(1)'/>")
    run.s3.put_object(Bucket=run.bucket, Key="sheets/_thumbnails/2.jpeg", Body=JPEG)
    huge = JPEG + b"\x00" * thumbnails.MAX_STORED_THUMBNAIL_BYTES
    run.s3.put_object(Bucket=run.bucket, Key="sheets/_thumbnails/3.jpeg", Body=huge)
    forge(run, images=[_entry(f"s3://{run.bucket}/sheets/{number}.jpeg", number) for number in range(4)])

    answer = gallery.get("sheet", **_sheet(run, 0, 4, task_id=FORGED))

    assert answer.status_code == 200
    views, cells = _cells(answer.content)
    assert cells == [None, None, JPEG, None], "a JPEG is embedded; what is no JPEG, missing or too big is not"
    assert list(views) == ["t0", "t1", "t2", "t3"]
    assert b"alert" not in answer.content
    assert thumbnailer.none_stored(f"s3://{run.bucket}/sheets/_thumbnails/1.jpeg"), "a miss is asked once"


def test_nothing_a_task_wrote_goes_into_a_sheet(gallery: Gallery, run: StoredRun) -> None:
    # Keys, prompts and ids full of markup: the SVG is made of numbers and base64 only.
    hostile = '"><script>alert(1)</script><image href="javascript:alert(2)'
    entries = []
    for number in range(3):
        key = f"xss/{hostile}{number}.jpeg"
        run.s3.put_object(Bucket=run.bucket, Key=thumbnail_key(key), Body=JPEG)
        entry = _entry(f"s3://{run.bucket}/{key}", number)
        entry.update(request_id=hostile, model=hostile, size=hostile)
        entries.append(entry)
    forge(run, images=entries)

    answer = gallery.get("sheet", **_sheet(run, 0, 3, task_id=FORGED))

    assert answer.status_code == 200
    _, cells = _cells(answer.content)
    assert cells == [JPEG] * 3
    text = answer.content.decode("ascii")
    assert "script" not in text
    assert "javascript" not in text
    assert "xss" not in text
    assert run.bucket not in text
    assert set(re.findall(r"<(\w+)", text)) == {"svg", "view", "image"}
    assert set(re.findall(r" ([\w-]+)=", text)) <= {
        "xmlns",
        "width",
        "height",
        "viewBox",
        "preserveAspectRatio",
        "id",
        "x",
        "y",
        "href",
    }


# ------------------------------------------------------------------------------------------------ the page
def _tile_sources(html: str) -> list[str]:
    return [src.replace("&amp;", "&") for src in re.findall(r'<img src="([^"]+)"', html)]


def test_the_page_draws_stored_thumbnails_from_one_sheet_per_row(
    gallery: Gallery, run: StoredRun, thumbnailer: Thumbnailer
) -> None:
    html = gallery.get("gallery", dag_id=run.dag_id, run_id=run.run_id, task_id="gen").text
    sources = _tile_sources(html)
    links = [link.replace("&amp;", "&") for link in re.findall(r'<a href="(image\?[^"]+)"', html)]

    assert len(sources) == len(links) == 9
    query = urlencode({"dag_id": run.dag_id, "run_id": run.run_id, "task_id": "gen", "map_index": -1})
    for number, (src, link) in enumerate(zip(sources, links, strict=True)):
        first, count = sheet_of(number, 9)
        assert src == f"sheet?{query}&first={first}&count={count}#t{number}"
        assert link == f"image?{query}&n={number}", "the tile still opens the full image"
    assert len({src.split("#")[0] for src in sources}) == 2, "nine tiles, two sheets"
    assert html.count('loading="lazy"') == 9
    # The URL the page names is the route's: same parameters, a view per tile.
    path, _, query = sources[3].split("#")[0].partition("?")
    views, _ = _cells(gallery.get(path, **dict(parse_qsl(query))).content)
    assert "t3" in views


def test_tiles_without_a_stored_thumbnail_load_their_own(
    gallery: Gallery, run: StoredRun, thumbnailer: Thumbnailer, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = run.xcom("gen", "images")
    thumb = thumbnail_key(images[2]["key"])
    kept = _stored(run, images[2])
    run.s3.delete_object(Bucket=run.bucket, Key=thumb)
    try:
        html = gallery.get("gallery", dag_id=run.dag_id, run_id=run.run_id, task_id="gen").text
        sources = _tile_sources(html)
        assert sources[2].startswith("thumbnail?")
        assert sources[2].endswith("&n=2")
        assert all(src.startswith("sheet?") for number, src in enumerate(sources) if number != 2)
        # Deleted after the page was made: its cell in the sheet is the placeholder.
        _, cells = _cells(gallery.get("sheet", **_sheet(run, 0, 8)).content)
        assert cells[2] is None
        assert all(cells[number] is not None for number in range(8) if number != 2)
    finally:
        run.s3.put_object(Bucket=run.bucket, Key=thumb, Body=kept)

    # Sheets off ([jimeng] gallery_sheets = False): every tile loads its own thumbnail, and no sheet is served.
    monkeypatch.setattr(
        thumbnailer, "settings", thumbnails.ThumbnailSettings(enabled=True, cache_bytes=0, sheets=False)
    )
    html = gallery.get("gallery", dag_id=run.dag_id, run_id=run.run_id, task_id="gen").text
    assert all(src.startswith("thumbnail?") for src in _tile_sources(html))
    assert "sheet?" not in html
    assert gallery.get("sheet", **_sheet(run, 0, 8)).status_code == 404


def test_sheets_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__JIMENG__GALLERY_SHEETS", raising=False)
    assert not thumbnails.ThumbnailSettings.from_config().sheets, "off by default: one request per tile"
    monkeypatch.setenv("AIRFLOW__JIMENG__GALLERY_SHEETS", "True")
    assert thumbnails.ThumbnailSettings.from_config().sheets
    monkeypatch.setenv("AIRFLOW__JIMENG__GALLERY_SHEETS", "False")
    assert not thumbnails.ThumbnailSettings.from_config().sheets
    monkeypatch.setenv("AIRFLOW__JIMENG__GALLERY_SHEETS", "True")
    monkeypatch.setenv("AIRFLOW__JIMENG__GALLERY_THUMBNAILS", "False")
    assert not thumbnails.ThumbnailSettings.from_config().sheets, "no thumbnails at all: full images"


# ----------------------------------------------------------------------------------------------- the parts
def test_sheets_cover_rows_of_at_most_eight() -> None:
    assert [sheet_of(number, 19) for number in (0, 7, 8, 15, 16, 18)] == [
        (0, 8),
        (0, 8),
        (8, 8),
        (8, 8),
        (16, 3),
        (16, 3),
    ]
    assert SHEET_MAX == 8


def test_a_sheet_views_each_cell_alone() -> None:
    views, cells = _cells(render_sheet(16, [JPEG, None, JPEG]))
    assert cells == [JPEG, None, JPEG]
    assert views == {"t16": "0 0 440 440", "t17": "456 0 440 440", "t18": "912 0 440 440"}


def test_sheet_requests_take_turns_as_tiles_do() -> None:
    admission, most, gaps = _tile_traffic(["/jimeng/sheet", "/jimeng/thumbnail"] * 3, wait_s=30)
    assert most == 1
    assert admission.overtaken == 0
    assert min(gaps) >= thumbnails.TILE_GAP_S


def test_a_sheet_leaves_the_process_to_airflow_twice_as_long_as_it_took() -> None:
    # Eight tiles' work in one turn: the next turn starts no sooner than twice that turn's time after it.
    _, _, gaps = _tile_traffic(["/jimeng/sheet", "/jimeng/thumbnail", "/jimeng/sheet"], wait_s=30, sheet_s=0.1)
    after_sheet, after_tile = gaps
    assert after_sheet >= thumbnails.SHEET_GAP_FACTOR * 0.1
    assert after_tile >= thumbnails.TILE_GAP_S


# ---------------------------------------------------------------------------------------------- in Chromium
#: Every tile made eager; resolves with each tile's natural width and the colour at its centre.
TILES_DRAWN = """async () => {
    const tiles = [...document.querySelectorAll("figure.image img")];
    tiles.forEach((img) => { img.loading = "eager"; });
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 440;
    const context = canvas.getContext("2d", {willReadFrequently: true});
    const drawn = [];
    for (const img of tiles) {
        const width = await img.decode().then(() => img.naturalWidth, () => 0);
        context.clearRect(0, 0, 440, 440);
        context.drawImage(img, 0, 0, 440, 440);
        drawn.push([width, [...context.getImageData(220, 220, 1, 1).data].slice(0, 3)]);
    }
    return drawn;
}"""


@pytest.fixture
def served(gallery: Gallery) -> Iterator[str]:
    """Airflow's API server app (a new one, as the test's) on a loopback port, for the browser."""
    import threading

    import uvicorn
    from airflow.api_fastapi.app import create_app

    from tests.e2e.stack import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app("core"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):
            if server.started:
                break
            thread.join(0.05)
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _colour(number: int) -> tuple[int, int, int]:
    return (number * 4 % 256, 255 - number * 4 % 256, (number * 37) % 256)


@pytest.mark.e2e
@pytest.mark.skipif(os.environ.get("JIMENG_E2E") != "1", reason="in headless Chromium; opt in with JIMENG_E2E=1")
def test_chromium_draws_64_tiles_from_8_sheets(gallery: Gallery, run: StoredRun, served: str) -> None:
    from PIL import Image

    from tests.e2e.stack import CHROMIUM, CHROMIUM_ARGS

    sync_api = pytest.importorskip("playwright.sync_api", reason="install the e2e extra: pip install -e '.[e2e]'")
    # 64 images, each with a stored thumbnail of its own colour (what a worker with store_thumbnails writes).
    entries = []
    for number in range(64):
        out = io.BytesIO()
        Image.new("RGB", (440, 330), _colour(number)).save(out, "JPEG", quality=95)
        key = f"grid/p{number:04d}_i00.jpeg"
        run.s3.put_object(Bucket=run.bucket, Key=key, Body=out.getvalue())
        run.s3.put_object(Bucket=run.bucket, Key=thumbnail_key(key), Body=out.getvalue())
        entries.append(_entry(f"s3://{run.bucket}/{key}", number))
    forge(run, images=entries)
    url = f"{served}/jimeng/gallery?{urlencode({'dag_id': run.dag_id, 'run_id': run.run_id, 'task_id': FORGED})}"

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(
                viewport={"width": 1280, "height": 1000},
                extra_http_headers={"Authorization": f"Bearer {gallery.tokens['reader']}"},
            )
            page = context.new_page()
            answers: list[tuple[str, int]] = []
            page.on("response", lambda response: answers.append((response.url, response.status)))
            for load in ("first", "again"):
                answers.clear()
                page.goto(url, wait_until="domcontentloaded")
                drawn = page.evaluate(TILES_DRAWN)
                tiles = [(path, status) for path, status in answers if "/jimeng/" in path and "/gallery?" not in path]

                assert [width for width, _ in drawn] == [440] * 64, load
                for number, (_, colour) in enumerate(drawn):
                    assert colour == pytest.approx(_colour(number), abs=12), f"tile {number} shows its own image"
                assert all("/jimeng/sheet?" in path for path, _ in tiles), tiles
                # One request per sheet (a second page load revalidates each: 304), not one per tile.
                assert len(tiles) == 8, (load, tiles)
                assert {status for _, status in tiles} == ({200} if load == "first" else {304})
            context.close()
        finally:
            browser.close()


# --------------------------------------------------------------------------- Airflow's requests first
def test_a_sheet_waits_for_airflow_s_request_then_is_served(
    gallery: Gallery, run: StoredRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(priority, "MAX_YIELD_S", LONG_S)
    assert AIRFLOW_REQUESTS.enabled
    outwaited = AIRFLOW_REQUESTS.outwaited
    token = AIRFLOW_REQUESTS.begin()  # an Airflow request being served
    answers: list[Any] = []
    thread, done = waiting(lambda: answers.append(gallery.get("sheet", **_sheet(run, 0, 8))))
    try:
        assert not done.wait(0.3), "the sheet waits while Airflow's request is served"
    finally:
        started = time.monotonic()
        AIRFLOW_REQUESTS.end(token)
    assert done.wait(LONG_S)
    thread.join()
    assert answers[0].status_code == 200
    assert time.monotonic() - started < LONG_S / 2
    assert AIRFLOW_REQUESTS.outwaited == outwaited, "it waited for the request, not for its bound"
