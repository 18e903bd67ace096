"""Sweep cost against ledger size: the deadline sweep, the re-drive query and the
reconciliation's ledger side, on a scratch PostgreSQL ledger of 10k and then 1M
rows with the same small number of rows due. Prints a table and the plans.

    python bench/sweep_bench.py [--pg postgresql://postgres@127.0.0.1:5432] [--sizes 10000,1000000]

The scratch database is dropped at the end. Nothing touches a backend: the
reconciliation's listing is simulated by the ids it would return.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DUE = 50  # of each kind: timed out, stuck pending, stuck revoking; plus held actives
REPEAT = 7


def fill(conn: psycopg.Connection[Any], first: int, last: int) -> None:
    """Ended tasks with a revoked credential each: the ledger's history."""
    conn.execute(
        """
        INSERT INTO tasks (id, tenant, name, owner_key_id, source, depth, state, max_ttl,
                           started_at, deadline, ended_at, created_at)
        SELECT 'h' || lpad(to_hex(i), 27, '0'), 't' || (i %% 7), 'bench/' || i, 'k',
               'bench://', 0, (ARRAY['succeeded','failed','cancelled','timed_out'])[1 + i %% 4],
               600, t, t + interval '10 minutes', t + interval '5 minutes', t
        FROM generate_series(%s::bigint, %s::bigint) AS i,
             LATERAL (SELECT now() - interval '29 days' + (i %% 2500000) * interval '1 second'
                      AS t) AS s
        """,
        (first, last),
    )
    conn.execute(
        """
        INSERT INTO credentials (id, tenant, task_id, "grant", generation, profile, issuer,
                                 state, backend_name, backend_ref, expires_at, created_at,
                                 updated_at, minted_at, claimed_at, revoked_at, revoke_reason,
                                 revoke_requested_at, attempts)
        SELECT 'c' || lpad(to_hex(i), 27, '0'), 't' || (i %% 7), 'h' || lpad(to_hex(i), 27, '0'),
               'db', 0, 'bench-db', 'postgres', 'revoked', 'lh_bench_' || i, 'lh_bench_' || i,
               t + interval '10 minutes', t, t + interval '5 minutes', t, t,
               t + interval '5 minutes', 'succeeded', t + interval '5 minutes', 0
        FROM generate_series(%s::bigint, %s::bigint) AS i,
             LATERAL (SELECT now() - interval '29 days' + (i %% 2500000) * interval '1 second'
                      AS t) AS s
        """,
        (first, last),
    )


def add_due(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """The same small set every time: due, stuck and held rows."""
    kinds = {
        "timed_out": ("running", "now() - interval '1 minute'", "active"),
        "held": ("running", "now() + interval '1 hour'", "active"),
        "pending": ("running", "now() + interval '1 hour'", "pending"),
        "revoking": ("failed", "now() + interval '1 hour'", "revoking"),
    }
    ids: dict[str, list[str]] = {}
    for kind, (task_state, deadline, cred_state) in kinds.items():
        ids[kind] = []
        for _ in range(DUE):
            task_id, cred_id = f"d{uuid.uuid4().hex[:27]}", f"e{uuid.uuid4().hex[:27]}"
            conn.execute(
                f"""INSERT INTO tasks (id, tenant, name, owner_key_id, source, depth, state,
                                       max_ttl, started_at, deadline, created_at)
                    VALUES (%s, 't1', %s, 'k', 'bench://', 0, %s, 3600,
                            now() - interval '20 minutes', {deadline}, now())""",
                (task_id, f"due/{task_id}", task_state),
            )
            conn.execute(
                """INSERT INTO credentials (id, tenant, task_id, "grant", generation, profile,
                       issuer, state, backend_name, backend_ref, expires_at, created_at,
                       updated_at, minted_at, attempts)
                   VALUES (%s, 't1', %s, 'db', 0, 'bench-db', 'postgres', %s, %s, %s,
                           now() + interval '1 hour', now() - interval '20 minutes',
                           now() - interval '10 minutes', now() - interval '15 minutes', 0)""",
                (cred_id, task_id, cred_state, f"lh_bench_{cred_id}", f"lh_bench_{cred_id}"),
            )
            ids[kind].append(cred_id)
    return ids


def timed(fn: Callable[[Any], Any]) -> tuple[float, Any]:
    """Median milliseconds of fn(session), each run rolled back; and the last result."""
    from sqlmodel import Session

    from app.core.db import get_engine

    times, result = [], None
    for _ in range(REPEAT):
        with Session(get_engine()) as session:
            start = time.perf_counter()
            result = fn(session)
            times.append((time.perf_counter() - start) * 1000)
            session.rollback()
    return statistics.median(times), result


def plans(fn: Callable[[Any], Any]) -> list[str]:
    """EXPLAIN of every SELECT/UPDATE the function runs, reduced to its scan lines."""
    from sqlalchemy import event
    from sqlmodel import Session

    from app.core.db import get_engine

    engine = get_engine()
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE")):
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with Session(engine) as session:
            fn(session)
            session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    out: dict[str, None] = {}  # statement shape -> its scans, each shape once
    with engine.connect() as conn:
        for statement, params in seen:
            lines = [r[0] for r in conn.exec_driver_sql("EXPLAIN " + statement, params)]
            scans = [
                ln.strip().removeprefix("->").strip().split("  (cost")[0]
                for ln in lines
                if "Scan" in ln
            ]
            head = " ".join(statement.split())[:70]
            out[f"    {head}...\n      " + "\n      ".join(scans)] = None
            conn.rollback()
    return list(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    db = f"lh_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{args.pg}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {db}")  # type: ignore[arg-type]
    url = f"{args.pg}/{db}"
    os.environ.update(
        LEASEHOLD_DATABASE_URL=url, LEASEHOLD_HOME=tempfile.mkdtemp(prefix="leasehold-bench-")
    )
    from app import ledger
    from app.core.migrate import upgrade
    from app.core.models import utcnow
    from schedules.reconcile import BATCH

    upgrade()
    rows: list[tuple[int, float, float, float, float]] = []
    explained: dict[str, list[str]] = {}
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            ids = add_due(conn)
            filled = 0
            for size in sizes:
                start = time.perf_counter()
                fill(conn, filled + 1, size)
                filled = size
                conn.execute("VACUUM ANALYZE")
                fill_s = time.perf_counter() - start
                now = utcnow()
                # The reconciliation's listing: the held and pending objects plus orphans.
                listed = (
                    ids["held"] + ids["pending"] + [f"x{uuid.uuid4().hex[:27]}" for _ in range(10)]
                )

                def deadline(s: Any, now: Any = now) -> Any:
                    return ledger.time_out_due(s, now=now, limit=BATCH)

                def redrive(s: Any, now: Any = now) -> Any:
                    return ledger.stuck_credentials(
                        s, older_than=now - timedelta(minutes=2), limit=BATCH
                    )

                def reconcile_side(s: Any, now: Any = now, listed: Any = listed) -> Any:
                    held = ledger.held_rows(s, listed)
                    active, after = [], None
                    while True:
                        batch = ledger.active_minted_before(
                            s, profiles=["bench-db"], before=now, after=after, limit=BATCH
                        )
                        active += batch
                        if len(batch) < BATCH:
                            return held, active
                        after = (batch[-1].updated_at, batch[-1].id)

                t_deadline, revoked = timed(deadline)
                t_redrive, (pending, revoking) = timed(redrive)
                t_reconcile, (held, active) = timed(reconcile_side)
                assert len(revoked) == DUE and len(pending) == DUE == len(revoking)
                assert len(held) == 2 * DUE and len(active) == 2 * DUE  # held + timed_out
                rows.append((size, fill_s, t_deadline, t_redrive, t_reconcile))
                explained = {
                    "deadline sweep": plans(deadline),
                    "re-drive": plans(redrive),
                    "reconciliation": plans(reconcile_side),
                }
    finally:
        if not args.keep:
            from app.core.db import dispose_engines

            dispose_engines()
            with psycopg.connect(f"{args.pg}/postgres", autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {db}")  # type: ignore[arg-type]

    print(f"\nledger rows (tasks = credentials), {DUE} of each kind due; median of {REPEAT}")
    print(
        f"{'rows':>10} | {'fill s':>7} | {'deadline sweep':>14} | {'re-drive':>9} | "
        f"{'reconcile ledger':>16}"
    )
    print("-" * 70)
    for size, fill_s, a, b, c in rows:
        print(f"{size:>10,} | {fill_s:>7.1f} | {a:>11.1f} ms | {b:>6.1f} ms | {c:>13.1f} ms")
    print(f"\nplans at {rows[-1][0]:,} rows (EXPLAIN of each statement, scan lines):")
    for name, lines in explained.items():
        print(f"  {name}")
        for line in lines:
            print(line)


if __name__ == "__main__":
    main()
