"""The body of a task instance of the faults DAGs, run in its own process so a test can kill it.

``python -m tests.faults.task_process '<json>'`` with ``dag_id``, ``run_id``, ``bucket`` (or
``output_path``), ``prompts``, ``size`` and optionally ``s3_key``: it calls the DAG's task's
``execute()`` as Airflow's task runner would (same connections from the environment, same task
instance identity and hence the same S3 keys as the ``dag.test()`` run that retries it), minus the
Airflow database. Like the task runner, it calls the
operator's ``on_kill()`` on SIGTERM. With ``result`` (a path), it writes there how the try ended:
``{"ok": ..., "error_type": ..., "error": ..., "xcom": {...}}``.

``python -m tests.faults.task_process --serve`` is a fork server, for tests that start many tries
(the kill loop): it imports Airflow, the provider and the DAGs once, then reads one JSON line per try
on stdin, forks a child that runs it (with ``env`` applied and its output in ``log``), answers
``{"pid": ...}`` at once and ``{"pid": ..., "status": <exit code, -9 for SIGKILL>}`` when the child
is gone. Airflow 3's supervisor forks its task runner the same way, so what a test kills is a task
process as Airflow would run it, started in milliseconds instead of seconds.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskInstanceIdentity:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def hold_local_records(flag: str) -> None:
    """``file://`` stores: the write of ``records.json`` never ends (the local twin of the S3 gate's hold).

    The try blocks there, as on an S3 PUT that never answers; ``flag`` is created when it does, so
    the test knows when to kill it.
    """
    import time

    from fsspec.implementations.local import LocalFileSystem

    original = LocalFileSystem._open

    def _open(self: Any, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode and os.path.basename(str(path)).startswith(".records.json."):
            with open(flag, "w", encoding="utf-8"):
                pass
            while True:
                time.sleep(1)
        return original(self, path, mode, *args, **kwargs)

    LocalFileSystem._open = _open  # type: ignore[method-assign]


def main(arguments: dict[str, Any]) -> int:
    from tests.dags import faults_pipeline

    task = getattr(faults_pipeline, arguments["dag_id"]).get_task("generate")
    # What rendering the templates would give: the values of run_conf.
    task.prompt = arguments["prompts"]
    if arguments.get("output_path"):
        task.output_path = arguments["output_path"]
        if arguments.get("hold_records"):
            hold_local_records(arguments["hold_records"])
    else:
        task.s3_bucket = arguments["bucket"]
    task.size = arguments.get("size", "1K")
    if arguments.get("s3_key"):
        task.s3_key = arguments["s3_key"]
    ti = TaskInstanceIdentity(arguments["dag_id"], arguments["run_id"], task.task_id)
    # What Airflow's task runner installs: SIGTERM (from the supervisor, or `airflow tasks` killing it) calls on_kill.
    signal.signal(signal.SIGTERM, lambda signum, frame: task.on_kill())
    outcome: dict[str, Any] = {"ok": True, "error_type": None, "error": None}
    try:
        task.execute({"ti": ti})  # type: ignore[arg-type]
    except BaseException as error:
        traceback.print_exc()
        outcome.update(ok=False, error_type=type(error).__name__, error=str(error))
    if arguments.get("result"):
        with open(arguments["result"], "w", encoding="utf-8") as handle:
            json.dump({**outcome, "xcom": ti.xcom}, handle, default=str)
    return 0 if outcome["ok"] else 1


def serve() -> None:
    """Fork one child per JSON line on stdin; answer its pid, then its exit code."""
    # Answers go to the original stdout alone: whatever Airflow logs goes to stderr.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # Everything a try imports, imported once (the children share it copy-on-write).
    import airflow.providers.amazon.aws.hooks.s3  # noqa: F401

    import airflow_provider_jimeng.operators.jimeng  # noqa: F401
    import tests.dags.faults_pipeline  # noqa: F401

    while line := sys.stdin.readline():
        arguments = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(arguments["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.environ.update(arguments.get("env") or {})
                channel.close()
                code = main(arguments)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), file=channel, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": os.waitstatus_to_exitcode(status)}), file=channel, flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(main(json.loads(sys.argv[1])))
