"""``/_emulator/ledger``, ``/_emulator/stats`` and ``POST /_emulator/reset`` over a real socket."""

from __future__ import annotations

import threading
from collections.abc import Callable
from hashlib import sha256

import pytest
import requests

from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, Fault, JiMengEmulator

MODEL = "doubao-seedream-4-0-250828"


def _generate(emulator: JiMengEmulator, prompt: str, **fields: object) -> requests.Response:
    return requests.post(
        f"{emulator.base_url}/images/generations",
        json={"model": MODEL, "prompt": prompt, "size": "1K", **fields},
        headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"},
        timeout=10,
    )


def test_ledger_lists_billed_requests_without_a_key(jimeng_emulator: JiMengEmulator) -> None:
    answer = _generate(jimeng_emulator, "a red fox in the snow")
    assert answer.status_code == 200
    _generate(jimeng_emulator, "a FORBIDDEN fox")  # refused: not billed, not in the ledger

    response = requests.get(f"{jimeng_emulator.root_url}/_emulator/ledger", timeout=5)

    assert response.status_code == 200
    payload = response.json()
    assert payload["billed_images"] == 1
    assert payload["undelivered_images"] == 0
    [entry] = payload["entries"]
    assert entry["request_id"] == answer.headers["x-request-id"]
    assert entry["model"] == MODEL
    assert entry["images"] == 1
    assert entry["delivered"] is True
    assert entry["prompt_sha256"] == sha256(b"a red fox in the snow").hexdigest()
    assert entry["billed_at"] > 0
    assert DEFAULT_API_KEY not in response.text


def test_stats_count_requests_429s_and_the_rate_limit(
    make_jimeng_emulator: Callable[..., JiMengEmulator], wait_for: Callable[..., bool]
) -> None:
    emulator = make_jimeng_emulator(images_per_minute=2, rate_limit_burst=2)
    codes = [_generate(emulator, f"prompt {index}").status_code for index in range(3)]
    assert codes == [200, 200, 429]
    # A request leaves the count just after its answer's last byte: the client may be faster.
    assert wait_for(lambda: emulator.runtime.stats.in_flight == 0)

    stats = requests.get(f"{emulator.root_url}/_emulator/stats", timeout=5).json()

    assert stats["request_count"] == 3
    assert stats["rate_limited"] == 1
    assert stats["statuses"] == {"200": 2, "429": 1}
    assert stats["billed_images"] == 2
    assert stats["billed_requests"] == 2
    assert stats["rate_limit"] == {"images_per_minute": 2, "burst": 2, "kind": "token_bucket"}
    assert stats["in_flight"] == 0
    assert stats["peak_in_flight"] >= 1  # sequential requests, but each one overlaps the next by a moment


def test_peak_in_flight_counts_concurrent_generation_requests(
    make_jimeng_emulator: Callable[..., JiMengEmulator],
) -> None:
    emulator = make_jimeng_emulator(latency=0.3)
    threads = [threading.Thread(target=_generate, args=(emulator, f"p{index}")) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert requests.get(f"{emulator.root_url}/_emulator/stats", timeout=5).json()["peak_in_flight"] == 3


def test_reset_forgets_ledger_and_counters(jimeng_emulator: JiMengEmulator, wait_for: Callable[..., bool]) -> None:
    _generate(jimeng_emulator, "a lighthouse")
    assert wait_for(lambda: jimeng_emulator.runtime.stats.in_flight == 0)
    assert requests.get(f"{jimeng_emulator.root_url}/_emulator/reset", timeout=5).status_code == 405

    response = requests.post(f"{jimeng_emulator.root_url}/_emulator/reset", timeout=5)

    assert response.status_code == 200
    stats = requests.get(f"{jimeng_emulator.root_url}/_emulator/stats", timeout=5).json()
    assert (stats["request_count"], stats["billed_images"], stats["peak_in_flight"]) == (0, 0, 0)
    assert jimeng_emulator.ledger == []


def test_inspection_routes_ignore_faults_and_do_not_shadow_the_api(jimeng_emulator: JiMengEmulator) -> None:
    jimeng_emulator.inject(Fault("server_error", path="*", times=5))
    assert requests.get(f"{jimeng_emulator.root_url}/_emulator/stats", timeout=5).json()["pending_faults"] == 1
    assert requests.get(f"{jimeng_emulator.root_url}/_emulator/nothing", timeout=5).status_code == 404
    jimeng_emulator.clear_faults()
    # The generation and model paths answer as before.
    assert _generate(jimeng_emulator, "a red fox").status_code == 200
    models = requests.get(
        f"{jimeng_emulator.base_url}/models", headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}, timeout=5
    )
    assert models.status_code == 200


@pytest.mark.parametrize("path", ["/_emulator/ledger", "/_emulator/stats"])
def test_inspection_routes_refuse_writes(jimeng_emulator: JiMengEmulator, path: str) -> None:
    assert requests.post(f"{jimeng_emulator.root_url}{path}", timeout=5).status_code == 404
