"""The lifecycle benchmark runs end to end with tiny numbers and prints every figure
(no timing is asserted: this machine's speed is not the test's business)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_lifecycle_bench_prints_every_figure() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "bench/lifecycle_bench.py",
            *("--tasks", "4", "--clients", "2", "--steady", "2", "--burst", "3"),
            *("--floor", "4", "--openbao", "4", "--soak", "4"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    number = r"[0-9]+(\.[0-9]+)?"
    for pattern in (
        rf"floor: .* {number} /s",
        rf"openbao: .* {number} /s",
        rf"end to end: 4 lifecycles .* {number} /s",
        rf"ratio: leasehold/direct {number}, leasehold/openbao {number}",
        rf"per lifecycle: API CPU {number} ms, worker CPU {number} ms, "
        rf"statements {number}, commits {number}",
        *(
            rf"{stage}: p50 {number} ms, p99 {number} ms"
            for stage in ("event->minted", "minted->claimed", "end->revoked")
        ),
        rf"time to revoke at 20 ends/s .* p50 {number} ms, p99 {number} ms",
        rf"time to revoke in a burst of 3 ends: p50 {number} ms, p99 {number} ms",
        rf"memory over a soak of 4 lifecycles .* API {number} -> {number} MiB .* "
        rf"worker .* {number} -> {number} MiB",
    ):
        assert re.search(pattern, out.stdout), f"{pattern!r} not in:\n{out.stdout}"
    # Statements were counted on the driver: a lifecycle cannot take none.
    statements = re.search(rf"statements ({number})", out.stdout)
    assert statements is not None and float(statements.group(1)) > 0
