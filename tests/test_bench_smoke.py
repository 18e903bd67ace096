"""bench/proxy_bench.py runs to its end with tiny numbers and prints every figure.
No timing is asserted: the figures depend on the machine."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.world import ROOT


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
