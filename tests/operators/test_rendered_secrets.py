"""Airflow's stored rendered fields (the UI's Rendered Template tab) show signed URLs redacted (issue 20 #13).

Before: a signed reference-image URL was stored verbatim, ``X-Tos-Signature`` and ``X-Tos-Credential``
included, for anyone who may read the task's rendered fields; the task itself must still send it whole.
"""

from __future__ import annotations

import json

from tests.dags import jimeng_test_rendered_secrets
from tests.dags.jimeng_test_rendered_secrets import SIGNED
from tests.operators.conftest import RunDag, TrackingEmulator

SHOWN = "https://ark-content.tos-cn-beijing.volces.com/ref/fox.png?<redacted>"


def test_rendered_fields_keep_signed_urls_and_credentials_redacted(emulator: TrackingEmulator, run_dag: RunDag) -> None:
    run = run_dag(jimeng_test_rendered_secrets.dag)

    assert run.state == "success"
    templated = run.rendered_fields("templated")
    assert templated["image"] == SHOWN
    assert templated["prompt"] == f"a fox like the one in {SHOWN}"
    assert templated["extra_body"] == {"callback": "socks5h://<redacted>@proxy.example:1080"}
    # @task.jimeng stores its fields again after execute, with what the function returned.
    assert run.rendered_fields("returned")["image"] == [SHOWN]
    for task_id in ("templated", "returned"):
        stored = json.dumps(run.rendered_fields(task_id))
        for secret in ("X-Tos-Signature", "X-Tos-Credential", "canary0123456789", "AKLT-canary", "canary-password"):
            assert secret not in stored, (task_id, secret)
    # The task itself sent the URLs whole (the emulator's request log shows a reference by its length).
    whole = f"<{len(SIGNED)} chars>"
    sent = sorted((request["body"]["prompt"], request["body"]["image"]) for request in emulator.requests)
    assert sent == [("a fox", [whole]), (f"a fox like the one in {SIGNED}", whole)]
