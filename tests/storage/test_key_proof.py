"""Issue 11 items 2 and 3: every image a run can bill gets its own key, proved before the first request."""

from __future__ import annotations

import pytest

from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.storage.keys import TaskKeyspace, safe_key_part


def keyspace(
    template: str | None = None, *, map_index: int = -1, run_id: str = "manual__2025-01-01T00:00:00+00:00"
) -> TaskKeyspace:
    return TaskKeyspace("bucket", "jimeng", "dag", run_id, "generate", map_index, key_template=template)


def test_run_ids_that_sanitise_alike_keep_apart() -> None:
    """Two scheduled runs sanitised to one prefix before: the second overwrote the first."""
    colon = "scheduled__2025-01-01T00:00:00+00:00"
    underscore = "scheduled__2025-01-01T00_00_00_00_00"
    assert safe_key_part(underscore) == underscore, "an id that is already safe is kept as it is"
    assert safe_key_part(colon) != safe_key_part(underscore)
    assert safe_key_part(colon).startswith("scheduled__2025-01-01T00_00_00_00_00-")
    assert keyspace(run_id=colon).task_prefix != keyspace(run_id=underscore).task_prefix
    assert safe_key_part(colon) == safe_key_part(colon), "deterministic: retries find their keys"


def test_the_default_layout_passes_for_sets_and_mapped_tasks() -> None:
    keyspace(map_index=3).check_image_keys([15, 15, 1])


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{}", "not allowed"),
        ("{0}/{run_id}", "not allowed"),
        ("{run_id}/{prompt_index:s}-{image_index}", "does not render"),
        ("{run_id}/{prompt_index!z}-{image_index}", "Unknown conversion specifier z"),
        ("{run_id}/{prompt_index:.1}-{image_index}", "does not render"),
        ("{run_id.upper}/{prompt_index}-{image_index}", "not allowed"),
        ("{date}/{prompt_index}-{image_index}", "{date}, which is not allowed"),
        ("{run_id}/{prompt_index}-{image_index", "not a valid format string"),
        ("products/2025-01-01/{prompt_index:03d}-{image_index}.{ext}", "another run"),
        ("products/{run_id:.8}/{prompt_index:03d}-{image_index}.{ext}", "another run"),
        ("{run_id}/{image_index}.{ext}", "the same key"),
        ("{run_id}/{prompt_index}.{ext}", "the same key"),
        ("jimeng/dag/{run_id}/generate/records.json", "records"),
        ("/", "empty key"),
        ("{run_id}/" + "x" * 1100 + "{prompt_index}-{image_index}", "longer than 1024"),
    ],
)
def test_templates_that_fail_or_collide_are_refused_before_any_request(template: str, fragment: str) -> None:
    space = keyspace(template)
    if "records" in fragment:
        space = keyspace(f"{space.task_prefix}/records.json")
    with pytest.raises(JiMengConfigurationError) as raised:
        space.check_image_keys([2, 2])
    assert raised.value.parameter == "s3_key"
    assert fragment in str(raised.value)


def test_a_mapped_task_needs_the_map_index_in_its_keys() -> None:
    """The docs' example, mapped: 3 billed, 1 object, and a green run before the fix."""
    template = "products/2025-01-01/{dag_id}/{task_id}/{run_id}/{prompt_index:03d}-{image_index}.{ext}"
    keyspace(template).check_image_keys([1, 1])  # not mapped: fine
    with pytest.raises(JiMengConfigurationError, match="another map index"):
        keyspace(template, map_index=0).check_image_keys([1, 1])
    keyspace(template.replace("{run_id}", "{run_id}/{map_index}"), map_index=0).check_image_keys([1, 1])


def test_one_image_needs_no_indexes_in_its_key() -> None:
    keyspace("covers/{dag_id}/{task_id}/{run_id}.{ext}").check_image_keys([1])


# ------------------------------------------------------------------------- issue 20 breaks 1 and 3
DOCS_EXAMPLE = "products/{dag_id}/{task_id}/{{ ds }}/{run_id}/{map_index}/{prompt_index:03d}-{image_index}.{ext}"


@pytest.mark.parametrize(
    ("template", "field"),
    [
        # The docs' example before issue 20: two tasks of one DAG, or two DAGs on one schedule, shared it.
        ("products/2025-01-01/{run_id}/{map_index}/{prompt_index:03d}-{image_index}.{ext}", "{task_id}"),
        ("products/{task_id}/{run_id}/{map_index}/{prompt_index:03d}-{image_index}.{ext}", "{dag_id}"),
        ("products/{dag_id}/{run_id}/{map_index}/{prompt_index:03d}-{image_index}.{ext}", "{task_id}"),
    ],
)
def test_a_template_another_task_or_dag_would_render_alike_is_refused(template: str, field: str) -> None:
    with pytest.raises(JiMengConfigurationError) as raised:
        keyspace(template).check_image_keys([1, 1])
    assert raised.value.parameter == "s3_key"
    assert f"allowed: a template with {field}" in str(raised.value)


def test_the_docs_example_is_safe() -> None:
    keyspace(DOCS_EXAMPLE.replace("{{ ds }}", "2025-01-01"), map_index=2).check_image_keys([4, 4])


def test_a_publication_inside_the_task_keyspace_is_refused() -> None:
    """It would overwrite a canonical image (p0000_i00.jpeg) or the records."""
    space = keyspace()
    with pytest.raises(JiMengConfigurationError, match="inside the task's own keyspace"):
        keyspace(space.task_prefix + "/p{prompt_index:04d}_i{image_index:02d}.{ext}").check_image_keys([1])


def local(template: str | None = None, *, run_id: str = "manual__1", prefix: str = "data/images") -> TaskKeyspace:
    return TaskKeyspace(
        "", prefix, "dag", run_id, "generate", -1, key_template=template, scheme="file", key_root=prefix
    )


def test_a_250_character_run_id_with_colons_fits_a_local_filesystem() -> None:
    """Break 3: the default layout with Airflow's longest run id failed after payment, on every try."""
    run_id = "manual__" + "2025-01-01T00:00:00+00:00:" * 9 + "x" * 8
    assert len(run_id) == 250
    space = local(run_id=run_id)
    space.check_image_keys([2])
    parts = space.image_key(0, 0).split("/")
    assert max(len(part) for part in parts) <= 200
    assert safe_key_part(run_id) != safe_key_part(run_id[:-1]), "cut ids keep apart (their hash differs)"
    long_safe = "r" * 250
    assert len(safe_key_part(long_safe)) == 200
    assert safe_key_part(long_safe) != safe_key_part("r" * 249)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        # 240 bytes: fits 255, but not the temporary name (.{name}.{12 hex}.part, 19 more).
        ("{dag_id}/{task_id}/{run_id}/" + "n" * 230 + "{prompt_index}{image_index}.{ext}", "at most 236 bytes"),
        ("{dag_id}/{task_id}/{run_id}/" + "d" * 256 + "/{prompt_index}{image_index}.{ext}", "directory name"),
        ("{dag_id}/{task_id}/{run_id}/a\x00b/{prompt_index}{image_index}.{ext}", "NUL"),
    ],
)
def test_local_publications_that_the_filesystem_would_refuse_are_refused_first(template: str, fragment: str) -> None:
    with pytest.raises(JiMengConfigurationError) as raised:
        local(template).check_image_keys([1, 1])
    assert raised.value.parameter == "s3_key"
    assert fragment in str(raised.value)
    # On S3 the same key is fine: 1,024 bytes, any name length.
    if "NUL" not in fragment:
        keyspace(template).check_image_keys([1, 1])


def test_a_local_output_path_too_long_for_the_default_layout_names_output_path() -> None:
    with pytest.raises(JiMengConfigurationError) as raised:
        local(prefix="/".join(["p" * 250] * 17)).check_image_keys([1])
    assert raised.value.parameter == "output_path"
    assert "longer than 4095 bytes" in str(raised.value)
