"""The "JiMeng images" button on a task: where the generated images can be looked at.

Airflow 3 evaluates links once, when the task finishes, and stores the result; the link is built
from the task's own output (its first image), so nothing extra is pushed for it. Where it goes:

* stored, on Airflow 3.1 and later: the task instance's **Images** tab in the Airflow UI (the
  provider's plugin view, ``.../tasks/{task_id}[/mapped/{map_index}]/plugin/jimeng-images``; the
  gallery is served by the API server under ``/jimeng``; docs/gallery.md), so the user stays in the UI;
* stored in AWS S3 (Airflow 3.0): the S3 console's view of the folder holding the task's images (a bare object
  URL of a private bucket answers 403);
* stored on another S3 endpoint (MinIO, moto; Airflow 3.0: an ``endpoint_url`` in the AWS connection): no link,
  because there is no console to send a person to, and a dead link is worse than none;
* stored through ``output_path`` (Airflow 3.0): ``gs://`` opens the Cloud console's folder; ``file://``,
  ``abfs://`` and other paths a browser cannot open get no link;
* not stored: the first image's signed URL, which is what the task returned.
"""

from __future__ import annotations

import logging
import posixpath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from airflow.sdk import BaseOperatorLink

from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

log = logging.getLogger(__name__)

#: Where the API server mounts the gallery plugin's app (airflow_provider_jimeng/plugins/gallery.py).
GALLERY_URL_PREFIX = "/jimeng"
#: The Images tab's route in the UI (the plugin's external view, ``.../plugin/jimeng-images``).
GALLERY_URL_ROUTE = "jimeng-images"
#: Console domain per AWS partition (as the Amazon provider's ``BaseAwsLink.get_aws_domain``).
CONSOLE_DOMAINS = {"aws": "aws.amazon.com", "aws-cn": "amazonaws.cn", "aws-us-gov": "amazonaws-us-gov.com"}
#: Host suffixes of AWS's own S3 endpoints (regional, dual-stack, FIPS, VPC endpoints, China).
AWS_ENDPOINT_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")


def is_aws_endpoint(endpoint_url: str | None) -> bool:
    """Whether an S3 client's endpoint is AWS itself (``None``: botocore's default, which is AWS)."""
    if not endpoint_url:
        return True
    host = (urlsplit(endpoint_url).hostname or "").lower()
    return host.endswith(AWS_ENDPOINT_SUFFIXES)


def s3_console_url(uri: str, *, region: str | None, partition: str = "aws") -> str:
    """The S3 console's view of the folder holding ``s3://bucket/key`` (the bucket, for a top-level key)."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    domain = CONSOLE_DOMAINS.get(partition, CONSOLE_DOMAINS["aws"])
    host = f"{region}.console.{domain}" if region and region != "aws-global" else f"console.{domain}"
    url = f"https://{host}/s3/buckets/{quote(bucket, safe='')}"
    folder = posixpath.dirname(key)
    return f"{url}?prefix={quote(folder, safe='/')}/" if folder else url


def is_stored(first: object) -> bool:
    """Whether a task's first output is a stored object's URI (``s3://``, ``gs://``, ``file://`` ...)."""
    return isinstance(first, str) and "://" in first and not first.startswith(("http://", "https://"))


def gallery_url(dag_id: str, run_id: str, task_id: str, map_index: int, *, base_url: str = "") -> str:
    """The task instance's Images tab in the UI (``[api] base_url`` first when it is set): the gallery in its frame."""
    path = "/".join(quote(part, safe="") for part in ("dags", dag_id, "runs", run_id, "tasks", task_id))
    if map_index >= 0:
        path += f"/mapped/{map_index}"
    return f"{base_url.rstrip('/')}/{path}/plugin/{GALLERY_URL_ROUTE}"


def _api_base_url() -> str:
    try:
        from airflow.configuration import conf

        return str(conf.get("api", "base_url", fallback="") or "")
    except Exception:  # a worker without the API's configuration: a path on the same host
        return ""


def images_link(first: object, *, endpoint_url: str | None, region: str | None, partition: str = "aws") -> str:
    """Where "JiMeng images" points for a task whose first output is ``first``; ``""`` for no link."""
    if not isinstance(first, str) or not first:
        return ""
    if first.startswith("gs://"):
        bucket, _, key = first.removeprefix("gs://").partition("/")
        return f"https://console.cloud.google.com/storage/browser/{bucket}/{key.rpartition('/')[0]}"
    if first.startswith(("https://", "http://")):
        return first  # no storage: the signed image URL the task returned
    if not first.startswith("s3://"):
        return ""  # an output_path on a filesystem the browser cannot open (file://, abfs:// ...)
    if not is_aws_endpoint(endpoint_url):
        return ""
    return s3_console_url(first, region=region, partition=partition)


class JiMengImagesLink(BaseOperatorLink):
    """Links a finished task to its images: the gallery (3.1+) or the S3 console folder, or the first signed URL."""

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
        if AIRFLOW_V_3_1_PLUS and ti_key is not None and is_stored(first):
            # The Images tab: the gallery reads the images on the API server (from the storage the
            # deployment allows), for a private bucket, a custom S3 endpoint and other backends alike
            # (Airflow 3.0 has no plugin views).
            return gallery_url(ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index, base_url=_api_base_url())
        if not isinstance(first, str) or not first.startswith("s3://"):
            return images_link(first, endpoint_url=None, region=None)
        try:
            conn_id = getattr(operator, "output_conn_id", None) or getattr(operator, "aws_conn_id", None)
            endpoint_url, region, partition = _s3_client_location(conn_id)
        except Exception as error:  # the link is a convenience: never fail a finished task over it
            log.warning("No JiMeng images link: the S3 client's endpoint is unknown (%s)", type(error).__name__)
            return ""
        return images_link(first, endpoint_url=endpoint_url, region=region, partition=partition)


class JiMengReviewLink(BaseOperatorLink):
    """Links a review (``JiMengReviewOperator``) to the gallery of the images it asked about, with its decision."""

    name = "Reviewed images"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        sources = getattr(operator, "images_from", None)
        if not AIRFLOW_V_3_1_PLUS or ti_key is None or not isinstance(sources, list) or not sources:
            return ""
        # The gallery page itself (every map index of a mapped generation task), not a task's tab.
        query = urlencode({"dag_id": ti_key.dag_id, "run_id": ti_key.run_id, "task_id": str(sources[0])})
        return f"{_api_base_url().rstrip('/')}{GALLERY_URL_PREFIX}/gallery?{query}"


def _s3_client_location(aws_conn_id: str | None) -> tuple[str | None, str | None, str]:
    """Endpoint, region and partition of the S3 client the task used (connection, env and config applied)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    meta = S3Hook(aws_conn_id=aws_conn_id).conn_client_meta
    return meta.endpoint_url, meta.region_name, meta.partition
