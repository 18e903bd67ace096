"""A Prefect 3 flow whose tasks read a just-in-time PostgreSQL credential.

`python prefect_flow.py` runs it (on your Prefect server, or a temporary local
one), with LEASEHOLD_URL / LEASEHOLD_KEY set. `report` reads the reports table
with its own login, revoked when it completes; `broken` fails after reading,
and its credential is revoked as `failed`. The flow holds a credential of its
own for as long as it runs.
"""

from __future__ import annotations

import psycopg
from prefect import flow, task

from leasehold_client.prefect import current_credentials, leasehold

GRANTS = {"db": "reports-readonly"}


def count_reports() -> int:
    dsn = current_credentials()["db"]["dsn"]  # claimed here, kept in memory only
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM reports").fetchone()
    return int(row[0]) if row else 0


@leasehold(grants=GRANTS, max_duration=600)
@task
def report() -> int:
    n = count_reports()
    print(f"report read {n} reports")
    return n  # the count is the result, never the credential


@leasehold(grants=GRANTS, max_duration=600)
@task(retries=0)
def broken() -> None:
    print(f"broken read {count_reports()} reports")
    raise RuntimeError("the report is broken")


@leasehold(grants=GRANTS, max_duration=900)
@flow(name="leasehold-report")
def leasehold_report() -> int:
    print(f"flow read {count_reports()} reports")
    n = report()
    state = broken(return_state=True)  # the flow goes on; the task run failed
    print(f"broken ended {state.type.value}")
    return n


if __name__ == "__main__":
    leasehold_report()
