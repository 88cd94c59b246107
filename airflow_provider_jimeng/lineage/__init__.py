"""What a run wrote and read, in OpenLineage's terms, without importing OpenLineage.

The operator keeps a :class:`RunLineage` after ``execute`` (what it stored, where, with which model
and size); :func:`operator_lineage` turns it into the OpenLineage provider's ``OperatorLineage``.
Only that function, and :mod:`.facets`, import the OpenLineage provider and client, and only when the
provider calls the operator's OpenLineage methods: without the provider installed nothing here is
imported and nothing changes.

Dataset names follow OpenLineage's naming conventions (https://openlineage.io/docs/spec/naming)
from the URI alone, so every storage backend ``ObjectStoragePath`` offers is named the same way:
the scheme and authority are the namespace (``s3://bucket``, ``gs://bucket``,
``abfss://container@account.dfs.core.windows.net``; ``file`` for a local path) and the path is the
name (relative to the bucket for object stores, absolute for file systems).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

#: Schemes that name the same store (fsspec and Hadoop aliases) and the name OpenLineage uses for it.
_SCHEME_ALIASES = {"gcs": "gs", "s3a": "s3", "s3n": "s3"}
#: File systems whose dataset name is the absolute path (with its leading ``/``); object stores name
#: a key relative to the bucket.
_PATH_SCHEMES = frozenset({"file", "local", "hdfs"})
#: Azure schemes whose authority is ``container@account.<endpoint>``: the ``@`` belongs to the name.
_AZURE_SCHEMES = frozenset({"abfs", "abfss", "wasb", "wasbs", "az", "adl"})


def dataset_name(uri: str) -> tuple[str, str]:
    """The OpenLineage ``(namespace, name)`` of a storage URI or local path.

    ``s3://bucket/jimeng/dag/run/task/`` -> ``("s3://bucket", "jimeng/dag/run/task")``;
    ``/opt/airflow/dags/prompt.txt`` -> ``("file", "/opt/airflow/dags/prompt.txt")``. A connection id in
    the authority (``s3://aws_prod@bucket/...``, how ``ObjectStoragePath`` carries it) is not part of
    where the data is, so it is dropped; Azure's ``container@account.dfs.core.windows.net`` is kept.
    """
    parts = urlsplit(uri)
    scheme = _SCHEME_ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    if not scheme or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):  # a plain (or Windows) path
        return "file", uri
    authority = parts.netloc
    if "@" in authority and not (scheme in _AZURE_SCHEMES and authority.rpartition("@")[2].count(".") >= 2):
        authority = authority.rpartition("@")[2]
    if scheme in _PATH_SCHEMES:
        path = parts.path or "/"
        name = path.rstrip("/") or "/"
        if scheme in ("file", "local"):
            return (f"file://{authority}" if authority else "file"), name
        return f"{scheme}://{authority}", name
    name = parts.path.strip("/") or "/"
    return f"{scheme}://{authority}", name


@dataclass(frozen=True)
class StoredLocation:
    """One place a run wrote to: the task's prefix, or a folder a key template put images in."""

    uri: str
    images: int = 0
    bytes: int | None = 0
    models: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunLineage:
    """What one try of the operator read and wrote, kept on the operator for its OpenLineage methods."""

    prompt_source: str
    prompt_count: int
    images: int
    failed_images: int
    billed_images: int
    requests: int
    models: tuple[str, ...]
    sizes: tuple[str, ...]
    image_format: str
    #: Where the images are, one entry a folder (empty without storage: the task returned URLs).
    locations: tuple[StoredLocation, ...] = ()
    #: The task's ``records.json``, when it stored anything.
    records_uri: str | None = None


def group_images(prefix_uri: str, images: Iterable[Any]) -> tuple[StoredLocation, ...]:
    """Group stored images by folder: everything under the task's prefix is one location.

    A key template (``s3_key``) publishes images outside the task's prefix; each folder they are
    published in is then a location of its own (what downstream readers use), so that lineage never
    claims a folder the run did not write to.
    """
    prefix = prefix_uri if prefix_uri.endswith("/") else prefix_uri + "/"
    groups: dict[str, list[Any]] = {prefix: []}
    for image in images:
        uri = str(getattr(image, "published_uri", None) or image.uri)
        folder = prefix if uri.startswith(prefix) else uri.rpartition("/")[0] + "/"
        groups.setdefault(folder, []).append(image)
    locations = []
    for folder, members in groups.items():
        sizes = [image.bytes for image in members]
        locations.append(
            StoredLocation(
                uri=folder,
                images=len(members),
                bytes=sum(sizes) if all(isinstance(size, int) for size in sizes) else None,
                models=_distinct(image.model for image in members),
                sizes=_distinct(image.size for image in members),
            )
        )
    return tuple(locations)


def _distinct(values: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(sorted({value for value in values if value}))


def find_prompt_file(name: str, searchpath: Sequence[str | Path]) -> str | None:
    """The absolute path of a prompt file as Airflow's Jinja loader finds it (DAG folder, then searchpath)."""
    path = Path(name)
    if path.is_absolute():
        return str(path) if path.is_file() else None
    for base in searchpath:
        candidate = Path(base) / name
        if candidate.is_file():
            return str(candidate.resolve())
    return None


def operator_lineage(
    lineage: RunLineage | None, prompt_file: str | None, *, complete: bool
) -> OperatorLineage[Any, Any]:
    """The ``OperatorLineage`` of a try: the prompt file as input; on completion the stored images as outputs."""
    from airflow.providers.common.compat.openlineage.facet import (
        Dataset,
        OutputDataset,
        OutputStatisticsOutputDatasetFacet,
    )
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_provider_jimeng.lineage.facets import JiMengGenerationRunFacet, JiMengImagesOutputDatasetFacet

    inputs = []
    if prompt_file is not None:
        namespace, name = dataset_name(prompt_file)
        inputs.append(Dataset(namespace=namespace, name=name))
    if not complete or lineage is None:
        return OperatorLineage(inputs=inputs)
    outputs = []
    for location in lineage.locations:
        namespace, name = dataset_name(location.uri)
        outputs.append(
            OutputDataset(
                namespace=namespace,
                name=name,
                outputFacets={
                    "outputStatistics": OutputStatisticsOutputDatasetFacet(
                        fileCount=location.images, size=location.bytes
                    ),
                    "jimeng_images": JiMengImagesOutputDatasetFacet(
                        imageCount=location.images,
                        models=list(location.models),
                        sizes=list(location.sizes),
                        format=lineage.image_format,
                        records=lineage.records_uri,
                    ),
                },
            )
        )
    run_facet = JiMengGenerationRunFacet(
        models=list(lineage.models),
        sizes=list(lineage.sizes),
        promptSource=lineage.prompt_source,
        promptCount=lineage.prompt_count,
        imageCount=lineage.images,
        failedImageCount=lineage.failed_images,
        billedImages=lineage.billed_images,
        requests=lineage.requests,
        storage=lineage.locations[0].uri if lineage.locations else None,
    )
    return OperatorLineage(inputs=inputs, outputs=outputs, run_facets={"jimeng_generation": run_facet})
