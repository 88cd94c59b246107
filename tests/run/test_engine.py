"""The run engine on its own: a fake hook and an in-memory store (issue 20, structure).

Each test builds :class:`GenerationRun` directly, as the operator does, and reads what it left in
the store, so the engine's decisions (reuse, top up, budget, counts) are checked in milliseconds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from airflow_provider_jimeng.api.request import max_images_billed
from airflow_provider_jimeng.api.response import GeneratedImage
from airflow_provider_jimeng.budget import SpendingCap
from airflow_provider_jimeng.exceptions import JiMengSpendingCapError
from airflow_provider_jimeng.options import RunOptions
from airflow_provider_jimeng.run.engine import GenerationRun
from airflow_provider_jimeng.run.outcome import Answer
from tests.run.fakes import FakeHook, MemoryStore, images

MODEL = "doubao-seedream-4-0-250828"
log = logging.getLogger(__name__)


def body(prompt: str, *, images_in_set: int | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"model": MODEL, "prompt": prompt, "response_format": "b64_json"}
    if images_in_set is not None:
        request["sequential_image_generation"] = "auto"
        request["sequential_image_generation_options"] = {"max_images": images_in_set}
    return request


def run(
    hook: FakeHook,
    store: MemoryStore | None,
    bodies: list[dict[str, Any]],
    *,
    limit: int | None = None,
    try_number: int = 1,
    concurrency: int = 2,
) -> GenerationRun:
    generation = GenerationRun(
        hook=hook,  # type: ignore[arg-type]
        bodies=bodies,
        store=store,
        options=RunOptions(max_concurrency=concurrency, s3_bucket="bucket" if store is not None else None),
        spending_cap=SpendingCap(limit),
        log=log,
        try_number=try_number,
    )
    generation.execute()
    return generation


def records(store: MemoryStore) -> dict[str, Any]:
    data = store.read_json(store.keyspace.records_key)
    assert data is not None
    return data


def test_a_run_stores_every_image_and_a_second_try_reuses_them_without_a_request() -> None:
    hook, store = FakeHook(), MemoryStore()
    bodies = [body("a red fox"), body("a comic in 3 images", images_in_set=3)]

    first = run(hook, store, bodies)

    assert first.fatal is None
    assert len(store.images()) == hook.billed == 4
    assert [len(outcome.stored) for outcome in first.outcomes] == [1, 3]
    again = run(hook, store, bodies, try_number=2)
    assert len(hook.sent) == 2, "nothing sent again"
    assert all(outcome.reused for outcome in again.outcomes)
    usage = again.usage()
    assert (usage["tries"], usage["generated_images"], usage["this_try"]["requests"]) == (2, 4, 0)


def test_workers_hand_the_loop_immutable_values() -> None:
    """Generation returns an ``Answer``, storage a ``Stored``: the prompt's outcome is the loop's alone."""
    hook, store = FakeHook(), MemoryStore()
    generation = GenerationRun(
        hook=hook,  # type: ignore[arg-type]
        bodies=[body("a red fox")],
        store=None,
        options=RunOptions(),
        spending_cap=SpendingCap(),
        log=log,
    )
    answer = generation._generate(0)
    assert isinstance(answer, Answer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        answer.retry_images = (1,)  # type: ignore[misc]
    assert generation.outcomes[0].requests == 0, "only the engine's loop updates an outcome"
    stored_by_a_worker = GenerationRun(
        hook=hook,  # type: ignore[arg-type]
        bodies=[body("a red fox")],
        store=store,
        options=RunOptions(s3_bucket="bucket"),
        spending_cap=SpendingCap(),
        log=log,
    )
    done = stored_by_a_worker._store(0, answer.entry, (), answer.entry.images)
    assert [image.key for image in done.stored] == store.images()
    assert done.record is not None
    assert stored_by_a_worker.outcomes[0].stored == [], "the worker's result is applied by the loop, not by it"
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.incomplete = True  # type: ignore[misc]


def test_the_budget_holds_over_tries() -> None:
    """Break 4, on the engine alone: what try 1 billed counts against try 2's cap."""
    failing = {"on": True}

    def script(request: Mapping[str, Any]) -> list[GeneratedImage] | BaseException:
        if failing["on"] and request["prompt"] == "a grey owl":
            return images(1, failed={0: "InternalServiceError"})
        return images(1)

    hook, store = FakeHook(script), MemoryStore()
    bodies = [body("a red fox"), body("a grey owl"), body("a brown bear")]
    first = run(hook, store, bodies, limit=3, concurrency=1)
    assert [len(outcome.stored) for outcome in first.outcomes] == [1, 0, 1]
    assert hook.billed == 2

    failing["on"] = False
    second = run(hook, store, bodies, limit=2, try_number=2)
    assert isinstance(second.fatal, JiMengSpendingCapError)
    assert second.fatal.earlier == 2
    assert hook.billed == 2, "the cap of 2 was spent by try 1: nothing sent"
    assert second.usage()["this_try"]["requests"] == 0, "a prompt the cap refused is no request"


def test_a_set_cut_short_by_the_service_is_topped_up_by_the_next_try() -> None:
    """Break 10, on the engine alone: the retry asks for the lost images only and fills their keys."""
    failing = {"on": True}

    def script(request: Mapping[str, Any]) -> list[GeneratedImage] | BaseException:
        wanted = max_images_billed(request)
        if failing["on"]:
            return images(3, failed={2: "InternalServiceError"})  # the set stopped at image 2
        return images(wanted)

    hook, store = FakeHook(script), MemoryStore()
    bodies = [body("a comic in 4 images", images_in_set=4)]
    first = run(hook, store, bodies)
    assert [image.image_index for image in first.outcomes[0].stored] == [0, 1]
    assert records(store)["prompts"][0]["retry_images"] == [2, 3]

    failing["on"] = False
    second = run(hook, store, bodies, try_number=2)
    assert hook.sent[1]["sequential_image_generation_options"] == {"max_images": 2}
    assert hook.billed == 4
    assert [image.image_index for image in second.outcomes[0].stored] == [0, 1, 2, 3]
    assert second.outcomes[0].failures == []
    (record,) = records(store)["prompts"]
    assert [image["image_index"] for image in record["images"]] == [0, 1, 2, 3]
    assert (record["failures"], record["retry_images"]) == ([], [])
    assert len(store.images()) == 4


def test_kept_images_whose_record_is_refused_are_notes_not_failures() -> None:
    """Break 8: the task's count of failures left out images kept whose ``records.json`` was refused."""
    hook, store = FakeHook(), MemoryStore()
    store.fail_writes = lambda key: key.endswith("records.json")

    generation = run(hook, store, [body("a red fox"), body("a grey owl")])

    assert [outcome.failures for outcome in generation.outcomes] == [[], []]
    assert all("stored but not its record" in outcome.notes[0] for outcome in generation.outcomes)
    assert all(outcome.incomplete for outcome in generation.outcomes)
    assert store.local_journal.usage, "the try's counters went to the fallback"
