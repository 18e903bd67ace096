"""The benchmarks run to their end with tiny numbers and print every figure.
No timing is asserted: the figures depend on the machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.support.world import ROOT

NUMBER = r"[0-9]+(\.[0-9]+)?"


def bench(*args: str, timeout: float) -> str:
    """A benchmark run to its end; its standard output."""
    out = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def assert_printed(stdout: str, patterns: list[str]) -> None:
    for pattern in patterns:
        assert re.search(pattern, stdout), f"{pattern!r} not in:\n{stdout}"


def test_proxy_bench_completes_and_prints_each_figure() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEHOLD_")}
    done = subprocess.run(
        [
            sys.executable,
            "bench/proxy_bench.py",
            "--requests",
            "6",
            "--big-requests",
            "2",
            "--big-kib",
            "64",
            "--clients",
            "2",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    # Fixed columns: body (24), upstream (8), path (22), then the figures.
    rows = {
        (line[:24].split()[0], line[25:33].strip(), line[34:56].split()[0]): line[57:].split()
        for line in done.stdout.splitlines()
        if line.startswith(("small", "streamed"))
    }
    assert len(rows) == 12, done.stdout
    for body in ("small", "streamed"):
        for scheme in ("http", "https"):
            for path in ("direct", "reverse", "forward"):
                figures = rows[(body, scheme, path)]
                # n, p50, p99, req/s; for a proxied path also the added p50 and p99.
                assert len(figures) == (4 if path == "direct" else 6), figures
                assert all(float(x) >= 0 for x in figures[:4]), figures
                assert int(figures[0]) > 0
                for added in figures[4:]:
                    float(added)
    assert "added p50" in done.stdout and "req/s" in done.stdout


def test_lifecycle_bench_prints_every_figure() -> None:
    stdout = bench(
        "bench/lifecycle_bench.py",
        *("--tasks", "4", "--clients", "2", "--steady", "2", "--burst", "3"),
        *("--floor", "4", "--openbao", "4", "--soak", "4"),
        timeout=300,
    )
    number = NUMBER
    assert_printed(
        stdout,
        [
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
            rf"this benchmark's clients {number} ms",
        ],
    )
    # The machine's CPU per cycle, for each of the three jobs (floor, OpenBao, lifecycle).
    machine = (
        rf"machine CPU {number} ms per cycle, {number} % of [0-9]+ cores busy "
        rf"\(PostgreSQL {number} ms, Redis {number} ms\)"
    )
    assert len(re.findall(machine, stdout)) == 3, stdout
    # Statements were counted on the driver: a lifecycle cannot take none.
    statements = re.search(rf"statements ({number})", stdout)
    assert statements is not None and float(statements.group(1)) > 0


def test_stack_floor_prints_each_figure() -> None:
    stdout = bench("bench/stack_floor.py", "--requests", "20", "--messages", "20", timeout=180)
    number = NUMBER
    assert_printed(
        stdout,
        [
            rf"http: .* server {number} ms, client \(httpx\) {number} ms CPU",
            rf"celery: .* publish {number} ms, worker {number} ms CPU",
            rf"three requests and two messages: {number} ms of CPU .* at most {number} such",
        ],
    )
    # The worker did the work: a message cannot have cost it nothing.
    worker = re.search(rf"worker ({number}) ms CPU", stdout)
    assert worker is not None and float(worker.group(1)) > 0
