"""Publications: the copy of a stored image under a custom key (``s3_key``).

An image's canonical copy lives in its task instance's keyspace, where no other task instance
writes and where records, journals and the kill recovery find it. A custom key is a publication of
that copy, made after it is stored and re-made by a retry (a copy, idempotent). Two task instances
can still render one publication key (templates are the user's): the second never overwrites the
first's image. Each copy carries the canonical object's metadata, which names the task instance that
made it, and a publication is written only over nothing, over the same image, or over an earlier
answer of the same task instance. Anything else is reported and left as it is; the canonical copy
is kept either way, so nothing paid for is lost.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

from airflow_provider_jimeng.storage.records import StoredImage

if TYPE_CHECKING:
    from airflow_provider_jimeng.storage.base import ImageStore

#: The metadata that names the task instance an object belongs to.
OWNER_METADATA = ("airflow-dag-id", "airflow-run-id", "airflow-task-id", "airflow-map-index")


def owner(metadata: Mapping[str, str]) -> tuple[str | None, ...]:
    """The task instance an object's metadata names (``None`` fields: not written by this provider)."""
    return tuple(metadata.get(name) for name in OWNER_METADATA)


def publish(store: ImageStore, image: StoredImage, key: str, metadata: Mapping[str, str]) -> StoredImage | str:
    """Copy the stored ``image`` to the publication ``key``; the image with its publication, or why not.

    ``metadata`` is the canonical object's (it names this task instance). The copy is skipped when
    the key holds this very image already (a retry), made when the key is free or holds an earlier
    answer of this task instance, and refused, as a failure line, when it holds anything else.
    Storage errors propagate (:class:`~airflow_provider_jimeng.exceptions.JiMengStorageError`): the
    canonical copy is stored, and a retry publishes it without a new request.
    """
    published = dataclasses.replace(image, published_key=key, published_uri=store.keyspace.uri(key))
    current = store.head_if_exists(key)
    if current is not None:
        found = current.get("Metadata") or {}
        if owner(found) != owner(metadata):
            theirs = owner(found)
            whose = (
                "another task instance's image (dag {}, run {}, task {}, map index {})".format(*theirs)
                if any(theirs)
                else "an object this provider did not write for this task instance"
            )
            return (
                f"prompt {image.prompt_index} image {image.image_index}: not published to {store.keyspace.uri(key)}: "
                f"it holds {whose}, left as it is; the image is kept at {image.uri} (s3_key)"
            )
        same_image = found.get("jimeng-request-id") == metadata.get("jimeng-request-id") and (
            image.bytes is None or int(current.get("ContentLength", -1)) == image.bytes
        )
        if same_image:
            return published
    store.copy_object(image.key, key, metadata)
    return published
