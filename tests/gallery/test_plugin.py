"""The gallery plugin as Airflow loads it: through its entry point, with views Airflow's API accepts."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_jimeng import version_compat
from airflow_provider_jimeng.get_provider_info import get_provider_info
from airflow_provider_jimeng.plugins import gallery
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS

needs_3_1 = pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="the gallery needs Airflow 3.1 or later")


@needs_3_1
def test_airflow_loads_the_plugin_through_its_entry_point() -> None:
    from airflow import plugins_manager

    [entry_point] = [
        ep for ep in importlib.metadata.entry_points(group="airflow.plugins") if ep.name == "jimeng_gallery"
    ]
    assert entry_point.load() is gallery.JiMengGalleryPlugin
    info = {plugin["name"]: plugin for plugin in plugins_manager.get_plugin_info()}
    assert info["jimeng_gallery"]["external_views"][0]["name"] == "Images"
    assert info["jimeng_gallery"]["fastapi_apps"][0]["url_prefix"] == "/jimeng"
    # Airflow 3.3 keeps the import errors beside the plugins; 3.1 and 3.2 in a module global.
    get_plugins = getattr(plugins_manager, "_get_plugins", None)
    errors = get_plugins()[1] if get_plugins else plugins_manager.import_errors
    assert not errors
    # Provider plugins load only with lazy_discover_providers = False: listing it there too would
    # register it twice, which Airflow reports as a plugin import error.
    assert "plugins" not in get_provider_info()


@needs_3_1
def test_the_images_view_is_one_airflows_api_accepts_for_task_instances() -> None:
    from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse, FastAPIAppResponse

    [view] = gallery.JiMengGalleryPlugin.external_views
    response = ExternalViewResponse.model_validate(view)
    assert response.destination == "task_instance"
    assert response.name == "Images"
    assert response.href == ("jimeng/gallery?dag_id={DAG_ID}&run_id={RUN_ID}&task_id={TASK_ID}&map_index={MAP_INDEX}")
    [app] = gallery.JiMengGalleryPlugin.fastapi_apps
    assert FastAPIAppResponse.model_validate({**app, "app": "x"}).url_prefix == "/jimeng"


def test_on_airflow_3_0_the_plugin_registers_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # On 3.0 itself this is the installed behaviour; on later releases it is simulated.
    monkeypatch.setattr(version_compat, "AIRFLOW_V_3_1_PLUS", False)
    try:
        reloaded = importlib.reload(gallery)
        assert reloaded.JiMengGalleryPlugin.fastapi_apps == []
        assert reloaded.JiMengGalleryPlugin.external_views == []
    finally:
        monkeypatch.undo()
        importlib.reload(gallery)


@needs_3_1
def test_loading_the_plugin_builds_no_app(tmp_path: Path) -> None:
    # Every task's process loads entry-point plugins (for macros): it must not pay for the API server's
    # modules. The app is built on the API server's first request to it.
    code = (
        "import sys, airflow_provider_jimeng.plugins.gallery as g;"
        "assert 'airflow.api_fastapi.core_api.security' not in sys.modules;"
        "assert 'fastapi' not in sys.modules;"
        "assert g.JiMengGalleryPlugin.fastapi_apps[0]['app']._app is None"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
