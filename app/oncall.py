"""The on-call commands: `leasehold credentials`, `tasks`, `sweeps` and `tail`.

They talk to the API (LEASEHOLD_URL, with LEASEHOLD_KEY as the bearer key) like any
client, so they work from a laptop against a remote installation; `--json` prints the
API's answers for scripts, otherwise a table for people. Everything printed goes
through `printable()`: task ids, workloads and errors are what emitters wrote.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer

from app.core.models import CredState, TaskState
from app.status import printable

ENV_HELP = "Talks to the API at LEASEHOLD_URL with the key in LEASEHOLD_KEY."
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
MAX_PAGES = 20  # a list follows `next` at most this many pages (--all)
TAIL_PAGES = 10  # a tail poll reads at most this many pages of new entries

JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON, for scripts")]

credentials_cli = typer.Typer(no_args_is_help=True, help=f"The credential ledger. {ENV_HELP}")
tasks_cli = typer.Typer(no_args_is_help=True, help=f"Tasks and their credentials. {ENV_HELP}")


def _fail(message: str) -> typer.Exit:
    typer.echo(printable(f"leasehold: {message}"), err=True)
    return typer.Exit(1)


def _out(text: str) -> None:
    typer.echo(printable(text, keep="\n"))


class Api:
    """The API, as the key in LEASEHOLD_KEY; every call bounded by TIMEOUT."""

    def __init__(self) -> None:
        from app.cli import settings

        s = settings()
        if s.key is None:
            raise _fail("set LEASEHOLD_KEY to an operator (or admin) key")
        self.url = s.url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            timeout=TIMEOUT,
            headers={"Authorization": f"Bearer {s.key.get_secret_value()}"},
        )

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *_: object) -> None:
        self._client.close()

    def call(self, method: str, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        try:
            answer = self._client.request(method, path, params=query)
        except httpx.ConnectError:
            raise _fail(
                f"cannot connect to {self.url} (is the API running? LEASEHOLD_URL)"
            ) from None
        except httpx.TimeoutException:
            raise _fail(f"{self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise _fail(f"cannot reach {self.url}: {type(exc).__name__}") from None
        if answer.status_code == 401:
            raise _fail("the API refused the key (401): check LEASEHOLD_KEY")
        if answer.status_code == 403:
            raise _fail("this key may not do this (403): an operator or admin key is needed")
        try:
            body = answer.json()
        except ValueError:
            body = None
        if answer.status_code >= 400:
            error = body.get("error") if isinstance(body, dict) else None
            raise _fail(f"{answer.status_code}: {error or answer.reason_phrase}")
        return body

    def pages(self, path: str, *, every: bool, **params: Any) -> Iterator[dict[str, Any]]:
        cursor = None
        for _ in range(MAX_PAGES if every else 1):
            page = self.call("GET", path, cursor=cursor, **params)
            yield from page["items"]
            cursor = page.get("next")
            if not cursor:
                return


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    return text.replace("T", " ").removesuffix("Z")[:19] if _is_time(text) else text


def _is_time(text: str) -> bool:
    return len(text) >= 20 and text[4] == "-" and text[10] == "T" and text.endswith("Z")


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, int]]) -> str:
    """Columns: (field, heading, width); the last column is not cut."""
    lines = [" ".join(f"{h:{w}}" for _, h, w in columns).rstrip()]
    for row in rows:
        cells = []
        for i, (name, _, width) in enumerate(columns):
            text = printable(_cell(row.get(name)))
            last = i == len(columns) - 1
            cells.append(text if last else f"{text[:width]:{width}}")
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines)


def _print(data: Any, as_json: bool, render: Any) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2))  # JSON escapes control characters itself
    else:
        _out(render(data))


def _list(
    path: str,
    columns: list[tuple[str, str, int]],
    empty: str,
    *,
    as_json: bool,
    every: bool = False,
    **params: Any,
) -> None:
    """Print a list endpoint's rows (up to MAX_PAGES pages with `every`) as a table."""
    with Api() as api:
        rows = list(api.pages(path, every=every, **params))
    _print(rows, as_json, lambda r: table(r, columns) if r else empty)


TenantOpt = Annotated[str | None, typer.Option(help="an admin key: one tenant")]
LimitOpt = Annotated[int, typer.Option(min=1, max=500, help="per page")]
AllOpt = Annotated[bool, typer.Option("--all", help=f"follow up to {MAX_PAGES} pages")]


CRED_COLUMNS = [
    ("id", "ID", 28),
    ("task", "TASK", 32),
    ("grant", "GRANT", 10),
    ("profile", "PROFILE", 18),
    ("state", "STATE", 17),
    ("minted_at", "MINTED", 19),
    ("revoke_reason", "REASON", 10),
    ("last_error", "LAST ERROR", 0),
]


@credentials_cli.command("list")
def credentials_list(
    state: Annotated[CredState | None, typer.Option(help="only in this state")] = None,
    profile: Annotated[str | None, typer.Option(help="only of this profile")] = None,
    task: Annotated[
        str | None, typer.Option(help="only of this task (the orchestrator's id)")
    ] = None,
    tenant: TenantOpt = None,
    limit: LimitOpt = 50,
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The ledger's credentials, newest first, never a secret (an operator key;
    LEASEHOLD_URL, LEASEHOLD_KEY)."""
    _list(
        "/v1/credentials",
        CRED_COLUMNS,
        "no credentials",
        as_json=as_json,
        every=all_pages,
        state=state.value if state else None,
        profile=profile,
        task=task,
        tenant=tenant,
        limit=limit,
    )


@credentials_cli.command("revoke")
def credentials_revoke(
    credential_id: Annotated[str, typer.Argument(metavar="ID", help="the credential's id")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke one credential now, reason `manual` (an operator key; LEASEHOLD_URL,
    LEASEHOLD_KEY)."""
    with Api() as api:
        answer = api.call("POST", f"/v1/credentials/{quote(credential_id, safe='')}/revoke")
    _print(answer, as_json, lambda a: f"credential {credential_id}: {a.get('state', 'revoking')}")


TASK_COLUMNS = [
    ("id", "TASK", 40),
    ("state", "STATE", 10),
    ("started_at", "STARTED", 19),
    ("deadline", "DEADLINE", 19),
    ("ended_at", "ENDED", 19),
    ("workload", "WORKLOAD", 0),
]


@tasks_cli.command("list")
def tasks_list(
    state: Annotated[TaskState | None, typer.Option(help="only in this state")] = None,
    source: Annotated[str | None, typer.Option(help="only from this event source")] = None,
    workload: Annotated[str | None, typer.Option(help="only of this workload")] = None,
    tenant: TenantOpt = None,
    limit: LimitOpt = 50,
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Tasks, newest first (LEASEHOLD_URL, LEASEHOLD_KEY)."""
    _list(
        "/v1/tasks",
        TASK_COLUMNS,
        "no tasks",
        as_json=as_json,
        every=all_pages,
        state=state.value if state else None,
        source=source,
        workload=workload,
        tenant=tenant,
        limit=limit,
    )


def _render_task(task: dict[str, Any]) -> str:
    head = [
        f"task      {_cell(task.get('id'))}",
        f"state     {_cell(task.get('state'))}",
        f"started   {_cell(task.get('started_at'))}",
        f"deadline  {_cell(task.get('deadline'))}",
        f"ended     {_cell(task.get('ended_at'))}",
        f"parent    {_cell(task.get('parent'))}",
        "",
    ]
    creds = task.get("credentials") or []
    if not creds:
        return "\n".join([*head, "no credentials"])
    columns = [c for c in CRED_COLUMNS if c[0] != "task"]
    return "\n".join(head) + "\n" + table(creds, columns)


@tasks_cli.command("show")
def tasks_show(
    task_id: Annotated[str, typer.Argument(metavar="TASK", help="the orchestrator's task id")],
    tenant: Annotated[str | None, typer.Option(help="an admin key: the task's tenant")] = None,
    as_json: JsonOpt = False,
) -> None:
    """One task and its credentials (LEASEHOLD_URL, LEASEHOLD_KEY)."""
    with Api() as api:
        task = api.call("GET", f"/v1/tasks/{quote(task_id, safe='')}", tenant=tenant)
    _print(task, as_json, _render_task)


SWEEP_COLUMNS = [
    ("id", "ID", 28),
    ("started_at", "STARTED", 19),
    ("finished_at", "FINISHED", 19),
    ("checked", "CHECKED", 7),
    ("orphans_revoked", "ORPHANS", 7),
    ("vanished", "VANISHED", 8),
    ("rerevoked", "REREVOKED", 9),
    ("redriven", "REDRIVEN", 8),
    ("errors", "ERRORS", 0),
]


def sweeps(
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recent reconciliation sweeps and what they found (an admin key; LEASEHOLD_URL,
    LEASEHOLD_KEY)."""
    _list("/v1/sweeps", SWEEP_COLUMNS, "no sweeps yet", as_json=as_json, limit=limit)


TAIL_COLUMNS = [
    ("at", "AT", 19),
    ("action", "ACTION", 18),
    ("actor", "ACTOR", 16),
    ("task", "TASK", 32),
    ("credential", "CREDENTIAL", 28),
    ("reason", "REASON", 10),
    ("detail", "DETAIL", 0),
]


def _new_entries(api: Api, after: str | None, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries with ids above `after` (None: the last 20), oldest first (ids are
    time-ordered); at most TAIL_PAGES pages a poll, so a burst is bounded."""
    found: list[dict[str, Any]] = []
    cursor = None
    for _ in range(TAIL_PAGES):
        limit = 20 if after is None else 500
        page = api.call("GET", "/v1/audit", cursor=cursor, limit=limit, **params)
        items = page["items"]
        fresh = [e for e in items if after is None or e["id"] > after]
        found.extend(fresh)
        cursor = page.get("next")
        if after is None or len(fresh) < len(items) or not cursor:
            break
    return list(reversed(found))


def tail(
    action: Annotated[
        str | None, typer.Option(help="only this action (minted, revoked, ...)")
    ] = None,
    task: Annotated[str | None, typer.Option(help="only this task")] = None,
    tenant: TenantOpt = None,
    interval: Annotated[float, typer.Option(min=0.2, max=60, help="seconds between polls")] = 1.0,
    seconds: Annotated[
        float | None, typer.Option("--for", min=0, help="stop after this many seconds")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Events, mints, claims and revocations as they happen (LEASEHOLD_URL, LEASEHOLD_KEY).

    Polls the audit trail (GET /v1/audit); starts with the last 20 entries; --json
    prints one JSON object a line."""
    params = {"action": action, "task": task, "tenant": tenant}
    end = None if seconds is None else time.monotonic() + seconds
    after: str | None = None  # None: the first poll
    heading = not as_json
    with Api() as api:
        while True:
            entries = _new_entries(api, after, params)
            if after is None:
                after = ""  # every id is above "": from now on everything is new
            if entries:
                after = entries[-1]["id"]
            for entry in entries:
                if as_json:
                    typer.echo(json.dumps(entry))
                    continue
                if heading:
                    _out(table([], TAIL_COLUMNS))
                    heading = False
                _out(table([entry], TAIL_COLUMNS).split("\n", 1)[1])
            if end is not None and time.monotonic() >= end:
                return
            time.sleep(interval if end is None else max(0, min(interval, end - time.monotonic())))
