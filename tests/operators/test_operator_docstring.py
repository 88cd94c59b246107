"""The operator's docstring is its API reference: every parameter, and Airflow's ``(templated)`` mark
exactly on the templated ones; prompts are shown as text in the rendered-template view."""

from __future__ import annotations

import inspect
import re

import pytest

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

PARAM = re.compile(r":param (\w+):(.*?)(?=\n\s*:param |\Z)", re.S)


def _documented() -> dict[str, str]:
    return {name: " ".join(text.split()) for name, text in PARAM.findall(inspect.getdoc(JiMengGenerateOperator) or "")}


def test_every_parameter_is_documented() -> None:
    parameters = [
        name for name in inspect.signature(JiMengGenerateOperator.__init__).parameters if name not in ("self", "kwargs")
    ]
    assert "optimize_prompt_mode" in parameters
    assert sorted(set(parameters) - set(_documented())) == []


@pytest.mark.parametrize("name", sorted(_documented()))
def test_templated_mark_matches_template_fields(name: str) -> None:
    text = _documented()[name]
    if name in JiMengGenerateOperator.template_fields:
        assert text.endswith("(templated)"), f"{name}: Airflow's convention ends the entry with (templated)"
    else:
        assert "templated" not in text.lower(), f"{name} is not a template field"


def test_prompts_render_as_text_not_python() -> None:
    renderers = JiMengGenerateOperator.template_fields_renderers
    assert set(renderers) <= set(JiMengGenerateOperator.template_fields)
    assert renderers["prompt"] == "jinja"
