"""Prompts from Jinja, XComArgs and prompt files; rendered fields; dynamic task mapping."""

from __future__ import annotations

import json

from tests.dags import jimeng_test_mapping, jimeng_test_templating
from tests.operators.conftest import Bucket, RunDag, TrackingEmulator, task_prefix

OPERATOR_TASKS = ["from_jinja", "from_xcomarg_str", "from_xcomarg_list", "from_file"]


def _sent_prompts(emulator: TrackingEmulator) -> list[str]:
    return sorted(str(request["body"]["prompt"]) for request in emulator.requests)


def test_prompts_come_from_jinja_xcomargs_and_a_prompt_file(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_templating.dag, {"bucket": bucket.name, "subject": "windmill", "style": "linocut print"})

    assert run.state == "success"
    expected = {
        "from_jinja": ["a windmill at dusk, oil painting"],
        "from_xcomarg_str": ["a windmill at dusk"],
        "from_xcomarg_list": ["a windmill at dawn", "a windmill in a storm"],
        # template_ext: the operator loaded the .j2 file and rendered {{ params.* }} inside it.
        "from_file": ["A windmill drawn as a linocut print, soft morning light"],
    }
    assert _sent_prompts(emulator) == sorted(prompt for prompts in expected.values() for prompt in prompts)
    for task_id, prompts in expected.items():
        assert run.rendered_fields(task_id)["prompt"] in (prompts, prompts[0])
        prefix = task_prefix(run, task_id)
        assert run.xcom(task_id) == [f"s3://{bucket.name}/{prefix}/p{i:04d}_i00.jpeg" for i in range(len(prompts))]
        assert [bucket.record(prefix, i)["prompt"] for i in range(len(prompts))] == prompts


def test_rendered_fields_xcoms_and_logs_never_show_the_api_key(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_templating.dag, {"bucket": bucket.name})

    assert run.state == "success"
    assert emulator.api_key is not None
    for task_id in OPERATOR_TASKS:
        rendered = run.rendered_fields(task_id)
        assert rendered["jimeng_conn_id"] == "jimeng_default"
        assert rendered["s3_bucket"] == bucket.name
        assert emulator.api_key not in json.dumps(rendered, default=str)
    assert emulator.api_key not in json.dumps([value for *_, value in run.xcoms()], default=str)
    assert emulator.api_key not in run.output


def test_mapped_instances_get_one_prompt_each_with_their_own_keys_and_xcoms(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    prompts = ["a red fox", "a blue whale", "a green parrot"]
    run = run_dag(jimeng_test_mapping.dag, {"bucket": bucket.name, "prompts": prompts})

    assert run.state == "success"
    states = run.states()
    assert sorted(index for task_id, index in states if task_id == "gen") == [0, 1, 2]
    assert all(state == "success" for state in states.values())
    uris = []
    for index, prompt in enumerate(prompts):
        prefix = task_prefix(run, map_index=index)
        assert prefix.endswith(f"/gen/map_{index}")
        key = f"{prefix}/p0000_i00.jpeg"
        assert run.xcom("gen", map_index=index) == [f"s3://{bucket.name}/{key}"]
        images = run.xcom("gen", "images", map_index=index)
        assert [item["key"] for item in images] == [key]
        assert run.xcom("gen", "usage", map_index=index)["generated_images"] == 1
        record = bucket.record(prefix, 0)
        assert record["prompt"] == prompt
        assert bucket.json(f"{prefix}/records.json")["airflow"]["map_index"] == index
        assert bucket.head(key)["Metadata"]["airflow-map-index"] == str(index)
        uris.append(f"s3://{bucket.name}/{key}")
    assert len(set(uris)) == 3
    assert run.xcom("collect") == uris, "the consumer sees every mapped output, in map index order"
    assert emulator.billed_images == 3
