"""What the benchmarks share: a free port, admin SQL, percentiles, a CloudEvent."""

from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime

import psycopg

PG = "postgresql://postgres@127.0.0.1:5432"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sql(db: str, *statements: str) -> None:
    with psycopg.connect(f"{PG}/{db}", autocommit=True) as c:
        for s in statements:
            c.execute(s)  # type: ignore[arg-type]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def event(kind: str, subject: str, data: dict | None = None) -> dict:
    body = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "bench://",
        "type": kind,
        "subject": subject,
        "time": datetime.now(UTC).isoformat(),
    }
    if data is not None:
        body["data"] = data
    return body
