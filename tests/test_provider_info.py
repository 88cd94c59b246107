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
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS

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


def test_the_gallery_storage_setting_is_declared(info: dict[str, Any]) -> None:
    # Declared so `airflow config list` shows it; empty by default: the gallery reads nothing until set.
    option = info["config"]["jimeng"]["options"]["gallery_storage"]
    assert option["default"] == ""
    assert option["type"] == "string"


@pytest.mark.parametrize("section", ["hooks", "operators", "triggers"])
def test_listed_modules_import(info: dict[str, Any], section: str) -> None:
    modules = [module for entry in info[section] for module in entry["python-modules"]]
    assert modules
    for module in modules:
        if module.endswith(".operators.review") and not AIRFLOW_V_3_1_PLUS:
            # Human-in-the-loop came with Airflow 3.1: the providers manager skips an optional feature.
            from airflow.exceptions import AirflowOptionalProviderFeatureException

            with pytest.raises(AirflowOptionalProviderFeatureException, match=r"needs Airflow 3\.1"):
                importlib.import_module(module)
            continue
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


# ------------------------------------------------------------------ the form a user can trust at a glance
#: Characters of placeholder the form's Base URL input shows whole: it is about 530 px wide in a 1280 px
#: window (docs/img/ui-connection-form.png), some 70 characters of its font; the browser test (tests/e2e)
#: checks the rendered width itself.
PLACEHOLDER_MAX_CHARS = 64


def _config_from_extra(monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any]) -> Any:
    """The hook's configuration for a connection with these extras, as a saved form would give it."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIMENG_FORM_TEST", json.dumps({"conn_type": "jimeng", "password": "k", "extra": extra})
    )
    return JiMengHook(jimeng_conn_id="jimeng_form_test").config


def test_every_switch_is_off_when_its_default_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # Airflow draws a boolean extra as a switch, "off" until touched: that is only honest for a default false.
    switches = [name for name, spec in CONNECTION_EXTRAS.items() if spec["schema"]["type"] == ["boolean", "null"]]
    assert "allow_http" in switches
    untouched = _config_from_extra(monkeypatch, dict.fromkeys(switches))
    for name in switches:
        assert getattr(untouched, name) is False, f"{name} defaults to true: a switch would show 'off' untouched"


def test_watermark_is_a_select_whose_untouched_value_says_true(monkeypatch: pytest.MonkeyPatch) -> None:
    schema = CONNECTION_EXTRAS["watermark"]["schema"]
    assert "boolean" not in schema["type"], "a boolean is drawn as a switch that reads 'off' untouched"
    # Airflow draws a string/null field with an enum as a select; null is the untouched value.
    assert schema["enum"][0] is None
    assert schema["values_display"]["null"] == "true (default)"
    assert _config_from_extra(monkeypatch, {"watermark": None}).watermark is True
    assert _config_from_extra(monkeypatch, {"watermark": "true"}).watermark is True
    assert _config_from_extra(monkeypatch, {"watermark": "false"}).watermark is False
    assert _config_from_extra(monkeypatch, {}).watermark is True


def test_every_select_option_has_a_label() -> None:
    for name, spec in CONNECTION_EXTRAS.items():
        for value in spec["schema"].get("enum", []):
            assert ("null" if value is None else str(value)) in spec["schema"]["values_display"], (name, value)


def test_the_base_url_placeholder_fits_the_input(connection_type: dict[str, Any]) -> None:
    placeholder = connection_type["ui-field-behaviour"]["placeholders"]["host"]
    assert len(placeholder) <= PLACEHOLDER_MAX_CHARS, placeholder
    assert placeholder.startswith("https://ark.cn-beijing.volces.com/api/v3")


def test_port_0_from_the_ui_means_no_port() -> None:
    # Airflow 3.3's form sends port 0 for the port it hides (apache/airflow#73298): never append ":0".
    from airflow_provider_jimeng.hooks.connection_config import resolve_base_url

    assert resolve_base_url("ark.cn-beijing.volces.com", None, 0) == "https://ark.cn-beijing.volces.com/api/v3"
    assert resolve_base_url("https://gateway.example.com/v1", None, 0) == "https://gateway.example.com/v1"
