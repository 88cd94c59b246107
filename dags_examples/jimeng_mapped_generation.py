"""
### JiMeng with dynamic task mapping and `@task.jimeng`

Two ways to fan out generation when the prompts are only known at run time:

* **Mapped operator** — `JiMengGenerateOperator.partial(...).expand(prompt=build_prompts())`
  creates one task instance per prompt. Each instance stores its image under its own
  `map_<i>/` prefix, retries on its own and shows up on its own in the grid view.
* **`@task.jimeng`** — a Python function receives upstream values and returns the prompts
  (a string, a list, or a dict of operator parameters with `prompt`). The task then runs
  as `JiMengGenerateOperator`. Returned prompts are used verbatim (not rendered as Jinja).

**Pool `jimeng`:** every generation task here runs in the `jimeng` pool, so that however
many mapped instances the scheduler could start, only as many as the pool has slots call
the API at once (your account has an images-per-minute limit; 500 by default). Create it
once per deployment, e.g. `airflow pools set jimeng 4 "JiMeng API calls"`. Without the pool,
the scheduler leaves the tasks queued (`dag.test()` ignores pools, so tests and `make demo`
run without it).

**Params:** `bucket`, `prefix`, `size`, `theme`.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import Param, dag, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

log = logging.getLogger(__name__)

SCENES = (
    "a lighthouse on a rocky coast at dawn",
    "a night market with paper lanterns",
    "a mountain cabin in fresh snow",
    "a rooftop garden above a busy city",
    "a desert road under a sky full of stars",
    "a rainy street with neon reflections",
)


@dag(
    dag_id="jimeng_mapped_generation",
    schedule=None,
    catchup=False,
    tags=["jimeng", "example", "mapping", "s3"],
    doc_md=__doc__,
    params={
        "bucket": Param("jimeng-images", type="string", description="S3 bucket for the images"),
        "prefix": Param("mapped", type="string", description="key prefix inside the bucket"),
        "size": Param("1K", type="string", description="1K, 2K, 4K or WxH"),
        "theme": Param("watercolour postcard", type="string", description="style shared by every prompt"),
    },
)
def jimeng_mapped_generation() -> None:
    @task
    def build_prompts(params: dict[str, Any]) -> list[str]:
        """One prompt per scene: the number of mapped instances is decided here, at run time."""
        return [f"{scene}, {params['theme']} style, no text" for scene in SCENES]

    prompts = build_prompts()

    # One task instance per prompt; every instance shares the arguments given to partial().
    scenes = JiMengGenerateOperator.partial(
        task_id="generate_scene",
        size="{{ params.size }}",
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="{{ params.prefix }}",
        pool="jimeng",
        max_images_per_task=1,
    ).expand(prompt=prompts)

    # The decorated variant: the function gets upstream values and returns operator parameters.
    @task.jimeng(
        task_id="generate_banners",
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="{{ params.prefix }}",
        pool="jimeng",
        max_images_per_task=10,
    )
    def generate_banners(scene_prompts: list[str], params: dict[str, Any]) -> dict[str, Any]:
        """Wide banners for the first three scenes, three at a time."""
        return {
            "prompt": [f"web banner, {prompt}" for prompt in scene_prompts[:3]],
            "size": "1280x720" if params["size"] == "1K" else "2848x1600",
            "max_concurrency": 3,
        }

    banners = generate_banners(prompts)

    @task
    def summarize(scene_uris: list[list[str]], banner_uris: list[str]) -> dict[str, int]:
        """Mapped outputs arrive as one list per instance; count without logging the keys."""
        # Index rather than iterate: iterating a lazy XCom sequence probes one past its end.
        scene_count = sum(len(scene_uris[index]) for index in range(len(scene_uris)))
        counts = {"scenes": scene_count, "banners": len(banner_uris)}
        log.info("Stored %d scene image(s) and %d banner(s)", counts["scenes"], counts["banners"])
        return counts

    summarize(scenes.output, banners)


dag = jimeng_mapped_generation()
