"""/metrics through the Prometheus client's own parser: names, types, bounded labels, the
token, and counters and histograms that move as a lifecycle runs in the real worker."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from app import queue
from app.core.db import session_scope
from app.core.logs import JsonFormatter, log
from app.core.models import Sweep, utcnow
from app.core.settings import get_settings
from app.observability import metrics, observe
from tests.support.api import auth, claim_url, credentials_of, event, started, states, unique
from tests.support.procs import environment, free_port, start_worker, stop_process, wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

COUNTERS = {
    "leasehold_mints": {"issuer", "profile", "outcome"},
    "leasehold_revocations": {"issuer", "profile", "reason", "outcome"},
    "leasehold_orphans_revoked": set(),
    "leasehold_second_claims": {"issuer", "profile"},
    "leasehold_jobs": {"job", "outcome"},
    "leasehold_events": {"type", "outcome"},
}
HISTOGRAMS = {
    "leasehold_mint_duration_seconds": {"issuer"},
    "leasehold_revoke_duration_seconds": {"issuer"},
    "leasehold_job_duration_seconds": {"job"},
}
GAUGES = {
    "leasehold_active_credentials": {"issuer", "profile"},
    "leasehold_running_tasks": set(),
    "leasehold_failing_revocations": set(),
    "leasehold_last_sweep_timestamp_seconds": set(),
    "leasehold_oldest_active_credential_age_seconds": set(),
    "leasehold_audit_unexported_entries": set(),
}
ID_LIKE = re.compile(r"^[0-9a-f]{28}$")  # the ledger's ids


def scrape(client: Any, token: str | None = None) -> dict[str, Any]:
    answer = client.get("/metrics", headers=auth(token) if token else {})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(answer.text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` whose labels include `labels`."""
    family = sample
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in families:
            family = sample[: -len(suffix)]
    if family not in families:
        return 0.0
    return sum(
        s.value
        for s in families[family].samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_names_types_and_bounded_labels(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("metrics-labels")
    answer = app_client.post(
        "/v1/events", json=started(name, {"v": "kv-reader"}), headers=auth(keys["emitter"])
    )
    assert answer.status_code == 202
    wait_until(lambda: states("t1", name) == {"v": "active"})
    families = scrape(app_client)
    for counter, labels in COUNTERS.items():
        assert families[counter].type == "counter", counter
        assert all(set(s.labels) <= labels for s in families[counter].samples), counter
    for histogram, labels in HISTOGRAMS.items():
        assert families[histogram].type == "histogram", histogram
        assert all(set(s.labels) <= labels | {"le"} for s in families[histogram].samples)
    for gauge, labels in GAUGES.items():
        assert families[gauge].type == "gauge", gauge
        assert all(set(s.labels) <= labels for s in families[gauge].samples), gauge
    ids = {c.id for c in credentials_of("t1", name)}
    for family in families.values():
        for sample in family.samples:
            for label in sample.labels.values():
                assert not ID_LIKE.match(label) and label not in ids and name not in label
    assert value(families, "leasehold_running_tasks") >= 1
    assert value(families, "leasehold_active_credentials", profile="kv-reader") >= 1
    # Every configured profile has a series, even at zero.
    assert {s.labels["profile"] for s in families["leasehold_active_credentials"].samples} >= {
        "kv-reader",
        "task-cache",
        "reports-readonly",
    }
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_counters_and_histograms_move_through_a_lifecycle(
    app_client: Any, keys: dict[str, str], worker: Path
) -> None:
    grants = {"vault": "kv-reader", "cache": "task-cache"}
    before = scrape(app_client)
    name = unique("metrics-lifecycle")
    answer = app_client.post(
        "/v1/events", json=started(name, grants), headers=auth(keys["emitter"])
    )
    assert answer.status_code == 202
    token = answer.json()["claim_token"]
    wait_until(lambda: states("t1", name) == {"vault": "active", "cache": "active"})

    during = scrape(app_client)
    for issuer, profile in (("vault-token", "kv-reader"), ("redis", "task-cache")):
        assert (
            value(during, "leasehold_mints_total", profile=profile, outcome="ok")
            - value(before, "leasehold_mints_total", profile=profile, outcome="ok")
        ) >= 1
        assert (
            value(during, "leasehold_mint_duration_seconds_count", issuer=issuer)
            - value(before, "leasehold_mint_duration_seconds_count", issuer=issuer)
        ) >= 1
        assert value(during, "leasehold_active_credentials", issuer=issuer, profile=profile) >= 1
    assert value(during, "leasehold_mint_duration_seconds_sum") > value(
        before, "leasehold_mint_duration_seconds_sum"
    )

    # Each run of a job is counted by name and outcome, and timed (workers.job): once its
    # body returned, just after the ledger shows the credential active.
    def mint_jobs_counted() -> dict[str, Any] | None:
        now = scrape(app_client)
        ran = value(now, "leasehold_jobs_total", job=queue.MINT, outcome="ok") - value(
            before, "leasehold_jobs_total", job=queue.MINT, outcome="ok"
        )
        return now if ran >= 2 else None

    ran = wait_until(mint_jobs_counted, timeout=5)
    assert (
        value(ran, "leasehold_job_duration_seconds_count", job=queue.MINT)
        - value(before, "leasehold_job_duration_seconds_count", job=queue.MINT)
    ) >= 2

    first = app_client.post(claim_url(name, "vault"), headers=auth(token))
    assert first.status_code == 200
    secret = first.json()["secret"]["token"]
    again = app_client.post(claim_url(name, "vault"), headers=auth(token))
    assert again.status_code == 410
    claimed = scrape(app_client)
    assert (
        value(claimed, "leasehold_second_claims_total", profile="kv-reader")
        - value(before, "leasehold_second_claims_total", profile="kv-reader")
    ) == 1

    ended = app_client.post(
        "/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"])
    )
    assert ended.status_code == 202
    wait_until(lambda: set(states("t1", name).values()) == {"revoked"})

    def revoked_counted() -> dict[str, Any] | None:
        after = scrape(app_client)
        moved = all(
            value(after, "leasehold_revocations_total", profile=p, reason="succeeded", outcome="ok")
            - value(
                before, "leasehold_revocations_total", profile=p, reason="succeeded", outcome="ok"
            )
            >= 1
            for p in grants.values()
        )
        return after if moved else None

    after = wait_until(revoked_counted, timeout=5)
    for issuer in ("vault-token", "redis"):
        count = value(after, "leasehold_revoke_duration_seconds_count", issuer=issuer) - value(
            before, "leasehold_revoke_duration_seconds_count", issuer=issuer
        )
        assert count >= 1
        # Buckets are cumulative: +Inf holds every observation.
        assert (
            value(after, "leasehold_revoke_duration_seconds_bucket", issuer=issuer, le="+Inf")
            - value(before, "leasehold_revoke_duration_seconds_bucket", issuer=issuer, le="+Inf")
        ) == count

    # One structured line per mint and revoke in the worker's log, and never the secret.
    text = worker.read_text()
    for cred in credentials_of("t1", name):
        assert re.search(rf"minted .*credential={cred.id}.*duration=", text), cred.grant
        assert re.search(rf"revoked .*credential={cred.id}.*reason=succeeded.*duration=", text)
    assert secret not in text and token not in text


def test_metrics_token(app_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASEHOLD_METRICS_TOKEN", "metrics-token-for-tests")
    get_settings.cache_clear()
    try:
        assert app_client.get("/metrics").status_code == 401
        assert app_client.get("/metrics", headers=auth("wrong")).status_code == 401
        families = scrape(app_client, "metrics-token-for-tests")
        assert "leasehold_mints" in families
    finally:
        monkeypatch.delenv("LEASEHOLD_METRICS_TOKEN")
        get_settings.cache_clear()
    assert app_client.get("/metrics").status_code == 200


def test_last_sweep_timestamp(app_client: Any) -> None:
    finished = utcnow()
    with session_scope() as session:
        row = Sweep(started_at=finished, finished_at=finished, checked=3, orphans_revoked=1)
        session.add(row)
    try:
        stamp = value(scrape(app_client), "leasehold_last_sweep_timestamp_seconds")
        assert stamp == pytest.approx(finished.timestamp(), abs=0.001)
    finally:
        with session_scope() as session:
            session.delete(session.get(Sweep, row.id))


def test_orphans_counter(app_client: Any) -> None:
    before = value(scrape(app_client), "leasehold_orphans_revoked_total")
    observe.orphans_revoked(2)
    assert value(scrape(app_client), "leasehold_orphans_revoked_total") == before + 2


# --- the multiprocess directory ----------------------------------------------


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def _write(path: Path, name: str, labels: dict[str, str], amount: float) -> None:
    d = MmapedDict(str(path))
    key = mmap_key(name, name + "_total", list(labels), list(labels.values()), "help")
    d.write_value(key, d.read_value(key)[0] + amount, 0.0)
    d.close()


def _total(directory: Path, name: str) -> float:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == name)


def test_dead_processes_files_are_merged_not_lost(tmp_path: Path, dead_pid: int) -> None:
    labels = {"issuer": "redis"}
    _write(tmp_path / f"counter_{dead_pid}.db", "leasehold_t", labels, 3)
    _write(tmp_path / "counter_archive.db", "leasehold_t", labels, 2)
    live = os.getppid()
    _write(tmp_path / f"counter_{live}.db", "leasehold_t", labels, 7)
    assert _total(tmp_path, "leasehold_t_total") == 12
    assert metrics.compact(tmp_path) == 1
    assert not (tmp_path / f"counter_{dead_pid}.db").exists()
    assert (tmp_path / f"counter_{live}.db").exists()  # a live process keeps its file
    assert _total(tmp_path, "leasehold_t_total") == 12  # nothing lost, nothing doubled
    assert metrics.compact(tmp_path) == 0


# --- logs ----------------------------------------------------------------------


@pytest.fixture
def json_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Capture()
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    yield lines
    log.removeHandler(handler)


def test_json_log_lines_carry_fields_and_no_secret(json_lines: list[str]) -> None:
    log.info(
        "revoked",
        extra={
            "credential": "c1",
            "task": "t1",
            "issuer": "redis",
            "reason": "manual",
            "duration": 0.012,
            "password": "hunter2",
            "note": "token hvs.ABCDEFGHIJKLMNOPQRSTUVWX",
        },
    )
    log.warning("claim with Bearer lhc.eyJhYmMiOjF9.c2lnbmF0dXJl and key lhk_abcdefghijklmnop")
    first, second = (json.loads(line) for line in json_lines)
    assert first["msg"] == "revoked" and first["level"] == "info"
    assert second["level"] == "warning" and "[Filtered]" in second["msg"]
    assert {k: first[k] for k in ("credential", "task", "issuer", "reason", "duration")} == {
        "credential": "c1",
        "task": "t1",
        "issuer": "redis",
        "reason": "manual",
        "duration": 0.012,
    }
    text = "\n".join(json_lines)
    for leaked in (
        "hunter2",
        "hvs.ABCDEFGHIJKLMNOPQRSTUVWX",
        "lhc.eyJhYmMiOjF9",
        "lhk_abcdefghijklmnop",
    ):
        assert leaked not in text


# --- a worker container's own endpoint ---------------------------------------------


def test_a_worker_serves_its_own_metrics_on_its_port(tmp_path: Path, dead_pid: int) -> None:
    """compose.yaml's shape: a worker with its own directory (no PID namespace shared
    with the api) serves its processes' counters; the ledger's gauges stay with the api."""
    import httpx

    port = free_port()
    directory = tmp_path / "metrics"
    env = {
        "LEASEHOLD_METRICS_PORT": str(port),
        "LEASEHOLD_METRICS_DIR": str(directory),
        "LEASEHOLD_METRICS_TOKEN": "worker-metrics-token",
    }
    with environment(env):
        proc = start_worker(tmp_path / "worker.log", "--concurrency", "1")
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        # A count left by one of this worker's (now gone) pool processes.
        labels = {"issuer": "redis", "profile": "task-cache", "outcome": "ok"}
        _write(directory / f"counter_{dead_pid}.db", "leasehold_mints", labels, 5)
        refused = wait_until(lambda: _get(url, {}), timeout=10)
        assert refused.status_code == 401
        answer = _get(url, auth("worker-metrics-token"))
        assert answer is not None and answer.status_code == 200, answer
        assert answer.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(answer.text)}
        assert value(families, "leasehold_mints_total", **labels) == 5
        assert set(COUNTERS) | set(HISTOGRAMS) <= set(families)
        assert not set(GAUGES) & set(families)  # installation-wide: the api serves them
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
    finally:
        stop_process(proc)


def _get(url: str, headers: dict[str, str]) -> Any:
    import httpx

    try:
        return httpx.get(url, headers=headers, timeout=5)
    except httpx.TransportError:
        return None  # not listening yet
