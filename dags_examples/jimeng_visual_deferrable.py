"""
### JiMeng 4.0 through the Visual API, deferrable

For accounts holding a Volcengine **access key pair** (the Visual API, `req_key: jimeng_t2i_v40`)
rather than an Ark API key. The connection `jimeng_visual` is a `jimeng` connection with the extra
`{"api": "visual"}`, the access key id as login and the secret access key as password.

The task submits every prompt (one image each: `force_single`), **journals the task ids in S3**
next to the task's `records.json` (`_visual/tasks.json`), then frees its worker slot: Airflow's
triggerer polls the tasks (polls are free) and the task resumes only to download and store the
images, with the same records, XComs and gallery as the Ark path. A retry, a cleared task or a
restarted triggerer reads the journal first and never submits a journaled prompt again.

Needs a triggerer (`airflow triggerer`); without one, set `deferrable=False`: the worker polls.

Written with `@task.jimeng`: the function builds the prompts; `JiMengGenerateOperator(deferrable=True)`
takes the same parameters.

**Params:** `topics` (one prompt each), `bucket` (where the images go).

**Try it offline:** `python -m airflow_provider_jimeng.emulator` serves the Visual API too.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import DAG, Param, task

log = logging.getLogger(__name__)

with DAG(
    dag_id="jimeng_visual_deferrable",
    schedule=None,
    catchup=False,
    tags=["jimeng", "example", "visual-api"],
    doc_md=__doc__,
    params={
        "topics": Param(
            ["a paper boat on a puddle", "a cactus wearing a scarf"],
            type="array",
            items={"type": "string", "minLength": 1},
            minItems=1,
        ),
        "bucket": Param("jimeng-images", type="string", minLength=3),
    },
) as dag:

    @task.jimeng(
        jimeng_conn_id="jimeng_visual",
        size="2048x2048",
        s3_bucket="{{ params.bucket }}",
        deferrable=True,  # on the Visual API only: the journal in S3 is what makes it safe
        poll_interval=5,
        watermark=False,  # the logo is chosen at poll time on the Visual API
        max_images_per_task=8,
    )
    def generate(params: dict[str, Any]) -> list[str]:
        """One prompt per topic; the function runs once, before the submit (never again on resume)."""
        return [f"{topic}, soft watercolour, white background" for topic in params["topics"]]

    @task
    def report(uris: list[str]) -> int:
        """Log where the images are (``s3://`` URIs: no credentials in them)."""
        for uri in uris:
            log.info("Stored %s", uri)
        return len(uris)

    report(generate())
