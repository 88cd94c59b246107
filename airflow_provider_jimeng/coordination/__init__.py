"""State that tasks on different workers share: the account-wide rate limiter and the journals a retry
on any worker reads.

It lives in the deployment's Redis, named by the ``jimeng`` connection's ``redis_conn_id`` extra and
reached through the redis provider (the ``redis`` extra). Without that extra nothing here is imported
and every task keeps its own state: a per-task pacer, journals on its worker's disk.
"""
