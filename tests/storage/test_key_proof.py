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
    template = "products/2025-01-01/{run_id}/{prompt_index:03d}-{image_index}.{ext}"
    keyspace(template).check_image_keys([1, 1])  # not mapped: fine
    with pytest.raises(JiMengConfigurationError, match="another map index"):
        keyspace(template, map_index=0).check_image_keys([1, 1])
    keyspace(template.replace("{run_id}", "{run_id}/{map_index}"), map_index=0).check_image_keys([1, 1])


def test_one_image_needs_no_indexes_in_its_key() -> None:
    keyspace("covers/{run_id}.{ext}").check_image_keys([1])
