"""The "JiMeng images" button on a task: where the generated images can be looked at.

Airflow 3 evaluates links once, when the task finishes, and stores the result; the link is built
from the task's own XCom (the first image), so nothing extra is pushed for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

S3_CONSOLE = "https://s3.console.aws.amazon.com/s3/object/{bucket}?prefix={key}"


def s3_browser_url(uri: str, endpoint_url: str | None = None) -> str:
    """An address a person can open for ``s3://bucket/key``: the S3 console, or a custom endpoint."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if endpoint_url:
        return f"{endpoint_url.rstrip('/')}/{bucket}/{quote(key)}"
    return S3_CONSOLE.format(bucket=bucket, key=quote(key, safe=""))


class JiMengImagesLink(BaseOperatorLink):
    """Links a finished task to its first image (stored object, or the signed URL without storage)."""

    name = "JiMeng images"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        # Airflow 3 evaluates links on the worker right after execute: the operator that just ran knows
        # its first output, and a failed run (no output) must not go looking for an XCom that is not there.
        if hasattr(operator, "images_link_target"):
            first = operator.images_link_target
        else:
            from airflow.sdk.execution_time.xcom import XCom

            outputs: Any = XCom.get_value(ti_key=ti_key, key="return_value")
            first = outputs[0] if isinstance(outputs, list) and outputs else None
        if not isinstance(first, str) or not first:
            return ""
        if not first.startswith("s3://"):
            return first
        return s3_browser_url(first, _endpoint_url(getattr(operator, "aws_conn_id", None)))


def _endpoint_url(aws_conn_id: str | None) -> str | None:
    try:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        return S3Hook(aws_conn_id=aws_conn_id).conn_config.endpoint_url
    except Exception:
        return None
