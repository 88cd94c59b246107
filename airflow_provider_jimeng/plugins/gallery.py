"""The "Images" tab of a task instance: a gallery of what a JiMeng task generated (Airflow 3.1 and later).

An :class:`~airflow.plugins_manager.AirflowPlugin` registered through the provider's metadata. It
brings two things to the API server:

* a FastAPI app mounted under :data:`URL_PREFIX`: ``gallery`` (an HTML page of the task instance's
  images, failures and usage) and ``image`` (one image's bytes, read server side and streamed: no
  bucket name, key or credential reaches the page);
* ``thumbnail``: the grid's small version of one image (:mod:`.thumbnails`), through the same lookup;
* ``sheet``: the stored thumbnails of a row of the grid (up to eight) in one SVG (:mod:`.sheets`),
  through the same lookup and checks for each;
* an external view on the task instance page, named "Images", that shows the gallery.

Every route requires what Airflow's own routes require to read what the page shows: ``GET`` on the
DAG's task instances and on its XComs (``requires_access_dag``, with the DAG's team), before
anything is read. The image route takes the task instance and a number, never a key. What may be
read is the deployment's decision (``[jimeng] gallery_storage``, :mod:`.gallery_access`), never
the task's: an image is served only if its URI lies under an allowed root, through the connection
named for that root, and every refusal is the same 404 as an unknown image.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, which name
# objects imported inside create_gallery_app (so that only the API server imports them).
import gzip
import hashlib
import logging
import re
from typing import TYPE_CHECKING, Annotated, Any

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_jimeng.links.jimeng import GALLERY_URL_PREFIX, GALLERY_URL_ROUTE
from airflow_provider_jimeng.plugins.priority import AIRFLOW_REQUESTS, AirflowFirst
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS

if TYPE_CHECKING:
    from fastapi import FastAPI

    from airflow_provider_jimeng.plugins.gallery_store import ObjectStream
    from airflow_provider_jimeng.storage.records import StoredImage

log = logging.getLogger(__name__)

#: Where the API server mounts the gallery app.
URL_PREFIX = GALLERY_URL_PREFIX
#: The external view's route in the UI (``.../plugin/jimeng-images``).
URL_ROUTE = GALLERY_URL_ROUTE
_INDEX = re.compile(r"^-?\d{1,6}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def gallery_href() -> str:
    """The external view's href: relative (no leading slash), so the UI's ``<base href>`` adds Airflow's base path."""
    placeholders = "dag_id={DAG_ID}&run_id={RUN_ID}&task_id={TASK_ID}&map_index={MAP_INDEX}"
    return f"{URL_PREFIX.lstrip('/')}/gallery?{placeholders}"


def _index(text: str | None) -> int | None:
    """A map index or image number as the request gave it; anything but a plain integer is ``None``."""
    return int(text) if text is not None and _INDEX.match(text) else None


def _team_name(dag_id: str, session: Any) -> str | None:
    """The DAG's team in multi-team mode (its storage roots are that team's own), else ``None``."""
    from airflow.configuration import conf

    if not conf.getboolean("core", "multi_team", fallback=False):
        return None
    from airflow.models.dag import DagModel

    return DagModel.get_team_name(dag_id, session=session)


def create_gallery_app() -> "FastAPI":
    """The gallery's FastAPI app (mounted by the API server under :data:`URL_PREFIX`)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.common.db.common import SessionDep
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from airflow_provider_jimeng.plugins.gallery_access import ConnectionMissing, allowed_roots, root_of
    from airflow_provider_jimeng.plugins.gallery_page import (
        CONTENT_SECURITY_POLICY,
        render_gallery,
        render_refusal,
    )
    from airflow_provider_jimeng.plugins.gallery_store import (
        find_missing,
        load_images,
        load_reviews,
        load_task_images,
        open_object,
        read_records,
    )
    from airflow_provider_jimeng.plugins.sheets import CONTENT_SECURITY_POLICY as SHEET_POLICY
    from airflow_provider_jimeng.plugins.sheets import SHEET_MAX, is_jpeg, render_sheet
    from airflow_provider_jimeng.plugins.thumbnails import Thumbnailer, ThumbnailSettings, TileAdmission
    from airflow_provider_jimeng.storage.s3 import image_content_type
    from airflow_provider_jimeng.storage.thumbnails import thumbnail_key

    app = FastAPI(
        title="JiMeng image gallery",
        description="The images a JiMeng task instance generated, read from the storage the deployment allows.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    # What Airflow requires to read what the page shows: the task instance and its XComs (per team:
    # requires_access_dag passes the DAG's team to the auth manager).
    can_read = [
        Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.TASK_INSTANCE)),
        Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.XCOM)),
    ]
    #: Every refusal (unknown image, URI outside the allowed roots, missing connection ...) is this one 404.
    not_found = HTTPException(status_code=404, detail="Not found")
    page_headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }
    thumbnailer = Thumbnailer(ThumbnailSettings.from_config())
    app.state.thumbnailer = thumbnailer
    app.add_middleware(TileAdmission, at_once=thumbnailer.settings.tiles_at_once)
    # Turn-taking and yielding to Airflow's own requests go together ([jimeng] gallery_tiles_at_once = 0: neither).
    AIRFLOW_REQUESTS.enabled = thumbnailer.settings.tiles_at_once > 0

    @app.exception_handler(StarletteHTTPException)
    async def readable_refusal(request: Request, error: StarletteHTTPException) -> Response:
        # The tab shows the page in an iframe: a refused user reads a sentence, not {"detail": ...}.
        if request.url.path.endswith("/gallery") and error.status_code in (401, 403):
            return HTMLResponse(render_refusal(error.status_code), status_code=error.status_code, headers=page_headers)
        return await http_exception_handler(request, error)

    @app.get("/gallery", response_class=HTMLResponse, dependencies=can_read)
    def gallery(
        session: SessionDep,
        dag_id: Annotated[str, Query(min_length=1)],
        run_id: Annotated[str, Query(min_length=1)],
        task_id: Annotated[str, Query(min_length=1)],
        map_index: Annotated[str | None, Query()] = None,
    ) -> HTMLResponse:
        # A task instance that is not mapped has no map index in the UI's URL: the placeholder stays
        # unreplaced, and every map index the task has is shown (just -1 for an unmapped task).
        roots = allowed_roots(_team_name(dag_id, session))
        tasks = load_task_images(
            session, dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=_index(map_index), roots=roots
        )
        for task in tasks:
            read_records(task)
            find_missing(task, thumbnails=thumbnailer.settings.sheets)
        load_reviews(session, dag_id=dag_id, run_id=run_id, tasks=tasks)
        page = render_gallery(
            dag_id,
            run_id,
            task_id,
            tasks,
            storage_configured=bool(roots),
            thumbnails=thumbnailer.settings.enabled,
            sheets=thumbnailer.settings.sheets,
        )
        return HTMLResponse(page, headers=page_headers)

    def find_images(
        session: Any, dag_id: str, task_id: str, run_id: str, map_index: str, first: str, count: str = "1"
    ) -> list[Any]:
        """Images ``first`` to ``first + count - 1`` and where each may be read: the one lookup of every route.

        Each readable one is ``(image, (uri, root), thumbnail)``, the thumbnail's location derived from
        the checked URI and checked under the roots too; a refused one is ``None``. Every refusal of
        the range as a whole (bad numbers, no roots, no such entries, none readable) is the one 404.
        """
        index, start, size = _index(map_index), _index(first), _index(count)
        if index is None or start is None or size is None:
            raise not_found
        roots = allowed_roots(_team_name(dag_id, session))
        if not roots:
            raise not_found
        found = load_images(
            session,
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            map_index=index,
            first=start,
            count=size,
            roots=roots,
        )
        if found is None or all(entry is None for entry in found):
            raise not_found
        # Where the worker may have stored its thumbnail: derived from the checked URI, read under the roots too.
        return [
            None if entry is None else (entry[0], entry[1], root_of(thumbnail_key(entry[1][0]), roots))
            for entry in found
        ]

    def find_image(session: Any, dag_id: str, task_id: str, run_id: str, map_index: str, n: str) -> Any:
        """The ``n``-th image, where it may be read and where its stored thumbnail may be."""
        return find_images(session, dag_id, task_id, run_id, map_index, n)[0]

    def open_found(allowed: Any, task_id: str) -> "ObjectStream":
        try:
            return open_object(*allowed)
        except (FileNotFoundError, ConnectionMissing):
            raise not_found from None
        except Exception as error:
            log.warning("JiMeng gallery: an image of %s not read (%s)", task_id, type(error).__name__)
            raise HTTPException(status_code=502, detail="The image could not be read from storage") from None

    @app.get("/image", dependencies=can_read)
    def image(
        request: Request,
        session: SessionDep,
        dag_id: Annotated[str, Query(min_length=1)],
        run_id: Annotated[str, Query(min_length=1)],
        task_id: Annotated[str, Query(min_length=1)],
        map_index: Annotated[str, Query()],
        n: Annotated[str, Query()],
    ) -> Response:
        stored, allowed, _ = find_image(session, dag_id, task_id, run_id, map_index, n)
        # Browsers keep the image but ask again each time: a revoked permission applies at once, and
        # an unchanged image costs a 304 (the permission is checked first, storage is not read).
        headers: dict[str, Any] = {"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}
        if stored.sha256 and _SHA256.match(stored.sha256):
            headers["ETag"] = f'"{stored.sha256}"'
            if request.headers.get("if-none-match") == headers["ETag"]:
                return Response(status_code=304, headers=headers)
        stream = open_found(allowed, task_id)
        if stream.size is not None:
            headers["Content-Length"] = str(stream.size)
        return StreamingResponse(
            stream.chunks, media_type=image_content_type(stream.first, "application/octet-stream"), headers=headers
        )

    # Async, unlike the routes above: its blocking parts run on the thumbnailer's own bounded threads,
    # so a grid of 64 tiles never holds the thread pool that Airflow's own (sync) API routes run on.
    @app.get("/thumbnail", dependencies=can_read)
    async def thumbnail(
        request: Request,
        session: SessionDep,
        dag_id: Annotated[str, Query(min_length=1)],
        run_id: Annotated[str, Query(min_length=1)],
        task_id: Annotated[str, Query(min_length=1)],
        map_index: Annotated[str, Query()],
        n: Annotated[str, Query()],
    ) -> Response:
        full_image = RedirectResponse(f"image?{request.url.query}", status_code=307)
        if not thumbnailer.settings.enabled:
            return full_image

        def lookup() -> tuple["StoredImage", "ObjectStream | None", bytes | None]:
            try:
                stored, allowed, thumb = find_image(session, dag_id, task_id, run_id, map_index, n)
            finally:
                session.close()  # its DB connection goes back to the pool before the image is read and decoded
            AIRFLOW_REQUESTS.wait_quiet()  # Airflow's own requests first (:mod:`.priority`)
            # The worker's thumbnail ([jimeng] store_thumbnails): ~16 KB read, nothing decoded here.
            data = thumbnailer.stored_thumbnail(thumb)
            return stored, None if data is not None else open_found(allowed, task_id), data

        stored, stream, data = await thumbnailer.run_io(lookup)
        # No-cache: the browser asks each time, so a revoked permission applies at once; an unchanged
        # thumbnail costs a 304 then, not its bytes.
        headers = {"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}
        if stream is None:
            if is_jpeg(data):  # a JPEG, or it is not served
                etag = f'"{hashlib.sha256(data).hexdigest()[:32]}"'
                if etag in request.headers.get("if-none-match", ""):
                    return Response(status_code=304, headers={**headers, "ETag": etag})
                return Response(data, media_type="image/jpeg", headers={**headers, "ETag": etag})
            return full_image
        validator = thumbnailer.validator(stored.uri, stream)
        if validator is not None and validator in request.headers.get("if-none-match", ""):
            stream.close()
            return Response(status_code=304, headers={**headers, "ETag": validator})
        made = await thumbnailer.thumbnail(stored.uri, stream)
        if made.data is None:
            return full_image
        if made.etag is not None:
            headers["ETag"] = made.etag
        return Response(made.data, media_type="image/jpeg", headers=headers)

    # A row of the grid in one request (:mod:`.sheets`): the stored thumbnails of images first to
    # first + count - 1, through the same lookup and checks as a tile, embedded in one SVG.
    @app.get("/sheet", dependencies=can_read)
    async def sheet(
        request: Request,
        session: SessionDep,
        dag_id: Annotated[str, Query(min_length=1)],
        run_id: Annotated[str, Query(min_length=1)],
        task_id: Annotated[str, Query(min_length=1)],
        map_index: Annotated[str, Query()],
        first: Annotated[str, Query()],
        count: Annotated[str, Query()],
    ) -> Response:
        size = _index(count)
        if not thumbnailer.settings.sheets or size is None or not 1 <= size <= SHEET_MAX:
            raise not_found

        validated = request.headers.get("if-none-match", "")
        gzipped = "gzip" in request.headers.get("accept-encoding", "")

        def make() -> tuple[bytes | None, str] | None:
            """The sheet (``None`` when the browser's copy is current) and its ETag; ``None``: nothing to show."""
            try:
                found = find_images(session, dag_id, task_id, run_id, map_index, first, count)
            finally:
                session.close()  # its DB connection goes back to the pool before storage is read
            # One after the other, on this one thread: ~8 small reads that wait on the network (the GIL
            # is free meanwhile) rather than 8 threads that compete with Airflow's own API for it.
            cells: list[bytes | None] = []
            for entry in found:
                AIRFLOW_REQUESTS.wait_quiet()  # Airflow's own requests first (:mod:`.priority`)
                cells.append(None if entry is None else thumbnailer.stored_thumbnail(entry[2]) or None)
            if all(cell is None for cell in cells):
                return None
            AIRFLOW_REQUESTS.wait_quiet()  # the encoding too: ~1 ms a cell, at Airflow's pace
            body = render_sheet(int(first), cells)
            # A strong validator per representation. Compressed here, on this thread, not by the API
            # server's GZip middleware (on its event loop for a sheet under 128 KB).
            etag = f'"{hashlib.sha256(body).hexdigest()[:32]}{"-gzip" if gzipped else ""}"'
            if etag in validated:
                return None, etag
            return (gzip.compress(body, compresslevel=1, mtime=0) if gzipped else body), etag

        made = await thumbnailer.run_io(make)
        if made is None:
            # Nothing read: the one 404, so that no answer tells an entry the roots allow (but whose
            # thumbnail is missing) from one they refuse. The page names no such sheet.
            raise not_found
        body, etag = made
        # As the tiles: the browser keeps the sheet and asks again on the next page load (a revoked
        # permission applies then); within one page every tile of the row is drawn from one fetch.
        headers = {
            "Cache-Control": "private, no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": SHEET_POLICY,
            "ETag": etag,
            "Vary": "Accept-Encoding",
        }
        if body is None:
            return Response(status_code=304, headers=headers)
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        return Response(body, media_type="image/svg+xml", headers=headers)

    return app


class LazyGalleryApp:
    """The gallery app as an ASGI callable that builds it on its first request.

    Airflow imports every entry-point plugin in each process that loads plugins, a task's own process
    included (for macros): building the FastAPI app there would import the API server's security
    modules, seconds of CPU per task for nothing. Only the API server ever calls this.
    """

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    @property
    def app(self) -> "FastAPI":
        if self._app is None:
            self._app = create_gallery_app()
        return self._app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class JiMengGalleryPlugin(AirflowPlugin):
    """Registers the gallery app and the "Images" view of task instances (nothing on Airflow 3.0)."""

    name = "jimeng_gallery"
    fastapi_apps = (
        [{"app": LazyGalleryApp(), "url_prefix": URL_PREFIX, "name": "JiMeng image gallery"}]
        if AIRFLOW_V_3_1_PLUS
        else []
    )
    # Counts Airflow's own requests in flight, so that the gallery's reads wait for them (:mod:`.priority`).
    fastapi_root_middlewares = (
        [{"middleware": AirflowFirst, "name": "JiMeng gallery: Airflow's own requests first"}]
        if AIRFLOW_V_3_1_PLUS
        else []
    )
    external_views = (
        [
            {
                "name": "Images",
                "href": gallery_href(),
                "destination": "task_instance",
                "url_route": URL_ROUTE,
            }
        ]
        if AIRFLOW_V_3_1_PLUS
        else []
    )
