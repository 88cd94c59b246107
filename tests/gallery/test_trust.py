"""What the gallery may read is the deployment's decision, never the task's (issue 19, section 1).

Each test writes what an attacker can write (a task's own XComs, through task code, the metadata
DB or the REST API with a USER role) straight into the metadata DB of a real run, and asks
Airflow's real API server app as a permitted viewer: nothing outside ``[jimeng] gallery_storage``
is read, and every refusal is the same 404 as an unknown image.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.plugins import gallery_access
from airflow_provider_jimeng.plugins.gallery_access import normalise, parse_roots
from airflow_provider_jimeng.storage.thumbnails import thumbnail_key
from airflow_provider_jimeng.testing import AWS_REGION, S3Server
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS, AIRFLOW_V_3_2_PLUS
from tests.dags import jimeng_test_generate
from tests.gallery.conftest import Gallery, StoredRun
from tests.gallery.roots import ALLOWED_ROOTS, allow

pytestmark = pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="the gallery needs Airflow 3.1 or later")

SECRET = b"api-server-secret-7f3a9c"
#: The plain task of the run whose XComs the tests forge (it pushes no images of its own).
FORGED = "count"
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64


@pytest.fixture(scope="module")
def run(store_run: Any) -> StoredRun:
    return store_run(jimeng_test_generate.set_continue_dag, prompts=["a red fox in the snow"])


def _entry(uri: str, number: int = 0) -> dict[str, Any]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")  # consistent, as the operator writes them
    return {
        "prompt_index": 0,
        "image_index": number,
        "size": "1024x1024",
        "request_id": f"forged-{number}",
        "model": "m",
        "uri": uri,
        "bucket": bucket,
        "key": key,
        "bytes": 1,
        "sha256": None,
    }


def _clear(run: StoredRun, task_id: str = FORGED) -> None:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as session:
        session.execute(
            delete(XComModel).where(
                XComModel.dag_id == run.dag_id,
                XComModel.run_id == run.run_id,
                XComModel.task_id == task_id,
                XComModel.key.in_(["images", "storage"]),
            )
        )


def forge(
    run: StoredRun,
    *,
    images: list[Any],
    records: str | None = None,
    conn_id: str | None = None,
    prefix: str | None = None,
) -> None:
    """Write the ``images`` and ``storage`` XComs of the run's plain task, as its code could."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    _clear(run)
    with create_session() as session:
        ids = {"dag_id": run.dag_id, "run_id": run.run_id, "task_id": FORGED, "map_index": -1, "session": session}
        XComModel.set("images", images, **ids)
        prefix = prefix or (records or "s3://x/").rsplit("/", 1)[0] + "/"
        storage = {"prefix": prefix, "records": records, "conn_id": conn_id}
        XComModel.set("storage", storage, **ids)


def _ti(run: StoredRun, **extra: Any) -> dict[str, Any]:
    return {"dag_id": run.dag_id, "run_id": run.run_id, "task_id": FORGED, **extra}


def served(gallery: Gallery, run: StoredRun, number: int, user: str = "reader", task_id: str = FORGED) -> list[Any]:
    """What each route that reads an image answers for the ``number``-th one: the image, its tile, its sheet."""
    ti = {**_ti(run, map_index=-1), "task_id": task_id}
    return [
        gallery.get("image", user=user, **ti, n=number),
        gallery.get("thumbnail", user=user, **ti, n=number),
        gallery.get("sheet", user=user, **ti, first=number, count=1),
    ]


def assert_nothing_served(gallery: Gallery, run: StoredRun, count: int = 1) -> str:
    """Every forged image is the same 404 as an unknown one; the page shows none of them. Returns the page."""
    unknown = gallery.get("image", **_ti(run, map_index=-1), n=999_999)
    assert unknown.status_code == 404
    for number in range(count):
        for answer in served(gallery, run, number):
            assert (answer.status_code, answer.content) == (404, unknown.content)
            assert SECRET not in answer.content
    # A whole row's sheet of refused entries is the same 404.
    answer = gallery.get("sheet", **_ti(run, map_index=-1), first=0, count=min(count, 8))
    assert (answer.status_code, answer.content) == (404, unknown.content)
    page = gallery.get("gallery", **_ti(run))
    assert page.status_code == 200
    assert SECRET.decode() not in page.text
    assert "<img" not in page.text
    return page.text


# ------------------------------------------------------------------------- what a task writes is not authority
@pytest.mark.parametrize("where", ["secret", "proc", "cfg"])
def test_a_forged_file_uri_reads_no_file_of_the_api_server(
    gallery: Gallery, run: StoredRun, tmp_path: Path, where: str
) -> None:
    secret = tmp_path / "simple_auth_manager_passwords.json.generated"
    secret.write_bytes(SECRET)
    path = {
        "secret": str(secret),
        "proc": "/proc/self/cmdline",
        "cfg": f"{os.environ.get('AIRFLOW_HOME', '/tmp')}/airflow.cfg",
    }[where]
    forge(run, images=[_entry(f"file://{path}")], records=f"file://{secret}")

    page = assert_nothing_served(gallery, run)
    assert "not where this deployment allows" in page


def test_another_bucket_with_a_connection_of_the_tasks_choosing_is_not_read(gallery: Gallery, run: StoredRun) -> None:
    run.s3.create_bucket(Bucket="another-bucket-gallery")
    run.s3.put_object(Bucket="another-bucket-gallery", Key="secret.jpeg", Body=JPEG + SECRET)
    run.s3.put_object(Bucket="another-bucket-gallery", Key="_thumbnails/secret.jpeg", Body=JPEG + SECRET)
    run.s3.put_object(Bucket="another-bucket-gallery", Key="records.json", Body=b'{"prompts": []}')
    forge(
        run,
        images=[_entry("s3://another-bucket-gallery/secret.jpeg")],
        records="s3://another-bucket-gallery/records.json",
        conn_id="aws_default",
    )

    page = assert_nothing_served(gallery, run)
    assert 'data-absent="not-allowed"' in page


def test_a_user_who_may_edit_xcoms_through_the_rest_api_reads_nothing_more(gallery: Gallery, run: StoredRun) -> None:
    # The USER role may write XComs through the REST API (and may not read connections).
    run.s3.create_bucket(Bucket="another-bucket-rest")
    run.s3.put_object(Bucket="another-bucket-rest", Key="secret.jpeg", Body=JPEG + SECRET)
    run.s3.put_object(Bucket="another-bucket-rest", Key="_thumbnails/secret.jpeg", Body=JPEG + SECRET)
    _clear(run)
    headers = {"Authorization": f"Bearer {gallery.tokens['editor']}"}
    url = f"/api/v2/dags/{run.dag_id}/dagRuns/{run.run_id}/taskInstances/{FORGED}/xcomEntries"
    for key, value in (
        ("images", [_entry("s3://another-bucket-rest/secret.jpeg")]),
        (
            "storage",
            {
                "prefix": "s3://another-bucket-rest/",
                "records": "s3://another-bucket-rest/records.json",
                "conn_id": "aws_default",
            },
        ),
    ):
        answer = gallery.client.post(url, json={"key": key, "value": value, "map_index": -1}, headers=headers)
        assert answer.status_code in (200, 201), answer.text

    assert_nothing_served(gallery, run)


def test_a_missing_connection_is_no_read_not_the_default_credentials(
    gallery: Gallery, run: StoredRun, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API server's default credential chain could read the bucket (the environment points it at
    # the S3 server): a root whose connection does not exist must still read nothing.
    for name, value in {
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": AWS_REGION,
    }.items():
        monkeypatch.setenv(name, value)
    run.s3.put_object(Bucket=run.bucket, Key="elsewhere/secret.jpeg", Body=JPEG + SECRET)
    run.s3.put_object(Bucket=run.bucket, Key="elsewhere/_thumbnails/secret.jpeg", Body=JPEG + SECRET)
    allow(monkeypatch, {f"s3://{run.bucket}/": "aws_gallery_missing"})
    forge(
        run,
        images=[_entry(f"s3://{run.bucket}/elsewhere/secret.jpeg")],
        records=f"s3://{run.bucket}/elsewhere/records.json",
        conn_id="aws_gallery_missing",
    )

    unknown = gallery.get("image", **_ti(run, map_index=-1), n=999_999)
    for answer in served(gallery, run, 0):
        assert (answer.status_code, answer.content) == (404, unknown.content)


def test_the_tasks_connection_id_is_ignored(gallery: Gallery, run: StoredRun, monkeypatch: pytest.MonkeyPatch) -> None:
    # The deployment names aws_default for the bucket; the task's conn_id (one that does not exist) changes nothing.
    run.s3.put_object(Bucket=run.bucket, Key="custom/layout/picture.jpeg", Body=JPEG)
    forge(run, images=[_entry(f"s3://{run.bucket}/custom/layout/picture.jpeg")], conn_id="no_such_connection")

    answer = gallery.get("image", **_ti(run, map_index=-1), n=0)
    assert answer.status_code == 200
    assert answer.content == JPEG


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:9/secret.jpeg",
        "https://example.com/secret.jpeg",
        "ftp://127.0.0.1/secret.jpeg",
        "memory://gallery-secret/secret.jpeg",
        "data:image/jpeg;base64,AAAA",
    ],
)
def test_other_schemes_are_never_read_even_when_listed(
    gallery: Gallery, run: StoredRun, monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    import fsspec

    fsspec.filesystem("memory").pipe("/gallery-secret/secret.jpeg", JPEG + SECRET)
    root = uri.rsplit("/", 1)[0] + "/"
    allow(monkeypatch, {**ALLOWED_ROOTS, root: "aws_default"})
    assert parse_roots(json.dumps({root: "aws_default"})) == ()
    forge(run, images=[_entry(uri)], records=root + "records.json")

    assert_nothing_served(gallery, run)


# -------------------------------------------------------------------------------------- traversal
def _traversals(root: str, target: str) -> list[str]:
    """Ways to name ``target`` (a sibling of the folder ``root``) from under ``root``."""
    return [
        f"{root}../{target}",
        f"{root}./../{target}",
        f"{root}sub/../../{target}",
        f"{root}%2e%2e/{target}",
        f"{root}%2E%2E%2F{target}",
        f"{root}..%2f{target}",
        f"{root}%252e%252e/{target}",
        f"{root}..\\{target}",
        f"{root}.\\..\\{target}",
        f"{root}/../{target}",
        f"{root}\x00/../{target}",
        f"{root}x.jpeg?/../../{target}",
        f"{root}x.jpeg#/../../{target}",
        f"{root}..",
        f"{root}.",
        root,
        root.upper(),
    ]


def test_traversal_in_a_file_uri_or_records_is_refused(
    gallery: Gallery, run: StoredRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "ok.jpeg").write_bytes(JPEG)
    (tmp_path / "secret.jpeg").write_bytes(JPEG + SECRET)
    (tmp_path / "records.json").write_text(json.dumps({"prompts": [], "failures": [f"prompt 0: {SECRET.decode()}"]}))
    root = f"file://{tmp_path}/allowed/"
    allow(monkeypatch, {root: None})
    uris = _traversals(root, "secret.jpeg")
    for records in _traversals(root, "records.json"):
        forge(run, images=[_entry(uri, number) for number, uri in enumerate(uris)], records=records, prefix=root)
        assert_nothing_served(gallery, run, count=len(uris))
    # The root itself is readable: the refusals above are the traversal's, not the root's.
    forge(run, images=[_entry(f"{root}ok.jpeg")])
    assert gallery.get("image", **_ti(run, map_index=-1), n=0).content == JPEG


def test_traversal_in_an_s3_uri_or_records_is_refused(
    gallery: Gallery, run: StoredRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = f"s3://{run.bucket}/allowed/"
    # Objects at the literal keys too: S3 does not resolve "..", so a key naming one must still be refused.
    uris = _traversals(root, "secret.jpeg")
    for uri in uris:
        key = uri.removeprefix(f"s3://{run.bucket}/")
        if key and "\x00" not in key and not key.startswith("S3:"):
            run.s3.put_object(Bucket=run.bucket, Key=key, Body=JPEG + SECRET)
    allow(monkeypatch, {root: "aws_default"})
    forge(
        run,
        images=[_entry(uri, number) for number, uri in enumerate(uris)],
        records=f"{root}../records.json",
        prefix=root,
    )

    assert_nothing_served(gallery, run, count=len(uris))


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://b/k.jpeg", "s3://b/k.jpeg"),
        ("s3://b/a/../k.jpeg", None),
        ("s3://b//k.jpeg", None),
        ("s3://b/%2e%2e/k.jpeg", None),
        ("s3://b/a\\k.jpeg", None),
        ("s3://b/a\x00k.jpeg", None),
        ("S3://b/k.jpeg", None),
        ("file:///etc/passwd", "file:///etc/passwd"),
        ("file://host/etc/passwd", None),
        ("file:etc/passwd", None),
        ("memory://b/k", None),
        ("s3://b/" + "k" * 3000, None),
        (None, None),
        (["s3://b/k"], None),
    ],
)
def test_uris_are_checked_as_written_never_decoded(uri: Any, expected: str | None) -> None:
    assert normalise(uri) == expected


def test_a_symlink_under_a_listed_file_root_is_not_followed_out_of_it(
    gallery: Gallery, run: StoredRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.jpeg").write_bytes(JPEG + SECRET)
    (root / "real.jpeg").write_bytes(JPEG)
    (root / "link.jpeg").symlink_to(outside / "secret.jpeg")
    (root / "dir").symlink_to(outside)
    (root / "inside.jpeg").symlink_to(root / "real.jpeg")  # a link that stays under the root is fine
    (root / "_thumbnails").mkdir()
    (root / "_thumbnails" / "real.jpeg").symlink_to(outside / "secret.jpeg")  # a "thumbnail" out of the root
    (root / "_thumbnails" / "inside.jpeg").write_bytes(JPEG)
    allow(monkeypatch, {f"file://{root}/": None})
    forge(
        run,
        images=[
            _entry(f"file://{root}/link.jpeg", 0),
            _entry(f"file://{root}/dir/secret.jpeg", 1),
            _entry(f"file://{root}/real.jpeg", 2),
            _entry(f"file://{root}/inside.jpeg", 3),
        ],
    )

    unknown = gallery.get("image", **_ti(run, map_index=-1), n=999_999)
    for number in (0, 1):
        for answer in served(gallery, run, number):
            assert (answer.status_code, answer.content) == (404, unknown.content)
    for number in (2, 3):
        assert gallery.get("image", **_ti(run, map_index=-1), n=number).content == JPEG
    # The sheet of all four embeds image 3's thumbnail only: image 2's links out of the root.
    sheet = gallery.get("sheet", **_ti(run, map_index=-1), first=0, count=4)
    assert sheet.status_code == 200
    assert SECRET not in sheet.content
    assert sheet.content.count(b"data:image/jpeg") == 1
    assert gallery.get("sheet", **_ti(run, map_index=-1), first=2, count=1).status_code == 404


# ------------------------------------------------------------------------------------------- teams
@pytest.fixture(scope="module")
def team_run(store_run: Any) -> Iterator[StoredRun]:
    """A run of a DAG whose bundle belongs to ``team_b`` (restored afterwards)."""
    from airflow.models.dag import DagModel
    from airflow.models.dagbundle import DagBundleModel
    from airflow.models.team import Team
    from airflow.utils.session import create_session
    from sqlalchemy import select, update

    run = store_run(jimeng_test_generate.dag, prompts=["a red fox"])
    with create_session() as session:
        bundle = session.get(DagBundleModel, "team-b-bundle") or DagBundleModel(name="team-b-bundle")
        if not bundle.teams:
            team = session.scalar(select(Team).where(Team.name == "team_b"))
            if team is None:  # Airflow 3.1 keys teams by a UUID, 3.2 and later by name
                team = Team(name="team_b", **({"id": uuid.uuid4()} if "id" in Team.__table__.columns else {}))
            bundle.teams.append(team)
        session.add(bundle)
        session.flush()
        original = session.scalar(select(DagModel.bundle_name).where(DagModel.dag_id == run.dag_id))
        session.execute(update(DagModel).where(DagModel.dag_id == run.dag_id).values(bundle_name="team-b-bundle"))
    yield run
    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == run.dag_id).values(bundle_name=original))


@pytest.mark.skipif(not AIRFLOW_V_3_2_PLUS, reason="users with teams in the simple auth manager: Airflow 3.2 or later")
def test_a_teams_dag_reads_only_the_teams_own_storage(
    gallery: Gallery, run: StoredRun, team_run: StoredRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Team B's DAG forges an image in a bucket the deployment allows (for DAGs of no team, or team A):
    # in multi-team mode team B's DAGs read only team B's roots, so nothing is served.
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    monkeypatch.setenv("AIRFLOW__CORE__MULTI_TEAM", "True")
    monkeypatch.setenv(
        "AIRFLOW__TEAM_B___JIMENG__GALLERY_STORAGE", json.dumps({f"s3://{team_run.bucket}/": "aws_default"})
    )
    run.s3.put_object(Bucket=run.bucket, Key="team-a/secret.jpeg", Body=JPEG + SECRET)
    run.s3.put_object(Bucket=run.bucket, Key="team-a/_thumbnails/secret.jpeg", Body=JPEG + SECRET)
    token = gallery.manager.generate_jwt(SimpleAuthManagerUser(username="member_b", role="viewer", teams=["team_b"]))
    headers = {"Authorization": f"Bearer {token}"}
    forged = {"dag_id": team_run.dag_id, "run_id": team_run.run_id, "task_id": "count", "map_index": -1}
    own = {**forged, "task_id": "gen"}
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        XComModel.set("images", [_entry(f"s3://{run.bucket}/team-a/secret.jpeg")], session=session, **forged)
        XComModel.set(
            "storage",
            {"prefix": f"s3://{run.bucket}/", "records": f"s3://{run.bucket}/records.json", "conn_id": "aws_default"},
            session=session,
            **forged,
        )

    [image] = team_run.xcom("gen", "images")[:1]
    run.s3.put_object(Bucket=team_run.bucket, Key=thumbnail_key(image["key"]), Body=JPEG)  # a sheet shows it
    unknown = gallery.client.get("/jimeng/image", params={**forged, "n": 999_999}, headers=headers)
    for route, number in (("image", {"n": 0}), ("thumbnail", {"n": 0}), ("sheet", {"first": 0, "count": 1})):
        answer = gallery.client.get(f"/jimeng/{route}", params={**forged, **number}, headers=headers)
        assert (answer.status_code, answer.content) == (404, unknown.content), route
        # Team B's own images, under team B's root, are served; a member of no team is refused the DAG.
        assert gallery.client.get(f"/jimeng/{route}", params={**own, **number}, headers=headers).status_code == 200
        assert gallery.get(route, **own, **number).status_code == 403


# ------------------------------------------------------------------------------------ bounded parsing
def test_a_huge_records_json_is_not_read(gallery: Gallery, run: StoredRun, monkeypatch: pytest.MonkeyPatch) -> None:
    body = json.dumps({"prompts": [], "padding": "x" * (17 * 1024 * 1024)}).encode()
    run.s3.put_object(Bucket=run.bucket, Key="huge/records.json", Body=body)
    forge(run, images=[], records=f"s3://{run.bucket}/huge/records.json")

    page = gallery.get("gallery", **_ti(run))
    assert page.status_code == 200
    assert "records could not be read" in page.text


def test_an_images_xcom_of_100000_entries_is_read_up_to_a_bound(gallery: Gallery, run: StoredRun) -> None:
    images: list[Any] = [_entry(f"s3://{run.bucket}/many/{number}.jpeg", number) for number in range(100_000)]
    images[1] = {"uri": 12, "prompt_index": "0"}  # a malformed entry: shown as unreadable
    images[2] = "s3://not/a/record"
    images[3] = _entry(f"s3://{run.bucket}/" + "k" * 5000)  # a string beyond the bound
    run.s3.put_object(Bucket=run.bucket, Key="many/0.jpeg", Body=JPEG)
    forge(run, images=images)

    started = time.monotonic()
    page = gallery.get("gallery", **_ti(run))
    elapsed = time.monotonic() - started
    assert page.status_code == 200
    assert "90000 more image(s) are not listed" in page.text
    assert page.text.count('data-absent="unreadable"') == 3
    assert page.text.count("<img ") == 1  # only many/0.jpeg exists: the others show as deleted
    assert page.text.count('data-absent="missing"') == 10_000 - 4
    assert elapsed < 30, elapsed
    assert gallery.get("image", **_ti(run, map_index=-1), n=0).content == JPEG
    assert gallery.get("image", **_ti(run, map_index=-1), n=50_000).status_code == 404


# ----------------------------------------------------------------------------------------- configuration
def test_no_configuration_reads_nothing_but_shows_what_the_task_listed(
    gallery: Gallery, run: StoredRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW__JIMENG__GALLERY_STORAGE", raising=False)
    page = gallery.get("gallery", **{**_ti(run), "task_id": "gen"})
    image = gallery.get("image", **{**_ti(run, map_index=-1), "task_id": "gen"}, n=0)

    assert image.status_code == 404
    assert page.status_code == 200
    assert "<img" not in page.text
    assert "has not allowed the gallery to read any storage" in page.text
    assert "request id" in page.text  # the XCom's metadata is still listed


@pytest.mark.parametrize(
    "value",
    ["not json", "[]", '{"s3://b/k": "aws"}', '{"s3://b/": ""}', '{"s3://b/": null}', '{"s3://b/../": "aws"}'],
)
def test_an_invalid_setting_allows_nothing(value: str) -> None:
    assert parse_roots(value) == ()


def test_one_client_per_connection_reused(gallery: Gallery, run: StoredRun) -> None:
    gallery_access.forget_clients()
    for number in range(3):
        assert gallery.get("image", **{**_ti(run, map_index=-1), "task_id": "gen"}, n=number).status_code == 200
    assert list(gallery_access._clients) == ["aws_default"]
    client = gallery_access._clients["aws_default"][1]
    assert gallery.get("image", **{**_ti(run, map_index=-1), "task_id": "gen"}, n=0).status_code == 200
    assert gallery_access._clients["aws_default"][1] is client


# ------------------------------------------------------------------------ what the page says of the rest
def test_a_deleted_image_and_a_missing_records_json_say_so(gallery: Gallery, run: StoredRun) -> None:
    run.s3.put_object(Bucket=run.bucket, Key="kept/0.jpeg", Body=JPEG)
    forge(
        run,
        images=[_entry(f"s3://{run.bucket}/kept/0.jpeg", 0), _entry(f"s3://{run.bucket}/kept/1.jpeg", 1)],
        records=f"s3://{run.bucket}/kept/records.json",
    )

    html = gallery.get("gallery", **_ti(run)).text
    assert html.count("<img ") == 1
    assert html.count('data-absent="missing"') == 1
    assert "Deleted: the image is no longer in storage." in html
    assert "records.json is missing" in html


def test_long_prompts_are_clamped_with_the_whole_text_on_demand_and_codes_are_whole(
    gallery: Gallery, run: StoredRun
) -> None:
    prompt = "a very long prompt " * 40 + "THE END"
    code = "OutputImageSensitiveContentDetectedWithAVeryLongSuffixThatMustNotBeClipped"
    record = {
        "schema": 2,
        "prompt_index": 0,
        "fingerprint": "f",
        "prompt": prompt,
        "images": [],
        "failures": [f"prompt 0 image 1: {code} (request id r-1): blocked"],
    }
    document = {"prompts": [record], "failures": ["prompt 1: InputTextSensitiveContentDetected (request id r-2): no"]}
    run.s3.put_object(Bucket=run.bucket, Key="long/records.json", Body=json.dumps(document).encode())
    run.s3.put_object(Bucket=run.bucket, Key="long/0.jpeg", Body=JPEG)
    forge(run, images=[_entry(f"s3://{run.bucket}/long/0.jpeg")], records=f"s3://{run.bucket}/long/records.json")

    html = gallery.get("gallery", **_ti(run)).text
    assert '<details class="prompt"><summary>' in html
    assert "THE END</div></details>" in html  # the whole prompt, one click away (no script)
    assert f'data-error-code="{code}"><div class="placeholder">{code}</div>' in html
    assert "overflow-wrap:anywhere" in html
    assert 'data-error-code="InputTextSensitiveContentDetected"' in html  # a whole prompt refused


def test_images_are_revalidated_so_a_revoked_permission_applies_at_once(gallery: Gallery, run: StoredRun) -> None:
    params = {**_ti(run, map_index=-1), "task_id": "gen"}
    first = gallery.get("image", **params, n=0)
    assert first.status_code == 200
    assert first.headers["cache-control"] == "private, no-cache"
    etag = first.headers["etag"]

    again = gallery.client.get(
        "/jimeng/image",
        params={**params, "n": 0},
        headers={"Authorization": f"Bearer {gallery.tokens['reader']}", "If-None-Match": etag},
    )
    refused = gallery.client.get(
        "/jimeng/image",
        params={**params, "n": 0},
        headers={"Authorization": f"Bearer {gallery.tokens['outsider']}", "If-None-Match": etag},
    )
    assert (again.status_code, again.content) == (304, b"")
    assert refused.status_code == 403
