"""Where images end up: S3 with deterministic keys, metadata and records, or URLs without storage."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from urllib.parse import urlsplit

import pytest
from PIL import Image

from tests.dags import jimeng_test_generate
from tests.operators.conftest import Bucket, RunDag, TrackingEmulator, task_prefix

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]


def test_images_are_stored_under_deterministic_keys_with_metadata_and_records(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_generate.dag, {"prompts": PROMPTS, "bucket": bucket.name, "size": "1280x720"})

    assert run.state == "success"
    prefix = task_prefix(run)
    expected = [f"{prefix}/p0000_i00.jpeg", f"{prefix}/p0001_i00.jpeg"]
    assert run.xcom("gen") == [f"s3://{bucket.name}/{key}" for key in expected]
    assert run.xcom("count") == 2, "the consumer task received the URIs"
    # Images, the task's records, and no journal left behind after success.
    assert bucket.keys(prefix) == sorted([*expected, f"{prefix}/records.json"])
    assert bucket.keys(f"{prefix}/_pending/") == []
    assert bucket.json(f"{prefix}/records.json")["airflow"] == {
        "dag_id": run.dag_id,
        "run_id": run.run_id,
        "task_id": "gen",
        "map_index": -1,
    }

    billed = {entry.prompt: entry for entry in emulator.ledger}
    assert emulator.billed_images == 2
    for index, key in enumerate(expected):
        head = bucket.head(key)
        request_id = billed[PROMPTS[index]].request_id
        assert head["ContentType"] == "image/jpeg"
        assert head["Metadata"] == {
            "jimeng-request-id": request_id,
            "jimeng-model": "doubao-seedream-4-0-250828",
            "jimeng-size": "1280x720",
            "jimeng-fingerprint": bucket.record(prefix, index)["fingerprint"],
            "jimeng-delivered": "0",
            "jimeng-failed": "",
            "airflow-dag-id": run.dag_id,
            "airflow-run-id": run.run_id,
            "airflow-task-id": "gen",
            "airflow-map-index": "-1",
            "airflow-try-number": "1",
        }
        with Image.open(io.BytesIO(bucket.read(key))) as image:
            assert image.format == "JPEG"
            assert image.size == (1280, 720)

        record = bucket.record(prefix, index)
        assert record["prompt"] == PROMPTS[index]
        assert record["model"] == "doubao-seedream-4-0-250828"
        assert record["request_id"] == request_id
        assert record["parameters"]["size"] == "1280x720"
        assert record["parameters"]["model"] == "doubao-seedream-4-0-250828"
        assert record["usage"]["generated_images"] == 1
        assert record["usage"]["output_tokens"] == 1280 * 720 // 256
        assert record["failures"] == []
        assert [image["key"] for image in record["images"]] == [key]


def test_images_and_usage_xcoms_describe_what_was_stored(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_generate.dag, {"prompts": PROMPTS, "bucket": bucket.name})

    prefix = task_prefix(run)
    images = run.xcom("gen", "images")
    assert [(item["prompt_index"], item["image_index"]) for item in images] == [(0, 0), (1, 0)]
    for item in images:
        data = bucket.read(item["key"])
        assert item["uri"] == f"s3://{bucket.name}/{item['key']}"
        assert item["key"].startswith(prefix + "/")
        assert item["bucket"] == bucket.name
        assert item["bytes"] == len(data)
        assert item["sha256"] == hashlib.sha256(data).hexdigest()
        assert item["size"] == "1024x1024"
        assert item["model"] == "doubao-seedream-4-0-250828"
        assert item["request_id"] in {entry.request_id for entry in emulator.ledger}
    assert run.xcom("gen", "storage") == {
        "prefix": f"s3://{bucket.name}/{prefix}/",
        "records": f"s3://{bucket.name}/{prefix}/records.json",
        "conn_id": "aws_default",
    }
    counts = {
        "generated_images": 2,
        "possibly_billed_images": 0,
        "output_tokens": 2 * 1024 * 1024 // 256,
        "total_tokens": 2 * 1024 * 1024 // 256,
        "requests": 2,
        "attempts": 2,
        "reused_prompts": 0,
        "web_searches": 0,
        "rate_limited": 0,
        "retries": 0,
    }
    # One try: the task instance's sums are this try's own.
    assert run.xcom("gen", "usage") == {**counts, "tries": 1, "this_try": counts}
    (tried,) = bucket.json(f"{task_prefix(run)}/records.json")["tries"]
    assert tried["final"]
    assert tried["try_number"] == 1
    assert {name: tried[name] for name in counts if name != "reused_prompts"} == {
        name: value for name, value in counts.items() if name != "reused_prompts"
    }


def test_custom_key_template_is_rendered_with_jinja_then_key_fields(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    template = "renders/{dag_id}/{run_id}/{task_id}/{prompt_index:03d}-{image_index}.{ext}"
    run = run_dag(jimeng_test_generate.dag, {"prompts": PROMPTS, "bucket": bucket.name, "s3_key": template})

    assert run.state == "success"
    safe_run_id = task_prefix(run).split("/")[2]
    expected = [f"renders/{run.dag_id}/{safe_run_id}/gen/{index:03d}-0.jpeg" for index in range(2)]
    assert bucket.images("renders/") == expected
    assert run.xcom("gen") == [f"s3://{bucket.name}/{key}" for key in expected], "the publications go downstream"
    # The canonical copies and the records stay under the task prefix, where a retry looks for them.
    prefix = task_prefix(run)
    canonical = [f"{prefix}/p{index:04d}_i00.jpeg" for index in range(2)]
    assert bucket.keys(prefix) == [*canonical, f"{prefix}/records.json"]
    records = [bucket.record(prefix, index)["images"][0] for index in range(2)]
    assert [(item["key"], item["published_key"]) for item in records] == list(zip(canonical, expected, strict=True))
    assert [bucket.read(key) for key in canonical] == [bucket.read(key) for key in expected]


def test_key_prefix_is_templated(emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag) -> None:
    run = run_dag(jimeng_test_generate.dag, {"prompts": PROMPTS[:1], "bucket": bucket.name, "s3_key_prefix": "team/a"})

    assert bucket.images() == [f"{task_prefix(run, prefix='team/a')}/p0000_i00.jpeg"]


def test_without_storage_returns_urls_and_records_hold_redacted_urls(
    emulator: TrackingEmulator, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_generate.url_dag, {"prompts": PROMPTS})

    assert run.state == "success"
    urls = run.xcom("gen")
    assert len(urls) == 2
    for url in urls:
        assert url.startswith(emulator.root_url + "/tos/")
        assert "X-Tos-Signature=" in urlsplit(url).query, "downstream gets the working (signed) URL"
    images = run.xcom("gen", "images")
    for url, record in zip(urls, images, strict=True):
        assert "X-Tos" not in record["url"], "the record keeps no signature"
        assert urlsplit(record["url"]).query in ("", "<redacted>")
        assert record["url"].split("?")[0] == url.split("?")[0]
        assert "key" not in record
    assert run.xcom("gen", "usage")["generated_images"] == 2
    assert emulator.downloads == 0, "without storage nothing is downloaded"


def test_b64_json_with_storage_keeps_image_data_out_of_xcom(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_generate.b64_dag, {"prompts": PROMPTS, "bucket": bucket.name})

    assert run.state == "success"
    assert [request["body"]["response_format"] for request in emulator.requests] == ["b64_json", "b64_json"]
    prefix = task_prefix(run)
    assert bucket.images(prefix) == [f"{prefix}/p0000_i00.jpeg", f"{prefix}/p0001_i00.jpeg"]
    assert bucket.keys(f"{prefix}/_pending/") == [], "journals are dropped once records.json is written"
    stored = [bucket.read(key) for key in bucket.images(prefix)]
    for data in stored:
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (1024, 1024)
    xcom_text = json.dumps([value for *_, value in run.xcoms()])
    for data in stored:
        assert base64.b64encode(data)[:64].decode() not in xcom_text
    assert "/9j/" not in xcom_text, "no base64 JPEG anywhere in XCom"
    assert emulator.downloads == 0


def test_b64_json_without_bucket_fails_before_any_request(emulator: TrackingEmulator, run_dag: RunDag) -> None:
    run = run_dag(jimeng_test_generate.b64_url_dag, {"prompts": PROMPTS})

    assert run.task_state("gen") == "failed"
    assert "'b64_json' needs s3_bucket" in run.log("gen")
    assert emulator.request_count == 0


@pytest.mark.parametrize("rendered", [None, "", "   ", "None"])
def test_a_bucket_that_renders_empty_is_an_error_not_urls_in_xcom(
    emulator: TrackingEmulator, run_dag: RunDag, rendered: str | None
) -> None:
    """Issue 11 item 6: storage asked for means storage or an error, before any request."""
    run = run_dag(jimeng_test_generate.dag, {"prompts": PROMPTS, "bucket": rendered})

    assert run.state == "failed"
    assert run.task_state("gen") == "failed"
    assert "s3_bucket: " in run.log("gen")
    assert emulator.request_count == 0
    assert run.xcom("gen") is None
