"""
### Check a JiMeng connection from the UI, without paying for an image

Trigger this DAG to check that a `jimeng` connection's base URL and key work: it runs the same
check as `airflow connections test` (a request without a prompt, which the API refuses before
generating anything) on a worker, and fails with the reason when the check fails: a refused key
(keys are regional), a wrong base URL, an unreachable host.

Use it where the connection form's **Test** button is missing or disabled (Airflow disables it
unless `[core] test_connection = Enabled`) or answers *Bad Request* for a saved connection (Airflow
3.3.x): see docs/getting-started.md, "Check the key without paying for an image".

**Params:** `conn_id` (the connection to check, `jimeng_default` by default).
"""

from __future__ import annotations

import logging

from airflow.sdk import DAG, Param, task

log = logging.getLogger(__name__)

with DAG(
    dag_id="jimeng_check_connection",
    schedule=None,
    catchup=False,
    tags=["jimeng", "example"],
    doc_md=__doc__,
    params={"conn_id": Param("jimeng_default", type="string", minLength=1, description="a jimeng connection")},
) as dag:

    @task(retries=0)
    def check_connection(params: dict[str, str]) -> str:
        """Fail with the check's own message, so the task's error says what is wrong."""
        from airflow.exceptions import AirflowFailException

        from airflow_provider_jimeng.hooks.jimeng import JiMengHook

        ok, message = JiMengHook(params["conn_id"]).test_connection()
        if not ok:
            raise AirflowFailException(message)
        log.info("%s", message)
        return message

    check_connection()
