"""A Visual API submit that times out, through a whole DAG run (``dag.test()``, task retries included).

The submit's answer never comes (the connection's 1 s read timeout, the emulator answering after
1.5 s): the service went on and billed the task, whose id nobody knows. The try counts it as
possibly billed, collects the other prompts, and fails; the retry submits that prompt again only
within ``max_images_per_task`` (docs/faults.md, "On the Visual API"), and never submits a prompt
whose image the first try stored. Asserted on the DagRun's state and on the emulator's ledger.

Driven with ``JiMengGenerateOperator`` (``dag.test()`` drops a deferral's kwargs, so ``@task.jimeng``
would run its function again on resume there; the scheduler keeps them).
"""

# ruff: noqa: F811  (fixtures imported from tests.visual_fixtures are parameters here)

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from airflow_provider_jimeng.emulator import SUBMIT_FAULT_PATH, Fault, JiMengEmulator
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS
from tests.dags import jimeng_test_visual
from tests.operators.conftest import Bucket, RunDag, task_prefix, wait_until
from tests.visual_fixtures import (  # noqa: F401  (fixtures)
    CONN_ID,
    Clock,
    clock,
    connect_visual,
    emulator,
    make_jimeng_emulator,
    make_visual_emulator,
    submits,
)

pytestmark = pytest.mark.timeout(90)

PROMPTS = jimeng_test_visual.PROMPTS


@pytest.fixture
def timing_out(emulator: JiMengEmulator, connect_visual: Callable[..., None]) -> JiMengEmulator:
    """The emulator behind a connection with a 1 s read timeout; the first submit is answered after 1.5 s."""
    connect_visual(emulator, timeout=1)
    emulator.inject(Fault("slow", delay=1.5, path=SUBMIT_FAULT_PATH, times=1))
    return emulator


#: Airflow 3.0 does not retry a try that failed after it resumed from a deferral as a fresh try
#: (apache/airflow#56731, fixed in 3.1): the run fails there, paying nothing twice (docs/compatibility.md).
RETRIES_AFTER_A_DEFERRAL = pytest.mark.skipif(
    not AIRFLOW_V_3_1_PLUS, reason="Airflow 3.0 does not retry a try that failed after a deferral (fixed in 3.1)"
)


@pytest.mark.parametrize(
    "deferrable",
    [pytest.param(True, marks=RETRIES_AFTER_A_DEFERRAL), False],
    ids=["deferrable", "polled-on-the-worker"],
)
def test_a_timed_out_submit_is_counted_and_the_retry_submits_only_that_prompt_again(
    run_dag: RunDag, bucket: Bucket, timing_out: JiMengEmulator, deferrable: bool
) -> None:
    dag = jimeng_test_visual.deferrable_dag if deferrable else jimeng_test_visual.polled_dag
    run = run_dag(dag, {"bucket": bucket.name})

    assert run.state == "success"
    assert run.try_number("gen") == 2
    assert "SubmitFailed" in run.log("gen")  # try 1 failed on the prompt whose answer never came
    # The lost task was billed by the service; the retry submitted its prompt once more (docs/faults.md
    # admits it: no cap was set), and nothing else twice.
    assert wait_until(lambda: timing_out.billed_images == 4)
    assert submits(timing_out) == 4
    assert Counter(entry.prompt for entry in timing_out.ledger) == Counter(
        {PROMPTS[0]: 2, PROMPTS[1]: 1, PROMPTS[2]: 1}
    )
    assert sum(not entry.delivered for entry in timing_out.ledger) == 1, "only the lost task's images went unfetched"
    # Nothing lost: every prompt's image is stored and handed downstream.
    records = run.xcom("gen", "images")
    assert sorted(record["prompt_index"] for record in records) == [0, 1, 2]
    assert len(bucket.images(task_prefix(run))) == 3


def test_a_timed_out_submit_is_not_paid_again_beyond_max_images_per_task(
    run_dag: RunDag, bucket: Bucket, timing_out: JiMengEmulator
) -> None:
    run = run_dag(jimeng_test_visual.capped_dag, {"bucket": bucket.name})

    assert run.state == "failed"
    assert run.try_number("gen") == 2
    assert "max_images_per_task" in run.log("gen")  # the retry refused before any request
    assert wait_until(lambda: timing_out.billed_images == 3)
    assert submits(timing_out) == 3, "the possibly billed submit counts against the cap: no second submit"
    assert Counter(entry.prompt for entry in timing_out.ledger) == Counter(PROMPTS)
    # What was made is kept: the two images the first try collected are stored.
    assert len(bucket.images(task_prefix(run))) == 2
