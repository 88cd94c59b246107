"""The gallery's thumbnails: made once with real Pillow, served through the image route's own lookup."""

from __future__ import annotations

import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image

from airflow_provider_jimeng.plugins import thumbnails
from airflow_provider_jimeng.plugins.gallery_page import render_gallery
from airflow_provider_jimeng.plugins.gallery_store import TaskImages
from airflow_provider_jimeng.plugins.thumbnails import TILES_AT_ONCE, ThumbnailCache, Thumbnailer, TileAdmission
from airflow_provider_jimeng.storage import thumbnails as stored_thumbnails
from airflow_provider_jimeng.storage.records import StoredImage
from airflow_provider_jimeng.storage.thumbnails import THUMBNAIL_PX, NotThumbnailable, make_thumbnail, thumbnail_key
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS
from tests.dags import jimeng_test_generate
from tests.gallery.conftest import Gallery, StoredRun

pytestmark = pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="the gallery needs Airflow 3.1 or later")


@pytest.fixture(scope="module")
def run(store_run: Any) -> StoredRun:
    return store_run(jimeng_test_generate.set_continue_dag, prompts=["a red fox in the snow", "a blue whale"])


@pytest.fixture
def thumbnailer(gallery: Gallery) -> Thumbnailer:
    from starlette.routing import Mount

    # The app the API server mounted (tests/gallery/test_plugin.py reloads the plugin module, whose
    # class attribute then names a new, unmounted app).
    mounted = next(route for route in gallery.client.app.routes if isinstance(route, Mount) and route.path == "/jimeng")
    found: Thumbnailer = mounted.app.app.state.thumbnailer
    found.cache = ThumbnailCache(found.settings.cache_bytes)  # each test starts cold
    return found


def _ti(run: StoredRun, n: int | str, map_index: int = -1) -> dict[str, Any]:
    return {"dag_id": run.dag_id, "run_id": run.run_id, "task_id": "gen", "map_index": map_index, "n": n}


def _unfollowed(gallery: Gallery, path: str, **params: Any) -> Any:
    headers = {"Authorization": f"Bearer {gallery.tokens['reader']}"}
    return gallery.client.get(f"/jimeng/{path}", params=params, headers=headers, follow_redirects=False)


def _jpeg(width: int, height: int, mode: str = "RGB", kind: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.effect_noise((width, height), 64).convert(mode).save(out, kind)
    return out.getvalue()


# ---------------------------------------------------------------------------------------- the route
def test_the_grid_loads_thumbnails_and_links_the_full_images(gallery: Gallery, run: StoredRun) -> None:
    images = run.xcom("gen", "images")
    html = gallery.get("gallery", dag_id=run.dag_id, run_id=run.run_id, task_id="gen").text
    tiles = re.findall(r'<a href="(image\?[^"]+)" [^>]*><img src="(thumbnail\?[^"]+)"', html)

    assert len(tiles) == len(images) > 0
    for full, small in tiles:
        assert full.replace("image?", "thumbnail?") == small  # the same image, by the same parameters
    for number, image in enumerate(images):
        answer = gallery.get("thumbnail", **_ti(run, number))
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/jpeg"
        assert answer.headers["cache-control"] == "private, no-cache"
        with Image.open(io.BytesIO(answer.content)) as small:
            width, height = small.size
        full_width, full_height = (int(side) for side in image["size"].split("x"))
        assert max(width, height) == min(THUMBNAIL_PX, max(full_width, full_height))
        assert abs(width / height - full_width / full_height) < 0.02
        assert len(answer.content) < image["bytes"]


def test_a_thumbnail_is_made_once_and_revalidated_without_its_bytes(
    gallery: Gallery, run: StoredRun, thumbnailer: Thumbnailer
) -> None:
    first = gallery.get("thumbnail", **_ti(run, 0))
    again = gallery.get("thumbnail", **_ti(run, 0))
    headers = {"Authorization": f"Bearer {gallery.tokens['reader']}", "If-None-Match": first.headers["etag"]}
    unchanged = gallery.client.get("/jimeng/thumbnail", params=_ti(run, 0), headers=headers)

    assert first.content == again.content
    assert thumbnailer.cache.made == 1
    # No stored thumbnail: looked for once, then remembered (not one extra S3 request per tile request).
    image = run.xcom("gen", "images")[0]
    assert thumbnailer.none_stored(thumbnail_key(image["uri"]))
    assert len(thumbnailer.cache) == 1
    assert unchanged.status_code == 304
    assert unchanged.content == b""
    assert run.bucket not in first.headers["etag"]


def test_a_thumbnail_goes_through_the_image_lookup(gallery: Gallery, run: StoredRun, thumbnailer: Thumbnailer) -> None:
    assert gallery.get("thumbnail", **_ti(run, 0)).status_code == 200  # cached now
    refused = gallery.get("thumbnail", user="outsider", **_ti(run, 0))
    anonymous = gallery.get("thumbnail", user=None, **_ti(run, 0))

    assert refused.status_code == 403
    assert anonymous.status_code == 401
    for number in (99, -1, "../records.json", "1e0"):
        assert gallery.get("thumbnail", **_ti(run, number)).status_code == 404
    assert gallery.get("thumbnail", **{**_ti(run, 0), "task_id": "count"}).status_code == 404


def test_a_deleted_image_has_no_thumbnail_even_when_cached(
    gallery: Gallery, store_run: Any, thumbnailer: Thumbnailer
) -> None:
    own = store_run(jimeng_test_generate.set_continue_dag, prompts=["a green parrot"])
    [image, *_] = own.xcom("gen", "images")
    assert gallery.get("thumbnail", **_ti(own, 0)).status_code == 200
    own.s3.delete_object(Bucket=image["bucket"], Key=image["key"])

    assert gallery.get("thumbnail", **_ti(own, 0)).status_code == 404


def test_an_object_that_is_no_image_shows_whole(gallery: Gallery, store_run: Any, thumbnailer: Thumbnailer) -> None:
    own = store_run(jimeng_test_generate.set_continue_dag, prompts=["a grey heron"])
    [image, *_] = own.xcom("gen", "images")
    own.s3.put_object(Bucket=image["bucket"], Key=image["key"], Body=b"not an image at all")

    answer = _unfollowed(gallery, "thumbnail", **_ti(own, 0))

    assert answer.status_code == 307
    assert answer.headers["location"].startswith("image?")
    assert answer.headers["location"].endswith("&n=0")


def test_without_thumbnails_the_grid_loads_the_full_images_lazily(
    gallery: Gallery, run: StoredRun, thumbnailer: Thumbnailer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(thumbnailer, "settings", thumbnails.ThumbnailSettings(enabled=False, cache_bytes=0))
    html = gallery.get("gallery", dag_id=run.dag_id, run_id=run.run_id, task_id="gen").text
    redirected = _unfollowed(gallery, "thumbnail", **_ti(run, 0))

    assert "thumbnail?" not in html
    assert re.findall(r'<img src="image\?[^"]+" [^>]*loading="lazy"', html)
    assert redirected.status_code == 307
    assert redirected.headers["location"].startswith("image?")


def test_decoding_is_bounded_and_leaves_airflow_s_api_free(
    gallery: Gallery, run: StoredRun, thumbnailer: Thumbnailer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every decode slot is held and more thumbnail requests wait than the thread pool that Airflow's own
    # sync routes run on has threads (shrunk here from 40 to 6, to keep the test short): Airflow's API
    # still answers, and no more than DECODE_WORKERS thumbnails are decoded at once.
    from anyio import to_thread

    release, all_busy, lock = threading.Event(), threading.Event(), threading.Lock()
    running = {"now": 0, "most": 0}
    real = thumbnails.make_thumbnail

    def held(data: bytes, px: int = THUMBNAIL_PX) -> bytes:
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
            if running["now"] == thumbnails.DECODE_WORKERS:
                all_busy.set()
        release.wait(30)
        try:
            return real(data, px)
        finally:
            with lock:
                running["now"] -= 1

    def set_pool(tokens: int) -> int:
        limiter = to_thread.current_default_thread_limiter()
        before, limiter.total_tokens = limiter.total_tokens, tokens
        return int(before)

    monkeypatch.setattr(thumbnails, "make_thumbnail", held)
    images = len(run.xcom("gen", "images"))
    pool_threads = gallery.client.portal.call(set_pool, 6)
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = [pool.submit(gallery.get, "thumbnail", **_ti(run, i % images)) for i in range(12)]
            try:
                assert all_busy.wait(30)
                token = gallery.tokens["reader"]
                dags = gallery.client.get("/api/v2/dags", headers={"Authorization": f"Bearer {token}"})
                assert dags.status_code == 200
                assert running["now"] == thumbnails.DECODE_WORKERS
            finally:
                release.set()
            assert [answer.result(timeout=60).status_code for answer in answers] == [200] * 12
    finally:
        gallery.client.portal.call(set_pool, pool_threads)
    assert running["most"] == thumbnails.DECODE_WORKERS


# ------------------------------------------------------------------------------------ the thumbnail itself
def test_a_2048_pixel_jpeg_becomes_a_small_440_pixel_jpeg() -> None:
    source = _jpeg(2048, 1536)

    small = make_thumbnail(source)

    with Image.open(io.BytesIO(small)) as image:
        assert (image.format, image.size) == ("JPEG", (440, 330))
    assert len(small) < len(source) / 10


def test_a_transparent_png_gets_a_white_background_and_a_small_image_is_not_enlarged() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (300, 200), (255, 0, 0, 0)).save(out, "PNG")

    with Image.open(io.BytesIO(make_thumbnail(out.getvalue()))) as image:
        assert image.size == (300, 200)
        assert image.getpixel((10, 10)) == pytest.approx((255, 255, 255), abs=3)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_what_is_not_an_image_raises_not_thumbnailable(data: bytes) -> None:
    with pytest.raises(NotThumbnailable):
        make_thumbnail(data)


def test_an_image_with_too_many_pixels_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stored_thumbnails, "MAX_SOURCE_PIXELS", 1000 * 1000)

    with pytest.raises(NotThumbnailable, match="1001x1000"):
        make_thumbnail(_jpeg(1001, 1000, mode="L"))


def test_the_cache_keeps_the_most_recent_thumbnails_within_its_bytes() -> None:
    cache = ThumbnailCache(max_bytes=250)
    for name in "abc":
        cache.put((name, 1), name.encode() * 100)
    cache.get(("b", 1))
    cache.put(("d", 1), b"d" * 100)
    cache.put(("huge", 1), b"x" * 251)

    assert cache.get(("a", 1)) is None
    assert cache.get(("c", 1)) is None
    assert cache.get(("huge", 1)) is None
    assert cache.get(("b", 1)) == b"b" * 100
    assert cache.get(("d", 1)) == b"d" * 100
    assert cache.bytes == 200


def test_the_page_without_pillow_names_no_thumbnail() -> None:
    image = StoredImage(0, 0, "2048x2048", "r-1", "m", "b", "k/p.jpeg", "s3://b/k/p.jpeg", 10, None)
    task = TaskImages(map_index=-1, images=[image], storage=None, usage={})
    task.image = lambda number: image  # type: ignore[method-assign]
    task.readable = lambda number: (image.uri, None)  # type: ignore[method-assign,assignment,return-value]

    html = render_gallery("d", "r", "t", [task], thumbnails=False)

    assert '<img src="image?' in html
    assert "thumbnail" not in html


# ------------------------------------------------------------------------ thumbnails the worker stored
def test_a_thumbnail_the_worker_stored_is_served_without_reading_the_image(
    gallery: Gallery, store_run: Any, thumbnailer: Thumbnailer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__JIMENG__STORE_THUMBNAILS", "True")
    own = store_run(jimeng_test_generate.set_continue_dag, prompts=["a snow leopard"])
    image = own.xcom("gen", "images")[0]
    stored = own.s3.get_object(Bucket=own.bucket, Key=thumbnail_key(image["key"]))["Body"].read()

    answer = gallery.get("thumbnail", **_ti(own, 0))

    assert answer.status_code == 200
    assert answer.content == stored, "the worker's thumbnail, as stored"
    assert thumbnailer.cache.made == 0, "nothing was decoded on the API server"
    with Image.open(io.BytesIO(stored)) as small:
        assert max(small.size) == THUMBNAIL_PX
    headers = {"Authorization": f"Bearer {gallery.tokens['reader']}", "If-None-Match": answer.headers["etag"]}
    assert gallery.client.get("/jimeng/thumbnail", params=_ti(own, 0), headers=headers).status_code == 304
    assert gallery.get("thumbnail", user="outsider", **_ti(own, 0)).status_code == 403


def test_a_stored_thumbnail_that_is_no_jpeg_is_not_served(
    gallery: Gallery, store_run: Any, thumbnailer: Thumbnailer
) -> None:
    own = store_run(jimeng_test_generate.set_continue_dag, prompts=["a grey heron"])
    image = own.xcom("gen", "images")[0]
    own.s3.put_object(Bucket=own.bucket, Key=thumbnail_key(image["key"]), Body=b"<script>alert(1)</script>")

    answer = _unfollowed(gallery, "thumbnail", **_ti(own, 0))

    assert answer.status_code == 307, "the tile falls back to the full image"
    assert b"script" not in answer.content


def test_the_worker_stores_no_thumbnail_unless_asked_and_a_bad_image_still_stores(
    store_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = store_run(jimeng_test_generate.set_continue_dag, prompts=["a plain run"])
    image = plain.xcom("gen", "images")[0]
    keys = [item["Key"] for item in plain.s3.list_objects_v2(Bucket=plain.bucket)["Contents"]]
    assert thumbnail_key(image["key"]) not in keys, "off by default: one object per image"

    monkeypatch.setenv("AIRFLOW__JIMENG__STORE_THUMBNAILS", "True")
    monkeypatch.setattr(stored_thumbnails, "MAX_SOURCE_PIXELS", 1)  # every image is "too large" to thumbnail
    refused = store_run(jimeng_test_generate.set_continue_dag, prompts=["a run whose thumbnails fail"])
    kept = refused.xcom("gen", "images")[0]
    assert refused.s3.head_object(Bucket=refused.bucket, Key=kept["key"])["ContentLength"] == kept["bytes"]


def test_the_thumbnail_key_sits_next_to_the_image() -> None:
    assert thumbnail_key("jimeng/d/r/t/p0000_i00.jpeg") == "jimeng/d/r/t/_thumbnails/p0000_i00.jpeg"
    assert thumbnail_key("s3://b/jimeng/d/r/t/p0001_i02.png") == "s3://b/jimeng/d/r/t/_thumbnails/p0001_i02.jpeg"
    assert thumbnail_key("p.jpeg") == "_thumbnails/p.jpeg"


# ------------------------------------------------------------------------------------ tiles take turns
def _tile_traffic(
    paths: list[str],
    *,
    wait_s: float,
    release_after: int | None = None,
    at_once: int = TILES_AT_ONCE,
    sheet_s: float = 0.0,
) -> tuple[TileAdmission, int, list[float]]:
    """Send ``paths`` at once through :class:`TileAdmission` to an app that holds each request until told.

    Returns the middleware, the most requests the inner app held at once, and the pauses between one
    request's end and the next one's start. The inner app releases
    everything once ``release_after`` requests are inside it (default: as soon as each arrives, one by one);
    a sheet's request takes ``sheet_s``.
    """
    import anyio

    gaps: list[float] = []

    async def main() -> tuple[TileAdmission, int, list[float]]:
        inside = {"now": 0, "most": 0, "entered": 0}
        last_end: list[float] = []
        everyone_in = anyio.Event()

        async def inner(scope: Any, receive: Any, send: Any) -> None:
            if last_end:
                gaps.append(anyio.current_time() - last_end[-1])
            inside["now"] += 1
            inside["entered"] += 1
            inside["most"] = max(inside["most"], inside["now"])
            if release_after is not None:
                if inside["entered"] == release_after:
                    everyone_in.set()
                await everyone_in.wait()
            await anyio.lowlevel.checkpoint()
            if scope["path"].endswith("/sheet"):
                await anyio.sleep(sheet_s)
            inside["now"] -= 1
            last_end.append(anyio.current_time())

        admission = TileAdmission(inner, wait_s=wait_s, at_once=at_once)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                for path in paths:
                    group.start_soon(admission, {"type": "http", "path": path}, None, None)
        return admission, inside["most"], gaps

    return anyio.run(main)


def test_tile_requests_take_turns_with_a_pause_and_others_pass_untouched() -> None:
    admission, most, gaps = _tile_traffic(["/jimeng/thumbnail"] * 6, wait_s=30)
    assert most == TILES_AT_ONCE == 1
    assert admission.overtaken == 0
    assert len(gaps) == 5
    assert min(gaps) >= thumbnails.TILE_GAP_S, "Airflow's requests get the GIL between tiles"

    _, most, _ = _tile_traffic(["/jimeng/image", "/jimeng/gallery", "/jimeng/image"], wait_s=30, release_after=3)
    assert most == 3, "only tiles take turns: the page and the full images are not queued"


def test_a_tile_held_up_delays_the_others_by_the_wait_not_by_the_storage() -> None:
    # The first tile never finishes until every tile is inside: the others must go ahead once their
    # wait runs out (a storage read stuck for its timeout does not stall every gallery for minutes).
    admission, most, _ = _tile_traffic(["/jimeng/thumbnail"] * 4, wait_s=0.05, release_after=4)
    assert most == 4
    assert admission.overtaken == 3


def test_tiles_at_once_is_the_deployment_s_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__JIMENG__GALLERY_TILES_AT_ONCE", "0")
    settings = thumbnails.ThumbnailSettings.from_config()
    assert settings.tiles_at_once == 0
    _, most, _ = _tile_traffic(["/jimeng/thumbnail"] * 4, wait_s=30, release_after=4, at_once=settings.tiles_at_once)
    assert most == 4, "0: no limit"

    monkeypatch.setenv("AIRFLOW__JIMENG__GALLERY_TILES_AT_ONCE", "2")
    _, most, _ = _tile_traffic(
        ["/jimeng/thumbnail"] * 6, wait_s=30, at_once=thumbnails.ThumbnailSettings.from_config().tiles_at_once
    )
    assert most == 2


def test_the_gallery_app_lets_tiles_take_turns(gallery: Gallery) -> None:
    from starlette.routing import Mount

    mounted = next(route for route in gallery.client.app.routes if isinstance(route, Mount) and route.path == "/jimeng")
    assert any(middleware.cls is TileAdmission for middleware in mounted.app.app.user_middleware)
