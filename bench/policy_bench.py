"""The cost of a policy decision: one grant, and a four-grant start in one batch,
against the sample policy plus a realistic set of 50 policies (a forbid among them),
with the parsed policy set and schema cached as the API caches them.

    python bench/policy_bench.py [--n 20000]

Prints microseconds per call (median of 5 runs); also the hot-reload check's cost
when the file has not changed (a monotonic clock read, a stat at most once a second).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.authority import policy


def policies(count: int) -> str:
    parts = [(Path(policy.__file__).parent.parent / "sample" / "policies.cedar").read_text()]
    for i in range(count):
        parts.append(
            f'@id("p{i}")\npermit (principal, action, resource == Profile::"profile-{i}")\n'
            f'when {{ principal.trust_domain == "td{i}.example.org" && '
            f'context.max_duration <= {600 + i} && context.emitter like "ci-*" }};\n'
        )
    parts.append(
        '@id("no-tmp")\nforbid (principal, action, resource)\n'
        'when { context.task like "tmp/*" && resource.issuer == "postgres" };\n'
    )
    return "\n".join(parts)


def ask(i: int) -> policy.Ask:
    return policy.Ask(
        action="mint",
        workload=f"spiffe://td{i}.example.org/ns/etl/sa/job",
        profile=f"profile-{i}",
        issuer="postgres",
        tenant="default",
        emitter="ci-main",
        source="https://ci.example.org/pipelines",
        task=f"etl/nightly/{i}",
        parent=None,
        max_duration=300,
    )


def per_call(fn: object, n: int) -> float:
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()  # type: ignore[operator]
        runs.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    n = parser.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policies.cedar"
        path.write_text(policies(50))
        engine = policy.Engine(path)
        loaded = engine.start()
        assert loaded is not None
        one, four = [ask(7)], [ask(i) for i in range(4)]
        assert policy.decide(loaded, one)[0].allowed
        for _ in range(200):  # warm up
            policy.decide(loaded, four)
        print(f"policies: {loaded.count}")
        print(f"one decision:          {per_call(lambda: policy.decide(loaded, one), n):7.1f} µs")
        four_us = per_call(lambda: policy.decide(loaded, four), n // 4)
        print(f"four grants, batched:  {four_us:7.1f} µs ({four_us / 4:.1f} µs per grant)")
        print(f"set in force (cached): {per_call(engine.current, n):7.2f} µs")


if __name__ == "__main__":
    main()
