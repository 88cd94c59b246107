"""The Visual API client (``hooks/visual.py``) against the emulator: submit and poll, every documented
error code onto the provider's typed errors, what a submit may have billed, and the connection."""

# ruff: noqa: F811  (fixtures imported from tests.visual_fixtures are parameters here)

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import POLL_FAULT_PATH, SUBMIT_FAULT_PATH, Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengAuthenticationError,
    JiMengConfigurationError,
    JiMengContentPolicyError,
    JiMengRateLimitError,
    JiMengResponseError,
    JiMengServerError,
    JiMengSubmitUncertainError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.visual import (
    ARK_API,
    DONE,
    EXPIRED,
    FAILED,
    GENERATING,
    IN_QUEUE,
    NOT_FOUND,
    TASK_TTL_SECONDS,
    VISUAL_API,
    VISUAL_BASE_URL,
    VisualClient,
    build_req_json,
    connection_api,
    max_images_billed_visual,
    validate_submit_body,
    visual_config,
)
from tests.visual_fixtures import (  # noqa: F401  (fixtures)
    ACCESS_KEY_ID,
    SECRET,
    SMALL,
    Clock,
    client,
    clock,
    connect_visual,
    emulator,
    make_client,
    make_jimeng_emulator,
    make_visual_emulator,
    submits,
)

JPEG = b"\xff\xd8\xff"
ONE = {"prompt": "a red fox in the snow", "force_single": True, **SMALL}


def decoded(result: Any) -> list[bytes]:
    return [base64.b64decode(image.b64_json) for image in result.result.images]


# -- submit and poll ----------------------------------------------------------------------------------


def test_submit_then_poll_gives_the_images_as_a_generation_result(
    client: VisualClient, emulator: JiMengEmulator
) -> None:
    task_id = client.submit({"prompt": "a set of 3 lighthouses", **SMALL})
    outcome = client.poll(task_id)
    assert (outcome.task_id, outcome.status, outcome.finished) == (task_id, DONE, True)
    assert outcome.result is not None
    assert outcome.result.model == "jimeng_t2i_v40"
    assert len(outcome.result.succeeded) == 3
    assert outcome.result.billed_images == 3
    assert all(image.startswith(JPEG) for image in decoded(outcome))
    assert emulator.billed_images == 3
    assert [entry.delivered for entry in emulator.ledger] == [True]
    assert client.stats["submits"] == 1
    assert client.stats["possibly_billed_submits"] == 0


def test_poll_with_return_url_gives_urls_and_several_ids_give_a_dict(client: VisualClient) -> None:
    first, second = client.submit(ONE), client.submit({**ONE, "prompt": "a blue whale"})
    outcomes = client.poll([first, second], build_req_json(return_url=True))
    assert list(outcomes) == [first, second]
    for outcome in outcomes.values():
        assert outcome.status == DONE
        assert outcome.result is not None
        image = outcome.result.images[0]
        assert image.url
        assert image.url.startswith("http://127.0.0.1")
        assert image.b64_json is None
        assert "Signature" not in repr(outcome)  # signed URLs stay out of reprs


def test_states_follow_the_emulators_clock(
    make_visual_emulator: Callable[..., JiMengEmulator],
    connect_visual: Callable[..., None],
    make_client: Callable[..., VisualClient],
    clock: Clock,
) -> None:
    emulator = make_visual_emulator(latency=5.0, visual_queue_delay=2.0)
    connect_visual(emulator)
    client = make_client()
    task_id = client.submit(ONE)
    seen = []
    for step in (0, 3, 5):
        clock.advance(step)
        seen.append(client.poll(task_id).status)
    assert seen == [IN_QUEUE, GENERATING, DONE]


def test_an_unknown_task_is_not_found_and_an_old_one_expired(client: VisualClient, clock: Clock) -> None:
    assert client.poll("no-such-task").status == NOT_FOUND
    task_id = client.submit(ONE)
    clock.advance(TASK_TTL_SECONDS + 1)
    outcome = client.poll(task_id)
    assert (outcome.status, outcome.finished, outcome.result) == (EXPIRED, True, None)


def test_the_watermark_is_chosen_at_poll_time(client: VisualClient, emulator: JiMengEmulator) -> None:
    task_id = client.submit(ONE)
    plain = decoded(client.poll(task_id, build_req_json(add_logo=False)))
    marked = decoded(client.poll(task_id, build_req_json(add_logo=True)))
    assert plain != marked
    # Without a req_json the connection's watermark extra (default true, as on the Ark path) decides.
    assert decoded(client.poll(task_id)) == marked
    assert emulator.billed_images == 1  # polls are free


# -- error codes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["50411", "50412", "50413"])
def test_a_submit_refused_by_moderation_is_a_content_policy_error_not_retried(
    client: VisualClient, emulator: JiMengEmulator, code: str
) -> None:
    emulator.inject(Fault("visual_error", code=code, path=SUBMIT_FAULT_PATH))
    with pytest.raises(JiMengContentPolicyError) as caught:
        client.submit(ONE)
    assert (caught.value.code, caught.value.retryable, caught.value.possibly_billed) == (code, False, False)
    assert submits(emulator) == 1
    assert emulator.billed_images == 0


@pytest.mark.parametrize("code", ["50429", "50430"])
def test_a_burst_of_rate_limits_on_submit_is_absorbed_with_backoff(
    client: VisualClient, emulator: JiMengEmulator, code: str
) -> None:
    emulator.inject(Fault("visual_error", code=code, path=SUBMIT_FAULT_PATH, times=3))
    task_id = client.submit(ONE)
    assert client.poll(task_id).status == DONE
    stats = client.stats
    assert (stats["submit_attempts"], stats["rate_limited"], stats["retries"], stats["submits"]) == (4, 3, 3, 1)
    assert emulator.billed_images == 1
    assert len(emulator.ledger) == 1


def test_rate_limits_beyond_max_retries_raise_the_rate_limit_error(
    emulator: JiMengEmulator, connect_visual: Callable[..., None], make_client: Callable[..., VisualClient]
) -> None:
    connect_visual(emulator, max_retries=1)
    client = make_client()
    emulator.inject(Fault("visual_error", code="50429", path=SUBMIT_FAULT_PATH, times=5))
    with pytest.raises(JiMengRateLimitError) as caught:
        client.submit(ONE)
    assert caught.value.retryable
    assert caught.value.status_code == 429
    assert submits(emulator) == 2
    assert emulator.billed_images == 0


@pytest.mark.parametrize("code", ["50500", "50501"])
def test_an_internal_error_on_submit_is_possibly_billed_and_never_re_sent(
    client: VisualClient, emulator: JiMengEmulator, code: str
) -> None:
    emulator.inject(Fault("visual_error", code=code, path=SUBMIT_FAULT_PATH))
    with pytest.raises(JiMengSubmitUncertainError) as caught:
        client.submit(ONE)
    error = caught.value
    assert (error.code, error.possibly_billed, error.retryable) == (code, True, False)
    assert isinstance(error, JiMengServerError)
    # The emulator started (and billed) the task though its id never came: one submit, one billed image.
    assert submits(emulator) == 1
    assert emulator.billed_images == 1
    assert client.stats["possibly_billed_submits"] == 1
    assert client.stats["submits"] == 0


def test_a_submit_that_times_out_is_counted_as_possibly_billed_and_never_re_sent(
    client: VisualClient, emulator: JiMengEmulator, wait_for: Callable[..., bool]
) -> None:
    quick = VisualClient(dataclasses.replace(client.config, timeout=0.2))
    emulator.inject(Fault("slow", delay=0.6, path=SUBMIT_FAULT_PATH))
    try:
        with pytest.raises(JiMengTimeoutError) as caught:
            quick.submit(ONE)
    finally:
        quick.close()
    assert caught.value.possibly_billed
    assert caught.value.code == "Timeout"
    assert quick.stats["possibly_billed_submits"] == 1
    assert quick.stats["submit_attempts"] == 1
    assert wait_for(lambda: emulator.billed_images == 1)  # the server went on and billed it
    assert submits(emulator) == 1


@pytest.mark.parametrize("kind", ["malformed", "truncated", "reset_mid_body"])
def test_a_broken_submit_answer_is_possibly_billed_and_never_re_sent(
    client: VisualClient, emulator: JiMengEmulator, kind: str
) -> None:
    emulator.inject(Fault(kind, path=SUBMIT_FAULT_PATH))
    with pytest.raises(JiMengAPIError) as caught:
        client.submit(ONE)
    assert caught.value.possibly_billed
    assert isinstance(caught.value, (JiMengResponseError, JiMengTimeoutError))
    assert submits(emulator) == 1
    assert emulator.billed_images == 1
    assert client.stats["possibly_billed_submits"] == 1


def test_a_submit_whose_connection_dropped_is_counted_possibly_billed_though_the_server_did_nothing(
    client: VisualClient, emulator: JiMengEmulator
) -> None:
    # The client cannot tell a drop before the work from one after it: it counts the worst and does not re-send.
    emulator.inject(Fault("reset", path=SUBMIT_FAULT_PATH))
    with pytest.raises(JiMengTimeoutError) as caught:
        client.submit(ONE)
    assert caught.value.possibly_billed
    assert client.stats["possibly_billed_submits"] == 1
    assert submits(emulator) == 1
    assert emulator.billed_images == 0


def test_a_submit_to_a_closed_port_is_retried_nothing_having_left(
    emulator: JiMengEmulator, connect_visual: Callable[..., None], make_client: Callable[..., VisualClient]
) -> None:
    connect_visual(emulator, max_retries=2)
    client = make_client()
    emulator.stop()
    with pytest.raises(JiMengTimeoutError) as caught:
        client.submit(ONE)
    assert not caught.value.possibly_billed
    assert client.stats["submit_attempts"] == 3
    assert client.stats["possibly_billed_submits"] == 0


def test_a_ca_bundle_that_is_not_there_fails_the_submit_as_a_setting_not_as_possibly_billed(tmp_path: Any) -> None:
    # The transport failures are the Ark hook's (hooks/sending.py): nothing left, so nothing may be billed.
    conn = SimpleNamespace(
        conn_id="jimeng_visual",
        host="https://127.0.0.1:9",
        schema=None,
        port=None,
        login=ACCESS_KEY_ID,
        password=SECRET,
        extra="{}",
        extra_dejson={"api": VISUAL_API, "verify": str(tmp_path / "missing-ca.pem")},
    )
    with VisualClient.from_connection(conn) as client:
        with pytest.raises(JiMengConfigurationError) as caught:
            client.submit(ONE)
        assert caught.value.parameter == "verify"
        assert client.stats["submit_attempts"] == 1
        assert client.stats["possibly_billed_submits"] == 0


@pytest.mark.parametrize(("code", "retryable"), [("50511", True), ("50512", False)])
def test_a_task_done_with_an_error_code_is_a_failed_outcome(
    client: VisualClient, emulator: JiMengEmulator, code: str, retryable: bool
) -> None:
    emulator.inject(Fault("visual_error", code=code, path=SUBMIT_FAULT_PATH))
    task_id = client.submit(ONE)  # the submit succeeds; the task fails once made
    outcome = client.poll(task_id)
    assert (outcome.status, outcome.finished, outcome.error_code, outcome.retryable) == (FAILED, True, code, retryable)
    assert outcome.result is None
    assert emulator.billed_images == 0


@pytest.mark.parametrize("code", ["50429", "50430", "50500", "50501", "50511"])
def test_transient_poll_errors_are_retried_polls_being_free(
    client: VisualClient, emulator: JiMengEmulator, code: str
) -> None:
    task_id = client.submit(ONE)
    emulator.inject(Fault("visual_error", code=code, path=POLL_FAULT_PATH, times=2))
    assert client.poll(task_id).status == DONE
    assert client.stats["poll_attempts"] == 3
    assert client.stats["retries"] == 2


def test_one_poll_attempt_raises_the_rate_limit_for_the_caller_to_back_off(
    client: VisualClient, emulator: JiMengEmulator
) -> None:
    task_id = client.submit(ONE)
    emulator.inject(Fault("visual_error", code="50430", path=POLL_FAULT_PATH))
    with pytest.raises(JiMengRateLimitError):
        client.poll_once(task_id)
    assert client.poll_once(task_id).status == DONE


@pytest.mark.parametrize("code", ["50411", "50412", "50413"])
def test_a_poll_refused_by_moderation_is_a_failed_outcome(
    client: VisualClient, emulator: JiMengEmulator, code: str
) -> None:
    task_id = client.submit(ONE)
    emulator.inject(Fault("visual_error", code=code, path=POLL_FAULT_PATH))
    outcome = client.poll(task_id)
    assert (outcome.status, outcome.error_code, outcome.retryable) == (FAILED, code, False)


def test_a_wrong_secret_is_an_authentication_error_and_sends_nothing_more(
    emulator: JiMengEmulator, connect_visual: Callable[..., None], make_client: Callable[..., VisualClient]
) -> None:
    wrong = "not-the-secret-9d8c7b6a"
    connect_visual(emulator, secret=wrong)
    client = make_client()
    with pytest.raises(JiMengAuthenticationError) as caught:
        client.submit(ONE)
    assert (caught.value.code, caught.value.status_code, caught.value.retryable) == (
        "SignatureDoesNotMatch",
        401,
        False,
    )
    with pytest.raises(JiMengAuthenticationError):
        client.poll("any-task")
    assert submits(emulator) == 1
    assert emulator.billed_images == 0
    assert wrong not in str(caught.value)
    assert SECRET not in str(caught.value)


def test_an_unknown_access_key_is_an_authentication_error(
    emulator: JiMengEmulator, connect_visual: Callable[..., None], make_client: Callable[..., VisualClient]
) -> None:
    connect_visual(emulator, access_key_id="AKLTsomeoneelse")
    with pytest.raises(JiMengAuthenticationError) as caught:
        make_client().poll("any-task")
    assert caught.value.code == "InvalidAccessKey"


# -- test_connection ----------------------------------------------------------------------------------


def test_test_connection_proves_the_signature_without_paying(client: VisualClient, emulator: JiMengEmulator) -> None:
    ok, message = client.test_connection()
    assert ok, message
    assert "accepted the signature" in message
    assert emulator.billed_images == 0
    assert submits(emulator) == 0
    assert [record["path"] for record in emulator.requests] == [POLL_FAULT_PATH]


def test_test_connection_reports_a_rejected_key_pair_without_the_secret(
    emulator: JiMengEmulator, connect_visual: Callable[..., None], make_client: Callable[..., VisualClient]
) -> None:
    wrong = "not-the-secret-1a2b3c4d"
    connect_visual(emulator, secret=wrong)
    ok, message = make_client().test_connection()
    assert not ok
    assert "SignatureDoesNotMatch" in message
    assert "password" in message
    assert wrong not in message


def test_test_connection_reports_an_unreachable_host(
    connect_visual: Callable[..., None], make_client: Callable[..., VisualClient], emulator: JiMengEmulator
) -> None:
    connect_visual(emulator)
    client = make_client()
    emulator.stop()
    ok, message = client.test_connection()
    assert not ok
    assert "Cannot reach" in message


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "parameter"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "x", "req_key": "jimeng_t2i_v30"}, "req_key"),
        ({"prompt": "x", "image_urls": ["https://a.example/i.png"] * 11}, "image_urls"),
        ({"prompt": "x", "image_urls": "https://a.example/i.png"}, "image_urls"),
        ({"prompt": "x", "image_urls": ["file:///etc/passwd"]}, "image_urls"),
        ({"prompt": "x", "size": 1000}, "size"),
        ({"prompt": "x", "size": 4096 * 4096 + 1}, "size"),
        ({"prompt": "x", "size": 2048.5}, "size"),
        ({"prompt": "x", "width": 2048}, "height"),
        ({"prompt": "x", "height": 2048}, "width"),
        ({"prompt": "x", "width": 512, "height": 512}, "width"),
        ({"prompt": "x", "width": 8192, "height": 4096}, "width"),
        ({"prompt": "x", "scale": 1.5}, "scale"),
        ({"prompt": "x", "scale": "0.5"}, "scale"),
        ({"prompt": "x", "force_single": "yes"}, "force_single"),
        ({"prompt": "x", "min_ratio": 0.01}, "min_ratio"),
        ({"prompt": "x", "max_ratio": 16}, "max_ratio"),
        ({"prompt": "x", "min_ratio": 2, "max_ratio": 1}, "min_ratio"),
        ({"prompt": "x", "forcesingle": True}, "forcesingle"),
        ({"prompt": "x", "seed": -2}, "seed"),
    ],
)
def test_an_invalid_submit_body_is_refused_before_any_request(
    client: VisualClient, emulator: JiMengEmulator, body: dict[str, Any], parameter: str
) -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        client.submit(body)
    assert caught.value.parameter == parameter
    assert emulator.request_count == 0


def test_a_valid_body_is_completed_and_its_most_billable_images_known() -> None:
    body = validate_submit_body({"prompt": "x", "image_urls": ["https://a.example/1.png"] * 4, "scale": 0.3})
    assert body["req_key"] == "jimeng_t2i_v40"
    assert max_images_billed_visual(body) == 11
    assert max_images_billed_visual({**body, "force_single": True}) == 1


def test_a_bad_req_json_is_refused_before_any_request(client: VisualClient, emulator: JiMengEmulator) -> None:
    for req_json in ("{not json", {"return_url": "yes"}, {"logo_info": {"add_logo": 1}}, "[1]"):
        with pytest.raises(JiMengConfigurationError) as caught:
            client.poll_once("some-task", req_json)
        assert caught.value.parameter == "req_json"
    assert emulator.request_count == 0


# -- the connection -----------------------------------------------------------------------------------


def _conn(**fields: Any) -> SimpleNamespace:
    base = {"conn_id": "c", "host": None, "schema": None, "port": None, "login": "AK", "password": "SK"}
    base["extra"] = '{"api": "visual"}'
    base.update(fields)
    extra = base["extra"]
    return SimpleNamespace(**base, extra_dejson=json.loads(extra) if extra else {})


def test_the_connection_defaults_to_the_official_host_and_region() -> None:
    config = visual_config(_conn())
    assert config.endpoint == VISUAL_BASE_URL
    assert config.credentials.region == "cn-north-1"
    assert config.action_url("CVSync2AsyncGetResult").startswith(
        "https://visual.volcengineapi.com/?Action=CVSync2AsyncGetResult&Version=2022-08-31"
    )
    assert visual_config(_conn(host="visual.volcengineapi.com")).endpoint == VISUAL_BASE_URL
    assert visual_config(_conn(extra='{"api": "visual", "region": "cn-beijing"}')).credentials.region == "cn-beijing"


@pytest.mark.parametrize(
    ("fields", "parameter"),
    [
        ({"login": ""}, "login"),
        ({"password": " "}, "password"),
        ({"host": "http://127.0.0.1:8765"}, "host"),
        ({"host": "https://visual.volcengineapi.com/api/v3"}, "host"),
        ({"extra": '{"api": "visual", "timeout": 0}'}, "timeout"),
        ({"extra": '{"api": "visual", "max_retries": "many"}'}, "max_retries"),
        ({"extra": '{"api": "visual", "allow_http": "perhaps"}'}, "allow_http"),
        ({"extra": None}, "api"),
        ({"extra": '{"api": "ark"}'}, "api"),
    ],
)
def test_a_bad_connection_names_its_field(fields: dict[str, Any], parameter: str) -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        visual_config(_conn(**fields))
    assert caught.value.parameter == parameter


def test_the_api_extra_says_which_api_a_connection_speaks() -> None:
    assert connection_api({}) == ARK_API
    assert connection_api({"api": "Visual"}) == VISUAL_API
    assert connection_api({"api": None}) == ARK_API
    with pytest.raises(JiMengConfigurationError) as caught:
        connection_api({"api": "openai"})
    assert caught.value.parameter == "api"


def test_the_secret_reaches_no_repr_message_or_log(
    emulator: JiMengEmulator,
    connect_visual: Callable[..., None],
    make_client: Callable[..., VisualClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    connect_visual(emulator)
    client = make_client()
    emulator.inject(
        Fault("visual_error", code="50429", path=SUBMIT_FAULT_PATH),
        Fault("visual_error", code="50500", path=SUBMIT_FAULT_PATH),
    )
    with pytest.raises(JiMengSubmitUncertainError) as caught:
        client.submit(ONE)
    assert client.test_connection()[0]
    texts = [repr(client.config), str(client.config), str(caught.value), repr(caught.value), caplog.text]
    assert all(SECRET not in text for text in texts)
    assert ACCESS_KEY_ID in repr(client.config)  # the key id is no secret: it names the key
