"""`leasehold`: the one entry point."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import typer
from pydantic import ValidationError

from app.models import Role
from app.redact import clip
from app.settings import Settings, get_settings

# No local variables in tracebacks: they may hold secrets (typer < 0.13 shows them).
cli = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_show_locals=False
)
db_cli = typer.Typer(no_args_is_help=True, help="The ledger database.")
keys_cli = typer.Typer(no_args_is_help=True, help="API keys.")
cli.add_typer(db_cli, name="db")
cli.add_typer(keys_cli, name="keys")


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
    from app.db import session_scope
    from app.profiles import ProfileError
    from app.startup import check

    try:
        with session_scope() as session:
            check(session)
    except ProfileError as exc:
        raise fail(str(exc)) from None


def _checked_policy() -> None:
    """An invalid policy file refuses the start with its message (the API warns if none)."""
    from app import policy

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
    from app.migrate import upgrade

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

    from app.models import utcnow

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
    from app.db import session_scope

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
    from sqlmodel import select

    from app.db import session_scope
    from app.models import ApiKey, utcnow
    from app.scope import describe as describe_scope

    with session_scope() as session:
        rows = session.exec(select(ApiKey).order_by(ApiKey.created_at)).all()
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

    from app.db import session_scope
    from app.models import ApiKey, utcnow

    with session_scope() as session:
        key = session.exec(select(ApiKey).where(ApiKey.name == name)).first()
        if key is None:
            raise fail(f"no key named {name!r}")
        key.revoked_at = key.revoked_at or utcnow()
    echo(f"key {name!r} retired")


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
def worker(
    queues: Annotated[str, typer.Option(help="queues to consume")] = "revoke,mint",
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 2,
    beat: Annotated[bool, typer.Option("--beat", help="run the scheduler inside")] = False,
) -> None:
    """A Celery worker (revocations first)."""
    s = settings()
    _checked_profiles()
    from app.logs import configure_logging
    from app.queue import celery_app

    configure_logging(s)
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
    from app.logs import configure_logging
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
    """Tasks and credentials at a glance."""
    settings()
    from app.db import session_scope
    from app.status import render_status

    with session_scope() as session:
        echo(render_status(session))


@cli.command()
def sweep() -> None:
    """Run the reconciliation once (after the deadline sweep), and print what it found."""
    from app.logs import configure_logging

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
    from app.profiles import ProfileError, get_profiles
    from app.sealing import webhook_key

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
    from app.embedded import run_everything

    raise typer.Exit(run_everything(settings(), host=host, port=port))


def main() -> None:
    cli(prog_name="leasehold")


if __name__ == "__main__":
    main()
