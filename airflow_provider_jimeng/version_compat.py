"""The one place that bridges Airflow 3.0 and later 3.x releases, so other modules import plainly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow import __version__ as AIRFLOW_VERSION
from packaging.version import Version

AIRFLOW_V_3_1_PLUS = Version(Version(AIRFLOW_VERSION).base_version) >= Version("3.1.0")

if TYPE_CHECKING or AIRFLOW_V_3_1_PLUS:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowFailException
    from airflow.sdk.log import mask_secret
else:  # Airflow 3.0 kept these outside the Task SDK's public surface.
    from airflow.exceptions import AirflowFailException  # type: ignore[no-redef]
    from airflow.hooks.base import BaseHook  # type: ignore[no-redef]
    from airflow.sdk.execution_time.secrets_masker import mask_secret  # type: ignore[no-redef]

__all__ = ["AIRFLOW_VERSION", "AIRFLOW_V_3_1_PLUS", "AirflowFailException", "BaseHook", "mask_secret"]
