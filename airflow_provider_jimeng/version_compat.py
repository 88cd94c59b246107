"""The one place that bridges Airflow 3.0 and later 3.x releases, so other modules import plainly."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow import __version__ as AIRFLOW_VERSION
from packaging.version import Version

_base_version = Version(Version(AIRFLOW_VERSION).base_version)
AIRFLOW_V_3_1_PLUS = _base_version >= Version("3.1.0")
AIRFLOW_V_3_2_PLUS = _base_version >= Version("3.2.0")

if TYPE_CHECKING or AIRFLOW_V_3_1_PLUS:
    from airflow.sdk import BaseHook
    from airflow.sdk.log import mask_secret
else:  # Airflow 3.0 kept these outside the Task SDK's public surface.
    from airflow.hooks.base import BaseHook  # type: ignore[no-redef]
    from airflow.sdk.execution_time.secrets_masker import mask_secret  # type: ignore[no-redef]

if TYPE_CHECKING or AIRFLOW_V_3_2_PLUS:
    from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException
else:  # Airflow 3.0 and 3.1: only in core (3.2 moved them to the Task SDK, deprecating the old names).
    from airflow.exceptions import AirflowFailException, AirflowNotFoundException  # type: ignore[no-redef]

__all__ = [
    "AIRFLOW_VERSION",
    "AIRFLOW_V_3_1_PLUS",
    "AIRFLOW_V_3_2_PLUS",
    "AirflowFailException",
    "AirflowNotFoundException",
    "BaseHook",
    "mask_secret",
]
