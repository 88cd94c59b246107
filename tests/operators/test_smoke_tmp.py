import time
import datetime
import logging
import pytest

def test_smoke(airflow_db, jimeng_conn, s3_bucket, s3_client, caplog, capsys):
    from tests.dags import jimeng_test_smoke as m
    ld = datetime.datetime(2024,5,1,tzinfo=datetime.timezone.utc)
    ra = datetime.datetime(2024,5,2,tzinfo=datetime.timezone.utc)
    dr = m.dag.test(run_conf={"bucket": s3_bucket, "prompts": ["a red fox", "a cat"]}, logical_date=ld, run_after=ra)
    print("T1", dr.state, dr.run_id)
    for ti in dr.get_task_instances():
        print(ti.task_id, ti.state, ti.try_number, ti.map_index)
    print(jimeng_conn.billed_images, jimeng_conn.request_count)
    t=time.monotonic()
    dr = m.dag.test(run_conf={"bucket": s3_bucket, "prompts": ["a red fox", "a cat"]}, logical_date=ld, run_after=ra)
    print("T2", time.monotonic()-t, dr.state, dr.run_id)
    for ti in dr.get_task_instances():
        print(ti.task_id, ti.state, ti.try_number, ti.map_index)
    print(jimeng_conn.billed_images, jimeng_conn.request_count)
    out = capsys.readouterr().out
    print("CAPLOG", len(caplog.records), any("Generating" in r.getMessage() for r in caplog.records), "Generating" in out)
