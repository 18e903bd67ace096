"""`leasehold`: the one entry point.

`status`, `sweep`, `keys`, `db` and `audit` read the ledger directly
(LEASEHOLD_DATABASE_URL, LEASEHOLD_HOME, ...); `credentials`, `tasks`, `sweeps`,
`tail` and `emit` talk to the API at LEASEHOLD_URL with the key in LEASEHOLD_KEY.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import ValidationError

from app import oncall
from app.core.models import Role
from app.core.redact import clip
from app.core.settings import Settings, get_settings

# No local variables in tracebacks: they may hold secrets (typer < 0.13 shows them).
# Shell completion: `leasehold --install-completion` (typer's).
cli = typer.Typer(no_args_is_help=True, help=__doc__, pretty_exceptions_show_locals=False)
db_cli = typer.Typer(no_args_is_help=True, help="The ledger database.")
keys_cli = typer.Typer(no_args_is_help=True, help="API keys.")
audit_cli = typer.Typer(no_args_is_help=True, help="The exported audit trail's hash chain.")
cli.add_typer(db_cli, name="db")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(audit_cli, name="audit")


def _version(value: bool) -> None:
    if value:
        from app import __version__

        typer.echo(f"leasehold {__version__}")
        raise typer.Exit()


@cli.callback()
def _main(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = None,
) -> None:
    pass


def echo(text: str, *, err: bool = False) -> None:
    """All CLI output: what emitters wrote (task ids, workloads) may hold escape
    sequences, shown as text instead of reaching the operator's terminal."""
    from app.status import printable

    typer.echo(printable(text, keep="\n\t"), err=err)


def fail(message: str, code: int = 1) -> typer.Exit:
    echo(f"leasehold: {message}", err=True)
    return typer.Exit(code)


def settings() -> Settings:
    """Settings, with errors printed without the values (they may be secrets)."""
    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise fail(f"bad configuration: {problems}") from None


def _checked_profiles() -> None:
    from app.core.db import session_scope
    from app.profiles import ProfileError
    from app.startup import check

    try:
        with session_scope() as session:
            check(session)
    except ProfileError as exc:
        raise fail(str(exc)) from None


def _checked_policy() -> None:
    """An invalid policy file refuses the start with its message (the API warns if none)."""
    from app.authority import policy

    path = settings().policy_file
    if path.exists():
        try:
            policy.load(path)
        except policy.PolicyError as exc:
            raise fail(str(exc)) from None


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations."""
    settings()
    from app.core.migrate import upgrade

    try:
        upgrade()
    except Exception as exc:
        # Database errors may quote the URL (and its password): say what failed, no URL.
        raise fail(f"db upgrade failed: {_without_urls(exc)}") from None
    echo("ledger is up to date")


def _listed(values: list[str] | None) -> list[str] | None:
    """Repeated options, each possibly comma-separated; not given means no limit."""
    if not values:
        return None
    return [part for value in values for part in value.split(",")]


def _without_urls(exc: BaseException) -> str:
    import re

    cause = getattr(exc, "orig", None) or exc  # the driver's own message, not SQLAlchemy's
    text = clip(" ".join(str(cause).split()))
    return f"{type(cause).__name__}: " + re.sub(r"[A-Za-z][\w+.-]*://\S*", "<url>", text)


def _expiry(text: str) -> datetime:
    """`--expires`: a duration from now (`90m`, `12h`, `30d`) or an ISO 8601 time."""
    import re

    from app.core.models import utcnow

    found = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if found:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[found[2]]
        return utcnow() + timedelta(**{unit: int(found[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise fail(f"--expires {text!r}: use a duration (90m, 12h, 30d) or an ISO time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@keys_cli.command("create")
def keys_create(
    name: str,
    role: Annotated[Role, typer.Option(help="emitter, operator or admin")],
    tenant: Annotated[str | None, typer.Option(help="the tenant (emitter, operator)")] = None,
    sources: Annotated[
        list[str] | None,
        typer.Option(help="limit an emitter to these event sources (repeat, or comma-separate)"),
    ] = None,
    workloads: Annotated[
        list[str] | None,
        typer.Option(
            help="limit an emitter to these workloads: prefixes, or spiffe://<trust domain>"
        ),
    ] = None,
    profiles: Annotated[
        list[str] | None, typer.Option(help="limit an emitter to these profiles")
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            help="when the key stops working: a duration (90m, 12h, 30d) or an ISO 8601 "
            "time (UTC unless it names its offset)"
        ),
    ] = None,
) -> None:
    """Print a new key, and only the key, on stdout."""
    settings()
    expires_at = _expiry(expires) if expires else None
    from sqlalchemy.exc import IntegrityError

    from app.api.auth import create_key
    from app.core.db import session_scope

    try:
        with session_scope() as session:
            _, secret = create_key(
                session,
                name=name,
                role=role,
                tenant=tenant,
                sources=_listed(sources),
                workloads=_listed(workloads),
                profiles=_listed(profiles),
                expires_at=expires_at,
            )
    except ValueError as exc:
        raise fail(str(exc)) from None
    except IntegrityError:
        raise fail(f"a key named {name!r} exists") from None
    echo(secret)


@keys_cli.command("list")
def keys_list() -> None:
    """The keys, without their secrets."""
    settings()
    from sqlmodel import col, select

    from app.authority.scope import describe as describe_scope
    from app.core.db import session_scope
    from app.core.models import ApiKey, utcnow

    with session_scope() as session:
        rows = session.exec(select(ApiKey).order_by(col(ApiKey.created_at))).all()
        now = utcnow()
        echo(
            f"{'NAME':24} {'ROLE':9} {'TENANT':16} {'CREATED':20} {'STATUS':8} "
            f"{'LAST USED':17} {'EXPIRES':17} SCOPE"
        )
        for k in rows:
            status = "retired" if k.revoked_at else "active"
            if status == "active" and k.expires_at is not None and k.expires_at <= now:
                status = "expired"
            scope = describe_scope(k.sources, k.workloads, k.profiles)
            used = f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "-"
            ends = f"{k.expires_at:%Y-%m-%d %H:%M}" if k.expires_at else "-"
            echo(
                f"{k.name:24} {k.role:9} {k.tenant or '*':16} "
                f"{k.created_at:%Y-%m-%d %H:%M:%S} {status:8} {used:17} {ends:17} {scope}"
            )


@keys_cli.command("revoke")
def keys_revoke(name: str) -> None:
    """Retire a key: it stops working within seconds."""
    settings()
    from sqlmodel import select

    from app.core.db import session_scope
    from app.core.models import ApiKey, utcnow

    with session_scope() as session:
        key = session.exec(select(ApiKey).where(ApiKey.name == name)).first()
        if key is None:
            raise fail(f"no key named {name!r}")
        key.revoked_at = key.revoked_at or utcnow()
    echo(f"key {name!r} retired")


# --- the audit export ------------------------------------------------------------


def _export_file(file: Path | None) -> Path:
    if file is not None:
        return file
    path = settings().audit_export_path
    if path is None:
        raise fail("LEASEHOLD_AUDIT_EXPORT is stdout (-): name the FILE to check")
    return path


@audit_cli.command("verify")
def audit_verify(
    file: Annotated[
        Path | None, typer.Argument(help="the export (default: LEASEHOLD_AUDIT_EXPORT)")
    ] = None,
    first_prev: Annotated[
        str | None,
        typer.Option(help="the hash the first line follows: a file that starts mid-chain"),
    ] = None,
) -> None:
    """Check the exported audit trail's hash chain; exit 1 naming the first bad line."""
    from app.audit_chain import is_hash, verify

    path = _export_file(file)
    if first_prev is not None and not is_hash(first_prev):
        raise fail("--first-prev must be 64 lowercase hex digits")
    try:
        with path.open("rb") as fh:
            verdict = verify(fh, first_prev=first_prev)
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    if not verdict.ok:
        raise fail(f"{path}:{verdict.bad_line}: {verdict.problem}")
    if verdict.lines == 0:
        echo(f"{path}: empty")
        return
    echo(
        f"{path}: {verdict.lines} lines, seq {verdict.first_seq}..{verdict.last_seq}, "
        f"chain intact; last hash {verdict.last_hash}"
    )


@audit_cli.command("status")
def audit_status(
    file: Annotated[
        Path | None, typer.Argument(help="the export (default: LEASEHOLD_AUDIT_EXPORT)")
    ] = None,
) -> None:
    """Compare the export's last line with the ledger's last exported entry (exit 1 if
    they differ): what a chain cannot show by itself, lines cut off the end."""
    settings()
    from sqlmodel import col, func, select

    from app.core.db import session_scope
    from app.core.models import AuditEntry
    from app.ledger import audit_export_head
    from schedules.audit_export import ExportError, read_tail

    with session_scope() as session:
        head, head_hash = audit_export_head(session)
        waiting = session.exec(
            select(func.count())
            .select_from(AuditEntry)
            .where(col(AuditEntry.exported_seq).is_(None))
        ).one()
    echo(f"ledger: exported up to seq {head} (hash {head_hash or '-'}); {waiting} waiting")
    if file is None and settings().audit_export_path is None:
        echo("export goes to stdout: nothing to compare")
        return
    path = _export_file(file)
    try:
        tail = read_tail(path, head, repair=False) if path.exists() else None
    except (ExportError, OSError) as exc:
        raise fail(f"{path}: {exc}") from None
    if tail is None or tail.last_seq is None:
        echo(f"file:   {path} is empty or missing (rotated?)")
        return
    echo(f"file:   {path} ends at seq {tail.last_seq} (hash {tail.last_hash})")
    if tail.last_seq < head:
        raise fail(f"the file ends {head - tail.last_seq} lines short of the ledger")
    if tail.last_seq == head and tail.last_hash != head_hash:
        raise fail("the file's last line is not the ledger's last exported entry")
    if tail.last_seq > head:
        echo("the file is ahead of the ledger: the next export marks those entries")
    else:
        echo("in step")


@audit_cli.command("export")
def audit_export(
    follow: Annotated[
        bool, typer.Option("--follow", help="keep exporting, every second, until stopped")
    ] = False,
) -> None:
    """Write audit entries not yet exported to LEASEHOLD_AUDIT_EXPORT (the scheduler does
    this every 2 s too; one exporter at a time)."""
    import time

    s = settings()
    from schedules.audit_export import ExportError, export

    while True:
        try:
            result = export()
        except ExportError as exc:
            raise fail(f"audit export stopped: {exc}") from None
        if not follow:
            if s.audit_export_path is not None:
                echo(
                    f"written {result.written}, reconciled {result.reconciled}, "
                    f"chain at seq {result.seq}"
                    + ("" if result.ran else " (another exporter holds the lock)"),
                    err=True,
                )
            return
        time.sleep(1.0)


@cli.command()
def api(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8700,
    workers: Annotated[int, typer.Option(help="API processes", min=1)] = 1,
) -> None:
    """The HTTP API."""
    settings()
    _checked_profiles()
    _checked_policy()
    import uvicorn

    uvicorn.run(
        "app.api:create_app",
        factory=True,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        workers=workers,
    )


@cli.command()
def proxy(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8701,
) -> None:
    """The proxy for `proxy` credentials: reverse mode (<url>/p/<credential id>/...) and,
    on the same port, forward mode (HTTP_PROXY / HTTPS_PROXY with CONNECT)."""
    settings()
    _checked_profiles()
    import uvicorn

    from app.proxy.forward import Sniffer

    uvicorn.run(
        "app.proxy.server:create_app",
        factory=True,
        http=Sniffer,  # the first request line picks forward mode or uvicorn's own
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # each request is audited instead; a URL may carry data
        limit_concurrency=1000,
        timeout_graceful_shutdown=5,
    )


@cli.command()
def worker(
    queues: Annotated[str, typer.Option(help="queues to consume")] = "revoke,mint",
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 2,
    beat: Annotated[bool, typer.Option("--beat", help="run the scheduler inside")] = False,
) -> None:
    """A Celery worker (revocations first)."""
    s = settings()
    _checked_profiles()
    from app.core.db import pre_ping
    from app.core.logs import configure_logging
    from app.queue import celery_app

    configure_logging(s)
    pre_ping(False)  # its jobs retry on OperationalError (app.core.db)
    argv = [
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "--loglevel",
        s.log_level,
        "-n",
        f"leasehold-{uuid.uuid4().hex[:8]}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        import schedules.beat  # noqa: F401  (installs the schedule)

        s.home.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule file there
        argv.append("-B")
    celery_app.worker_main(argv)


@cli.command("beat")
def beat_cmd() -> None:
    """The Celery beat scheduler: deadline sweeps and re-drives."""
    s = settings()
    import schedules.beat  # noqa: F401  (installs the schedule)
    from app.core.logs import configure_logging
    from app.queue import celery_app

    configure_logging(s)
    s.home.mkdir(parents=True, exist_ok=True)  # beat keeps its schedule file there
    celery_app.start(["beat", "--loglevel", s.log_level])


def _parse_grant(text: str) -> dict[str, str]:
    name, sep, profile = text.partition("=")
    if not sep or not name or not profile:
        raise typer.BadParameter(f"{text!r}: use NAME=PROFILE")
    return {"name": name, "profile": profile}


@cli.command()
def emit(
    type_: Annotated[
        str,
        typer.Argument(
            metavar="TYPE",
            help="started, heartbeat, succeeded, failed, cancelled (or task.started, ...)",
        ),
    ],
    task_id: Annotated[str, typer.Argument(help="the task's id (the event subject)")],
    grant: Annotated[list[str] | None, typer.Option(help="NAME=PROFILE, repeatable")] = None,
    max_duration: Annotated[int | None, typer.Option(help="seconds")] = None,
    workload: Annotated[str | None, typer.Option()] = None,
    parent: Annotated[str | None, typer.Option()] = None,
    source: Annotated[str, typer.Option(help="the CloudEvents source")] = "cli://leasehold",
    event_id: Annotated[str | None, typer.Option("--id", help="event id (default: new)")] = None,
) -> None:
    """Send one event, as an orchestrator would (LEASEHOLD_URL, LEASEHOLD_KEY)."""
    s = settings()
    if s.key is None:
        raise fail("set LEASEHOLD_KEY to an emitter key")
    kind = type_ if type_.startswith("task.") else f"task.{type_}"
    data: dict[str, Any] = {}
    if kind == "task.started":
        data["grants"] = [_parse_grant(g) for g in grant or []]
        data["max_duration"] = max_duration if max_duration is not None else 600
    elif max_duration is not None:
        data["max_duration"] = max_duration
    if workload:
        data["workload"] = workload
    if parent:
        data["parent"] = parent
    from leasehold_client import Client, LeaseholdError

    # A new id per command (unless given): each `emit` is its own event, and the
    # client's retries within it resend that one event.
    with Client(s.url, s.key.get_secret_value(), source=source) as client:
        try:
            answer = client.emit(kind, task_id, data, event_id=event_id or f"cli-{uuid.uuid4()}")
        except LeaseholdError as exc:
            echo(json.dumps(exc.body, indent=2))
            raise typer.Exit(1) from None
        except httpx.HTTPError as exc:
            raise fail(f"cannot reach {s.url}: {type(exc).__name__}") from None
    echo(json.dumps(answer.body, indent=2))


@cli.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    no_args_is_help=True,
)
def run(
    command: Annotated[list[str], typer.Argument(help="the command, after --")],
    grant: Annotated[list[str], typer.Option(help="NAME=PROFILE, repeatable")],
    task: Annotated[
        str | None, typer.Option(help="the task id (default: run/<host>/<random>)")
    ] = None,
    max_duration: Annotated[
        int | None,
        typer.Option(help="seconds (default: the smallest max_ttl of the grants' profiles)", min=1),
    ] = None,
    workload: Annotated[str | None, typer.Option()] = None,
    grace: Annotated[
        float, typer.Option(help="seconds between a forwarded signal and SIGKILL", min=0)
    ] = 10.0,
) -> None:
    """Run COMMAND as a task: its credentials in its environment, revoked when it ends
    (LEASEHOLD_URL, LEASEHOLD_KEY). Exits with COMMAND's code."""
    from leasehold_client import LeaseholdError

    from app.run import FAILED_TO_START, RunError
    from app.run import run as run_command

    grants: dict[str, str] = {}
    for text in grant:
        parsed = _parse_grant(text)
        if parsed["name"] in grants:
            raise typer.BadParameter(f"grant {parsed['name']!r} is given twice")
        grants[parsed["name"]] = parsed["profile"]
    try:
        code = run_command(
            command,
            grants=grants,
            task=task,
            max_duration=max_duration,
            workload=workload,
            grace=grace,
        )
    except RunError as exc:
        raise fail(f"run: {exc}", FAILED_TO_START) from None
    except LeaseholdError as exc:
        raise fail(f"run: the server refused: {exc}", FAILED_TO_START) from None
    except httpx.HTTPError as exc:
        raise fail(f"run: cannot reach the server: {type(exc).__name__}", FAILED_TO_START) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@cli.command()
def guide() -> None:
    """Print the agent-facing usage guide (what `leasehold run` gives a command; its
    path is in the command's LEASEHOLD_GUIDE)."""
    from app.run import GUIDE

    typer.echo(GUIDE.read_text())


def _api(s: Settings) -> httpx.Client:
    if s.key is None:
        raise fail("set LEASEHOLD_KEY to an operator (or admin) key, and LEASEHOLD_URL")
    return httpx.Client(
        base_url=s.url,
        headers={"Authorization": f"Bearer {s.key.get_secret_value()}"},
        timeout=httpx.Timeout(10.0, read=120.0),  # a throw takes its batches first
    )


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:200]}
    if response.status_code >= 400:
        raise fail(f"{response.status_code}: {body.get('error', body)}")
    return body if isinstance(body, dict) else {}


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width if total == 0 else min(width, width * done // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


@cli.command("revoke")
def revoke_switch(
    profile: Annotated[str | None, typer.Option(help="cut off this profile")] = None,
    workload: Annotated[str | None, typer.Option(help="cut off this workload")] = None,
    source: Annotated[str | None, typer.Option(help="cut off this event source")] = None,
    tenant: Annotated[
        str | None, typer.Option(help="cut off this tenant (an operator: its own only)")
    ] = None,
    wait: Annotated[
        bool, typer.Option(help="wait, with a progress bar, until the revocations are done")
    ] = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait at most", min=1)] = 600,
    as_json: Annotated[bool, typer.Option("--json", help="print the switch as JSON")] = False,
) -> None:
    """The kill switch (LEASEHOLD_URL, LEASEHOLD_KEY): revoke every credential matching
    all the options given (at least one) and refuse new ones until it is lifted
    (DELETE /v1/revocations/ID, or the dashboard)."""
    s = settings()
    match = {"profile": profile, "workload": workload, "source": source, "tenant": tenant}
    match = {k: v for k, v in match.items() if v}
    if not match:
        raise fail("name at least one of --profile, --workload, --source, --tenant", code=2)
    drawn = False
    with _api(s) as api:
        try:
            view = _answer(api.post("/v1/revocations", json=match))
            if not as_json:
                what = " ".join(f"{k}={v}" for k, v in view["match"].items() if v)
                echo(f"kill switch {view['id']} in force: {what}")
                echo(f"revoking {view['revoking']}, denied {view['denied']}")
            end = time.monotonic() + timeout
            while wait and not view.get("done") and time.monotonic() < end:
                if not as_json:  # the bar on stderr, redrawn in place
                    done = view["revoked"] + view["failed"]
                    total = done + view["remaining"] + view["live"]
                    typer.echo(f"\r{_bar(done, total)}", err=True, nl=False)
                    drawn = True
                time.sleep(0.5)
                view = _answer(api.get(f"/v1/revocations/{view['id']}"))
            if drawn:
                typer.echo("", err=True)
        except httpx.HTTPError as exc:
            raise fail(f"cannot reach {s.url}: {type(exc).__name__}") from None
    if as_json:
        echo(json.dumps(view, indent=2))
    else:
        done = view["revoked"] + view["failed"]
        total = done + view["remaining"] + view["live"]
        echo(_bar(done, total) + (" done" if view.get("done") else " (still revoking)"))
        if view["failed"]:
            echo(f"{view['failed']} revocations failed for good: see the dashboard")
    if wait and not view.get("done"):
        raise typer.Exit(1)


@cli.command()
def status() -> None:
    """Tasks and credentials at a glance (reads the ledger)."""
    settings()
    from app.core.db import session_scope
    from app.status import render_status

    _ledger_ready()
    with session_scope() as session:
        echo(render_status(session))


def _ledger_ready() -> None:
    """A ledger that cannot be read, or is not at the latest migration, is named as
    such (with what to do) instead of a traceback."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    from app.core.db import get_engine
    from app.core.migrate import alembic_config

    try:
        with get_engine().connect() as conn:
            current = set(MigrationContext.configure(conn).get_current_heads())
    except SQLAlchemyError as exc:
        raise fail(f"cannot read the ledger: {_without_urls(exc)}") from None
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    if current != heads:
        state = "has no tables yet" if not current else "is not up to date"
        raise fail(f"the ledger {state}: run `leasehold db upgrade`")


@cli.command()
def sweep() -> None:
    """Run the reconciliation once (after the deadline sweep), and print what it found."""
    from app.core.logs import configure_logging

    configure_logging(settings())
    from schedules.reconcile import reconcile, render_report
    from schedules.sweep import sweep_deadlines

    echo(f"timed out: {sweep_deadlines()} credential revocations requested")
    report = reconcile(trigger="cli")
    echo(render_report(report))
    if report.errors:
        raise typer.Exit(1)


@cli.command("webhook-secret")
def webhook_secret(profile: str) -> None:
    """Print the key PROFILE's approval webhook is signed with, for its receiver."""
    settings()
    from app.core.sealing import webhook_key
    from app.profiles import ProfileError, get_profiles

    try:
        found = get_profiles().get(profile)
    except ProfileError as exc:
        raise fail(str(exc)) from None
    if found is None or not found.approval_webhook:
        raise fail(f"profile {profile!r} has no approval_webhook")
    typer.echo(webhook_key(found).decode())


@cli.command()
def up(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8700,
) -> None:
    """Everything on one machine: ledger, API, worker with scheduler, and OpenBao dev."""
    from app.local.embedded import run_everything

    raise typer.Exit(run_everything(settings(), host=host, port=port))


# The on-call commands (app/oncall.py): over the API, listed after the rest.
cli.add_typer(oncall.credentials_cli, name="credentials")
cli.add_typer(oncall.tasks_cli, name="tasks")
cli.command("sweeps")(oncall.sweeps)
cli.command("tail")(oncall.tail)


def main() -> None:
    cli(prog_name="leasehold")


if __name__ == "__main__":
    main()
