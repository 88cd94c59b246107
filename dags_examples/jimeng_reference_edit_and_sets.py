"""
### JiMeng reference-image edits and image sets

JiMeng 4.0 / Seedream 4.0 does more than text-to-image:

* **`edit_reference`** — an *edit*: the prompt says what to change, `image=` gives the
  reference (a URL, a `data:` URI or, as here, a local file shipped next to the DAG:
  `data/reference_mug.png`, sent inline). Up to 10 reference images per request.
* **`storyboard_set`** — a *set*: with `sequential_image_generation="auto"` the model may
  return several related images for one prompt (a storyboard, a product from several
  angles). **Every image of a set is billed**, so always cap it with `max_images`; the
  operator refuses a run whose worst case exceeds `max_images_per_task` before any request.
  The model decides how many images it returns, up to `max_images`.

Both store their images in S3 under `<prefix>/<dag_id>/<run_id>/<task_id>/`.

**Params:** `bucket`, `prefix`, `size`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from airflow.sdk import Param, dag, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

log = logging.getLogger(__name__)

# resolve(): the DAG file may be a symlink into the DAGs folder; the image ships next to the real file.
REFERENCE_IMAGE = Path(__file__).resolve().parent / "data" / "reference_mug.png"
MAX_SET_IMAGES = 4


@dag(
    dag_id="jimeng_reference_edit_and_sets",
    schedule=None,
    catchup=False,
    tags=["jimeng", "example", "edit", "s3"],
    doc_md=__doc__,
    params={
        "bucket": Param("jimeng-images", type="string", description="S3 bucket for the images"),
        "prefix": Param("edits", type="string", description="key prefix inside the bucket"),
        "size": Param("1K", type="string", description="1K, 2K, 4K or WxH"),
    },
)
def jimeng_reference_edit_and_sets() -> None:
    edit = JiMengGenerateOperator(
        task_id="edit_reference",
        prompt=(
            "Turn this flat sketch into a photorealistic product photo of a navy ceramic mug "
            "on a light oak table, keep the shape and the three white stripes, soft window light"
        ),
        image=str(REFERENCE_IMAGE),
        size="{{ params.size }}",
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="{{ params.prefix }}",
        max_images_per_task=1,
    )

    storyboard = JiMengGenerateOperator(
        task_id="storyboard_set",
        prompt=(
            "A storyboard set of 4 images for a coffee brand: the same navy mug at sunrise on a "
            "balcony, on a desk at noon, in a cafe in the afternoon and by a fireplace at night"
        ),
        sequential_image_generation="auto",
        max_images=MAX_SET_IMAGES,
        size="{{ params.size }}",
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="{{ params.prefix }}",
        max_images_per_task=MAX_SET_IMAGES,
        # A set is one request: if one image fails moderation, keep the others and warn.
        on_partial_failure="continue",
    )

    @task
    def report(edited: list[str], frames: list[str], usage: dict[str, Any]) -> dict[str, int]:
        """Count what was stored and billed (the set's usage comes from the operator's ``usage`` XCom)."""
        counts = {"edited": len(edited), "frames": len(frames), "set_billed": int(usage["generated_images"])}
        log.info("Edited %d image(s); storyboard set of %d frame(s)", counts["edited"], counts["frames"])
        return counts

    report(edit.output, storyboard.output, storyboard.output["usage"])


dag = jimeng_reference_edit_and_sets()
