"""Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_provider_jimeng import __version__

INTEGRATION = "JiMeng (Seedream)"


def _conn_fields() -> dict[str, Any]:
    from airflow_provider_jimeng.hooks.connection_form import CONNECTION_EXTRAS

    return CONNECTION_EXTRAS


def _ui_field_behaviour() -> dict[str, Any]:
    from airflow_provider_jimeng.hooks.connection_form import UI_FIELD_BEHAVIOUR

    return {
        "hidden-fields": UI_FIELD_BEHAVIOUR["hidden_fields"],
        "relabeling": UI_FIELD_BEHAVIOUR["relabeling"],
        "placeholders": UI_FIELD_BEHAVIOUR["placeholders"],
    }


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-jimeng",
        "name": "JiMeng (Seedream)",
        "description": "Generate images with ByteDance JiMeng 4.0 (Seedream 4.0) and store them durably in S3.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": INTEGRATION,
                "external-doc-url": "https://www.volcengine.com/docs/82379/1541523",
                "tags": ["ai", "service"],
            }
        ],
        "hooks": [{"integration-name": INTEGRATION, "python-modules": ["airflow_provider_jimeng.hooks.jimeng"]}],
        "operators": [
            {
                "integration-name": INTEGRATION,
                "python-modules": [
                    "airflow_provider_jimeng.operators.jimeng",
                    "airflow_provider_jimeng.operators.review",
                ],
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_provider_jimeng.hooks.jimeng.JiMengHook",
                "hook-name": "JiMeng (Seedream)",
                "connection-type": "jimeng",
                "ui-field-behaviour": _ui_field_behaviour(),
                "conn-fields": _conn_fields(),
            }
        ],
        "triggers": [{"integration-name": INTEGRATION, "python-modules": ["airflow_provider_jimeng.triggers.visual"]}],
        "extra-links": [
            "airflow_provider_jimeng.links.jimeng.JiMengImagesLink",
            "airflow_provider_jimeng.links.jimeng.JiMengReviewLink",
        ],
        "config": {
            "jimeng": {
                "description": "Settings of the JiMeng provider.\n",
                "options": {
                    "gallery_storage": {
                        "description": (
                            "The storage the Images gallery (on the API server) may read, as a JSON object mapping a "
                            "storage root URI, ending with '/', to the connection id the API server reads it with: "
                            '{"s3://images/jimeng/": "aws_gallery"}. Images and records.json are served only from '
                            "under these roots, through these connections; what a task wrote (its storage XCom's "
                            "connection id included) decides nothing. Empty: nothing is read (the page lists images "
                            "without showing them). file:// roots are read only when listed (no connection id "
                            "needed); http, ftp, memory and other schemes never. A connection that does not exist "
                            "means no read (never the default credential chain). In multi-team mode a team's DAGs "
                            "use the team's own value (AIRFLOW__<TEAM>___JIMENG__GALLERY_STORAGE) only.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": '{"s3://images/jimeng/": "aws_gallery"}',
                        "default": "",
                    },
                    "gallery_thumbnails": {
                        "description": (
                            "Whether the gallery's grid loads thumbnails (440 px JPEGs made by the API server on "
                            "first request, needs Pillow: the 'gallery' extra) instead of the full images. Without "
                            "Pillow, or False, tiles load the full images lazily.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "False",
                        "default": "True",
                    },
                    "store_thumbnails": {
                        "description": (
                            "Whether workers store a thumbnail (a 440 px JPEG, ~16-60 KB) next to each image they "
                            "store in S3, under _thumbnails/ in the image's folder (needs Pillow on the workers: "
                            "the 'gallery' extra). The gallery then reads that small object for a tile instead of "
                            "reading and decoding the whole image on the API server. Costs ~20 ms of worker CPU and "
                            "one PUT per image.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "True",
                        "default": "False",
                    },
                    "gallery_sheets": {
                        "description": (
                            "Whether the gallery's tiles whose thumbnail a worker stored (store_thumbnails) load "
                            "from sheets: one request per row of up to eight tiles (an SVG embedding the stored "
                            "JPEGs) instead of one per tile, so a grid of 64 images costs the API server 8 "
                            "requests. The page lists each image folder's _thumbnails/ once to know which tiles "
                            "have one; the others load their own thumbnail. False (the default): one request per "
                            "tile, which keeps Airflow's own API closer to idle while a grid loads (P8); True costs "
                            "the API server less CPU per grid and draws it sooner, in bursts.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "True",
                        "default": "False",
                    },
                    "gallery_thumbnail_cache_mb": {
                        "description": (
                            "The API server's in-memory cache of thumbnails, in MiB (a thumbnail is about 16 KB); "
                            "least recently used ones leave first.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "128",
                        "default": "64",
                    },
                    "gallery_tiles_at_once": {
                        "description": (
                            "Thumbnail and sheet requests each API server process handles at once; the others "
                            "wait their turn (at most 1 s), so a grid of many tiles leaves the process's one GIL to "
                            "Airflow's own API. 0: no limit.\n"
                        ),
                        "version_added": "0.1.0",
                        "type": "integer",
                        "example": "2",
                        "default": "1",
                    },
                },
            }
        },
        "task-decorators": [{"name": "jimeng", "class-name": "airflow_provider_jimeng.decorators.jimeng.jimeng_task"}],
    }
