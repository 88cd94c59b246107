"""Scripted faults: each kind fails the way the hook's retry and billing logic must survive."""

from __future__ import annotations

import json

import pytest
import requests

from airflow_provider_jimeng.emulator import FAULT_KINDS, Fault, JiMengEmulator


@pytest.mark.parametrize(
    ("kind", "status", "code"),
    [
        ("rate_limit", 429, "ModelAccountIpmRateLimitExceeded"),
        ("quota", 429, "QuotaExceeded"),
        ("server_error", 500, "InternalServiceError"),
        ("unavailable", 503, "ServiceUnavailable"),
    ],
)
def test_error_faults_answer_once_then_recover(generate, jimeng_emulator, kind, status, code) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault(kind))
    failed = generate()
    assert failed.status_code == status
    assert failed.json()["error"]["code"] == code
    assert failed.json()["error"]["message"].endswith(f"Request id: {failed.headers['x-request-id']}")
    assert "Retry-After" not in failed.headers
    assert generate().status_code == 200
    assert jimeng_emulator.billed_images == 1
    assert [record["fault"] for record in jimeng_emulator.requests] == [kind, None]
    assert jimeng_emulator.rate_limited_count == 0  # only the images_per_minute limiter counts


@pytest.mark.parametrize(("retry_after", "header"), [(2, "2"), (0.5, "0.5")])
def test_retry_after_header(generate, jimeng_emulator, retry_after, header) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("rate_limit", retry_after=retry_after), Fault("unavailable", retry_after=retry_after))
    assert generate().headers["Retry-After"] == header
    assert generate().headers["Retry-After"] == header


def test_times_and_fifo_order(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("server_error", times=2), Fault("unavailable"))
    assert [generate().status_code for _ in range(4)] == [500, 500, 503, 200]
    assert jimeng_emulator.request_count == 4


def test_faults_only_hit_requests_that_would_be_processed(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("server_error"))
    assert generate(size="3K").status_code == 400
    assert generate().status_code == 500
    jimeng_emulator.inject(Fault("server_error"))
    jimeng_emulator.clear_faults()
    assert generate().status_code == 200


def test_path_filter(generate, jimeng_emulator, session) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("unavailable", path="/v1/*"), Fault("server_error", path="/api/v3/models"))
    assert generate().status_code == 200
    assert generate(path="/v1").status_code == 503
    assert session.get(f"{jimeng_emulator.base_url}/models", timeout=5).status_code == 500
    assert session.get(f"{jimeng_emulator.base_url}/models", timeout=5).status_code == 200


def test_unknown_fault_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("explode")
    with pytest.raises(ValueError, match="times"):
        Fault("reset", times=0)
    assert "reset_mid_body" in FAULT_KINDS


def test_slow_answer_is_billed_even_when_the_client_gave_up(generate, jimeng_emulator, wait_for) -> None:  # type: ignore[no-untyped-def]
    # A second between the client giving up (closing its socket) and the answer: room for a loaded machine.
    jimeng_emulator.inject(Fault("slow", delay=1.2))
    with pytest.raises(requests.ReadTimeout):
        generate(timeout=0.2)
    # Billed (as undelivered: the client is gone) only once the emulator finishes the slow answer.
    assert wait_for(lambda: len(jimeng_emulator.ledger) == 1 and jimeng_emulator.ledger[0].delivered is False)
    assert jimeng_emulator.billed_images == 1


def test_slow_answer_arrives_when_the_client_waits(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("slow", delay=0.2))
    assert generate().status_code == 200
    assert jimeng_emulator.ledger[0].delivered is True


def test_reset_bills_nothing_and_the_next_request_works(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("reset"))
    with pytest.raises(requests.ConnectionError):
        generate()
    assert jimeng_emulator.ledger == []
    assert jimeng_emulator.requests[0]["status"] is None
    assert generate().status_code == 200


def test_reset_mid_body_is_billed_but_not_delivered(generate, jimeng_emulator, wait_for) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("reset_mid_body"))
    with pytest.raises(requests.RequestException):
        generate(response_format="b64_json").json()
    assert wait_for(lambda: bool(jimeng_emulator.ledger) and not jimeng_emulator.ledger[0].delivered)
    assert jimeng_emulator.billed_images == 1
    assert generate().status_code == 200


@pytest.mark.parametrize("kind", ["malformed", "truncated"])
def test_unparseable_answers_are_billed(generate, jimeng_emulator, kind) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault(kind))
    response = generate()
    assert response.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        response.json()
    assert jimeng_emulator.billed_images == 1
    assert generate().status_code == 200  # the connection is still in a clean state


def test_expired_url(generate, jimeng_emulator, session) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("expired_url"))
    url = generate().json()["data"][0]["url"]
    response = session.get(url, timeout=5)
    assert response.status_code == 403
    assert response.json()["Code"] == "AccessDenied"
    assert jimeng_emulator.billed_images == 1
    assert session.get(generate().json()["data"][0]["url"], timeout=5).status_code == 200


def test_missing_url(generate, jimeng_emulator, session) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("missing_url"))
    response = session.get(generate().json()["data"][0]["url"], timeout=5)
    assert response.status_code == 404
    assert response.json()["Code"] == "NoSuchKey"
    assert jimeng_emulator.downloads == 0


def test_download_fault_by_path(generate, jimeng_emulator, session) -> None:  # type: ignore[no-untyped-def]
    url = generate().json()["data"][0]["url"]
    jimeng_emulator.inject(Fault("server_error", path="/tos/*"))
    assert session.get(url, timeout=5).status_code == 500
    assert session.get(url, timeout=5).status_code == 200


def _stream_lines(response: requests.Response) -> list[str]:
    return [line for line in response.iter_lines(decode_unicode=True) if line]


def test_truncated_stream_lacks_completed(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("truncated"))
    lines = _stream_lines(
        generate(
            prompt="4 images",
            stream=True,
            sequential_image_generation="auto",
            sequential_image_generation_options={"max_images": 4},
        )
    )
    types = [json.loads(line[6:])["type"] for line in lines if line.startswith("data: {")]
    assert types == ["image_generation.partial_succeeded"] * 2
    assert "data: [DONE]" not in lines
    assert jimeng_emulator.billed_images == 4


def test_reset_mid_stream(generate, jimeng_emulator, wait_for) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("reset_mid_body"))
    with pytest.raises(requests.RequestException):
        _stream_lines(generate(stream=True))
    assert wait_for(lambda: bool(jimeng_emulator.ledger) and not jimeng_emulator.ledger[0].delivered)


def test_malformed_stream(generate, jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    jimeng_emulator.inject(Fault("malformed"))
    lines = _stream_lines(generate(stream=True))
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0][len("data: ") :])
    assert jimeng_emulator.billed_images == 1


def test_faults_survive_concurrency(make_jimeng_emulator) -> None:  # type: ignore[no-untyped-def]
    from concurrent.futures import ThreadPoolExecutor

    emulator: JiMengEmulator = make_jimeng_emulator()
    emulator.inject(Fault("server_error", times=10))
    url = f"{emulator.base_url}/images/generations"

    def one(_: int) -> int:
        body = {"model": "doubao-seedream-4-0-250828", "prompt": "x", "size": "1K"}
        return requests.post(url, json=body, headers={"Authorization": "Bearer emulator-key"}, timeout=10).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(one, range(32)))
    assert statuses.count(500) == 10
    assert statuses.count(200) == 22
    assert emulator.billed_images == 22
