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
