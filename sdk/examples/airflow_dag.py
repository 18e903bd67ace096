"""An Airflow 3 DAG whose tasks read a just-in-time PostgreSQL credential.

Put it in your dags folder (with leasehold-client installed next to Airflow and
LEASEHOLD_URL / LEASEHOLD_KEY set for the workers), or try it: `python
airflow_dag.py` runs it once with `dag.test()`. `report` reads the reports table
with its own login, revoked when the task succeeds; `broken` fails after reading,
and its credential is revoked as `failed`.
"""

from __future__ import annotations

from typing import Any

import psycopg
from airflow.sdk import dag, task

from leasehold_client.airflow import credentials, current_credentials

LEASEHOLD = {"grants": {"db": "reports-readonly"}, "max_duration": 600}


def count_reports(dsn: str) -> int:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM reports").fetchone()
    return int(row[0]) if row else 0


@dag(dag_id="leasehold_report", schedule=None, catchup=False)
def leasehold_report() -> None:
    @task(params={"leasehold": LEASEHOLD})
    def report() -> int:
        n = count_reports(current_credentials()["db"]["dsn"])  # claimed here, kept in memory
        print(f"report read {n} reports")
        return n  # the count goes to XCom, never the credential

    @task(params={"leasehold": LEASEHOLD}, retries=0)
    def broken(**context: Any) -> None:
        # The same, through the task's context.
        print(f"broken read {count_reports(credentials(context)['db']['dsn'])} reports")
        raise RuntimeError("the report is broken")

    report()
    broken()


example = leasehold_report()

if __name__ == "__main__":
    example.test()
