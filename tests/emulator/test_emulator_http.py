"""The emulator answers like the real API: auth, validation, images, sets, URLs, streams, billing."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, KNOWN_MODELS, JiMengEmulator

MODEL = "doubao-seedream-4-0-250828"


def _decode(data: bytes) -> tuple[str, tuple[int, int]]:
    image_module = pytest.importorskip("PIL.Image")
    with image_module.open(io.BytesIO(data)) as image:
        return str(image.format), image.size


def _sse_events(response: requests.Response) -> list[tuple[str | None, str]]:
    events: list[tuple[str | None, str]] = []
    event: str | None = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((event, line[len("data: ") :]))
            event = None
    return events


def _connections_opened(session: requests.Session, url: str) -> int:
    pools = session.get_adapter(url).poolmanager.pools
    return sum(pools[key].num_connections for key in pools.keys())  # noqa: SIM118 - no __iter__


# -- auth, ids, routing -------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {DEFAULT_API_KEY}"])
def test_bad_key_gets_401_envelope_with_request_id(jimeng_emulator: JiMengEmulator, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = requests.post(
        f"{jimeng_emulator.base_url}/images/generations",
        json={"model": MODEL, "prompt": "x"},
        headers={**headers, "X-Client-Request-Id": "client-123"},
        timeout=5,
    )
    assert response.status_code == 401
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert error["code"] == "AuthenticationError"
    assert error["type"] == "Unauthorized"
    assert error["message"] == f"The API key in the request is missing or invalid. Request id: {request_id}"
    assert jimeng_emulator.request_count == 1
    assert jimeng_emulator.requests[0]["client_request_id"] == "client-123"
    assert jimeng_emulator.requests[0]["status"] == 401
    assert jimeng_emulator.billed_images == 0


def test_request_ids_are_unique(generate) -> None:  # type: ignore[no-untyped-def]
    ids = {generate().headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_no_auth_mode_accepts_any_key(make_jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    emulator = make_jimeng_emulator(api_key=None)
    response = requests.post(
        f"{emulator.base_url}/images/generations", json={"model": MODEL, "prompt": "x", "size": "1K"}, timeout=5
    )
    assert response.status_code == 200


def test_models_listing_requires_key(jimeng_emulator: JiMengEmulator, session: requests.Session) -> None:
    for base in (jimeng_emulator.base_url, jimeng_emulator.openai_base_url):
        listing = session.get(f"{base}/models", timeout=5)
        assert listing.status_code == 200
        assert listing.json()["object"] == "list"
        assert [model["id"] for model in listing.json()["data"]] == list(KNOWN_MODELS)
        anonymous = requests.get(f"{base}/models", timeout=5)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "AuthenticationError"
    assert jimeng_emulator.request_count == 0  # listing models is not a generation


def test_health_and_unknown_routes(jimeng_emulator: JiMengEmulator, session: requests.Session) -> None:
    assert session.get(f"{jimeng_emulator.root_url}/healthz", timeout=5).json() == {"status": "ok"}
    wrong = session.post(f"{jimeng_emulator.root_url}/api/v3/image/generations", json={}, timeout=5)
    assert wrong.status_code == 404
    assert wrong.json()["error"]["code"] == "InvalidEndpointOrModel.NotFound"
    elsewhere = session.get(f"{jimeng_emulator.root_url}/nothing-here", timeout=5)
    assert elsewhere.status_code == 404
    assert "x-request-id" in elsewhere.headers
    assert session.get(f"{jimeng_emulator.base_url}/images/generations", timeout=5).status_code == 405


def test_keep_alive_survives_errors(jimeng_emulator: JiMengEmulator, session: requests.Session) -> None:
    """Every answer (errors included) has a correct length, so one pooled connection serves them all."""
    url = f"{jimeng_emulator.base_url}/images/generations"
    session.post(url, json={"model": MODEL, "prompt": "x", "size": "1K"}, timeout=5).raise_for_status()
    session.post(url, json={"model": MODEL, "prompt": "x", "size": "3K"}, timeout=5)
    session.post(url, data=b"not json", timeout=5)
    session.get(f"{jimeng_emulator.root_url}/nothing-here", timeout=5)
    requests_ok = session.post(url, json={"model": MODEL, "prompt": "x", "size": "1K"}, timeout=5)
    assert requests_ok.status_code == 200
    assert _connections_opened(session, url) == 1


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "3K"}, "size"),
        ({"size": "100x100"}, "size"),
        (
            {"sequential_image_generation": "auto", "sequential_image_generation_options": {"max_images": 16}},
            "max_images",
        ),
        ({"model": "doubao-seedream-4-5-251128", "size": "1K"}, "size"),
        ({"model": "doubao-seedream-3-0-t2i-250415", "size": "1024x1024", "stream": True}, "stream"),
        ({"prompt": "   "}, "prompt"),
        ({"response_format": "png"}, "response_format"),
    ],
)
def test_invalid_body_gets_400_naming_the_parameter(generate, fields, param) -> None:  # type: ignore[no-untyped-def]
    response = generate(**fields)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "InvalidParameter"
    assert error["param"] == param
    assert error["type"] == "BadRequest"
    assert error["message"].endswith(f"Request id: {response.headers['x-request-id']}")


def test_non_json_body_is_400(jimeng_emulator: JiMengEmulator, session: requests.Session) -> None:
    response = session.post(f"{jimeng_emulator.base_url}/images/generations", data=b"{oops", timeout=5)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "InvalidParameter"
    assert jimeng_emulator.requests[-1]["status"] == 400


def test_unknown_model_is_404_but_endpoint_ids_are_served(generate) -> None:  # type: ignore[no-untyped-def]
    unknown = generate(model="doubao-seedream-9-9-999999")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "InvalidEndpointOrModel.NotFound"
    assert generate(model="ep-20250101000000-abcde").status_code == 200
    assert generate(model="seedream-4-0-250828").status_code == 200


# -- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "expected"), [("1K", (1024, 1024)), ("2K", (2048, 2048)), ("1280x720", (1280, 720))])
def test_images_are_jpegs_of_the_requested_size(generate, session, size, expected) -> None:  # type: ignore[no-untyped-def]
    response = generate(size=size)
    assert response.status_code == 200
    item = response.json()["data"][0]
    assert item["size"] == f"{expected[0]}x{expected[1]}"
    assert "X-Tos-Signature=" in item["url"]
    download = session.get(item["url"], timeout=5)
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "image/jpeg"
    assert int(download.headers["Content-Length"]) == len(download.content)
    assert _decode(download.content) == ("JPEG", expected)


def test_default_size_is_2048_square(generate) -> None:  # type: ignore[no-untyped-def]
    response = generate(size=None, response_format="b64_json")
    assert response.json()["data"][0]["size"] == "2048x2048"


def test_b64_json_and_deterministic_content(generate) -> None:  # type: ignore[no-untyped-def]
    first = generate(seed=7, response_format="b64_json").json()["data"][0]
    again = generate(seed=7, response_format="b64_json").json()["data"][0]
    other_seed = generate(seed=8, response_format="b64_json").json()["data"][0]
    other_prompt = generate(seed=7, prompt="a blue whale", response_format="b64_json").json()["data"][0]
    assert "url" not in first
    data = base64.b64decode(first["b64_json"])
    assert _decode(data) == ("JPEG", (1024, 1024))
    assert first["b64_json"] == again["b64_json"]
    assert first["b64_json"] != other_seed["b64_json"]
    assert first["b64_json"] != other_prompt["b64_json"]


def test_url_downloads_are_counted_and_signatures_checked(generate, jimeng_emulator, session) -> None:  # type: ignore[no-untyped-def]
    url = generate().json()["data"][0]["url"]
    assert url.startswith(f"{jimeng_emulator.root_url}/tos/")
    assert session.get(url, timeout=5).status_code == 200
    assert jimeng_emulator.downloads == 1
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    forbidden = session.get(tampered, timeout=5)
    assert forbidden.status_code == 403
    assert forbidden.json()["Code"] == "SignatureDoesNotMatch"
    assert jimeng_emulator.downloads == 1


def test_urls_expire(make_jimeng_emulator, session) -> None:  # type: ignore[no-untyped-def]
    emulator = make_jimeng_emulator(url_ttl=0.5)
    response = session.post(
        f"{emulator.base_url}/images/generations", json={"model": MODEL, "prompt": "x", "size": "1K"}, timeout=5
    )
    url = response.json()["data"][0]["url"]
    assert "X-Tos-Expires=1" in url
    assert session.get(url, timeout=5).status_code == 200
    time.sleep(0.55)
    expired = session.get(url, timeout=5)
    assert expired.status_code == 403
    assert expired.json()["Code"] == "AccessDenied"
    assert expired.json()["Message"] == "Request has expired"


# -- sets, moderation, usage, ledger --------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "max_images", "expected"),
    [
        ("a comic strip, 4 images", 15, 4),
        ("a comic strip, 4 images", 2, 2),
        ("a set of 5 postcards", None, 5),
        ("一组插画，共两张", None, 2),
        ("a storyboard", None, 3),
        ("a storyboard", 1, 1),
    ],
)
def test_auto_sets_follow_prompt_and_max_images(generate, jimeng_emulator, prompt, max_images, expected) -> None:  # type: ignore[no-untyped-def]
    fields = {"sequential_image_generation": "auto", "response_format": "b64_json"}
    if max_images is not None:
        fields["sequential_image_generation_options"] = {"max_images": max_images}
    payload = generate(prompt=prompt, **fields).json()
    assert len(payload["data"]) == expected
    assert payload["usage"] == {
        "generated_images": expected,
        "output_tokens": expected * 4096,
        "total_tokens": expected * 4096,
    }
    assert jimeng_emulator.billed_images == expected
    images = {item["b64_json"] for item in payload["data"]}
    assert len(images) == expected  # each image of a set differs


def test_disabled_sets_give_one_image(generate) -> None:  # type: ignore[no-untyped-def]
    payload = generate(prompt="4 images please", sequential_image_generation="disabled").json()
    assert len(payload["data"]) == 1


def test_one_failed_image_is_not_billed(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    payload = generate(
        prompt="3 images FAIL_IMAGE_1",
        size="2K",
        sequential_image_generation="auto",
        sequential_image_generation_options={"max_images": 3},
    ).json()
    assert "url" in payload["data"][0]
    assert "url" in payload["data"][2]
    assert payload["data"][1]["error"]["code"] == "OutputImageSensitiveContentDetected"
    assert payload["usage"] == {"generated_images": 2, "output_tokens": 32768, "total_tokens": 32768}
    (entry,) = jimeng_emulator.ledger
    assert (entry.images, entry.output_tokens, entry.delivered) == (2, 32768, True)


def test_moderated_prompt_fails_whole_request(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    response = generate(prompt="something FORBIDDEN here")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "InputTextSensitiveContentDetected"
    assert jimeng_emulator.ledger == []


def test_ledger_and_request_records(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    data_uri = "data:image/png;base64," + base64.b64encode(_tiny_png()).decode()
    response = generate(prompt="a fox", size="1280x720", image=[data_uri])
    assert response.status_code == 200, response.text
    (entry,) = jimeng_emulator.ledger
    assert entry.request_id == response.headers["x-request-id"]
    assert (entry.model, entry.prompt, entry.images, entry.output_tokens) == (MODEL, "a fox", 1, 3600)
    assert entry.delivered is True
    assert abs(entry.created - time.time()) < 5
    (record,) = jimeng_emulator.requests
    assert record["path"] == "/api/v3/images/generations"
    assert record["status"] == 200
    assert record["body"]["prompt"] == "a fox"
    assert record["body"]["image"] == [f"<{len(data_uri)} chars>"]
    jimeng_emulator.reset()
    assert (jimeng_emulator.ledger, jimeng_emulator.requests, jimeng_emulator.request_count) == ([], [], 0)


def _tiny_png() -> bytes:
    image_module = pytest.importorskip("PIL.Image")
    buffer = io.BytesIO()
    image_module.new("RGB", (32, 32), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def test_openai_style_path_is_served(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    response = generate(path="/v1")
    assert response.status_code == 200
    assert jimeng_emulator.requests[0]["path"] == "/v1/images/generations"


# -- streaming ----------------------------------------------------------------------------------


def test_stream_sends_one_event_per_image_then_completed_and_done(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    response = generate(
        prompt="3 images FAIL_IMAGE_2",
        stream=True,
        sequential_image_generation="auto",
        sequential_image_generation_options={"max_images": 4},
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = _sse_events(response)
    assert events[-1] == (None, "[DONE]")
    payloads = [json.loads(data) for _, data in events[:-1]]
    assert [event for event, _ in events[:-1]] == [payload["type"] for payload in payloads]
    assert [payload["type"] for payload in payloads] == [
        "image_generation.partial_succeeded",
        "image_generation.partial_succeeded",
        "image_generation.partial_failed",
        "image_generation.completed",
    ]
    assert [payload.get("image_index") for payload in payloads[:3]] == [0, 1, 2]
    assert payloads[0]["size"] == "1024x1024"
    assert payloads[0]["url"]
    assert payloads[2]["error"]["code"] == "OutputImageSensitiveContentDetected"
    assert payloads[3]["usage"]["generated_images"] == 2
    assert jimeng_emulator.billed_images == 2


def test_stream_validation_error_is_plain_json(generate) -> None:  # type: ignore[no-untyped-def]
    response = generate(stream=True, size="3K")
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"


def test_stream_keeps_the_connection_usable(generate, session, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    assert _sse_events(generate(stream=True))[-1] == (None, "[DONE]")
    assert generate().status_code == 200
    url = f"{jimeng_emulator.base_url}/images/generations"
    assert _connections_opened(session, url) == 1


# -- limits and concurrency ---------------------------------------------------------------------


def test_images_per_minute_limit(make_jimeng_emulator, session) -> None:  # type: ignore[no-untyped-def]
    emulator = make_jimeng_emulator(images_per_minute=5)
    url = f"{emulator.base_url}/images/generations"
    base = {"model": MODEL, "size": "1K", "response_format": "b64_json"}
    auto = {"sequential_image_generation": "auto", "sequential_image_generation_options": {"max_images": 5}}
    # Reserves 5 (its max_images), settles to the 2 it generated.
    assert session.post(url, json={**base, **auto, "prompt": "2 images"}, timeout=5).status_code == 200
    for _ in range(3):
        assert session.post(url, json={**base, "prompt": "one"}, timeout=5).status_code == 200
    limited = session.post(url, json={**base, "prompt": "one"}, timeout=5)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "ModelAccountIpmRateLimitExceeded"
    assert "Retry-After" not in limited.headers
    assert emulator.rate_limited_count == 1
    assert emulator.billed_images == 5
    emulator.images_per_minute = None  # knobs change at runtime
    assert session.post(url, json={**base, "prompt": "one"}, timeout=5).status_code == 200


def test_a_set_reserves_its_max_images(make_jimeng_emulator, session) -> None:  # type: ignore[no-untyped-def]
    emulator = make_jimeng_emulator(images_per_minute=4)
    body = {
        "model": MODEL,
        "prompt": "2 images",
        "size": "1K",
        "sequential_image_generation": "auto",
        "sequential_image_generation_options": {"max_images": 5},
    }
    response = session.post(f"{emulator.base_url}/images/generations", json=body, timeout=5)
    assert response.status_code == 429
    assert emulator.rate_limited_count == 1


def test_64_concurrent_requests_overlap(make_jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    emulator = make_jimeng_emulator(latency=0.3)
    url = f"{emulator.base_url}/images/generations"

    def one(index: int) -> int:
        body = {"model": MODEL, "prompt": f"image {index % 4}", "size": "1K"}
        headers = {"Authorization": f"Bearer {DEFAULT_API_KEY}"}
        return requests.post(url, json=body, headers=headers, timeout=10).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=64) as pool:
        statuses = list(pool.map(one, range(64)))
    elapsed = time.monotonic() - started
    assert statuses == [200] * 64
    assert emulator.billed_images == 64
    assert elapsed < 6.0, f"64 requests of 0.3 s took {elapsed:.2f} s: they did not run concurrently"


def test_records_stamp_arrival_and_answer_on_the_monotonic_clock(make_jimeng_emulator, session, wait_for) -> None:  # type: ignore[no-untyped-def]
    # The bench measures the generation window (first request in, last answer out) from these.
    emulator = make_jimeng_emulator(latency=0.1)
    before = time.monotonic()
    response = session.post(
        f"{emulator.base_url}/images/generations", json={"model": MODEL, "prompt": "x", "size": "1K"}, timeout=5
    )
    after = time.monotonic()
    assert response.status_code == 200
    refused = session.post(f"{emulator.base_url}/images/generations", data=b"{", timeout=5)
    assert refused.status_code == 400
    assert wait_for(lambda: all(record["answered_at"] is not None for record in emulator.requests))
    answered, invalid = emulator.requests
    assert before <= answered["received_at"] <= answered["answered_at"] <= after + 0.05
    assert answered["answered_at"] - answered["received_at"] >= 0.1  # the latency is inside the window
    assert invalid["received_at"] <= invalid["answered_at"]


def test_stop_interrupts_latency_sleep() -> None:
    emulator = JiMengEmulator(latency=30).start()
    url = f"{emulator.base_url}/images/generations"
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(
            requests.post,
            url,
            json={"model": MODEL, "prompt": "x", "size": "1K"},
            headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
            timeout=10,
        )
        deadline = time.monotonic() + 10
        while emulator.request_count < 1 and time.monotonic() < deadline:  # the request is in
            time.sleep(0.01)
        started = time.monotonic()
        emulator.stop()
        assert time.monotonic() - started < 3
        with contextlib.suppress(requests.RequestException):
            future.result(timeout=5)


def test_stream_client_hanging_up_is_still_billed(make_jimeng_emulator, session, wait_for) -> None:  # type: ignore[no-untyped-def]
    emulator = make_jimeng_emulator(latency=0.05)
    body = {
        "model": MODEL,
        "prompt": "4 images",
        "size": "1K",
        "stream": True,
        "sequential_image_generation": "auto",
        "sequential_image_generation_options": {"max_images": 4},
    }
    response = session.post(f"{emulator.base_url}/images/generations", json=body, stream=True, timeout=5)
    next(response.iter_lines())
    response.close()
    assert wait_for(lambda: bool(emulator.ledger))
    assert emulator.ledger[0].images == 4
    assert wait_for(lambda: emulator.ledger[0].delivered is False)


def test_http10_stream_is_ended_by_closing(jimeng_emulator: JiMengEmulator) -> None:
    payload = json.dumps({"model": MODEL, "prompt": "x", "size": "1K", "stream": True}).encode()
    request = (
        b"POST /api/v3/images/generations HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + DEFAULT_API_KEY.encode() + b"\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )
    host, port = jimeng_emulator.root_url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(request)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    head, _, stream = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert stream.startswith(b"event: image_generation.partial_succeeded\n")
    assert stream.endswith(b"data: [DONE]\n\n")
