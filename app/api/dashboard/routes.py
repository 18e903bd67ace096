"""/dashboard's pages and forms: sign-in and -out, the live view, revoke, approve and deny,
and the kill switch (throw, lift).

Sign-in exchanges an operator or admin key for a session cookie (sessions.py:
HttpOnly, SameSite=Strict, 8 hours, Secure over https, Path=/dashboard so it
never rides along to the API). Every form is read within its limit first, then
checked for origin, session and CSRF token. An operator sees only its tenant.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlmodel import Session, col, select

from app import ledger
from app.api.auth import lookup_key
from app.api.credentials import (
    DecisionIn,
    approve_credential,
    deny_credential,
    revoke_credential,
)
from app.api.dashboard.chart import chart
from app.api.dashboard.sessions import (
    COOKIE,
    SESSION_SECONDS,
    Viewer,
    csrf_ok,
    end_session,
    open_session,
    viewer_of,
)
from app.api.errors import ApiError
from app.api.limits import MAX_FORM_BODY
from app.api.revocations import SwitchIn, switch_view
from app.api.revocations import lift as lift_switch
from app.api.revocations import throw as throw_switch
from app.authority import policy
from app.core.db import SessionDep, get_engine
from app.core.models import Credential, CredState, KillSwitch, Role, Task, utcnow
from app.core.settings import get_settings
from app.observability import overview

ROOT = Path(__file__).resolve().parents[2]  # app/
router = APIRouter(prefix="/dashboard", include_in_schema=False)
templates = Jinja2Templates(directory=ROOT / "templates")
templates.env.filters["ago"] = overview.ago
templates.env.filters["duration"] = overview.duration

SLOW_SECONDS = 5.0  # chart, interceptions and sweeps: heavier queries, refreshed less often
SECURITY_HEADERS = {
    # No inline script, nothing from elsewhere; the chart is inline SVG markup.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",  # a framed revoke button is a clickjacking target
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: under it a browser sends "Origin: null" with our own form posts.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


def _page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
    return _secure(templates.TemplateResponse(request, name, context, status_code=status))


def _to(url: str) -> Response:
    return _secure(RedirectResponse(url, status_code=303))


def _same_origin(request: Request) -> bool:
    """A browser's Origin (or Referer) must be us; non-browser clients send neither."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin or origin == "null":
        return origin is None
    own = f"{request.url.scheme}://{request.url.netloc}"
    return origin == own or origin.startswith(own + "/")


async def _form(request: Request) -> dict[str, str]:
    """Read first, before any session or CSRF check: the limit (app.api.limits) holds."""
    body = await request.body()
    if len(body) > MAX_FORM_BODY:
        return {}
    parsed = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    return {k: v[0] for k, v in parsed.items()}


# --- what the page shows -----------------------------------------------------


_slow_lock = threading.Lock()
_slow_cache: dict[str | None, tuple[float, dict[str, Any]]] = {}


def _slow_parts(session: Session, scope: str | None, now: datetime) -> dict[str, Any]:
    with _slow_lock:
        hit = _slow_cache.get(scope)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
    parts = {
        "chart": chart(overview.revocation_series(session, tenant=scope, now=now)),
        "interceptions": overview.interceptions(session, tenant=scope),
        "sweeps": overview.sweeps(session),
    }
    with _slow_lock:
        if len(_slow_cache) > 1000:
            _slow_cache.clear()
        _slow_cache[scope] = (time.monotonic() + SLOW_SECONDS, parts)
    return parts


def _policy_line() -> dict[str, Any]:
    """Which policy set is in force, since when, and whether the file on disk was refused."""
    try:
        status = policy.engine().status()
    except policy.PolicyError as exc:
        return {"sha": None, "loaded_at": None, "count": 0, "error": str(exc)}
    loaded = status.in_force
    return {
        "sha": loaded.sha[:12] if loaded else None,
        "loaded_at": loaded.loaded_at if loaded else None,
        "count": loaded.count if loaded else 0,
        "error": status.error,
    }


def _switches(session: Session, scope: str | None) -> list[dict[str, Any]]:
    """The kill switches in force (a tenant's, or all for an admin), with progress."""
    query = select(KillSwitch).where(col(KillSwitch.lifted_at).is_(None))
    if scope is not None:
        query = query.where(KillSwitch.tenant == scope)
    rows = session.exec(query.order_by(col(KillSwitch.id).desc()).limit(50))
    return [switch_view(session, s) for s in rows]


def snapshot(session: Session, scope: str | None) -> dict[str, Any]:
    now = utcnow()
    alert_after = get_settings().revoke_alert_after
    return {
        "now": now,
        "alert_after": alert_after,
        "summary": overview.summary(session, tenant=scope, now=now, alert_after=alert_after),
        "awaiting": overview.awaiting_approval(session, tenant=scope),
        "live": (live := overview.live_credentials(session, tenant=scope)),
        "proxy_counts": overview.proxy_counts(session, [r.id for r in live if r.issuer == "proxy"]),
        "recent": overview.recent_revocations(session, tenant=scope),
        "failing": overview.failing_revocations(session, tenant=scope, alert_after=alert_after),
        "policy": _policy_line(),
        "switches": _switches(session, scope),
        **_slow_parts(session, scope, now),
    }


# --- routes ------------------------------------------------------------------


@router.get("", response_class=HTMLResponse)
def dashboard(
    request: Request,
    session: SessionDep,
    tenant: str | None = None,
    revoked: str | None = None,
    approved: str | None = None,
    denied: str | None = None,
    switch: str | None = None,
) -> Response:
    viewer = viewer_of(request, session)
    if viewer is None:
        return _to("/dashboard/login")
    scope = viewer.scope(tenant)
    notice = None
    if revoked:
        notice = "Revocation requested; it shows below as soon as it is verified."
    elif approved:
        notice = "Approved; the credential is being minted for its task."
    elif denied:
        notice = "Denied; the credential will never be minted."
    elif switch in SWITCH_NOTICES:
        notice = SWITCH_NOTICES[switch]
    query = urlencode({"tenant": scope}) if viewer.key.role == Role.admin and scope else ""
    return _page(
        request,
        "dashboard.html",
        viewer=viewer,
        scope=scope,
        notice=notice,
        live_url="/dashboard/live" + (f"?{query}" if query else ""),
        **snapshot(session, scope),
    )


@router.get("/live", response_class=HTMLResponse)
def live(request: Request, session: SessionDep, tenant: str | None = None) -> Response:
    """The refreshed part of the page, polled every ~2 s by dashboard.js."""
    viewer = viewer_of(request, session)
    if viewer is None:
        return _secure(HTMLResponse("sign in again", status_code=401))
    scope = viewer.scope(tenant)
    return _page(request, "_live.html", viewer=viewer, scope=scope, **snapshot(session, scope))


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, session: SessionDep) -> Response:
    if viewer_of(request, session) is not None:
        return _to("/dashboard")
    return _page(request, "login.html", error=None)


def _sign_in(secret: str) -> tuple[str | None, str | None, int]:
    """(cookie, error, status): a session for an operator or admin key."""
    with Session(get_engine(), expire_on_commit=False) as session:
        key = lookup_key(session, secret) if secret else None
        if key is None:
            return None, "That key is not valid.", 401
        if key.role not in (Role.operator, Role.admin):
            return None, f"An {key.role} key cannot sign in; use an operator or admin key.", 403
        token = open_session(session, key.id)
        session.commit()
    return token, None, 200


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    form = await _form(request)
    if not _same_origin(request):
        return _page(request, "login.html", status=403, error="Cross-site sign-in refused.")
    token, error, status = await run_in_threadpool(_sign_in, form.get("key", "").strip())
    if token is None:
        return _page(request, "login.html", status=status, error=error)
    response = _to("/dashboard")
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    form = await _form(request)
    viewer = await run_in_threadpool(_viewer_in_own_session, request)
    if viewer is None or not _same_origin(request) or not csrf_ok(viewer.nonce, form.get("csrf")):
        return _secure(HTMLResponse("refused: missing or wrong CSRF token", status_code=403))
    await run_in_threadpool(_sign_out, viewer.nonce)
    response = _to("/dashboard/login")
    response.delete_cookie(
        COOKIE,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


def _sign_out(nonce: str) -> None:
    with Session(get_engine()) as session:
        end_session(session, nonce)
        session.commit()


def _viewer_in_own_session(request: Request) -> Viewer | None:
    with Session(get_engine(), expire_on_commit=False) as session:
        return viewer_of(request, session)


def _visible_credential(
    request: Request, session: Session, credential_id: str
) -> tuple[Viewer, Credential] | Response:
    """The signed-in viewer and a credential in its scope; else the page that says why."""
    viewer = viewer_of(request, session)
    if viewer is None:
        return _to("/dashboard/login")
    cred = session.get(Credential, credential_id)
    scope = viewer.scope(None)
    if cred is None or (scope is not None and cred.tenant != scope):
        return _page(
            request, "message.html", status=404, title="Not found", message="No such credential."
        )
    return viewer, cred


# A form's action, run as the signed-in viewer: the dashboard query its redirect
# carries; an ApiError is shown on a message page.
FormAction = Callable[[Viewer, Session, dict[str, str]], dict[str, str]]


def _act(request: Request, form: dict[str, str], action: FormAction) -> tuple[int, Any]:
    """(200, the action's query) or (status, message), checking the session and CSRF token."""
    with Session(get_engine(), expire_on_commit=False) as session:
        viewer = viewer_of(request, session)
        if viewer is None:
            return 401, "Sign in again."
        if not csrf_ok(viewer.nonce, form.get("csrf")):
            return 403, "Refused: missing or wrong CSRF token."
        try:  # the API's own endpoints: same ledger transition, audit entry and enqueue
            return 200, action(viewer, session, form)
        except ApiError as exc:
            return exc.status, exc.message


async def _post_form(request: Request, action: FormAction, failed: str) -> Response:
    """A same-origin form post: its action, then back to the dashboard with a notice,
    or a message page titled `failed`."""
    form = await _form(request)
    if not _same_origin(request):
        return _page(
            request,
            "message.html",
            status=403,
            title="Refused",
            message="Cross-site request refused.",
        )
    status, result = await run_in_threadpool(_act, request, form, action)
    if status == 200:
        return _to(f"/dashboard?{urlencode(result)}")
    if status == 401:
        return _to("/dashboard/login")
    return _page(request, "message.html", status=status, title=failed, message=result)


@router.get("/credentials/{credential_id}/revoke", response_class=HTMLResponse)
def confirm_revoke(request: Request, credential_id: str, session: SessionDep) -> Response:
    """The confirmation, as a page (the script shows the same form in a dialog)."""
    found = _visible_credential(request, session, credential_id)
    if isinstance(found, Response):
        return found
    viewer, cred = found
    task = session.get(Task, cred.task_id)
    return _page(request, "confirm_revoke.html", viewer=viewer, cred=cred, task=task)


@router.post("/credentials/{credential_id}/revoke")
async def revoke(request: Request, credential_id: str) -> Response:
    def action(viewer: Viewer, session: Session, form: dict[str, str]) -> dict[str, str]:
        revoke_credential(credential_id, viewer.key, session)
        return {"revoked": credential_id}

    return await _post_form(request, action, "Not revoked")


@router.get("/credentials/{credential_id}/decide", response_class=HTMLResponse)
def confirm_decision(request: Request, credential_id: str, session: SessionDep) -> Response:
    """A grant awaiting approval, with its task's context, and the approve/deny form."""
    found = _visible_credential(request, session, credential_id)
    if isinstance(found, Response):
        return found
    viewer, cred = found
    if cred.state != CredState.awaiting_approval:
        return _page(
            request,
            "message.html",
            status=409,
            title="Already decided",
            message=f"This credential is {cred.state}, not awaiting approval.",
        )
    task = session.get(Task, cred.task_id)
    requested = None
    if task is not None and task.deadline is not None and task.started_at is not None:
        requested = int((task.deadline - task.started_at).total_seconds())
    return _page(
        request,
        "decide.html",
        viewer=viewer,
        cred=cred,
        task=task,
        requested=requested,
        now=utcnow(),
        max_reason=ledger.MAX_DECISION_REASON,
    )


async def _decision(request: Request, credential_id: str, approve: bool) -> Response:
    def action(viewer: Viewer, session: Session, form: dict[str, str]) -> dict[str, str]:
        try:
            body = DecisionIn(reason=form.get("reason") or None)
        except ValidationError as exc:
            raise ApiError(422, "Reason: " + "; ".join(e["msg"] for e in exc.errors())) from None
        decide = approve_credential if approve else deny_credential
        decide(credential_id, viewer.key, session, body)
        return {"approved" if approve else "denied": credential_id}

    return await _post_form(request, action, "Not approved" if approve else "Not denied")


@router.post("/credentials/{credential_id}/approve")
async def approve(request: Request, credential_id: str) -> Response:
    return await _decision(request, credential_id, approve=True)


@router.post("/credentials/{credential_id}/deny")
async def deny(request: Request, credential_id: str) -> Response:
    return await _decision(request, credential_id, approve=False)


# --- the kill switch -----------------------------------------------------------

SWITCH_NOTICES = {
    "thrown": "Kill switch thrown: what it matches is being revoked (see its progress "
    "below); new mints for the match are refused until it is lifted.",
    "lifted": "Kill switch lifted: matching credentials may be minted again.",
}


async def _switch_form(request: Request, switch_id: str | None) -> Response:
    """Throw (switch_id None) or lift a switch through the API's own endpoints."""

    def action(viewer: Viewer, session: Session, form: dict[str, str]) -> dict[str, str]:
        if switch_id is not None:
            lift_switch(switch_id, viewer.key, session)
            return {"switch": "lifted"}
        fields = {f: form.get(f, "").strip() or None for f in ledger.SWITCH_FIELDS}
        try:
            body = SwitchIn(**fields)
        except ValidationError as exc:
            message = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())
            raise ApiError(422, message) from None
        throw_switch(body, viewer.key)
        return {"switch": "thrown"}

    return await _post_form(request, action, "Not lifted" if switch_id else "Not thrown")


@router.post("/revocations")
async def throw(request: Request) -> Response:
    return await _switch_form(request, None)


@router.post("/revocations/{switch_id}/lift")
async def lift(request: Request, switch_id: str) -> Response:
    return await _switch_form(request, switch_id)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=ROOT / "static"), name="dashboard-static")
