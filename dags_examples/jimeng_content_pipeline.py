"""
### JiMeng product content pipeline

The job this provider exists for: turn a product catalogue into a reviewed-ready image
gallery on S3, on a schedule, without paying twice when a task is retried.

1. **`build_prompts`** reads the catalogue (`data/products.json`: name, colour, material,
   style per product) and writes one prompt per product.
2. **`generate_images`** (`JiMengGenerateOperator`) sends the prompts to JiMeng 4.0 /
   Seedream 4.0, `max_concurrency` at a time, and streams every image straight into
   `s3://<bucket>/<prefix>/<dag_id>/<run_id>/generate_images/`. A retry reuses what an earlier try
   already stored; `max_images_per_task` refuses an over-budget run before any request.
3. **`publish_gallery`** reads the operator's `images` XCom (one record per stored image:
   URI, size, bytes, SHA-256, request id) and writes `manifest.json` and an `index.html`
   gallery next to the images. It updates the `jimeng_product_gallery` asset, so other DAGs
   can run when a new gallery lands: `schedule=[Asset.ref(name="jimeng_product_gallery")]`
   (the event's `extra` carries the actual `manifest` and `gallery` URIs).

**Params:** `bucket`, `prefix`, `size` (`1K` is cheapest).
**Connections:** `jimeng_default` (the API) and `aws_default` (S3).
"""

from __future__ import annotations

import html
import json
import logging
import posixpath
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.sdk import Asset, Param, dag, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

log = logging.getLogger(__name__)

CATALOGUE = Path(__file__).resolve().parent / "data" / "products.json"
#: Updated with the gallery's real location (in the event's extra) after every successful run.
GALLERY_ASSET = Asset(name="jimeng_product_gallery", uri="s3://jimeng-images/catalogue/")


def product_prompt(product: dict[str, str]) -> str:
    """One product record -> one prompt; kept as plain code so it can be unit-tested and reviewed."""
    return (
        f"Studio product photograph of the {product['name']}, a {product['colour']} piece in "
        f"{product['material']}, {product['style']} style, soft daylight, seamless light background, "
        "centred, sharp focus, e-commerce catalogue shot, no text"
    )


def render_gallery(title: str, entries: list[dict[str, Any]]) -> str:
    """A dependency-free HTML page; image links are relative so the folder works wherever it is copied."""
    figures = "\n".join(
        f'    <figure><a href="{html.escape(e["file"])}"><img src="{html.escape(e["file"])}" '
        f'alt="{html.escape(e["product"])}" loading="lazy"></a>'
        f"<figcaption>{html.escape(e['product'])} <small>{html.escape(e['sku'])} · {html.escape(str(e['size']))}"
        "</small></figcaption></figure>"
        for e in entries
    )
    return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{html.escape(title)}</title>
  <style>
    body {{ font-family: system-ui, sans-serif; margin: 2rem; background: #fafafa; color: #222; }}
    main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 1.5rem; }}
    figure {{ margin: 0; background: #fff; padding: .75rem; border-radius: 8px; box-shadow: 0 1px 3px #0002; }}
    img {{ width: 100%; height: auto; border-radius: 4px; }}
    small {{ display: block; color: #777; }}
  </style>
</head>
<body>
  <h1>{html.escape(title)}</h1>
  <p>{len(entries)} image(s) generated with JiMeng / Seedream; details in <a href="manifest.json">manifest.json</a>.</p>
  <main>
{figures}
  </main>
</body>
</html>
"""


@dag(
    dag_id="jimeng_content_pipeline",
    schedule=None,
    catchup=False,
    tags=["jimeng", "example", "s3"],
    doc_md=__doc__,
    params={
        "bucket": Param("jimeng-images", type="string", description="S3 bucket for images and the gallery"),
        "prefix": Param("catalogue", type="string", description="key prefix inside the bucket"),
        "size": Param("1K", type="string", description="1K, 2K, 4K or WxH"),
    },
)
def jimeng_content_pipeline() -> None:
    @task(multiple_outputs=True)
    def build_prompts() -> dict[str, list[Any]]:
        """Read the catalogue; prompt ``i`` belongs to product ``i`` (the operator keeps that order)."""
        products: list[dict[str, str]] = json.loads(CATALOGUE.read_text(encoding="utf-8"))
        return {"products": products, "prompts": [product_prompt(product) for product in products]}

    catalogue = build_prompts()

    generate = JiMengGenerateOperator(
        task_id="generate_images",
        prompt=catalogue["prompts"],
        size="{{ params.size }}",
        watermark=False,
        max_concurrency=4,
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="{{ params.prefix }}",
        max_images_per_task=50,
        retries=2,  # a retry reuses the images already stored: it does not pay twice
        retry_delay=timedelta(seconds=30),
    )

    @task(outlets=[GALLERY_ASSET])
    def publish_gallery(
        products: list[dict[str, str]],
        images: list[dict[str, Any]],
        run_id: str | None = None,
        outlet_events: Any = None,
    ) -> str:
        """Write manifest.json and index.html next to the images; return the gallery's URI."""
        if not images:
            raise ValueError("generate_images stored no image; nothing to publish")
        bucket = images[0]["bucket"]
        folder = posixpath.dirname(images[0]["key"])
        entries = []
        for record in sorted(images, key=lambda r: (r["prompt_index"], r["image_index"])):
            product = products[record["prompt_index"]]
            entries.append(
                {
                    "product": product["name"],
                    "sku": product["sku"],
                    "file": posixpath.relpath(record["key"], folder),
                    "uri": record["uri"],
                    "size": record["size"],
                    "bytes": record["bytes"],
                    "sha256": record["sha256"],
                    "request_id": record["request_id"],
                }
            )
        # put_object rather than load_string: the content types let a browser (or CDN) show the gallery.
        s3 = S3Hook(aws_conn_id="aws_default").get_conn()
        manifest_key, gallery_key = f"{folder}/manifest.json", f"{folder}/index.html"
        manifest = {"run_id": run_id, "count": len(entries), "images": entries}
        s3.put_object(
            Bucket=bucket,
            Key=manifest_key,
            Body=json.dumps(manifest, indent=2).encode("utf-8"),
            ContentType="application/json",
        )
        s3.put_object(
            Bucket=bucket,
            Key=gallery_key,
            Body=render_gallery("Product catalogue", entries).encode("utf-8"),
            ContentType="text/html; charset=utf-8",
        )
        gallery_uri = f"s3://{bucket}/{gallery_key}"
        if outlet_events is not None:
            outlet_events[GALLERY_ASSET].extra = {
                "gallery": gallery_uri,
                "manifest": f"s3://{bucket}/{manifest_key}",
                "images": len(entries),
            }
        log.info("Published %d image(s): gallery %s", len(entries), gallery_uri)
        return gallery_uri

    publish_gallery(catalogue["products"], generate.output["images"])


dag = jimeng_content_pipeline()
