"""The provider registers itself with Airflow: metadata, entry point, connection type and its form."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

import airflow
import pytest

from airflow_provider_jimeng import __version__
from airflow_provider_jimeng.get_provider_info import get_provider_info
from airflow_provider_jimeng.hooks.connection_form import CONNECTION_EXTRAS
from airflow_provider_jimeng.hooks.jimeng import JiMengHook

PACKAGE = "airflow-provider-jimeng"
ENTRY_POINT = "airflow_provider_jimeng.get_provider_info:get_provider_info"


def import_string(dotted_path: str) -> Any:
    """``package.module.Name`` -> the object, as Airflow's providers manager resolves class names."""
    module, _, name = dotted_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def info() -> dict[str, Any]:
    return get_provider_info()


@pytest.fixture(scope="module")
def connection_type(info: dict[str, Any]) -> dict[str, Any]:
    [entry] = info["connection-types"]
    return entry


def test_provider_info_names_package_and_version(info: dict[str, Any]) -> None:
    assert info["package-name"] == PACKAGE
    assert info["versions"] == [__version__]
    assert info["name"]
    assert info["description"]


def test_provider_info_matches_airflows_schema(info: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = Path(airflow.__file__).parent / "provider_info.schema.json"
    if not schema_path.exists():
        pytest.skip("this Airflow release ships no provider_info.schema.json")
    jsonschema.validate(info, json.loads(schema_path.read_text()))


@pytest.mark.parametrize("section", ["hooks", "operators"])
def test_listed_modules_import(info: dict[str, Any], section: str) -> None:
    modules = [module for entry in info[section] for module in entry["python-modules"]]
    assert modules
    for module in modules:
        importlib.import_module(module)


def test_extra_links_and_decorators_import(info: dict[str, Any]) -> None:
    for class_name in info["extra-links"]:
        assert isinstance(import_string(class_name), type)
    for decorator in info["task-decorators"]:
        assert callable(import_string(decorator["class-name"]))


def test_connection_type_points_at_the_hook(connection_type: dict[str, Any]) -> None:
    assert connection_type["connection-type"] == "jimeng"
    hook_class = import_string(connection_type["hook-class-name"])
    assert hook_class is JiMengHook
    assert hook_class.conn_type == "jimeng"
    assert hook_class.default_conn_name == "jimeng_default"
    assert connection_type["hook-name"] == JiMengHook.hook_name


def test_connection_form_hides_unused_fields_and_relabels_host_and_password(
    connection_type: dict[str, Any],
) -> None:
    behaviour = connection_type["ui-field-behaviour"]
    assert {"login", "schema", "port"} <= set(behaviour["hidden-fields"])
    assert behaviour["relabeling"] == {"host": "Base URL", "password": "API Key"}
    assert "ark.cn-beijing.volces.com" in behaviour["placeholders"]["host"]
    assert json.loads(behaviour["placeholders"]["extra"])["model"]
    legacy = JiMengHook.get_ui_field_behaviour()
    assert legacy["hidden_fields"] == behaviour["hidden-fields"]
    assert legacy["relabeling"] == behaviour["relabeling"]


def test_connection_form_declares_every_extra_with_label_and_schema(connection_type: dict[str, Any]) -> None:
    fields = connection_type["conn-fields"]
    assert fields == CONNECTION_EXTRAS
    assert {"model", "timeout", "connect_timeout", "max_retries", "watermark", "allow_http"} <= set(fields)
    for name, spec in fields.items():
        assert spec["label"], name
        assert spec["description"], name
        assert "null" in spec["schema"]["type"], name


def test_entry_point_is_registered() -> None:
    entry_points = [
        entry
        for entry in importlib.metadata.entry_points(group="apache_airflow_provider")
        if entry.value == ENTRY_POINT
    ]
    if not entry_points:
        pytest.skip(f"{PACKAGE} is not installed in this environment (pip install -e .)")
    [entry] = entry_points
    assert entry.load() is get_provider_info
    assert importlib.metadata.version(PACKAGE) == __version__


def _providers_manager() -> Any:
    try:
        from airflow.providers_manager import ProvidersManager
    except ImportError:  # pragma: no cover - depends on the Airflow release
        pytest.skip("airflow.providers_manager is not importable in this Airflow release")
    manager = ProvidersManager()
    if PACKAGE not in manager.providers:
        pytest.skip(f"{PACKAGE} is not installed in this environment (pip install -e .)")
    return manager


@pytest.mark.filterwarnings("ignore:ProvidersManager.hooks is deprecated")  # the UI still reads it
def test_providers_manager_lists_the_jimeng_hook() -> None:
    manager = _providers_manager()
    assert manager.providers[PACKAGE].version == __version__
    hook_info = manager.hooks["jimeng"]
    assert hook_info is not None
    assert hook_info.hook_class_name == "airflow_provider_jimeng.hooks.jimeng.JiMengHook"
    assert hook_info.package_name == PACKAGE
    assert hook_info.connection_id_attribute_name == "jimeng_conn_id"
    assert hook_info.connection_testable


def test_providers_manager_serves_the_form_behaviour() -> None:
    manager = _providers_manager()
    if not hasattr(manager, "field_behaviours"):
        pytest.skip("this Airflow release has no ProvidersManager.field_behaviours")
    if "jimeng" not in manager.field_behaviours and importlib.util.find_spec("wtforms") is None:
        # Airflow < 3.2 reads form behaviour from the hook, inside a block that imports wtforms first.
        pytest.skip("this Airflow reads form behaviour from hooks only with wtforms (the FAB provider) installed")
    behaviour = manager.field_behaviours["jimeng"]
    assert {"login", "schema", "port"} <= set(behaviour["hidden_fields"])
    assert behaviour["relabeling"]["password"] == "API Key"


def test_task_sdk_runtime_lists_the_jimeng_hook() -> None:
    runtime = pytest.importorskip("airflow.sdk.providers_manager_runtime")
    manager = runtime.ProvidersManagerTaskRuntime()
    if "jimeng" not in manager.hooks:
        pytest.skip(f"{PACKAGE} is not installed in this environment (pip install -e .)")
    assert manager.hooks["jimeng"].hook_class_name == "airflow_provider_jimeng.hooks.jimeng.JiMengHook"
