"""
### JiMeng hello world

The smallest useful DAG: one prompt, kept in a Jinja file next to the DAG
(`prompts/hello.j2`), rendered with the run's `params` and date, sent to JiMeng 4.0 /
Seedream 4.0 through the `jimeng_default` connection.

No storage is configured, so the task returns the **signed image URLs** (valid 24 hours)
in XCom. The downstream task only counts them: signed URLs are credentials-like and must
never be logged. For anything you want to keep, set `s3_bucket` (see
`jimeng_content_pipeline`).

**Params:** `subject` (what to draw), `size` (`1K`, `2K`, `4K` or `WxH`).

**Try it offline:** `python -m airflow_provider_jimeng.emulator` or `make demo`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from airflow.sdk import DAG, Param, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

log = logging.getLogger(__name__)

# resolve(): the file may be a symlink into the DAGs folder; the prompt file lives next to the real one.
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"

with DAG(
    dag_id="jimeng_hello",
    schedule=None,
    catchup=False,
    tags=["jimeng", "example"],
    doc_md=__doc__,
    template_searchpath=[str(PROMPTS_DIR)],
    params={
        "subject": Param("a red panda reading the morning newspaper", type="string", minLength=1),
        "size": Param("1K", type="string", description="1K, 2K, 4K or WxH"),
    },
) as dag:
    generate = JiMengGenerateOperator(
        task_id="generate",
        prompt="hello.j2",  # a .j2 file: Airflow reads and renders it (template_ext)
        size="{{ params.size }}",
        watermark=True,
        max_images_per_task=1,
    )

    @task
    def report(urls: list[str]) -> int:
        """Log how many images came back, never the URLs themselves (they are signed)."""
        log.info("JiMeng returned %d image URL(s); they expire in 24 hours", len(urls))
        return len(urls)

    report(generate.output)
