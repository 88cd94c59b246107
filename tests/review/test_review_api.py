"""``JiMengReviewOperator`` answered through Airflow's HITL REST API, on the real API server app.

One ``dag.test()`` run of ``jimeng_test_review`` generates with the emulator into
moto's S3 server; while its reviews wait in ``awaiting_input``, the scenario answers them as
reviewers would (``PATCH .../hitlDetails``), lets the deadline pass for one, clears two and answers
them again. Each test then checks one part of what happened. The scenario waits on what
``dag.test()`` says it waits for (its "Waiting for Human-in-the-loop input" log line), never on time.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import boto3
import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.testing import AWS_REGION, S3Server, aws_connection_json, jimeng_connection_json
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS
from tests.dag_runs import read_xcom
from tests.gallery.conftest import Gallery
from tests.gallery.roots import GALLERY_STORAGE_ENV, register_root
from tests.hitl_runs import (
    AWAITS_INPUT_REASON,
    WaitingTasks,
    dag_test_awaits_input,
    latest_run_id,
    run_with_reviewer,
)

pytestmark = [
    pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="human-in-the-loop operators need Airflow 3.1 or later"),
    pytest.mark.skipif(AIRFLOW_V_3_1_PLUS and not dag_test_awaits_input(), reason=AWAITS_INPUT_REASON),
    pytest.mark.integration,
    pytest.mark.xdist_group("review_api"),
]

if AIRFLOW_V_3_1_PLUS:
    from airflow_provider_jimeng.operators.review import PUBLISH_NONE, REGENERATE

REVIEWS = {"review_multi", "review_empty", "review_mind", "review_mapped", "review_deadline", "review_regen"}


@dataclass
class Takes:
    """One answer of ``review_regen`` after a clear, and what the take task then did."""

    requests: list[dict[str, Any]]
    #: The prompts the emulator billed while the take task ran.
    paid: list[str]
    #: Each map index's stored take (its key), in map order.
    keys: list[str]
    kept: list[dict[str, Any]]


@dataclass
class Scenario:
    """What the scenario saw and did; each test reads its part."""

    dag_id: str
    run_id: str
    bucket: str
    s3: Any
    emulator: JiMengEmulator
    gallery: Gallery
    responses: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    billed: dict[str, int] = field(default_factory=dict)
    thumbnails: list[Any] = field(default_factory=list)
    takes: dict[str, Takes] = field(default_factory=dict)
    dag_run: Any = None

    def path(self, task_id: str, map_index: int = -1) -> str:
        run = quote(self.run_id, safe="")
        return f"/api/v2/dags/{self.dag_id}/dagRuns/{run}/taskInstances/{task_id}/{map_index}/hitlDetails"

    def detail(self, task_id: str, user: str = "editor") -> Any:
        return self.gallery.client.get(self.path(task_id), headers=self.headers(user)).json()

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.gallery.tokens[user]}"}

    def answer(self, task_id: str, options: list[str], user: str = "editor", note: str | None = None) -> Any:
        body: dict[str, Any] = {"chosen_options": options}
        if note is not None:
            body["params_input"] = {"note": note}
        return self.gallery.client.patch(self.path(task_id), json=body, headers=self.headers(user))

    def labels(self, task_id: str, *numbers: int) -> list[str]:
        options = self.details[task_id]["options"]
        return [next(option for option in options if option.startswith(f"#{n} ")) for n in numbers]

    def xcom(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        return read_xcom(self.dag_id, self.run_id, task_id, key, map_index)

    def keys(self, prefix: str = "") -> set[str]:
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return {item["Key"] for item in listed.get("Contents", [])}


def _clear(dag_id: str, run_id: str, task_ids: set[str]) -> None:
    from airflow.models.taskinstance import TaskInstance, clear_task_instances
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id.in_(task_ids)
            )
        ).all()
        clear_task_instances(list(tis), session, dag_run_state=False)


def _pass_deadlines() -> None:
    """What the scheduler does on its timer: resolve parked HITL tasks whose deadline has passed."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()


@pytest.fixture(scope="module")
def scenario(gallery: Gallery, airflow_db: None, s3_server: S3Server) -> Iterator[Scenario]:
    from tests.dags import jimeng_test_review

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=AWS_REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    bucket = f"jimeng-review-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    tokens = gallery.tokens
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    # A user who may answer HITL requests in general, but is not a respondent of review_multi.
    tokens["intern"] = gallery.manager.generate_jwt(SimpleAuthManagerUser(username="intern", role="user"))
    with pytest.MonkeyPatch.context() as patch, JiMengEmulator() as emulator:
        patch.setenv("AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(emulator.base_url, max_retries=0))
        patch.setenv("AIRFLOW_CONN_AWS_DEFAULT", aws_connection_json(s3_server.endpoint_url))
        patch.setenv(GALLERY_STORAGE_ENV, json.dumps({}))
        register_root(f"s3://{bucket}/", "aws_default")
        played: list[Scenario] = []

        def review(waiting: WaitingTasks) -> None:
            waiting.wait_for(REVIEWS)
            found = Scenario("jimeng_test_review", latest_run_id("jimeng_test_review"), bucket, s3, emulator, gallery)
            _play(found, waiting)
            played.append(found)

        dag_run = run_with_reviewer(jimeng_test_review.dag, review, run_conf={"bucket": bucket})
        played[0].dag_run = dag_run
        yield played[0]


def _play(found: Scenario, waiting: WaitingTasks) -> None:
    """The reviewers' answers, in order, while dag.test() runs."""
    for task_id in REVIEWS:
        found.details[task_id] = found.detail(task_id)
    body = found.details["review_multi"]["body"]
    for link in re.findall(r"\]\((jimeng/thumbnail\?[^)]+)\)", body):
        found.thumbnails.append(found.gallery.client.get(f"/{link}", headers=found.headers("reader")))
    found.thumbnails.append(
        found.gallery.client.get(
            f"/{re.findall(r'(jimeng/thumbnail[^)]+)', body)[0]}", headers=found.headers("outsider")
        )
    )
    found.billed["generated"] = len(found.emulator.ledger)

    # Who may answer: a viewer may not update a HITL detail; a user who is not a respondent may not either.
    found.responses["viewer"] = found.answer("review_multi", found.labels("review_multi", 1), user="reader")
    found.responses["intern"] = found.answer("review_multi", found.labels("review_multi", 1), user="intern")
    # As the UI sends it when "Publish none" was pre-selected (on_timeout="approve_none") and two images picked.
    chosen = [PUBLISH_NONE, *found.labels("review_multi", 1, 3)]
    found.responses["multi"] = found.answer("review_multi", chosen, note="Shop: 1 and 3")
    found.responses["mind_first"] = found.answer("review_mind", found.labels("review_mind", 2))
    found.responses["mind_again"] = found.answer("review_mind", found.labels("review_mind", 4))
    found.responses["nothing_ticked"] = found.answer("review_empty", [])
    found.responses["empty"] = found.answer("review_empty", [PUBLISH_NONE])
    found.responses["regen"] = found.answer("review_regen", [REGENERATE, *found.labels("review_regen", 2)])
    _pass_deadlines()
    waiting.wait_for({"review_mapped"})
    found.billed["first_takes"] = len(found.emulator.ledger)
    found.details["review_mind_first"] = found.xcom("review_mind", "review")
    found.details["regenerate_first"] = found.xcom("regenerate", "images", map_index=0)

    # A cleared review asks again (a new try: its answer is reset); a cleared take is not paid again.
    _clear(found.dag_id, found.run_id, {"review_mind", "review_regen", "regenerate"})
    waiting.wait_for({"review_mapped", "review_mind", "review_regen"})
    found.details["review_mind_again"] = found.detail("review_mind")
    found.responses["mind_cleared"] = found.answer("review_mind", found.labels("review_mind", 4))
    found.responses["regen_again"] = found.answer("review_regen", [REGENERATE, *found.labels("review_regen", 2)])
    waiting.wait_for({"review_mapped"})
    found.billed["second_takes"] = len(found.emulator.ledger)
    found.details["regenerate_requests"] = found.xcom("review_regen", "regenerate")

    # Cleared and answered differently: each stored take stays on its map index of the take task.
    _take_again(found, waiting, "one_more", 1, 2)  # the sneaker (new) and the teapot (stored at map index 0)
    _take_again(found, waiting, "subset", 1)  # the sneaker alone: the teapot keeps index 0, not paid
    _take_again(found, waiting, "another", 1, 3)  # the sneaker and the lamp (new)

    # A mapped generation upstream: images of every map index, numbered in map order.
    found.responses["mapped"] = found.answer("review_mapped", found.labels("review_mapped", 2, 3))


def _take_again(found: Scenario, waiting: WaitingTasks, step: str, *numbers: int) -> None:
    """Clear the review and its take task, answer "regenerate" with ``numbers``, let the take task run."""
    _clear(found.dag_id, found.run_id, {"review_regen", "takes", "regenerate"})
    waiting.wait_for({"review_mapped", "review_regen"})
    paid_before = len(found.emulator.ledger)
    found.responses[step] = found.answer("review_regen", [REGENERATE, *found.labels("review_regen", *numbers)])
    waiting.wait_for({"review_mapped"})
    requests = found.xcom("review_regen", "regenerate")
    found.takes[step] = Takes(
        requests=requests,
        paid=[entry.prompt for entry in found.emulator.ledger[paid_before:]],
        keys=[found.xcom("regenerate", "images", map_index=index)[0]["key"] for index in range(len(requests))],
        kept=found.xcom("review_regen", "review").get("kept_takes", []),
    )


# ------------------------------------------------------------------------------------------- tests
def test_the_request_shows_each_image_with_its_prompt_and_size(scenario: Scenario) -> None:
    detail = scenario.details["review_multi"]
    assert detail["multiple"] is True
    assert detail["subject"] == "Pick for the shop"
    assert detail["assigned_users"] == [{"id": "editor", "name": "editor"}]
    labels = [option for option in detail["options"] if option.startswith("#")]
    assert labels == [
        "#1 a red sneaker (1024x1024)",
        "#2 a blue teapot (1024x1024)",
        "#3 a green lamp (1024x1024)",
        "#4 a yellow chair (1024x1024)",
    ]
    assert detail["options"][4:] == [PUBLISH_NONE, REGENERATE]
    assert detail["defaults"] == [PUBLISH_NONE]  # on_timeout="approve_none": what the UI pre-selects
    body = detail["body"]
    assert body.count("](jimeng/thumbnail?") == 4
    assert body.count("](jimeng/image?") == 4
    assert "a blue teapot" in body
    assert scenario.bucket not in body
    assert "note" in detail["params"]


def test_thumbnails_in_the_request_load_through_the_gallery_with_its_permissions(scenario: Scenario) -> None:
    *allowed, refused = scenario.thumbnails
    assert len(allowed) == 4
    assert all(answer.status_code == 200 for answer in allowed), [answer.status_code for answer in allowed]
    assert all(answer.headers["content-type"] == "image/jpeg" for answer in allowed)
    assert refused.status_code == 403  # a user who may not read the DAG sees no image


def test_a_user_who_may_not_answer_is_refused(scenario: Scenario) -> None:
    assert scenario.responses["viewer"].status_code == 403
    assert scenario.responses["intern"].status_code == 403
    assert "not a respondent" in scenario.responses["intern"].json()["detail"]


def test_multiple_choice_approves_exactly_the_chosen_images(scenario: Scenario) -> None:
    assert scenario.responses["multi"].status_code == 200
    generated = scenario.xcom("gen")
    approved = scenario.xcom("review_multi")
    assert approved == [generated[0], generated[2]]
    decision = scenario.xcom("review_multi", "review")
    assert [choice["prompt"] for choice in decision["approved"]] == ["a red sneaker", "a green lamp"]
    assert [choice["uri"] for choice in decision["rejected"]] == [generated[1], generated[3]]
    assert decision["decided_by"] == {"id": "editor", "name": "editor"}
    assert decision["decided_at"]
    assert decision["timed_out"] is False
    assert decision["note"] == "Shop: 1 and 3"
    # Downstream mapping over the approved images: exactly those two were published.
    published = scenario.keys("published/")
    assert len(published) == 2
    assert {key.rsplit("/", 1)[-1] for key in published} == {"p0000_i00.jpeg", "p0002_i00.jpeg"}


def test_rejected_images_are_moved_under_rejected_not_deleted(scenario: Scenario) -> None:
    decision = scenario.xcom("review_multi", "review")
    assert decision["rejected_action"] == "move"
    moved = decision["moved"]
    assert len(moved) == 2
    keys = scenario.keys()
    for source, target in moved.items():
        assert source.removeprefix(f"s3://{scenario.bucket}/") not in keys
        assert target.removeprefix(f"s3://{scenario.bucket}/") in keys
        assert target.startswith(f"s3://{scenario.bucket}/rejected/")


def test_an_empty_choice_approves_nothing_and_tags_the_rejected(scenario: Scenario) -> None:
    assert scenario.responses["nothing_ticked"].status_code == 422  # Airflow needs one option: "none" is one
    assert scenario.responses["empty"].status_code == 200
    assert scenario.xcom("review_empty") == []
    decision = scenario.xcom("review_empty", "review")
    assert decision["approved"] == []
    assert len(decision["rejected"]) == 3
    assert decision["rejected_action"] == "tag"
    first = decision["rejected"][0]["key"]
    tags = scenario.s3.get_object_tagging(Bucket=scenario.bucket, Key=first)["TagSet"]
    assert {"Key": "jimeng-review", "Value": "rejected"} in tags


def test_a_changed_mind_after_answering_is_refused_and_a_cleared_review_asks_again(scenario: Scenario) -> None:
    assert scenario.responses["mind_first"].status_code == 200
    assert scenario.responses["mind_again"].status_code == 409  # the first answer stands
    first = scenario.details["review_mind_first"]
    assert [choice["prompt"] for choice in first["approved"]] == ["a blue teapot"]
    # Cleared: a new try asks again, with nothing answered yet.
    again = scenario.details["review_mind_again"]
    assert again["response_received"] is False
    assert again["chosen_options"] is None
    assert REGENERATE not in again["options"]
    assert scenario.responses["mind_cleared"].status_code == 200
    final = scenario.xcom("review_mind", "review")
    assert [choice["prompt"] for choice in final["approved"]] == ["a yellow chair"]


def test_regenerate_takes_the_chosen_prompt_again_once(scenario: Scenario) -> None:
    assert scenario.responses["regen"].status_code == 200
    assert scenario.xcom("review_regen") == []
    requests = scenario.details["regenerate_requests"]
    assert requests == [
        {"prompt": "a blue teapot", "size": "1024x1024", "s3_key_prefix": "jimeng/takes/take_2/gen/map_-1/p0001"}
    ]
    # One image paid for the new take; the cleared review, answered the same, reused it.
    assert scenario.billed["first_takes"] - scenario.billed["generated"] == 1
    assert scenario.billed["second_takes"] == scenario.billed["first_takes"]
    take = scenario.details["regenerate_first"][0]["key"]
    assert take.startswith("jimeng/takes/take_2/gen/map_-1/p0001/")
    assert scenario.xcom("regenerate", "images", map_index=0)[0]["key"] == take


def test_a_cleared_review_answered_differently_pays_only_for_new_takes(scenario: Scenario) -> None:
    """Each take stays on the take task's map index where it is stored: reused there, never paid again."""
    prefix = "jimeng/takes/take_2/gen/map_-1/"
    teapot, sneaker, lamp = f"{prefix}p0001", f"{prefix}p0000", f"{prefix}p0002"
    expected = {
        # The teapot, taken first, keeps map index 0; the sneaker comes after it and is the one paid.
        "one_more": ([teapot, sneaker], ["a red sneaker"], []),
        # The sneaker alone: at index 1 it finds its take; the teapot keeps index 0 (reused, not paid).
        "subset": ([teapot, sneaker], [], [0]),
        # A new image: after the stored ones, never on a map index that holds another prompt's take.
        "another": ([teapot, sneaker, lamp], ["a green lamp"], [0]),
    }
    for step, (prefixes, paid, kept) in expected.items():
        takes = scenario.takes[step]
        assert scenario.responses[step].status_code == 200
        assert takes.paid == paid, step  # the emulator's ledger: only new takes are paid
        assert [request["s3_key_prefix"] for request in takes.requests] == prefixes, step
        assert [take["map_index"] for take in takes.kept] == kept, step
        # Each map index's images are in the keyspace of its own request and map index.
        for index, (key, request) in enumerate(zip(takes.keys, takes.requests, strict=True)):
            assert key.startswith(f"{request['s3_key_prefix']}/{scenario.dag_id}/"), (step, key)
            assert f"/regenerate/map_{index}/" in key, (step, key)
    assert scenario.takes["another"].kept[0]["prompt"] == "a blue teapot"


def test_the_deadline_takes_the_default_outcome(scenario: Scenario) -> None:
    decision = scenario.xcom("review_deadline", "review")
    assert decision["timed_out"] is True
    assert decision["decided_by"] is None
    assert len(decision["approved"]) == 4  # on_timeout="approve_all"
    assert decision["rejected_action"] == "keep"


def test_a_mapped_generation_is_reviewed_across_its_map_indexes(scenario: Scenario) -> None:
    labels = [option for option in scenario.details["review_mapped"]["options"] if option.startswith("#")]
    assert [label.split(" (")[0] for label in labels] == ["#1 a small fox", "#2 a tall giraffe", "#3 a round owl"]
    decision = scenario.xcom("review_mapped", "review")
    assert [(c["map_index"], c["prompt_index"]) for c in decision["approved"]] == [(1, 0), (1, 1)]
    assert scenario.xcom("review_mapped") == scenario.xcom("gen_mapped", map_index=1)
    assert str(scenario.dag_run.state) == "success"


def test_the_gallery_shows_what_the_reviews_decided(scenario: Scenario) -> None:
    page = scenario.gallery.get("gallery", dag_id=scenario.dag_id, run_id=scenario.run_id, task_id="gen_mapped")
    assert page.status_code == 200
    html = page.text
    assert (
        html.count('<figure class="image" data-review="approved"') == 2
    )  # review_mapped approved the two images of map index 1
    assert html.count('<figure class="image" data-review="not approved"') == 1
    assert "Approved by editor (review_mapped)" in html
    assert "Not approved by editor (review_empty)" in html


def test_the_review_links_to_the_gallery_of_what_it_reviewed(scenario: Scenario) -> None:
    # Airflow 3 evaluates extra links when the task finishes and stores them as XComs.
    link = scenario.xcom("review_mapped", "_link_JiMengReviewLink")
    run = quote(scenario.run_id, safe="")
    assert link.endswith(f"/jimeng/gallery?dag_id={scenario.dag_id}&run_id={run}&task_id=gen_mapped"), link
