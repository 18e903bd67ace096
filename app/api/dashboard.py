"""/dashboard: the operators' view, server-rendered and refreshed by a small script.

Sign-in exchanges an operator or admin key for a signed session cookie
(HttpOnly, SameSite=Strict, 8 hours, Secure over https, Path=/dashboard so it
never rides along to the API). The key itself is not kept: the cookie names
the key's id, and a retired key ends its sessions. The session also has a row
in the ledger (by a hash of its nonce): signing out closes it, so a copied
cookie stops working. State-changing forms carry a CSRF token bound to the
session. An operator sees only its tenant.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy import delete, update
from sqlmodel import Session, col

from app import ledger, overview, policy
from app.api.auth import lookup_key
from app.api.credentials import (
    DecisionIn,
    approve_credential,
    deny_credential,
    revoke_credential,
)
from app.api.errors import ApiError
from app.db import SessionDep, get_engine
from app.models import ApiKey, Credential, CredState, DashboardSession, Role, Task, utcnow
from app.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent
router = APIRouter(prefix="/dashboard", include_in_schema=False)
templates = Jinja2Templates(directory=ROOT / "templates")
templates.env.filters["ago"] = overview.ago
templates.env.filters["duration"] = overview.duration

COOKIE = "lh_session"
SESSION_SECONDS = 8 * 3600
MAX_FORM = 4096
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


# --- the session cookie ------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, purpose: bytes, message: bytes) -> bytes:
    derived = hmac.new(key, purpose, hashlib.sha256).digest()
    return hmac.new(derived, message, hashlib.sha256).digest()


def new_session(key_id: str, *, now: float | None = None) -> str:
    expires = int((now or time.time()) + SESSION_SECONDS)
    payload = _b64(json.dumps([key_id, expires, secrets.token_urlsafe(16)]).encode())
    sig = _mac(get_settings().secret_keys[0], b"leasehold-session", payload.encode())
    return f"lhs.{payload}.{_b64(sig)}"


def read_session(token: str, *, now: float | None = None) -> tuple[str, str] | None:
    """(key id, nonce) of a well-signed, unexpired session; any configured key verifies."""
    try:
        prefix, payload, sig = token.split(".")
        if prefix != "lhs":
            return None
        given = _unb64(sig)
        if not any(
            hmac.compare_digest(_mac(k, b"leasehold-session", payload.encode()), given)
            for k in get_settings().secret_keys
        ):
            return None
        key_id, expires, nonce = json.loads(_unb64(payload))
    except (ValueError, TypeError):
        return None
    if int(expires) <= (now or time.time()):
        return None
    return str(key_id), str(nonce)


def session_row_id(nonce: str) -> str:
    """The server-side session's id: a hash, so the table alone names no cookie."""
    return hashlib.sha256(nonce.encode()).hexdigest()


def open_session(session: Session, key_id: str, *, now: float | None = None) -> str:
    """A new cookie and its row; expired rows go at the same time."""
    token = new_session(key_id, now=now)
    parsed = read_session(token, now=now)
    assert parsed is not None
    at = datetime.fromtimestamp(now or time.time(), UTC)
    session.execute(delete(DashboardSession).where(col(DashboardSession.expires_at) < at))
    session.add(
        DashboardSession(
            id=session_row_id(parsed[1]),
            key_id=key_id,
            created_at=at,
            expires_at=at + timedelta(seconds=SESSION_SECONDS),
        )
    )
    return token


def end_session(session: Session, nonce: str) -> None:
    session.execute(
        update(DashboardSession)
        .where(
            col(DashboardSession.id) == session_row_id(nonce),
            col(DashboardSession.ended_at).is_(None),
        )
        .values(ended_at=utcnow())
    )


def csrf_token(nonce: str) -> str:
    return _b64(_mac(get_settings().secret_keys[0], b"leasehold-csrf", nonce.encode()))


def csrf_ok(nonce: str, given: str | None) -> bool:
    if not given:
        return False
    try:
        raw = _unb64(given)
    except ValueError:
        return False
    return any(
        hmac.compare_digest(_mac(k, b"leasehold-csrf", nonce.encode()), raw)
        for k in get_settings().secret_keys
    )


@dataclass
class Viewer:
    key: ApiKey
    nonce: str

    @property
    def csrf(self) -> str:
        return csrf_token(self.nonce)

    def scope(self, asked: str | None) -> str | None:
        """An operator's own tenant; an admin's choice (None: all)."""
        if self.key.role == Role.admin:
            return asked or None
        return self.key.tenant


def viewer_of(request: Request, session: Session) -> Viewer | None:
    token = request.cookies.get(COOKIE)
    parsed = read_session(token) if token else None
    if parsed is None:
        return None
    key_id, nonce = parsed
    row = session.get(DashboardSession, session_row_id(nonce))
    if row is None or row.ended_at is not None or row.key_id != key_id:
        return None  # signed out, or never opened here
    if row.expires_at <= utcnow():
        return None
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None or key.role not in (Role.operator, Role.admin):
        return None
    return Viewer(key=key, nonce=nonce)


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
    if len(body) > MAX_FORM:
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


def snapshot(session: Session, scope: str | None) -> dict[str, Any]:
    now = utcnow()
    alert_after = get_settings().revoke_alert_after
    return {
        "now": now,
        "alert_after": alert_after,
        "summary": overview.summary(session, tenant=scope, now=now, alert_after=alert_after),
        "awaiting": overview.awaiting_approval(session, tenant=scope),
        "live": overview.live_credentials(session, tenant=scope),
        "recent": overview.recent_revocations(session, tenant=scope),
        "failing": overview.failing_revocations(session, tenant=scope, alert_after=alert_after),
        "policy": _policy_line(),
        **_slow_parts(session, scope, now),
    }


# --- the chart: inline SVG, computed here ------------------------------------

W, H, LEFT, RIGHT = 760, 230, 56, 12
BARS_TOP, BARS_BOTTOM = 16, 96
LAT_TOP, LAT_BOTTOM = 126, 206


def _lat_y(value: float, lo: float, hi: float) -> float:
    value = min(max(value, lo), hi)
    frac = (math.log10(value) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return round(LAT_BOTTOM - frac * (LAT_BOTTOM - LAT_TOP), 1)


def chart(series: overview.Series) -> dict[str, Any]:
    """Bars of revocations per bucket over p50/p99 lines of time to revoke (log scale)."""
    n = len(series.buckets)
    step = (W - LEFT - RIGHT) / n
    most = max((b.count for b in series.buckets), default=0)
    worst = max((b.p99 for b in series.buckets if b.p99 is not None), default=0.0)
    lo, hi = 0.001, 10 ** max(0, math.ceil(math.log10(worst))) if worst > 0 else 1.0
    bars: list[dict[str, Any]] = []
    lines: dict[str, list[list[str]]] = {"p50": [[]], "p99": [[]]}
    dots: dict[str, list[dict[str, Any]]] = {"p50": [], "p99": []}
    for i, b in enumerate(series.buckets):
        x = LEFT + i * step
        if b.count:
            height = max(1.0, (BARS_BOTTOM - BARS_TOP) * b.count / most)
            bars.append(
                {
                    "x": round(x + 1, 1),
                    "y": round(BARS_BOTTOM - height, 1),
                    "w": round(step - 2, 1),
                    "h": round(height, 1),
                    "title": (
                        f"{b.start:%H:%M} UTC: {b.count} revoked, "
                        f"p50 {overview.duration(b.p50)}, p99 {overview.duration(b.p99)}"
                    ),
                }
            )
        for name in ("p50", "p99"):
            value = getattr(b, name)
            if value is None:
                if lines[name][-1]:
                    lines[name].append([])  # a gap: start a new line
                continue
            cx, cy = round(x + step / 2, 1), _lat_y(value, lo, hi)
            lines[name][-1].append(f"{cx},{cy}")
            dots[name].append(
                {
                    "x": cx,
                    "y": cy,
                    "title": f"{b.start:%H:%M} UTC: {name} {overview.duration(value)}",
                }
            )
    ticks = []
    exp = -3
    while 10.0**exp <= hi * 1.0001:
        ticks.append({"y": _lat_y(10.0**exp, lo, hi), "label": overview.duration(10.0**exp)})
        exp += 1
    minutes = int((series.width * n).total_seconds() // 60)
    return {
        "w": W,
        "h": H,
        "left": LEFT,
        "right": W - RIGHT,
        "bars_top": BARS_TOP,
        "bars_bottom": BARS_BOTTOM,
        "lat_top": LAT_TOP,
        "lat_bottom": LAT_BOTTOM,
        "most": most,
        "bars": bars,
        "ticks": ticks,
        "p50": [" ".join(pts) for pts in lines["p50"] if pts],
        "p99": [" ".join(pts) for pts in lines["p99"] if pts],
        "dots": dots,
        "x_labels": [
            {"x": LEFT, "label": f"-{minutes}m"},
            {"x": round(LEFT + (W - LEFT - RIGHT) / 2, 1), "label": f"-{minutes // 2}m"},
            {"x": W - RIGHT, "label": "now"},
        ],
        "empty": most == 0,
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


@router.get("/credentials/{credential_id}/revoke", response_class=HTMLResponse)
def confirm_revoke(request: Request, credential_id: str, session: SessionDep) -> Response:
    """The confirmation, as a page (the script shows the same form in a dialog)."""
    viewer = viewer_of(request, session)
    if viewer is None:
        return _to("/dashboard/login")
    cred = session.get(Credential, credential_id)
    scope = viewer.scope(None)
    if cred is None or (scope is not None and cred.tenant != scope):
        return _page(
            request, "message.html", status=404, title="Not found", message="No such credential."
        )
    task = session.get(Task, cred.task_id)
    return _page(request, "confirm_revoke.html", viewer=viewer, cred=cred, task=task)


def _revoke(request: Request, credential_id: str, csrf: str | None) -> tuple[int, str]:
    with Session(get_engine(), expire_on_commit=False) as session:
        viewer = viewer_of(request, session)
        if viewer is None:
            return 401, "Sign in again."
        if not csrf_ok(viewer.nonce, csrf):
            return 403, "Refused: missing or wrong CSRF token."
        try:  # the API's own revoke: same ledger transition, audit entry and enqueue
            revoke_credential(credential_id, viewer.key, session)
        except ApiError as exc:
            return exc.status, exc.message
    return 202, ""


@router.post("/credentials/{credential_id}/revoke")
async def revoke(request: Request, credential_id: str) -> Response:
    form = await _form(request)
    if not _same_origin(request):
        return _page(
            request,
            "message.html",
            status=403,
            title="Refused",
            message="Cross-site request refused.",
        )
    status, message = await run_in_threadpool(_revoke, request, credential_id, form.get("csrf"))
    if status == 202:
        return _to(f"/dashboard?{urlencode({'revoked': credential_id})}")
    if status == 401:
        return _to("/dashboard/login")
    return _page(request, "message.html", status=status, title="Not revoked", message=message)


@router.get("/credentials/{credential_id}/decide", response_class=HTMLResponse)
def confirm_decision(request: Request, credential_id: str, session: SessionDep) -> Response:
    """A grant awaiting approval, with its task's context, and the approve/deny form."""
    viewer = viewer_of(request, session)
    if viewer is None:
        return _to("/dashboard/login")
    cred = session.get(Credential, credential_id)
    scope = viewer.scope(None)
    if cred is None or (scope is not None and cred.tenant != scope):
        return _page(
            request, "message.html", status=404, title="Not found", message="No such credential."
        )
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


def _decide(
    request: Request, credential_id: str, form: dict[str, str], approve: bool
) -> tuple[int, str]:
    with Session(get_engine(), expire_on_commit=False) as session:
        viewer = viewer_of(request, session)
        if viewer is None:
            return 401, "Sign in again."
        if not csrf_ok(viewer.nonce, form.get("csrf")):
            return 403, "Refused: missing or wrong CSRF token."
        try:
            body = DecisionIn(reason=form.get("reason") or None)
        except ValidationError as exc:
            return 422, "Reason: " + "; ".join(e["msg"] for e in exc.errors())
        decide = approve_credential if approve else deny_credential
        try:  # the API's own endpoint: same ledger transition, audit entry and enqueue
            decide(credential_id, viewer.key, session, body)
        except ApiError as exc:
            return exc.status, exc.message
    return 200, ""


async def _decision(request: Request, credential_id: str, approve: bool) -> Response:
    form = await _form(request)
    if not _same_origin(request):
        return _page(
            request,
            "message.html",
            status=403,
            title="Refused",
            message="Cross-site request refused.",
        )
    status, message = await run_in_threadpool(_decide, request, credential_id, form, approve)
    if status == 200:
        done = "approved" if approve else "denied"
        return _to(f"/dashboard?{urlencode({done: credential_id})}")
    if status == 401:
        return _to("/dashboard/login")
    title = "Not approved" if approve else "Not denied"
    return _page(request, "message.html", status=status, title=title, message=message)


@router.post("/credentials/{credential_id}/approve")
async def approve(request: Request, credential_id: str) -> Response:
    return await _decision(request, credential_id, approve=True)


@router.post("/credentials/{credential_id}/deny")
async def deny(request: Request, credential_id: str) -> Response:
    return await _decision(request, credential_id, approve=False)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=ROOT / "static"), name="dashboard-static")
