"""Prometheus metrics across processes.

Counters and histograms are incremented in Celery worker processes but served
by the API process, so they use prometheus_client's multiprocess mode: each
process writes its own mmapped files into one directory
(LEASEHOLD_METRICS_DIR, default <LEASEHOLD_HOME>/metrics) and a scrape sums
them. One directory serves the processes of ONE host and PID namespace (files
are named by PID; a dead process's files are recognised by its PID being gone):
a container, or `leasehold up`'s machine. In containers each keeps its own
directory and a worker serves it on LEASEHOLD_METRICS_PORT (`serve`); the
API's /metrics adds the ledger's gauges. Prometheus sums the counters over
the scraped instances.

Files of dead processes are merged into one archive file per type (never
deleted with their counts, which would make counters go backwards) under an
exclusive lock; scrapes read under a shared lock, so they never see a count
twice or not at all.

Gauges (active credentials, running tasks, failing revocations, last sweep)
are not kept in files: the ledger is their truth, read at scrape time by
`LedgerCollector` with indexed queries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlmodel import col, func, select

from app.core.settings import Settings, get_settings

logger = logging.getLogger("leasehold")

CONTENT_TYPE = CONTENT_TYPE_LATEST
MINT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The budget is ~15 ms from a terminal event; timeouts wait for the sweep; orphans for
# the reconciliation.
REVOKE_BUCKETS = (
    0.005,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)
# A job's run: sub-second jobs (a revoke, a mint) to a reconciliation of many backends.
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
JOB_OUTCOMES = ("ok", "retry", "failed", "ignored")
# leasehold_events_total's outcome: accepted, duplicate, or why it was refused (by the
# answer's status: a bounded set, never an id or a message).
EVENT_REJECTIONS = {
    400: "invalid",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    503: "unavailable",
}
_LOCK_FILE = ".lock"  # not *.db: the collector globs those


@dataclass(frozen=True)
class Metrics:
    mints: Counter
    revocations: Counter
    mint_duration: Histogram
    revoke_duration: Histogram
    claims: Counter
    second_claims: Counter
    orphans_revoked: Counter
    policy_reload_errors: Counter
    policy_decisions: Counter
    jobs: Counter
    job_duration: Histogram
    proxy_requests: Counter
    events: Counter


_lock = threading.Lock()
_metrics: Metrics | None = None
_path: Path | None = None
_series_ready = False


def metrics_dir(settings: Settings) -> Path:
    return (settings.metrics_dir or settings.home / "metrics").resolve()


def prepare(settings: Settings | None = None) -> Path:
    """Choose the directory for this process and tidy up after dead ones (idempotent).

    prometheus_client picks its value class when it is first imported, from
    PROMETHEUS_MULTIPROC_DIR; whoever imported it first, we switch to the
    multiprocess class here, before the first metric exists.
    """
    global _path
    with _lock:
        if _path is not None:
            return _path
        path = metrics_dir(settings or get_settings())
        path.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
        if not getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass = values.MultiProcessValue()
        _path = path
    try:
        compact(path)
    except OSError as exc:  # a read-only or full disk must not stop the process serving
        logger.warning("metrics: could not compact %s: %s", path, exc)
    return path


def get() -> Metrics:
    global _metrics
    if _metrics is not None:
        return _metrics
    prepare()
    with _lock:
        if _metrics is None:
            # registry=None: the multiprocess collector reads the files, not a registry.
            _metrics = Metrics(
                mints=Counter(
                    "leasehold_mints",
                    "Credentials minted, by outcome",
                    ["issuer", "profile", "outcome"],
                    registry=None,
                ),
                revocations=Counter(
                    "leasehold_revocations",
                    "Revocation attempts, by reason and outcome",
                    ["issuer", "profile", "reason", "outcome"],
                    registry=None,
                ),
                mint_duration=Histogram(
                    "leasehold_mint_duration_seconds",
                    "Time the issuer took to mint",
                    ["issuer"],
                    buckets=MINT_BUCKETS,
                    registry=None,
                ),
                revoke_duration=Histogram(
                    "leasehold_revoke_duration_seconds",
                    "Time from the task's end (or the revoke request) to the verified revoke",
                    ["issuer"],
                    buckets=REVOKE_BUCKETS,
                    registry=None,
                ),
                claims=Counter(
                    "leasehold_claims",
                    "Credentials handed out by a claim",
                    ["issuer", "profile"],
                    registry=None,
                ),
                second_claims=Counter(
                    "leasehold_second_claims",
                    "Claims of an already claimed credential (possible interceptions)",
                    ["issuer", "profile"],
                    registry=None,
                ),
                orphans_revoked=Counter(
                    "leasehold_orphans_revoked",
                    "Marked backend objects the reconciliation revoked",
                    registry=None,
                ),
                policy_reload_errors=Counter(
                    "leasehold_policy_reload_errors",
                    "Policy file changes refused (invalid or removed); the last good set stayed",
                    registry=None,
                ),
                policy_decisions=Counter(
                    "leasehold_policy_decisions",
                    "Policy decisions, by action and decision",
                    ["action", "decision"],
                    registry=None,
                ),
                jobs=Counter(
                    "leasehold_jobs",
                    "Runs of a Celery job, by job name and outcome (ok, retry, failed, ignored)",
                    ["job", "outcome"],
                    registry=None,
                ),
                job_duration=Histogram(
                    "leasehold_job_duration_seconds",
                    "Time one run of a Celery job took, whatever its outcome",
                    ["job"],
                    buckets=JOB_BUCKETS,
                    registry=None,
                ),
                proxy_requests=Counter(
                    "leasehold_proxy_requests",
                    "Requests to `leasehold proxy`: forwarded, or refused by reason",
                    ["profile", "outcome"],
                    registry=None,
                ),
                events=Counter(
                    "leasehold_events",
                    "Events received, by type and outcome (accepted, duplicate, or the "
                    "reason a rejected one was refused)",
                    ["type", "outcome"],
                    registry=None,
                ),
            )
    return _metrics


def initialize_series() -> None:
    """Zero series for every configured profile, so a fresh install shows every name."""
    from app.profiles import ProfileError, get_profiles
    from app.queue import QUEUES

    m = get()
    m.orphans_revoked.inc(0)
    m.policy_reload_errors.inc(0)
    for job in QUEUES:
        for outcome in JOB_OUTCOMES:
            m.jobs.labels(job, outcome).inc(0)
        m.job_duration.labels(job)
    from app.ledger import EVENT_TYPES

    for type_ in EVENT_TYPES:
        for outcome in ("accepted", "duplicate"):
            m.events.labels(type_, outcome).inc(0)
    for action in ("mint", "extend"):
        for decision in ("allow", "deny"):
            m.policy_decisions.labels(action, decision).inc(0)
    try:
        profiles = get_profiles()
    except ProfileError:
        return
    for p in profiles.values():
        for outcome in ("ok", "failed"):
            m.mints.labels(p.issuer, p.name, outcome).inc(0)
        m.claims.labels(p.issuer, p.name).inc(0)
        m.second_claims.labels(p.issuer, p.name).inc(0)
        m.mint_duration.labels(p.issuer)
        m.revoke_duration.labels(p.issuer)
        if p.issuer == "proxy":
            m.proxy_requests.labels(p.name, "forwarded").inc(0)


# --- the directory ---------------------------------------------------------


@contextlib.contextmanager
def _dir_lock(path: Path, *, shared: bool) -> Iterator[None]:
    fd = os.open(path / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _dead_pid(file: Path) -> int | None:
    """The PID of a per-process file whose process is gone, else None."""
    pid = file.stem.rsplit("_", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return None
    return None if _alive(int(pid)) else int(pid)


def compact(path: Path) -> int:
    """Merge dead processes' counter and histogram files into archives; returns files merged.

    A crash between adding a file to the archive and removing it would count
    that file twice; the window is a few microseconds per file.
    """
    merged = 0
    with _dir_lock(path, shared=False):
        for typ in ("counter", "histogram"):
            dead = [f for f in sorted(path.glob(f"{typ}_*.db")) if _dead_pid(f) is not None]
            if not dead:
                continue
            archive = MmapedDict(str(path / f"{typ}_archive.db"))
            try:
                for file in dead:
                    for key, value, _ts, _pos in MmapedDict.read_all_values_from_file(str(file)):
                        current, _ = archive.read_value(key)
                        archive.write_value(key, current + value, 0.0)
                    file.unlink()
                    merged += 1
            finally:
                archive.close()
        for file in path.glob("gauge_*.db"):
            pid = _dead_pid(file)
            if pid is not None:
                mark_process_dead(pid, str(path))
    return merged


# --- scraping --------------------------------------------------------------


class FilesCollector(Collector):
    """The processes' files, plus an empty family for each metric nobody has touched yet,
    so every name is listed (with its type) from the first scrape."""

    def __init__(self, path: Path) -> None:
        self._files = MultiProcessCollector(None, path=str(path))

    def collect(self) -> Iterator[Metric]:
        seen = set()
        for family in self._files.collect():
            seen.add(family.name)
            yield family
        for metric in vars(get()).values():
            for declared in metric.describe():  # a family without samples
                if declared.name not in seen:
                    yield declared


class LedgerCollector(Collector):
    """Gauges read from the ledger at scrape time (indexed on state)."""

    def collect(self) -> Iterator[Metric]:
        from app.core.db import session_scope
        from app.core.models import (
            AuditEntry,
            Credential,
            CredState,
            Sweep,
            Task,
            TaskState,
            utcnow,
        )
        from app.observability.overview import failing_clause
        from app.profiles import ProfileError, get_profiles

        settings = get_settings()
        with session_scope() as session:
            active = session.exec(
                select(Credential.issuer, Credential.profile, func.count())
                .where(Credential.state == CredState.active)
                .group_by(Credential.issuer, Credential.profile)
            ).all()
            running = session.exec(
                select(func.count()).select_from(Task).where(Task.state == TaskState.running)
            ).one()
            failing = session.exec(
                select(func.count())
                .select_from(Credential)
                .where(failing_clause(settings.revoke_alert_after))
            ).one()
            oldest = session.exec(
                select(func.min(Credential.minted_at)).where(Credential.state == CredState.active)
            ).one()
            unexported = session.exec(
                select(func.count())
                .select_from(AuditEntry)
                .where(col(AuditEntry.exported_seq).is_(None))
            ).one()
            # Ids are time-ordered: the newest finished sweep is found walking the key.
            last_sweep = session.exec(
                select(Sweep.finished_at)
                .where(col(Sweep.finished_at).is_not(None))
                .order_by(col(Sweep.id).desc())
                .limit(1)
            ).first()
        counts = {(issuer, profile): n for issuer, profile, n in active}
        try:  # configured profiles show 0 rather than vanish
            for p in get_profiles().values():
                counts.setdefault((p.issuer, p.name), 0)
        except ProfileError:
            pass
        family = GaugeMetricFamily(
            "leasehold_active_credentials",
            "Credentials minted and not yet revoked",
            labels=["issuer", "profile"],
        )
        for (issuer, profile), n in sorted(counts.items()):
            family.add_metric([issuer, profile], n)
        yield family
        yield GaugeMetricFamily("leasehold_running_tasks", "Tasks running", value=running)
        yield GaugeMetricFamily(
            "leasehold_failing_revocations",
            "Revocations that failed at least LEASEHOLD_REVOKE_ALERT_AFTER times, or for good",
            value=failing,
        )
        yield GaugeMetricFamily(
            "leasehold_oldest_active_credential_age_seconds",
            "How long the oldest active credential has been minted (0: none active)",
            value=max((utcnow() - oldest).total_seconds(), 0.0) if oldest else 0.0,
        )
        yield GaugeMetricFamily(
            "leasehold_audit_unexported_entries",
            "Audit entries not yet written to LEASEHOLD_AUDIT_EXPORT",
            value=unexported,
        )
        yield GaugeMetricFamily(
            "leasehold_last_sweep_timestamp_seconds",
            "When the last reconciliation sweep finished (0: never)",
            value=last_sweep.timestamp() if last_sweep else 0.0,
        )


class PolicyCollector(Collector):
    """Which policy set this process has in force, and since when."""

    def collect(self) -> Iterator[Metric]:
        from app.authority import policy

        try:
            status = policy.engine().status()
        except policy.PolicyError:  # no set could be loaded at all
            status = None
        in_force = status.in_force if status else None
        yield GaugeMetricFamily(
            "leasehold_policy_loaded_timestamp_seconds",
            "When the policy set in force was loaded (0: no policy file, every grant allowed)",
            value=in_force.loaded_at.timestamp() if in_force else 0.0,
        )
        info = GaugeMetricFamily(
            "leasehold_policy_info", "The policy set in force", labels=["sha", "policies"]
        )
        info.add_metric(
            [in_force.sha if in_force else "", str(in_force.count if in_force else 0)], 1
        )
        yield info
        yield GaugeMetricFamily(
            "leasehold_policy_file_refused",
            "1 while the policy file on disk is invalid or removed and the last good set is used",
            value=1 if status is None or status.error else 0,
        )


def render(*, ledger: bool = True) -> bytes:
    """The Prometheus text exposition of this directory's processes, and (the API's
    scrape) the ledger's gauges, which are installation-wide: served once."""
    global _series_ready
    path = prepare()
    if not _series_ready:
        initialize_series()
        _series_ready = True
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FilesCollector(path))
    if ledger:
        registry.register(LedgerCollector())
        registry.register(PolicyCollector())  # the API decides; workers hold no policy
    with _dir_lock(path, shared=True):
        return generate_latest(registry)


# --- a worker's own endpoint ---------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    timeout = 5  # a slow client never holds a thread for long
    server_version = "leasehold-metrics"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._answer(404, b"not found\n", "text/plain")
            return
        token = get_settings().metrics_token
        if token is not None:
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
                self._answer(401, b"a valid metrics token is required\n", "text/plain")
                return
        try:
            body = render(ledger=False)
        except Exception:
            logger.exception("metrics: scrape failed")
            self._answer(500, b"scrape failed\n", "text/plain")
            return
        self._answer(200, body, CONTENT_TYPE)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes are not worth a log line each


_server: ThreadingHTTPServer | None = None


def serve(settings: Settings | None = None) -> int | None:
    """Serve this process's directory on LEASEHOLD_METRICS_PORT (once); returns the port."""
    global _server
    settings = settings or get_settings()
    if settings.metrics_port is None:
        return None
    prepare(settings)  # takes _lock itself
    with _lock:
        if _server is None:
            server = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), _Handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
            _server = server
            logger.info("metrics on %s:%d/metrics", settings.metrics_host, settings.metrics_port)
        return int(_server.server_address[1])


def _serve_in_worker(**_: object) -> None:
    """The worker's main process serves its pool's files (the pool is forked by now)."""
    try:
        serve()
    except OSError as exc:  # a taken port must not stop revocations
        logger.error("metrics: cannot listen on LEASEHOLD_METRICS_PORT: %s", exc)


def _connect_worker_signal() -> None:
    from celery.signals import worker_ready

    worker_ready.connect(_serve_in_worker, weak=False)


_connect_worker_signal()
