"""The auth manager of the gallery tests: Airflow's ``SimpleAuthManager`` with a refused user.

A module of its own (not the conftest) so that Airflow's ``[core] auth_manager`` can import it by
a stable dotted path whichever test directories pytest collects.
"""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


class RestrictedAuthManager(SimpleAuthManager):
    """``SimpleAuthManager`` where ``outsider`` may read no ``jimeng_*`` DAG, and ``noxcom`` none of their XComs;
    only a review's respondents may answer it, admins included."""

    #: Every DAG check asked of the auth manager: (user, method, access entity, dag id).
    checks: list[tuple[str, str, Any, str | None]] = []

    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        dag_id = details.id if details else None
        self.checks.append((user.get_name(), method, access_entity, dag_id))
        if user.get_name() == "outsider" and (dag_id is None or dag_id.startswith("jimeng_")):
            return False
        if user.get_name() == "noxcom" and getattr(access_entity, "name", None) == "XCOM":
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)

    def is_authorized_hitl_task(self, *, assigned_users: set[str], user: Any) -> bool:
        # Respondents are checked even when every user is an admin (the e2e stack): only they may answer.
        return bool(user.get_id() in assigned_users)
