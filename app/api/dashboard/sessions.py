"""The dashboard's sign-in: a signed session cookie, its server-side row, and CSRF tokens.

The cookie names the key's id (the key itself is not kept), an expiry and a
nonce, signed by app.core.sealing's signer (the one the claim tokens use, under a
purpose of its own). The session also has a row in the ledger (by a hash of
its nonce): signing out closes it, so a copied cookie stops working, and a
retired key ends its sessions. State-changing forms carry a CSRF token: the
nonce signed for another purpose.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import Request
from sqlalchemy import delete, update
from sqlmodel import Session, col

from app.core import sealing
from app.core.models import ApiKey, DashboardSession, Role, utcnow

COOKIE = "lh_session"
SESSION_SECONDS = 8 * 3600
SESSION = b"leasehold-session"
CSRF = b"leasehold-csrf"


def new_session(key_id: str, *, now: float | None = None) -> str:
    expires = int((now or time.time()) + SESSION_SECONDS)
    return sealing.sign("lhs", SESSION, [key_id, expires, secrets.token_urlsafe(16)])


def read_session(token: str, *, now: float | None = None) -> tuple[str, str] | None:
    """(key id, nonce) of a well-signed, unexpired session; any configured key verifies."""
    payload = sealing.unsign("lhs", SESSION, token)
    try:
        key_id, expires, nonce = payload or []
        if int(expires) <= (now or time.time()):
            return None
    except (ValueError, TypeError):
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
    return sealing.mac(CSRF, nonce.encode())


def csrf_ok(nonce: str, given: str | None) -> bool:
    return sealing.mac_ok(CSRF, nonce.encode(), given)


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
