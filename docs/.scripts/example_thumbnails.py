"""Regenerate docs/img/examples/*.jpeg: emulator output for the example DAGs' prompts, as 256 px thumbnails.

Run from the repository root: ``.venv/bin/python docs/.scripts/example_thumbnails.py``.
The emulator draws placeholder pictures (deterministic in prompt, seed and image index); the real
service returns actual images for the same requests.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import requests
from PIL import Image

from airflow_provider_jimeng.api.reference_images import normalize_reference_image
from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, JiMengEmulator

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "img" / "examples"
MODEL = "doubao-seedream-4-0-250828"
THUMBNAIL = 256

PRODUCTS = json.loads((ROOT / "dags_examples" / "data" / "products.json").read_text(encoding="utf-8"))


def product_prompt(product: dict[str, str]) -> str:
    # Mirrors dags_examples/jimeng_content_pipeline.py.
    return (
        f"Studio product photograph of the {product['name']}, a {product['colour']} piece in "
        f"{product['material']}, {product['style']} style, soft daylight, seamless light background, "
        "centred, sharp focus, e-commerce catalogue shot, no text"
    )


# name -> request body (without model and response_format)
REQUESTS: dict[str, dict[str, object]] = {
    "hello": {
        "prompt": "A cheerful flat illustration of a red panda reading the morning newspaper, bright morning "
        "light, pastel colours, clean composition with space for a headline, made for the team newsletter",
        "size": "1K",
        "watermark": True,
    },
    **{
        f"pipeline-{product['sku'].lower()}": {"prompt": product_prompt(product), "size": "1K", "watermark": False}
        for product in PRODUCTS[:3]
    },
    **{
        f"mapped-scene-{index}": {"prompt": f"{scene}, watercolour postcard style, no text", "size": "1K"}
        for index, scene in enumerate(
            ("a lighthouse on a rocky coast at dawn", "a night market with paper lanterns"), start=0
        )
    },
    "mapped-banner-0": {
        "prompt": "web banner, a lighthouse on a rocky coast at dawn, watercolour postcard style, no text",
        "size": "1280x720",
        "seed": 42,
    },
    "edit-reference": {
        "prompt": "Turn this flat sketch into a photorealistic product photo of a navy ceramic mug on a light oak "
        "table, keep the shape and the three white stripes, soft window light",
        "image": normalize_reference_image("image", str(ROOT / "dags_examples" / "data" / "reference_mug.png")),
        "size": "1K",
    },
    "storyboard": {
        "prompt": "A storyboard set of 4 images for a coffee brand: the same navy mug at sunrise on a balcony, on a "
        "desk at noon, in a cafe in the afternoon and by a fireplace at night",
        "sequential_image_generation": "auto",
        "sequential_image_generation_options": {"max_images": 4},
        "size": "1K",
    },
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with JiMengEmulator() as emulator, requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {DEFAULT_API_KEY}"
        for name, fields in REQUESTS.items():
            body = {"model": MODEL, "response_format": "b64_json", **fields}
            answer = http.post(f"{emulator.base_url}/images/generations", json=body, timeout=60)
            answer.raise_for_status()
            items = answer.json()["data"]
            for index, item in enumerate(items):
                image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
                image.thumbnail((THUMBNAIL, THUMBNAIL))
                suffix = f"-{index + 1}" if len(items) > 1 else ""
                path = OUT / f"{name}{suffix}.jpeg"
                image.save(path, "JPEG", quality=85)
                print(path.relative_to(ROOT), item["size"])


if __name__ == "__main__":
    main()
