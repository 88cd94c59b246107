"""The provider's custom OpenLineage facets; imported only by the operator's OpenLineage methods.

Custom facets carry a project prefix in their key (``jimeng_``) and a ``_schemaURL`` to their JSON
Schema (``facets.json`` beside this module, published with the source), as the OpenLineage spec asks
of custom facets (https://openlineage.io/docs/spec/facets/custom-facets).
"""

from __future__ import annotations

from attrs import define, field
from openlineage.client.facet_v2 import OutputDatasetFacet, RunFacet

SCHEMA_BASE = (
    "https://raw.githubusercontent.com/airflow-provider-jimeng/airflow-provider-jimeng/main/"
    "airflow_provider_jimeng/lineage/facets.json"
)


@define
class JiMengGenerationRunFacet(RunFacet):
    """How a try generated its images: model, size, prompts, images kept and failed, what was billed.

    ``promptSource`` is ``text`` (a prompt or a rendered template), ``file`` (a prompt file, also an
    input dataset) or ``xcom`` (an upstream task's result); ``storage`` is the task's prefix, or
    ``None`` when the task returned the service's URLs instead of storing the images.
    """

    models: list[str] = field(factory=list)
    sizes: list[str] = field(factory=list)
    promptSource: str = "text"
    promptCount: int = 0
    imageCount: int = 0
    failedImageCount: int = 0
    billedImages: int = 0
    requests: int = 0
    storage: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return f"{SCHEMA_BASE}#/$defs/JiMengGenerationRunFacet"


@define
class JiMengImagesOutputDatasetFacet(OutputDatasetFacet):
    """The images a try wrote to a dataset: how many, by which model(s), at which size(s), in which format."""

    imageCount: int = 0
    models: list[str] = field(factory=list)
    sizes: list[str] = field(factory=list)
    format: str = "jpeg"
    #: The task's ``records.json``: per image its key, prompt, request id, size and checksum.
    records: str | None = None

    @staticmethod
    def _get_schema() -> str:
        return f"{SCHEMA_BASE}#/$defs/JiMengImagesOutputDatasetFacet"
