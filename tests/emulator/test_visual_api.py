"""The emulator's Visual API (``POST /?Action=CVSync2Async...``): signatures, task states, faults, billing.

Tasks move on an injected clock (no sleeps); requests are signed with the provider's own signer, and
one test drives the whole exchange with the official ``volcengine`` SDK's ``VisualService``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import requests

from airflow_provider_jimeng.emulator import (
    DEFAULT_ACCESS_KEY_ID,
    DEFAULT_SECRET_ACCESS_KEY,
    POLL_FAULT_PATH,
    SUBMIT_FAULT_PATH,
    Fault,
    JiMengEmulator,
)
from airflow_provider_jimeng.emulator.inspection import ledger_payload
from airflow_provider_jimeng.hooks.signing import VisualCredentials, sign_request
from tests.visual_fixtures import SMALL, Clock

SUBMIT = "CVSync2AsyncSubmitTask"
POLL = "CVSync2AsyncGetResult"
REQ_KEY = "jimeng_t2i_v40"
JPEG = b"\xff\xd8\xff"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def emulator(make_jimeng_emulator: Callable[..., JiMengEmulator], clock: Clock) -> JiMengEmulator:
    return make_jimeng_emulator(clock=clock)


def call(
    emulator: JiMengEmulator,
    action: str,
    body: dict[str, Any],
    *,
    access_key_id: str = DEFAULT_ACCESS_KEY_ID,
    secret: str = DEFAULT_SECRET_ACCESS_KEY,
    sent_body: bytes | None = None,
    version: str = "2022-08-31",
) -> requests.Response:
    """POST a signed Visual API request (``sent_body``: send other bytes than those signed)."""
    url = f"{emulator.root_url}/?Action={action}&Version={version}"
    raw = json.dumps(body).encode()
    credentials = VisualCredentials(access_key_id, secret)
    headers = sign_request(credentials, "POST", url, headers={"Content-Type": "application/json"}, body=raw)
    return requests.post(url, data=raw if sent_body is None else sent_body, headers=headers, timeout=10)


def submit(emulator: JiMengEmulator, prompt: str = "a red fox in the snow", **fields: Any) -> requests.Response:
    return call(emulator, SUBMIT, {"req_key": REQ_KEY, "prompt": prompt, **SMALL, **fields})


def submitted(emulator: JiMengEmulator, prompt: str = "a red fox in the snow", **fields: Any) -> str:
    answer = submit(emulator, prompt, **fields)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["code"], body["status"], body["message"]) == (10000, 10000, "Success")
    return str(body["data"]["task_id"])


def poll(emulator: JiMengEmulator, task_id: str, **options: Any) -> requests.Response:
    body: dict[str, Any] = {"req_key": REQ_KEY, "task_id": task_id}
    if options:
        body["req_json"] = json.dumps(options)
    return call(emulator, POLL, body)


def state(emulator: JiMengEmulator, task_id: str, **options: Any) -> dict[str, Any]:
    answer = poll(emulator, task_id, **options)
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


# -- the official SDK ----------------------------------------------------------------------------------


def test_the_official_sdk_submits_and_polls_until_done(
    make_jimeng_emulator: Callable[..., JiMengEmulator], clock: Clock
) -> None:
    from volcengine.visual.VisualService import VisualService

    emulator = make_jimeng_emulator(clock=clock, latency=2.0, visual_queue_delay=1.0)
    service = VisualService()
    service.set_ak(DEFAULT_ACCESS_KEY_ID)
    service.set_sk(DEFAULT_SECRET_ACCESS_KEY)
    service.set_host(emulator.visual_host)
    service.set_scheme("http")
    answer = service.cv_sync2async_submit_task({"req_key": REQ_KEY, "prompt": "2 images of a lighthouse", **SMALL})
    assert answer["code"] == 10000
    task_id = answer["data"]["task_id"]
    form = {"req_key": REQ_KEY, "task_id": task_id, "req_json": json.dumps({"return_url": True})}
    seen = []
    for _ in range(10):
        result = service.cv_sync2async_get_result(form)
        seen.append(result["data"]["status"])
        if seen[-1] == "done":
            break
        clock.advance(1.0)
    assert seen == ["in_queue", "generating", "generating", "generating", "generating", "done"]
    urls = result["data"]["image_urls"]
    assert len(urls) == 2
    for url in urls:
        download = requests.get(url, timeout=10)
        assert download.status_code == 200
        assert download.content.startswith(JPEG)
    inline = service.cv_sync2async_get_result({"req_key": REQ_KEY, "task_id": task_id})
    assert [base64.b64decode(item)[:3] for item in inline["data"]["binary_data_base64"]] == [JPEG, JPEG]
    assert emulator.billed_images == 2
    assert [(entry.model, entry.images, entry.delivered) for entry in emulator.ledger] == [(REQ_KEY, 2, True)]


def test_the_official_sdk_meets_signature_does_not_match(emulator: JiMengEmulator) -> None:
    from volcengine.visual.VisualService import VisualService

    service = VisualService()
    service.set_ak(DEFAULT_ACCESS_KEY_ID)
    service.set_sk("not-the-secret")
    service.set_host(emulator.visual_host)
    service.set_scheme("http")
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        service.cv_sync2async_submit_task({"req_key": REQ_KEY, "prompt": "a fox", **SMALL})
    assert emulator.billed_images == 0


# -- the gateway -------------------------------------------------------------------------------------


def _gateway_error(answer: requests.Response) -> dict[str, Any]:
    metadata: dict[str, Any] = answer.json()["ResponseMetadata"]
    assert metadata["Service"] == "cv"
    assert metadata["Region"] == "cn-north-1"
    assert metadata["RequestId"]
    error: dict[str, Any] = metadata["Error"]
    return error


def test_a_wrong_secret_answers_signature_does_not_match(emulator: JiMengEmulator) -> None:
    answer = call(emulator, SUBMIT, {"req_key": REQ_KEY, "prompt": "a fox"}, secret="wrong-secret")
    assert answer.status_code == 401
    error = _gateway_error(answer)
    assert (error["Code"], error["CodeN"]) == ("SignatureDoesNotMatch", 100010)
    assert "wrong-secret" not in answer.text
    assert DEFAULT_SECRET_ACCESS_KEY not in answer.text
    assert emulator.billed_images == 0
    assert emulator.runtime.visual_tasks.all() == []


def test_a_body_other_than_the_signed_one_does_not_match(emulator: JiMengEmulator) -> None:
    tampered = json.dumps({"req_key": REQ_KEY, "prompt": "something else", **SMALL}).encode()
    answer = call(emulator, SUBMIT, {"req_key": REQ_KEY, "prompt": "a fox", **SMALL}, sent_body=tampered)
    assert _gateway_error(answer)["Code"] == "SignatureDoesNotMatch"
    assert emulator.billed_images == 0


def test_missing_and_unknown_access_keys_and_unknown_actions(emulator: JiMengEmulator) -> None:
    url = f"{emulator.root_url}/?Action={SUBMIT}&Version=2022-08-31"
    unsigned = requests.post(url, json={"req_key": REQ_KEY, "prompt": "a fox"}, timeout=10)
    assert unsigned.status_code == 401
    assert _gateway_error(unsigned)["Code"] == "MissingAuthenticationToken"
    stranger = call(emulator, SUBMIT, {"req_key": REQ_KEY, "prompt": "a fox"}, access_key_id="AKLTsomeoneelse")
    assert stranger.status_code == 401
    assert _gateway_error(stranger)["Code"] == "InvalidAccessKey"
    old = call(emulator, SUBMIT, {"req_key": REQ_KEY, "prompt": "a fox"}, version="2020-08-26")
    assert old.status_code == 404
    assert _gateway_error(old)["Code"] == "InvalidActionOrVersion"
    assert emulator.billed_images == 0


def test_without_an_access_key_any_request_is_accepted(make_jimeng_emulator: Callable[..., JiMengEmulator]) -> None:
    emulator = make_jimeng_emulator(access_key_id=None)
    url = f"{emulator.root_url}/?Action={SUBMIT}&Version=2022-08-31"
    answer = requests.post(url, json={"req_key": REQ_KEY, "prompt": "a fox", **SMALL}, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["data"]["task_id"]


# -- task states -------------------------------------------------------------------------------------


def test_a_task_moves_through_its_states_on_the_clock(
    make_jimeng_emulator: Callable[..., JiMengEmulator], clock: Clock
) -> None:
    emulator = make_jimeng_emulator(clock=clock, latency=2.0, visual_queue_delay=1.0)
    task_id = submitted(emulator, "a set of 4 postcards")
    assert emulator.billed_images == 4  # the submit starts the paid work
    assert state(emulator, task_id)["status"] == "in_queue"
    clock.advance(1.0)
    assert state(emulator, task_id)["status"] == "generating"
    clock.advance(7.99)  # 4 images at 2 s each
    assert state(emulator, task_id) == {"status": "generating", "image_urls": None, "binary_data_base64": []}
    assert emulator.ledger[0].delivered is False  # billed, not fetched yet
    clock.advance(0.01)
    done = state(emulator, task_id)
    assert done["status"] == "done"
    assert len(done["binary_data_base64"]) == 4
    assert emulator.ledger[0].delivered is True
    assert ledger_payload(emulator)["undelivered_images"] == 0
    assert emulator.billed_images == 4  # polling is free


def test_an_unknown_task_is_not_found_and_costs_nothing(emulator: JiMengEmulator) -> None:
    answer = poll(emulator, "7000000000000000001")
    assert answer.status_code == 200
    assert answer.json()["code"] == 10000
    assert answer.json()["data"]["status"] == "not_found"
    assert emulator.billed_images == 0


def test_a_task_expires_12_hours_after_submit_billed_and_undelivered(emulator: JiMengEmulator, clock: Clock) -> None:
    task_id = submitted(emulator)
    clock.advance(12 * 3600 - 1)
    assert state(emulator, task_id, return_url=True)["status"] == "done"
    clock.advance(1)
    assert state(emulator, task_id)["status"] == "expired"
    assert emulator.billed_images == 1


def test_an_expired_task_never_polled_stays_undelivered(emulator: JiMengEmulator, clock: Clock) -> None:
    task_id = submitted(emulator)
    clock.advance(12 * 3600)
    assert state(emulator, task_id)["status"] == "expired"
    assert ledger_payload(emulator)["undelivered_images"] == 1


# -- sets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "fields", "images"),
    [
        ("a red fox", {}, 1),
        ("a storyboard of 4 panels", {}, 4),
        ("a storyboard of 4 panels", {"force_single": True}, 1),
        ("12 images of a cat", {"image_urls": [f"https://example.com/{i}.jpg" for i in range(10)]}, 5),
    ],
    ids=["plain", "set", "force_single", "set-capped-by-references"],
)
def test_sets_force_single_and_references(
    emulator: JiMengEmulator, prompt: str, fields: dict[str, Any], images: int
) -> None:
    task_id = submitted(emulator, prompt, **fields)
    assert len(state(emulator, task_id)["binary_data_base64"]) == images
    assert emulator.billed_images == images


# -- req_json at poll time ---------------------------------------------------------------------------


def test_req_json_chooses_urls_or_base64_and_the_logo_at_poll_time(emulator: JiMengEmulator) -> None:
    task_id = submitted(emulator)
    plain = base64.b64decode(state(emulator, task_id)["binary_data_base64"][0])
    logo = base64.b64decode(
        state(emulator, task_id, logo_info={"add_logo": True, "position": 0})["binary_data_base64"][0]
    )
    assert plain.startswith(JPEG)
    assert logo.startswith(JPEG)
    assert plain != logo
    urls = state(emulator, task_id, return_url=True, logo_info={"add_logo": False})
    assert urls["binary_data_base64"] == []
    assert requests.get(urls["image_urls"][0], timeout=10).content == plain
    assert emulator.billed_images == 1


@pytest.mark.parametrize(
    "req_json",
    ['{"return_url": "yes"}', "not json", '{"logo_info": {"position": 7}}', '{"logo_info": {"opacity": 2}}'],
)
def test_a_bad_req_json_is_refused(emulator: JiMengEmulator, req_json: str) -> None:
    task_id = submitted(emulator)
    answer = call(emulator, POLL, {"req_key": REQ_KEY, "task_id": task_id, "req_json": req_json})
    assert answer.status_code == 400
    assert answer.json()["code"] == 50400


@pytest.mark.parametrize(
    "fields",
    [
        {"req_key": "jimeng_t2i_v30"},
        {"prompt": ""},
        {"width": 1024, "height": None},
        {"width": 512, "height": 512},
        {"size": 4097 * 4096, "width": None, "height": None},
        {"image_urls": [f"https://example.com/{i}.jpg" for i in range(11)]},
        {"force_single": "yes"},
        {"scale": 1.5},
    ],
)
def test_invalid_submits_are_refused_before_any_work(emulator: JiMengEmulator, fields: dict[str, Any]) -> None:
    body = {"req_key": REQ_KEY, "prompt": "a fox", **SMALL, **fields}
    answer = call(emulator, SUBMIT, {key: value for key, value in body.items() if value is not None})
    assert answer.status_code == 400
    assert answer.json()["code"] == 50400
    assert emulator.billed_images == 0
    assert emulator.runtime.visual_tasks.all() == []


# -- faults and limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"), [("50429", 429), ("50430", 429), ("50411", 400), ("50412", 400), ("50413", 400)]
)
def test_refusals_at_submit_start_nothing(emulator: JiMengEmulator, code: str, status: int) -> None:
    emulator.inject(Fault("visual_error", code=code, path=SUBMIT_FAULT_PATH))
    answer = submit(emulator)
    assert answer.status_code == status
    assert (answer.json()["code"], answer.json()["data"]) == (int(code), None)
    assert emulator.billed_images == 0
    assert emulator.runtime.visual_tasks.all() == []
    submitted(emulator)  # the fault was used once
    assert emulator.billed_images == 1


@pytest.mark.parametrize("code", ["50500", "50501"])
def test_an_internal_error_at_submit_may_have_started_a_billed_task(emulator: JiMengEmulator, code: str) -> None:
    emulator.inject(Fault("visual_error", code=code, path=SUBMIT_FAULT_PATH))
    answer = submit(emulator)
    assert answer.status_code == 500
    assert answer.json()["code"] == int(code)
    assert emulator.billed_images == 1  # why the spec says not to retry a submit blindly
    assert ledger_payload(emulator)["undelivered_images"] == 1


@pytest.mark.parametrize("code", ["50511", "50512"])
def test_a_task_failing_after_generation_is_done_with_the_code_and_not_billed(
    emulator: JiMengEmulator, code: str
) -> None:
    emulator.inject(Fault("visual_error", code=code, path=SUBMIT_FAULT_PATH))
    task_id = submitted(emulator)
    answer = poll(emulator, task_id)
    assert answer.status_code == 400
    assert answer.json()["code"] == int(code)
    assert answer.json()["data"]["status"] == "done"
    assert emulator.billed_images == 0


@pytest.mark.parametrize(("code", "status"), [("50429", 429), ("50430", 429), ("50500", 500), ("50501", 500)])
def test_poll_errors_are_transient(emulator: JiMengEmulator, code: str, status: int) -> None:
    task_id = submitted(emulator)
    emulator.inject(Fault("visual_error", code=code, path=POLL_FAULT_PATH, times=2))
    assert [poll(emulator, task_id).status_code for _ in range(2)] == [status, status]
    assert state(emulator, task_id)["status"] == "done"
    assert emulator.billed_images == 1


def test_a_submit_whose_answer_is_lost_is_billed_all_the_same(emulator: JiMengEmulator) -> None:
    emulator.inject(Fault("reset_mid_body", path=SUBMIT_FAULT_PATH))
    with pytest.raises(requests.RequestException):
        submit(emulator)
    assert emulator.billed_images == 1
    assert [record["task_id"] is not None for record in emulator.requests] == [True]


def test_the_moderation_marker_is_refused_as_text_risk(emulator: JiMengEmulator) -> None:
    answer = submit(emulator, "a FORBIDDEN picture")
    assert answer.status_code == 400
    assert answer.json()["code"] == 50412
    assert emulator.billed_images == 0


def test_the_concurrency_limit_answers_50430_until_a_task_is_done(
    make_jimeng_emulator: Callable[..., JiMengEmulator], clock: Clock
) -> None:
    emulator = make_jimeng_emulator(clock=clock, latency=5.0, visual_max_concurrent_tasks=2)
    submitted(emulator)
    submitted(emulator)
    refused = submit(emulator)
    assert refused.status_code == 429
    assert refused.json()["code"] == 50430
    clock.advance(5.0)
    submitted(emulator)
    assert emulator.billed_images == 3


def test_with_limited_parallelism_tasks_wait_in_queue_first_come_first_served(
    make_jimeng_emulator: Callable[..., JiMengEmulator], clock: Clock
) -> None:
    emulator = make_jimeng_emulator(clock=clock, latency=5.0, visual_parallelism=2)
    first, second, third = (submitted(emulator, f"a fox number {n}") for n in range(3))

    def statuses() -> list[str]:
        return [state(emulator, task)["status"] for task in (first, second, third)]

    assert statuses() == ["generating", "generating", "in_queue"]
    clock.advance(5.0)
    assert statuses() == ["done", "done", "generating"]
    clock.advance(5.0)
    assert statuses() == ["done", "done", "done"]
    assert emulator.billed_images == 3  # billed at submit, queued or not


def test_images_per_minute_limits_submits_with_50429(make_jimeng_emulator: Callable[..., JiMengEmulator]) -> None:
    emulator = make_jimeng_emulator(images_per_minute=2)
    submitted(emulator, "a set of 2 mugs")
    refused = submit(emulator)
    assert refused.status_code == 429
    assert refused.json()["code"] == 50429
    assert emulator.rate_limited_count == 1
    assert emulator.billed_images == 2


def test_visual_error_faults_need_a_known_code() -> None:
    with pytest.raises(ValueError, match="visual_error needs a code"):
        Fault("visual_error", code="12345")


def test_a_submit_the_client_gave_up_on_is_billed(emulator: JiMengEmulator, wait_for: Callable[..., bool]) -> None:
    emulator.inject(Fault("slow", delay=0.5, path=SUBMIT_FAULT_PATH))
    url = f"{emulator.root_url}/?Action={SUBMIT}&Version=2022-08-31"
    raw = json.dumps({"req_key": REQ_KEY, "prompt": "a fox", **SMALL}).encode()
    credentials = VisualCredentials(DEFAULT_ACCESS_KEY_ID, DEFAULT_SECRET_ACCESS_KEY)
    headers = sign_request(credentials, "POST", url, headers={"Content-Type": "application/json"}, body=raw)
    with pytest.raises(requests.Timeout):
        requests.post(url, data=raw, headers=headers, timeout=0.1)
    assert wait_for(lambda: emulator.billed_images == 1)
    assert ledger_payload(emulator)["undelivered_images"] == 1


def test_a_broken_poll_answer_leaves_the_task_undelivered_until_a_poll_gets_through(emulator: JiMengEmulator) -> None:
    task_id = submitted(emulator)
    emulator.inject(Fault("reset_mid_body", path=POLL_FAULT_PATH))
    with pytest.raises(requests.RequestException):
        poll(emulator, task_id)
    assert ledger_payload(emulator)["undelivered_images"] == 1
    assert len(state(emulator, task_id)["binary_data_base64"]) == 1
    assert ledger_payload(emulator)["undelivered_images"] == 0
    assert emulator.billed_images == 1
