"""``JiMengReviewOperator`` without a DAG run: its parse-time contract, its checks and what it writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS

REVIEW_MODULE = Path(__file__).resolve().parents[2] / "airflow_provider_jimeng" / "operators" / "review.py"


def test_on_airflow_3_0_importing_the_review_fails_naming_the_version_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.exceptions import AirflowOptionalProviderFeatureException

    from airflow_provider_jimeng import version_compat

    monkeypatch.setattr(version_compat, "AIRFLOW_V_3_1_PLUS", False)
    monkeypatch.setattr(version_compat, "AIRFLOW_VERSION", "3.0.6")
    spec = importlib.util.spec_from_file_location("review_on_3_0", REVIEW_MODULE)
    assert spec is not None
    assert spec.loader is not None
    with pytest.raises(AirflowOptionalProviderFeatureException) as raised:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert "needs Airflow 3.1 or later" in str(raised.value)
    assert "this is Airflow 3.0.6" in str(raised.value)


requires_hitl = pytest.mark.skipif(
    not AIRFLOW_V_3_1_PLUS, reason="human-in-the-loop operators need Airflow 3.1 or later"
)


def _review(**kwargs: Any) -> Any:
    from airflow.sdk import DAG

    from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
    from airflow_provider_jimeng.operators.review import JiMengReviewOperator

    with DAG("jimeng_review_unit", schedule=None):
        generate = JiMengGenerateOperator(task_id="gen", prompt="a fox", s3_bucket="images")
        return JiMengReviewOperator(task_id="review", images_from=generate, **kwargs)


@requires_hitl
def test_the_operator_is_cheap_to_build_and_wires_itself_after_the_generation() -> None:
    review = _review(respondents=["editor", "chief"])
    assert review.upstream_task_ids == {"gen"}
    assert review.images_from == ["gen"]
    assert review.assigned_users == [{"id": "editor", "name": "editor"}, {"id": "chief", "name": "chief"}]
    assert review.multiple is True
    assert "note" in review.serialized_params  # the reviewer's free text


@requires_hitl
@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"on_timeout": "approve"}, "on_timeout"),
        ({"rejected": "delete"}, "rejected"),
        ({"rejected_prefix": "/"}, "rejected_prefix"),
        ({"rejected_prefix": "a/../b/"}, "rejected_prefix"),
        ({"takes_prefix": ""}, "takes_prefix"),
        ({"takes_bucket": "Not_A_Bucket"}, "takes_bucket"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_asked(kwargs: dict[str, Any], parameter: str) -> None:
    from airflow_provider_jimeng.exceptions import JiMengConfigurationError

    review = _review(**kwargs)
    with pytest.raises(JiMengConfigurationError) as raised:
        review.execute({})  # checked first: no XCom is read, no request is written
    assert raised.value.parameter == parameter
    assert "allowed" in str(raised.value)


@requires_hitl
def test_a_prompt_is_shown_literally_and_labels_stay_short() -> None:
    from airflow_provider_jimeng.operators.review import ReviewItem, markdown_text

    assert markdown_text("a [link](http://x) # not a heading\n*bold*") == (
        r"a \[link\]\(http://x\) \# not a heading \*bold\*"
    )
    item = ReviewItem(3, "gen", -1, 2, "s3://b/k", "k", 2, 0, "word " * 40, "1024x1024", 1)
    assert item.label.startswith("#3 word word")
    assert item.label.endswith("… (1024x1024)")
    assert len(item.label) < 80


@requires_hitl
def test_another_take_has_its_own_prefix_with_the_take_number() -> None:
    from airflow_provider_jimeng.operators.review import ReviewItem, take_of

    review = _review(takes_prefix="shop/takes/")
    first = ReviewItem(1, "gen", 4, 0, "s3://b/k", "k", 7, 0, "a fox", "2K", 1)
    assert review.regenerate_request(first) == {
        "prompt": "a fox",
        "size": "2K",
        "s3_key_prefix": "shop/takes/take_2/gen/map_4/p0007",
    }
    assert take_of("s3://b/shop/takes/take_2/gen/map_4/p0007/dag/run/regenerate/map_0/") == 2
    assert take_of("s3://b/jimeng/dag/run/gen/") == 1


@requires_hitl
def test_a_taskflow_generation_output_is_reviewed_like_its_operator() -> None:
    from airflow.sdk import DAG, task

    from airflow_provider_jimeng.operators.review import JiMengReviewOperator

    with DAG("jimeng_review_taskflow", schedule=None):

        @task.jimeng(s3_bucket="images")
        def generate() -> list[str]:
            return ["a fox", "an owl"]

        review = JiMengReviewOperator(task_id="review", images_from=generate())
    assert review.images_from == ["generate"]
    assert review.upstream_task_ids == {"generate"}


@requires_hitl
@pytest.mark.parametrize(
    ("asked", "stored", "requests", "kept", "moved"),
    [
        # Nothing stored yet: the answer's order.
        (["A", "B"], {}, ["A", "B"], [], []),
        # Answered again in another order: each back where it is stored.
        (["B", "A"], {0: "A", 1: "B"}, ["A", "B"], [], []),
        # A subset: B stays at 1, A keeps index 0 (reused, not paid); nothing after B.
        (["B"], {0: "A", 1: "B"}, ["A", "B"], [0], []),
        (["A"], {0: "A", 1: "B"}, ["A"], [], []),
        # A new one after the stored ones, never on an occupied index.
        (["B", "C"], {0: "A", 1: "B"}, ["A", "B", "C"], [0], []),
        # A free index below a stored one takes a new request first.
        (["C", "B"], {1: "B"}, ["C", "B"], [], []),
        # Two images of one prompt sent back: two takes, each reused where it is.
        (["A", "A"], {0: "A", 1: "A"}, ["A", "A"], [], []),
        # A free index below the only stored take, no new request to fill it: the take moves (paid again).
        (["B"], {1: "B"}, ["B"], [], [1]),
        (["A", "B"], {1: "B", 2: "A"}, ["A", "B"], [], [2]),
        # Nothing asked: nothing to take.
        ([], {0: "A"}, [], [], []),
    ],
)
def test_takes_go_back_to_the_map_index_where_they_are_stored(
    asked: list[str], stored: dict[int, str], requests: list[str], kept: list[int], moved: list[int]
) -> None:
    from airflow_provider_jimeng.operators.review import arrange_takes

    plan = arrange_takes(asked, stored)
    assert (plan.requests, plan.kept, plan.moved) == (requests, kept, moved)
    # Every occupied index in the list holds its own request: no prompt lands on another's take.
    assert all(plan.requests[index] == request for index, request in stored.items() if index < len(plan.requests))
    assert sorted(set(asked)) == sorted(set(plan.requests) - {stored[index] for index in plan.kept})


@requires_hitl
def test_the_takes_are_found_under_this_run_only_and_a_contradiction_keeps_one(
    s3_bucket: str, s3_client: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The take task's keys as the generation operator writes them: run ids escaped, journals count."""
    from types import SimpleNamespace

    from airflow_provider_jimeng.operators.review import ReviewItem
    from airflow_provider_jimeng.storage.keys import TaskKeyspace

    review = _review(takes_prefix="shop/takes/")
    items = [
        ReviewItem(
            n + 1, "gen", -1, n, f"s3://{s3_bucket}/jimeng/x/p{n}.jpeg", "k", n, 0, prompt, "2K", 1, "aws_default"
        )
        for n, prompt in enumerate(["a fox", "an owl", "a cat", "a hen"])
    ]
    fox, owl, cat, hen = (review.regenerate_request(item)["s3_key_prefix"] for item in items)
    run_id = "manual__2026-01-01T00:00:00+00:00"  # escaped in keys: safe_key_part adds a hash

    def store(prefix: str, map_index: int, name: str, *, run: str = run_id, task: str = "take_again") -> None:
        keyspace = TaskKeyspace(s3_bucket, prefix, "jimeng_review_unit", run, task, map_index)
        s3_client.put_object(Bucket=s3_bucket, Key=f"{keyspace.task_prefix}/{name}", Body=b"{}")

    store(fox, 0, "records.json")
    store(owl, 1, "_pending/1-0.json")  # paid, then failed: its journal occupies the index
    store(cat, 1, "p0000_i00.jpeg")  # a contradictory history: two requests at index 1
    store(hen, 0, "records.json", run="another_run")  # another run's takes are not this run's
    ti = SimpleNamespace(dag_id="jimeng_review_unit", run_id=run_id)

    requests, kept = review.plan_takes({"ti": ti}, items, [items[3], items[2]])  # type: ignore[arg-type]
    assert [request["s3_key_prefix"] for request in requests] == [fox, cat, hen]
    assert kept == [{"map_index": 0, "prompt": "a fox", "s3_key_prefix": fox}]
    assert "Map index 1 of the take task holds takes of 2 requests" in capsys.readouterr().out  # structlog
    # Neither asked for: index 1 keeps one of its two (in key order), and the new request goes after.
    requests, kept = review.plan_takes({"ti": ti}, items, [items[3]])  # type: ignore[arg-type]
    assert [request["s3_key_prefix"] for request in requests] == [fox, owl, hen]
    assert [take["map_index"] for take in kept] == [0, 1]
    requests, kept = review.plan_takes({"ti": ti}, items, [items[1]])  # type: ignore[arg-type]
    assert [request["s3_key_prefix"] for request in requests] == [fox, owl]


@requires_hitl
def test_a_storage_that_cannot_be_listed_sends_no_take(s3_bucket: str) -> None:
    from types import SimpleNamespace

    from airflow_provider_jimeng.exceptions import JiMengStorageError
    from airflow_provider_jimeng.operators.review import ReviewItem

    review = _review(takes_bucket="no-such-bucket-here")
    item = ReviewItem(1, "gen", -1, 0, f"s3://{s3_bucket}/k.jpeg", "k.jpeg", 0, 0, "a fox", "2K", 1, "aws_default")
    ti = SimpleNamespace(dag_id="jimeng_review_unit", run_id="r1")
    with pytest.raises(JiMengStorageError, match="NoSuchBucket"):
        review.plan_takes({"ti": ti}, [item], [item])  # type: ignore[arg-type]
