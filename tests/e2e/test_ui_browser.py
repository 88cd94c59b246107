"""The provider as a person meets it: the connection form, a run of the hello DAG, the extra link,
and the Images gallery of a run of the content pipeline that stored its images in S3.

The first test walks the whole path in a real browser against a real Airflow on loopback, because
each step needs the one before it (the DAG uses the connection the form created). The gallery test
creates the connection through the REST API if the first test did not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.hooks.connection_form import CONNECTION_EXTRAS, UI_FIELD_BEHAVIOUR
from tests.e2e.conftest import GALLERY_BUCKET, PIPELINE_DAG, REVIEWER
from tests.e2e.stack import EMULATOR_API_KEY, AirflowStack

# Starting Airflow alone takes most of a minute on two cores; the whole path stays well under 5 minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

CONN_ID = "jimeng_default"
DAG_ID = "jimeng_hello"
RUN_TIMEOUT = 180.0
#: Whether an input's placeholder, in the input's own font, fits inside its text box.
PLACEHOLDER_FITS = """(input) => {
    const style = getComputedStyle(input);
    const context = document.createElement("canvas").getContext("2d");
    context.font = style.font;
    const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    return context.measureText(input.placeholder).width <= room;
}"""
#: The labels Airflow would show for fields this connection type hides.
HIDDEN_LABELS = {"login": "Login", "schema": "Schema", "port": "Port"}


def _open_connection_form(page: Any, stack: AirflowStack) -> Any:
    page.goto(f"{stack.base_url}/connections")
    page.get_by_role("button", name="Add Connection").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Connection ID").fill(CONN_ID)
    connection_type = dialog.get_by_role("combobox")
    connection_type.click()
    connection_type.fill("JiMeng")
    page.get_by_role("option", name="JiMeng (Seedream)").click()
    return dialog


def _check_standard_fields(dialog: Any) -> None:
    """Host and password are relabelled, with placeholders; login, schema and port are gone."""
    relabelling = UI_FIELD_BEHAVIOUR["relabeling"]
    assert relabelling == {"host": "Base URL", "password": "API Key"}
    base_url = dialog.get_by_label("Base URL", exact=True)
    api_key = dialog.get_by_label("API Key", exact=True)
    base_url.wait_for()
    assert base_url.get_attribute("placeholder") == UI_FIELD_BEHAVIOUR["placeholders"]["host"]
    assert base_url.evaluate(PLACEHOLDER_FITS), "the Base URL placeholder is cut off"
    assert api_key.get_attribute("placeholder") == UI_FIELD_BEHAVIOUR["placeholders"]["password"]
    assert api_key.get_attribute("type") == "password"
    for field in UI_FIELD_BEHAVIOUR["hidden_fields"]:
        label = HIDDEN_LABELS[field]
        assert dialog.get_by_label(label, exact=True).count() == 0, f"{label} should be hidden"
    for original in ("Host", "Password"):
        assert dialog.get_by_label(original, exact=True).count() == 0, f"{original} should be relabelled"


def _check_extra_fields(dialog: Any) -> None:
    """Every extra in connection_form.CONNECTION_EXTRAS, with its label, help text and kind of input."""
    dialog.get_by_role("button", name="Extra Fields", exact=True).click()
    for name, spec in CONNECTION_EXTRAS.items():
        control = dialog.locator(f"[name='element_{name}']")
        control.wait_for(state="attached")
        label = dialog.get_by_text(spec["label"], exact=True)
        assert label.is_visible(), f"extra {name!r}: label {spec['label']!r} not shown"
        assert dialog.get_by_text(spec["description"], exact=True).is_visible(), f"extra {name!r}: no help text"
        if spec["schema"]["type"] == ["boolean", "null"]:
            assert control.get_attribute("type") == "checkbox", f"extra {name!r} should be a switch"
        if "enum" in spec["schema"]:
            # A select: untouched, it shows what the empty value means (watermark: "true (default)").
            untouched = spec["schema"]["values_display"]["null"]
            row = dialog.locator("[data-scope='field'][data-part='root']").filter(has_text=spec["label"])
            assert row.get_by_text(untouched, exact=True).is_visible(), f"extra {name!r}: {untouched!r} not shown"


def _switch_on(dialog: Any, name: str) -> None:
    # Chakra draws the switch over a visually hidden checkbox: click the drawn control.
    control = dialog.locator(f"input[name='element_{name}']")
    dialog.locator(f"label[data-scope='switch']:has(input[name='element_{name}'])").click()
    assert control.is_checked()


def _wait_for_run(stack: AirflowStack, run_id: str, dag_id: str = DAG_ID) -> str:
    run_path = urllib.parse.quote(run_id, safe="")

    def finished() -> str | None:
        state = stack.api(f"dags/{dag_id}/dagRuns/{run_path}")["state"]
        return state if state in ("success", "failed") else None

    state: str = stack.wait_for(f"run {run_id}", finished, RUN_TIMEOUT, interval=2.0)
    if state != "success":
        instances = stack.api(f"dags/{dag_id}/dagRuns/{run_path}/taskInstances")["task_instances"]
        summary = {ti["task_id"]: ti["state"] for ti in instances}
        pytest.fail(f"{dag_id} run {run_id} ended {state}: {summary}\n{stack.diagnostics()}")
    return state


def test_connection_form_hello_run_and_images_link(
    browser: Any, airflow_stack: AirflowStack, screenshot_dir: Path
) -> None:
    stack = airflow_stack
    timings = dict(stack.timings)
    started = time.monotonic()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)

    # 1. The connection form for type jimeng: relabelled, hidden and extra fields.
    dialog = _open_connection_form(page, stack)
    _check_standard_fields(dialog)
    dialog.get_by_label("Base URL", exact=True).fill(stack.emulator_base_url)
    dialog.get_by_label("API Key", exact=True).fill(EMULATOR_API_KEY)
    dialog.get_by_label("Description", exact=True).fill("JiMeng emulator on loopback (end-to-end test)")
    dialog.screenshot(path=str(screenshot_dir / "ui-connection-form.png"))
    page.set_viewport_size({"width": 1280, "height": 1900})  # the extras are a long list
    _check_extra_fields(dialog)
    _switch_on(dialog, "allow_http")
    dialog.screenshot(path=str(screenshot_dir / "ui-connection-extras.png"))
    page.set_viewport_size({"width": 1280, "height": 900})

    # 2. Create it; what was saved is what the form said.
    dialog.get_by_role("button", name="Save").click()
    page.get_by_text("Connection has been successfully created.").wait_for()
    saved = stack.api(f"connections/{CONN_ID}")
    assert saved["conn_type"] == "jimeng"
    assert saved["host"] == stack.emulator_base_url
    assert (saved["login"], saved["schema"], saved["port"]) == (None, None, None)
    extra = json.loads(saved["extra"])
    assert extra["allow_http"] is True
    timings["connection form"] = time.monotonic() - started

    # 3. Trigger the hello DAG from its page, with the default params.
    page.goto(f"{stack.base_url}/dags/{DAG_ID}")
    page.get_by_role("button", name="Trigger").first.click()
    page.get_by_role("dialog").get_by_role("button", name="Trigger").click()
    run_id = stack.wait_for(
        "the triggered run",
        lambda: (stack.api(f"dags/{DAG_ID}/dagRuns?order_by=-run_after&limit=1")["dag_runs"] or [{}])[0]["dag_run_id"],
        30,
    )
    page.goto("about:blank")  # the grid polls the API: keep SQLite and the CPU free for the run
    triggered = time.monotonic()
    _wait_for_run(stack, run_id)
    timings["hello run"] = time.monotonic() - triggered

    # 4. The finished task's "JiMeng images" link is the first image on the emulator.
    run_path = urllib.parse.quote(run_id, safe="")
    page.goto(f"{stack.base_url}/dags/{DAG_ID}/runs/{run_path}/tasks/generate/details")
    link = page.get_by_role("link", name="JiMeng images")
    link.wait_for()
    href = link.get_attribute("href")
    urls = stack.task_api(DAG_ID, run_id, "generate", "/xcomEntries/return_value")["value"]
    assert href == urls[0]
    assert href.startswith(f"{stack.emulator_root}/tos/"), href
    assert urllib.parse.urlsplit(href).path.endswith(".jpeg"), href
    with urllib.request.urlopen(href, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.read(3) == b"\xff\xd8\xff"  # a JPEG
    link.hover()
    page.screenshot(path=str(screenshot_dir / "ui-extra-link.png"))
    with page.context.expect_page() as opened:  # the link opens in a new tab: follow it like a person
        link.click()
    image_tab = opened.value
    image_tab.wait_for_load_state()
    assert image_tab.url == href
    image_tab.screenshot(path=str(screenshot_dir / "ui-extra-link-image.png"))
    timings["total in browser"] = time.monotonic() - started
    print("e2e timings (s): " + ", ".join(f"{step} {seconds:.1f}" for step, seconds in timings.items()))


OTHER_BUCKET = "jimeng-e2e-not-a-gallery"
#: Resolves once the image has loaded and can be drawn; its natural width (0: broken).
IMAGE_SHOWN = "(img) => img.decode().then(() => img.naturalWidth, () => 0)"


def _ensure_connection(stack: AirflowStack) -> None:
    try:
        stack.api(f"connections/{CONN_ID}")
    except urllib.error.HTTPError:
        stack.post(
            "connections",
            {
                "connection_id": CONN_ID,
                "conn_type": "jimeng",
                "host": stack.emulator_base_url,
                "password": EMULATOR_API_KEY,
                "extra": json.dumps({"allow_http": True}),
            },
        )


def test_the_images_tab_shows_every_stored_image(
    browser: Any, airflow_stack: AirflowStack, screenshot_dir: Path
) -> None:
    stack = airflow_stack
    _ensure_connection(stack)
    stack.s3_client(GALLERY_BUCKET)
    run_id = stack.post(f"dags/{PIPELINE_DAG}/dagRuns", {"logical_date": None, "conf": {"bucket": GALLERY_BUCKET}})[
        "dag_run_id"
    ]
    _wait_for_run(stack, run_id, PIPELINE_DAG)
    images = stack.task_api(PIPELINE_DAG, run_id, "generate_images", "/xcomEntries/images")["value"]
    assert len(images) == 8  # one per product of the catalogue

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(30_000)
    run_path = urllib.parse.quote(run_id, safe="")
    task_page = f"{stack.base_url}/dags/{PIPELINE_DAG}/runs/{run_path}/tasks/generate_images"
    page.goto(f"{task_page}/details")

    # The extra link of a task that stored its images opens its Images tab in the UI (Airflow 3.1+).
    link = page.get_by_role("link", name="JiMeng images")
    link.wait_for()
    href = link.get_attribute("href") or ""
    assert href == f"{task_page}/plugin/jimeng-images", href

    # The Images tab: the gallery in the task instance page, every image loaded from the bucket.
    tab = page.get_by_role("link", name=re.compile(r"^Images$"))
    tab.wait_for()
    assert (tab.get_attribute("href") or "").endswith("/plugin/jimeng-images"), tab.get_attribute("href")
    tab.click()
    page.wait_for_url(re.compile(r"/plugin/jimeng-images$"))
    gallery = page.frame_locator("iframe").first
    figures = gallery.locator("figure.image img")
    figures.first.wait_for()
    assert figures.count() == len(images)
    for index in range(len(images)):
        figure = figures.nth(index)
        figure.scroll_into_view_if_needed()
        # Each tile is a thumbnail (440 px at most; the stored images are 1K-2K), linking the full image.
        assert (figure.get_attribute("src") or "").startswith("thumbnail?"), figure.get_attribute("src")
        assert 0 < figure.evaluate(IMAGE_SHOWN) <= 440, f"image {index} is not shown as a thumbnail"
    text = gallery.locator("body").inner_text()
    for image in images:
        assert image["request_id"] in text
    assert GALLERY_BUCKET not in gallery.locator("html").inner_html()
    figures.first.scroll_into_view_if_needed()
    page.screenshot(path=str(screenshot_dir / "ui-gallery.png"))

    # A refused user (``outsider``: may read no jimeng_ DAG) opening the same tab gets a readable page
    # that says so, not raw JSON, and no image. Needs the gallery's refusal page (issue 19, section 2).
    outsider = _token_of(stack, "outsider")
    refused = browser.new_context(
        viewport={"width": 1280, "height": 700}, extra_http_headers={"Authorization": f"Bearer {outsider}"}
    )
    try:
        refused_page = refused.new_page()
        answer = refused_page.goto(gallery_url(stack, PIPELINE_DAG, run_id, "generate_images"))
        assert answer is not None
        assert answer.status in (401, 403, 404), answer.status
        body = refused_page.locator("body").inner_text()
        refused_page.screenshot(path=str(screenshot_dir / "ui-gallery-refused.png"))
        assert (answer.headers.get("content-type") or "").startswith("text/html"), answer.headers
        assert '{"detail"' not in body, body
        assert re.search(r"permission|not allowed|access", body, re.IGNORECASE), body
        assert images[0]["request_id"] not in body
        assert refused_page.locator("img").count() == 0
    finally:
        refused.close()


def _token_of(stack: AirflowStack, user: str, role: str = "viewer") -> str:
    """A JWT for ``user``, signed as the API server signs (its auth manager and secret, in a child process)."""
    code = (
        "from airflow.api_fastapi.app import create_auth_manager\n"
        "from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser\n"
        f"print(create_auth_manager().generate_jwt(SimpleAuthManagerUser(username={user!r}, role={role!r})))"
    )
    answer = subprocess.run(
        [sys.executable, "-c", code], env=stack.env, cwd=stack.home, capture_output=True, text=True, timeout=120
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    return answer.stdout.strip().splitlines()[-1]


def gallery_url(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> str:
    query = urllib.parse.urlencode({"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "map_index": -1})
    return f"{stack.base_url}/jimeng/gallery?{query}"


def _put_xcom(stack: AirflowStack, dag_id: str, run_id: str, task_id: str, key: str, value: Any) -> None:
    """What a user with XCom edit rights can do through Airflow's REST API."""
    path = f"dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries"
    try:
        stack.post(path, {"key": key, "value": value, "map_index": -1})
    except urllib.error.HTTPError as error:
        if error.code != 409:
            raise
        request = urllib.request.Request(
            f"{stack.base_url}/api/v2/{path}/{key}",
            data=json.dumps({"value": value, "map_index": -1}).encode(),
            headers={"Authorization": f"Bearer {stack.token()}", "Content-Type": "application/json"},
            method="PATCH",
        )
        urllib.request.urlopen(request, timeout=30).close()


def test_a_forged_xcom_makes_the_gallery_serve_nothing(
    browser: Any, airflow_stack: AirflowStack, screenshot_dir: Path
) -> None:
    # Plain @tasks of a pipeline run get the gallery's XComs written through the REST API: one names
    # an object of a bucket no JiMeng task stores in, the other a file of the API server (airflow.cfg).
    # Neither is under a storage root the deployment lists: nothing is served, and the page leaks nothing.
    # Needs the gallery's trust boundary (issue 19, section 1): on a gallery that trusts the XCom it fails.
    stack = airflow_stack
    _ensure_connection(stack)
    s3 = stack.s3_client(GALLERY_BUCKET, OTHER_BUCKET)
    secret = json.dumps({"secret": "planted-not-by-a-jimeng-task"}).encode()
    s3.put_object(Bucket=OTHER_BUCKET, Key="planted/secret.jpeg", Body=secret)
    run_id = stack.post(f"dags/{PIPELINE_DAG}/dagRuns", {"logical_date": None, "conf": {"bucket": GALLERY_BUCKET}})[
        "dag_run_id"
    ]
    _wait_for_run(stack, run_id, PIPELINE_DAG)
    config = str(stack.home / "airflow.cfg")
    forged = {
        "build_prompts": (f"s3://{OTHER_BUCKET}/", OTHER_BUCKET, "planted/secret.jpeg"),
        "publish_gallery": ("file:///", "", config.lstrip("/")),
    }
    page = browser.new_page(viewport={"width": 1280, "height": 700})
    page.set_default_timeout(30_000)
    for task_id, (prefix, bucket, key) in forged.items():
        uri = f"{prefix}{key}"
        image = {"prompt_index": 0, "image_index": 0, "bucket": bucket, "key": key, "uri": uri, "size": "2048x2048"}
        storage = {"prefix": prefix, "records": f"{prefix}records.json", "conn_id": "aws_default"}
        _put_xcom(stack, PIPELINE_DAG, run_id, task_id, "storage", storage)
        _put_xcom(stack, PIPELINE_DAG, run_id, task_id, "images", [image])
        url = gallery_url(stack, PIPELINE_DAG, run_id, task_id)
        page.goto(url)
        html = page.content()
        assert "planted-not-by-a-jimeng-task" not in html
        assert "jwt_secret" not in html
        for img in page.locator("img").all():
            assert img.evaluate(IMAGE_SHOWN) == 0, f"{task_id}: a forged image was shown"
        for route in ("image", "thumbnail"):
            direct = page.request.get(url.replace("/gallery?", f"/{route}?") + "&n=0")
            assert direct.status == 404, f"{task_id}: {route} answered {direct.status}"
            assert b"planted-not-by-a-jimeng-task" not in direct.body()
            assert b"jwt_secret" not in direct.body()
        if task_id == "build_prompts":
            page.screenshot(path=str(screenshot_dir / "ui-gallery-forged.png"))


REVIEW_DAG = "jimeng_review_before_publishing"


def _patch_hitl(stack: AirflowStack, path: str, token: str, body: dict[str, Any]) -> int:
    request = urllib.request.Request(
        f"{stack.base_url}/api/v2/{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="PATCH",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_a_reviewer_chooses_two_of_four_images_and_exactly_those_are_published(
    browser: Any, airflow_stack: AirflowStack, screenshot_dir: Path
) -> None:
    stack = airflow_stack
    _ensure_connection(stack)
    s3 = stack.s3_client(GALLERY_BUCKET)
    conf = {"bucket": GALLERY_BUCKET, "prefix": "catalogue", "products": 4}
    run_id = stack.post(f"dags/{REVIEW_DAG}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]
    run_path = urllib.parse.quote(run_id, safe="")
    hitl_path = f"dags/{REVIEW_DAG}/dagRuns/{run_path}/taskInstances/review_images/-1/hitlDetails"

    def asking() -> dict[str, Any] | None:
        ti = stack.task_api(REVIEW_DAG, run_id, "review_images")
        if ti["state"] not in ("awaiting_input", "deferred"):
            assert ti["state"] in (None, "scheduled", "queued", "running"), ti
            return None
        return dict(stack.api(hitl_path))

    detail = stack.wait_for("the review's question", asking, RUN_TIMEOUT, interval=2.0)
    generated = stack.task_api(REVIEW_DAG, run_id, "generate_images", "/xcomEntries/return_value")["value"]
    assert len(generated) == 4
    assert detail["assigned_users"] == [{"id": REVIEWER, "name": REVIEWER}]
    labels = [option for option in detail["options"] if option.startswith("#")]
    assert len(labels) == 4

    # A user who may act on the DAG but is not a respondent cannot answer (403), through the UI's API.
    intern = _token_of(stack, "intern", role="admin")
    assert _patch_hitl(stack, hitl_path, intern, {"chosen_options": [labels[0]]}) == 403

    # The reviewer opens the required action: four thumbnails, served by the gallery, load.
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.set_default_timeout(30_000)
    task_page = f"{stack.base_url}/dags/{REVIEW_DAG}/runs/{run_path}/tasks/review_images"
    page.goto(f"{task_page}/required_actions")
    thumbnails = page.locator("img[src*='jimeng/thumbnail']")
    thumbnails.first.wait_for()
    assert thumbnails.count() == 4
    for index in range(4):
        thumbnails.nth(index).scroll_into_view_if_needed()
        assert 0 < thumbnails.nth(index).evaluate(IMAGE_SHOWN) <= 440, f"thumbnail {index} did not load"
    assert GALLERY_BUCKET not in page.content()

    # Chooses #1 and #3 in the options, leaves a note, and answers.
    chooser = page.locator("#element_chosen_options")
    for label in (labels[0], labels[2]):
        chooser.click()
        page.keyboard.type(label.split(" ", 1)[0] + " ")
        page.keyboard.press("Enter")
    note = page.locator("#element_note")
    if note.count():
        note.fill("1 and 3 for the shop")
    thumbnails.first.scroll_into_view_if_needed()
    page.screenshot(path=str(screenshot_dir / "ui-review-required-action.png"), full_page=True)
    page.get_by_role("button", name="Respond").click()

    _wait_for_run(stack, run_id, REVIEW_DAG)
    answered = stack.api(hitl_path)
    # The form pre-selects the deadline's default ("Publish none of these"): the images picked are approved.
    assert set(answered["chosen_options"]) - {"Publish none of these"} == {labels[0], labels[2]}
    assert answered["responded_by_user"]["id"] == REVIEWER
    published = s3.list_objects_v2(Bucket=GALLERY_BUCKET, Prefix=f"published/{run_id}/").get("Contents", [])
    names = sorted(item["Key"].rsplit("/", 1)[-1] for item in published)
    chosen = sorted(uri.rsplit("/", 1)[-1] for uri in (generated[0], generated[2]))
    assert names == sorted([*chosen, "decision.json"])

    # The generation task's Images tab shows the decision on each image.
    page.goto(f"{stack.base_url}/dags/{REVIEW_DAG}/runs/{run_path}/tasks/generate_images/plugin/jimeng-images")
    gallery = page.frame_locator("iframe").first
    gallery.locator("figure.image img").first.wait_for()
    assert gallery.locator("figure[data-review=approved]").count() == 2
    assert gallery.locator('figure[data-review="not approved"]').count() == 2
    assert f"Approved by {REVIEWER} (review_images)" in gallery.locator("body").inner_text()
    page.screenshot(path=str(screenshot_dir / "ui-review-gallery.png"))


def test_a_review_nobody_answers_takes_its_default_at_the_deadline(airflow_stack: AirflowStack) -> None:
    # tests/e2e/dags/jimeng_e2e_review_deadline.py: a 20 s deadline, "approve all" by default. The real
    # scheduler times the review out; the publish task copies both images; the decision says so.
    stack = airflow_stack
    _ensure_connection(stack)
    dag_id = "jimeng_e2e_review_deadline"
    s3 = stack.s3_client(GALLERY_BUCKET)
    run_id = stack.post(f"dags/{dag_id}/dagRuns", {"logical_date": None, "conf": {"bucket": GALLERY_BUCKET}})[
        "dag_run_id"
    ]
    _wait_for_run(stack, run_id, dag_id)

    generated = stack.task_api(dag_id, run_id, "generate_images", "/xcomEntries/return_value")["value"]
    approved = stack.task_api(dag_id, run_id, "review_images", "/xcomEntries/return_value")["value"]
    assert len(generated) == 2
    assert approved == generated, "the deadline's default: every image approved"
    decision = stack.task_api(dag_id, run_id, "review_images", "/xcomEntries/review")["value"]
    assert decision["timed_out"] is True
    assert decision["decided_by"] is None
    published = s3.list_objects_v2(Bucket=GALLERY_BUCKET, Prefix=f"published/{run_id}/").get("Contents", [])
    assert sorted(item["Key"].rsplit("/", 1)[-1] for item in published) == sorted(
        uri.rsplit("/", 1)[-1] for uri in generated
    )
