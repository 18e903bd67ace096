"""The one-time claim, the ledger of credentials, a manual revoke, and approvals."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar, TypeVarTuple

from fastapi import APIRouter, Query, Request, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Session, col, select

from app import ledger, notify
from app.api import offload
from app.api.auth import EmitterKey, OperatorKey, bearer, tenant_scope
from app.api.errors import ApiError
from app.api.paging import page
from app.api.paths import TASK_ID, raw_segment
from app.api.schemas import (
    MAX_GRANTS,
    ApiJSON,
    ClaimOut,
    CredentialPage,
    StateOut,
    credential_view,
    errors,
)
from app.authority import identity, policy
from app.core import sealing
from app.core.db import SessionDep, get_engine
from app.core.logs import log
from app.core.models import ApiKey, Credential, CredState, Task, TaskState, utcnow
from app.observability import observe
from app.profiles import get_profiles
from app.queue import enqueue_approval_request, enqueue_mint, enqueue_revoke

T = TypeVar("T")
Ts = TypeVarTuple("Ts")
router = APIRouter(tags=["credentials"])
# Documentation only: the claim reads its bearer itself (a claim token, or a JWT).
claim_scheme = HTTPBearer(
    scheme_name="ClaimToken",
    description="the claim token from the task.started answer, or a workload JWT",
    auto_error=False,
)
MAX_WAIT = 30.0
WAITING = (CredState.pending, CredState.awaiting_approval)
# ?wait= long-polls hold no thread, but each re-checks the ledger: bound how many wait
# (one per grant of a token, a few hundred per process; over it: 409 at once) and
# how many threads and pool connections their re-checks may take, so a flood of
# waiters leaves the thread pool and the ledger to everyone else's events.
MAX_WAITERS_PER_TOKEN = MAX_GRANTS
MAX_WAITERS = 256
RECHECK_THREADS = 4


class WaitSlots:
    """Counts of waiting claims, per claim token and per process (one event loop)."""

    def __init__(self, per_token: int, total: int) -> None:
        self.per_token, self.total = per_token, total
        self.by_token: dict[str, int] = {}
        self.waiting = 0

    @contextlib.contextmanager
    def take(self, token: str) -> Iterator[bool]:
        held = self.by_token.get(token, 0)
        if held >= self.per_token or self.waiting >= self.total:
            yield False
            return
        self.by_token[token] = held + 1
        self.waiting += 1
        try:
            yield True
        finally:
            self.waiting -= 1
            left = self.by_token[token] - 1
            if left:
                self.by_token[token] = left
            else:
                del self.by_token[token]


slots = WaitSlots(MAX_WAITERS_PER_TOKEN, MAX_WAITERS)


async def _recheck(func: Callable[[*Ts], T], *args: *Ts) -> T:
    """Run a waiter's ledger read on its own few threads, never the shared pool's."""
    return await offload.run_in(offload.pool("recheck", RECHECK_THREADS), func, *args)


def _facts(row: Any) -> ledger.ClaimedCredential:
    return ledger.ClaimedCredential(
        id=row.id,
        tenant=row.tenant,
        task_id=row.task_id,
        issuer=row.issuer,
        profile=row.profile,
        minted_at=row.minted_at,
    )


@dataclass(frozen=True)
class Claimant:
    """Who claims: the holder of a claim token, or the workload a JWT proved (`subject`)."""

    tenant: str
    task_pk: str
    subject: str | None = None
    generation: int = 0  # a claim token's; a JWT proves the workload instead

    @property
    def actor(self) -> str:
        """The audit actor: the proven identity (the column holds 128 characters; the
        detail has it whole), else "claim" for the token's holder."""
        if self.subject is None:
            return "claim"
        return self.subject if len(self.subject) <= 128 else self.subject[:125] + "..."

    @property
    def detail(self) -> str | None:
        return None if self.subject is None else f"JWT sub {self.subject}"[:2000]


JWT_REFUSED = "this JWT is not valid for this task"


def _jwt_claimant(token: str, tenant: str | None, task_name: str) -> Claimant:
    """The JWT checked (signature, exp, nbf, aud, iss), then bound to the task named by
    ?tenant= and the path: its `sub` must be the task's workload. Any failure is a 403
    that does not tell whether the task exists."""
    try:
        proven = identity.verify(token)
    except identity.IdentityError as exc:
        log.warning("claim: JWT refused", extra={"reason": str(exc)})
        raise ApiError(403, f"the JWT is refused: {exc}") from None
    if not tenant:
        raise ApiError(403, "a JWT claim names its tenant with ?tenant=")
    with Session(get_engine()) as session:
        task = ledger.find_task(session, tenant, task_name)
        if task is None or task.workload is None or task.workload != proven.subject:
            log.warning("claim: JWT subject is not the task's workload", extra={"tenant": tenant})
            raise ApiError(403, JWT_REFUSED)
        return Claimant(tenant=tenant, task_pk=task.id, subject=proven.subject)


def _authorize_at_claim(session: Session, task: Task, cred: Credential, subject: str) -> str | None:
    """`mint` again with the proven principal (a `claim = "jwt"` profile): None when
    allowed, else the refusal (audited as `claim_denied`; the credential stays unclaimed)."""
    owner = session.get(ApiKey, task.owner_key_id)
    parent = session.get(Task, task.parent_id) if task.parent_id else None
    duration = 0
    if task.deadline is not None and task.started_at is not None:
        duration = round((task.deadline - task.started_at).total_seconds())
    [decision] = policy.authorize(
        [
            policy.Ask(
                action="mint",
                workload=subject,
                profile=cred.profile,
                issuer=cred.issuer,
                tenant=task.tenant,
                emitter=owner.name if owner else "",
                source=task.source,
                task=task.name,
                parent=parent.name if parent else None,
                max_duration=duration,
            )
        ]
    )
    if decision.allowed:
        return None
    policies = ", ".join(decision.policies) or "-"
    ledger.audit_credential(
        session,
        cred,
        "claim_denied",
        actor=Claimant(task.tenant, task.id, subject).actor,
        now=utcnow(),
        reason="policy",
        detail=f"mint at claim for {subject} denied by policy: {decision.reason} "
        f"(policies: {policies})"[:2000],
    )
    session.commit()
    return f"policy denies this claim: {decision.reason}"


def _try_claim(
    claimant: Claimant, task_name: str, grant: str
) -> tuple[int, dict[str, Any], str | None]:
    """One attempt: (status, body, credential id). 409 means 'not yet'."""
    with Session(get_engine(), expire_on_commit=False) as session:
        outcome = _attempt_claim(session, claimant, task_name, grant)
        # Ends with COMMIT also when it answered without consuming: every write in
        # _attempt_claim is committed or rolled back where it happens, but the claim's
        # statement (a WITH that may write) leaves app/core/db.py's rule unable to
        # tell, and a ROLLBACK makes psycopg drop the connection's prepared statements.
        session.commit()
        return outcome


def _attempt_claim(
    session: Session, claimant: Claimant, task_name: str, grant: str
) -> tuple[int, dict[str, Any], str | None]:
    conn = session.connection()
    profiles = get_profiles()
    row, taken = ledger.read_for_claim(
        conn,
        task_pk=claimant.task_pk,
        grant=grant,
        tenant=claimant.tenant,
        task_name=task_name,
        generation=claimant.generation,
        subject=claimant.subject,
        asks_again=[name for name, p in profiles.items() if p.claim == "jwt"],
        actor=claimant.actor,
        now=utcnow(),
        detail=claimant.detail,
    )
    if taken:  # the usual claim: read and consumed in one statement, not yet committed
        return _answer_claim(session, row)
    if row is None or row.task_tenant != claimant.tenant or row.task_name != task_name:
        return 403, {"error": "this claim token is not valid for this task"}, None
    if claimant.subject is not None and row.workload != claimant.subject:
        return 403, {"error": JWT_REFUSED}, None
    if claimant.subject is None and claimant.generation != row.claim_generation:
        # A rotation made a new token: whoever holds an older one gets nothing.
        return 403, {"error": "this claim token was replaced by a rotation"}, None
    if row.id is None:
        return 404, {"error": f"task has no grant {grant!r}"}, None
    if row.claimed_at is not None:
        # Whatever became of the task or the credential since: someone else holds
        # the token and came second. Said, even after the end.
        return (*_second_claim(session, _facts(row), claimant), row.id)
    if row.task_state != TaskState.running:
        return 410, {"error": "the task has ended", "state": row.task_state}, row.id
    if row.state in WAITING:
        return 409, {"error": "not minted yet", "state": row.state}, row.id
    if row.state != CredState.active:
        return 410, {"error": f"credential is {row.state}", "state": row.state}, row.id
    profile = profiles.get(row.profile)
    if profile is not None and profile.claim == "jwt":
        if claimant.subject is None:
            return (
                403,
                {"error": f"profile {row.profile!r} accepts only a JWT claim"},
                row.id,
            )
        # The emitter named the workload at start; the JWT has proven it: ask again.
        task = session.get(Task, claimant.task_pk)
        cred = session.get(Credential, row.id)
        assert task is not None and cred is not None  # read above, never deleted live
        refusal = _authorize_at_claim(session, task, cred, claimant.subject)
        if refusal is not None:
            return 403, {"error": refusal}, row.id
        conn = session.connection()
    if row.sealed_secret is None:
        return 410, {"error": "credential holds no secret", "state": row.state}, row.id
    if not ledger.take_secret(
        conn,
        credential_id=row.id,
        sealed_secret=row.sealed_secret,
        actor=claimant.actor,
        now=utcnow(),
        detail=claimant.detail,
    ):
        session.rollback()
        conn = session.connection()
        again = conn.execute(
            ledger.CLAIM_READ, {"p_task": claimant.task_pk, "p_grant": grant}
        ).first()
        if again is not None and again.id == row.id and again.claimed_at is not None:
            return (*_second_claim(session, _facts(again), claimant), row.id)
        # Lost a race with a revoke (or the task's end): no interception.
        state = again.state if again is not None and again.id == row.id else row.state
        return 410, {"error": f"credential is {state}", "state": state}, row.id
    return _answer_claim(session, row)


def _answer_claim(session: Session, row: Any) -> tuple[int, dict[str, Any], str | None]:
    """The secret just consumed (uncommitted) decrypted, then committed and answered.
    One that cannot be decrypted is rolled back: never destroyed, the claim answers 500
    and can be tried again."""
    try:
        secret = sealing.unseal(row.sealed_secret)
    except ValueError:
        session.rollback()
        return _undecryptable(row)
    session.commit()
    observe.claimed(_facts(row))
    return (
        200,
        {
            "grant": row.grant,
            "profile": row.profile,
            "issuer": row.issuer,
            "expires_at": row.expires_at,
            "secret": secret,
        },
        row.id,
    )


def _undecryptable(row: Any) -> tuple[int, dict[str, Any], str | None]:
    log.error(
        "claim: the sealed secret cannot be decrypted with the configured keys",
        extra={"credential": row.id, "task": row.task_id, "profile": row.profile},
    )
    return 500, {"error": "the secret cannot be decrypted; it is kept, try again"}, row.id


def _second_claim(
    session: Session, cred: ledger.ClaimedCredential, claimant: Claimant
) -> tuple[int, dict[str, Any]]:
    ledger.record_second_claim(session, cred, actor=claimant.actor, now=utcnow())
    session.commit()
    observe.second_claim(cred)
    return 410, {"error": "credential was already claimed", "state": "claimed"}


@router.post(
    "/v1/tasks/{task_id:path}/credentials/{grant}/claim",
    response_class=ApiJSON,
    response_model=ClaimOut,
    responses=errors(403, 404, 409, 410, 422),
    dependencies=[Security(claim_scheme)],
)
async def claim(
    request: Request,
    task_id: Annotated[str, TASK_ID],
    grant: str,
    wait: float = Query(0, ge=0, le=MAX_WAIT),
    tenant: str | None = Query(None, max_length=128, description="the tenant, for a JWT claim"),
) -> ApiJSON:
    # The token comes first: a wrong one answers 403 whether or not the task exists.
    # A claim token is `lhc.`-prefixed; anything else with three parts is taken as a JWT.
    token = bearer(request)
    task_name = raw_segment(request, 2)
    grant = raw_segment(request, 4)
    if token and identity.looks_like_jwt(token):
        claimant = await offload.run(_jwt_claimant, token, tenant, task_name)
    else:
        bound = sealing.read_claim_token(token) if token else None
        if bound is None:
            raise ApiError(403, "a valid claim token is required")
        claimant = Claimant(tenant=bound[0], task_pk=bound[1], generation=bound[2])
    deadline = time.monotonic() + wait
    since = notify.waiters.clock()  # before the read: a change after it wakes this claim
    status, body, cred_id = await offload.run(_try_claim, claimant, task_name, grant)
    if status == 409 and wait > 0 and cred_id is not None:
        with slots.take(claimant.task_pk) as admitted:
            if admitted:
                status, body = await _wait_for_claim(
                    claimant, task_name, grant, deadline, cred_id, since, (status, body)
                )
    headers = {"Cache-Control": "no-store"}
    if status == 409:
        headers["Retry-After"] = "1"
    return ApiJSON(body, status_code=status, headers=headers)


async def _wait_for_claim(
    claimant: Claimant,
    task_name: str,
    grant: str,
    deadline: float,
    cred_id: str,
    since: float,
    last: tuple[int, dict[str, Any]],
) -> tuple[int, dict[str, Any]]:
    """Register interest in the credential the first attempt read, then re-check only
    when it changed: at once if a notification came since that read began (none is
    missed), else when woken (or every 2 s: a message lost while reconnecting)."""
    status, body = last
    with notify.waiters.watch(cred_id) as woken:
        changed = notify.waiters.notified_since(cred_id, since)
        while (remaining := deadline - time.monotonic()) > 0:
            if not changed:
                await notify.waiters.wait(woken, remaining)
                if deadline - time.monotonic() <= 0:
                    break  # the wait is over: the last answer stands
            changed = False
            status, body, _ = await _recheck(_try_claim, claimant, task_name, grant)
            if status != 409:
                break
    return status, body


class RotateOut(BaseModel):
    """A rotation's answer: the new credential (its state) and the task's new claim token."""

    id: str
    grant: str
    state: CredState
    claim_token: str


def _rotate(key: ApiKey, task_name: str, grant: str) -> tuple[ledger.Rotation, str]:
    with Session(get_engine(), expire_on_commit=False) as session:
        task = ledger.find_task(session, key.tenant or "", task_name, lock=True)
        if task is None:
            raise ApiError(404, f"no task {task_name!r}")
        if task.owner_key_id != key.id:
            raise ApiError(403, "this task belongs to another emitter key")
        try:
            done = ledger.rotate(
                session,
                key,
                task,
                grant,
                profiles=get_profiles(),
                installation_id=ledger.installation_id(),
                now=utcnow(),
            )
        except ledger.LedgerError as exc:
            raise ApiError(exc.status, exc.message, **exc.extra) from None
        session.commit()
        token = sealing.claim_token(task.tenant, task.id, done.claim_generation)
        return done, token


@router.post(
    "/v1/tasks/{task_id:path}/credentials/{grant}/rotate",
    response_class=ApiJSON,
    status_code=202,
    response_model=RotateOut,
    responses=errors(401, 403, 404, 409, 422),
)
def rotate_credential(
    request: Request, key: EmitterKey, task_id: Annotated[str, TASK_ID], grant: str
) -> ApiJSON:
    """Revoke a grant's credential (reason `rotated`) and mint a fresh one: the answer's
    claim token replaces the task's older ones, which are refused from now on."""
    task_name = raw_segment(request, 2)
    grant = raw_segment(request, 4)
    done, token = _rotate(key, task_name, grant)
    enqueue_revoke(done.to_revoke)  # after the commit, as for events
    enqueue_mint(done.to_mint)
    enqueue_approval_request(done.to_ask)
    for cred_id in done.to_revoke:
        notify.credential_changed(cred_id)
    log.info("rotated", extra={"credential": done.credential.id, "by": key.name})
    return ApiJSON(
        {
            "id": done.credential.id,
            "grant": done.credential.grant,
            "state": done.credential.state,
            "claim_token": token,
        },
        status_code=202,
        headers={"Cache-Control": "no-store"},
    )


@router.get(
    "/v1/credentials",
    response_class=ApiJSON,
    response_model=CredentialPage,
    responses=errors(401, 403, 422),
)
def list_credentials(
    key: OperatorKey,
    session: SessionDep,
    state: CredState | None = None,
    profile: str | None = None,
    task: str | None = None,
    tenant: str | None = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = None,
) -> ApiJSON:
    query = select(Credential)
    scope = tenant_scope(key, tenant)
    if scope is not None:
        query = query.where(Credential.tenant == scope)
    if state is not None:
        query = query.where(Credential.state == state)
    if profile is not None:
        query = query.where(Credential.profile == profile)
    if task is not None:
        query = query.join(Task).where(Task.name == task)
    rows, nxt = page(session, query, Credential.id, limit, cursor)
    names = dict(
        session.exec(
            select(Task.id, Task.name).where(col(Task.id).in_({c.task_id for c in rows}))
        ).all()
    )
    items = [credential_view(c, names.get(c.task_id)) | {"tenant": c.tenant} for c in rows]
    return ApiJSON({"items": items, "next": nxt})


@router.post(
    "/v1/credentials/{credential_id}/revoke",
    response_class=ApiJSON,
    status_code=202,
    response_model=StateOut,
    responses=errors(401, 403, 404, 409, 422),
)
def revoke_credential(credential_id: str, key: OperatorKey, session: SessionDep) -> ApiJSON:
    cred = session.get(Credential, credential_id)
    scope = tenant_scope(key, None)
    if cred is None or (scope is not None and cred.tenant != scope):
        raise ApiError(404, f"no credential {credential_id!r}")
    ids = ledger.request_revoke(
        session, credential_id=cred.id, reason="manual", actor=key.name, now=utcnow()
    )
    session.commit()
    if not ids:
        session.refresh(cred)
        raise ApiError(409, f"credential is {cred.state}, not live", state=cred.state)
    enqueue_revoke(ids)
    return ApiJSON({"id": cred.id, "state": CredState.revoking}, status_code=202)


# --- approvals ---------------------------------------------------------------


class DecisionIn(BaseModel):
    """An approval or denial's optional reason, kept in the audit trail."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=ledger.MAX_DECISION_REASON)

    @field_validator("reason")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        if value is not None:
            if "\x00" in value:
                raise ValueError("contains a NUL character")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("is not valid Unicode (a lone surrogate)") from None
        return value or None


def _own_credential(session: Session, key: ApiKey, credential_id: str) -> Credential:
    """The credential if the key's tenant holds it (an admin: any); else 404."""
    cred = session.get(Credential, credential_id)
    scope = tenant_scope(key, None)
    if cred is None or (scope is not None and cred.tenant != scope):
        raise ApiError(404, f"no credential {credential_id!r}")
    return cred


def _not_awaiting(session: Session, cred: Credential) -> ApiError:
    session.refresh(cred)
    if cred.state == CredState.awaiting_approval:  # its task is past its deadline, ending
        return ApiError(409, "the task's deadline has passed", state=cred.state)
    return ApiError(409, f"credential is {cred.state}, not awaiting approval", state=cred.state)


@router.post(
    "/v1/credentials/{credential_id}/approve",
    response_class=ApiJSON,
    status_code=202,
    response_model=StateOut,
    responses=errors(401, 403, 404, 409, 422),
)
def approve_credential(
    credential_id: str, key: OperatorKey, session: SessionDep, body: DecisionIn | None = None
) -> ApiJSON:
    """Mint a grant whose profile sets `approval = true` (it was awaiting approval)."""
    cred = _own_credential(session, key, credential_id)
    reason = body.reason if body else None
    done = ledger.approve(session, cred.id, actor=key.name, reason=reason, now=utcnow())
    session.commit()
    if done is None:
        raise _not_awaiting(session, cred)
    enqueue_mint([cred.id])  # after the commit, as for events
    log.info("approved", extra={"credential": cred.id, "task": cred.task_id, "by": key.name})
    return ApiJSON({"id": cred.id, "state": CredState.pending}, status_code=202)


@router.post(
    "/v1/credentials/{credential_id}/deny",
    response_class=ApiJSON,
    response_model=StateOut,
    responses=errors(401, 403, 404, 409, 422),
)
def deny_credential(
    credential_id: str, key: OperatorKey, session: SessionDep, body: DecisionIn | None = None
) -> ApiJSON:
    """Refuse a grant that was awaiting approval, for good: it is never minted."""
    cred = _own_credential(session, key, credential_id)
    reason = body.reason if body else None
    done = ledger.deny(session, cred.id, actor=key.name, reason=reason, now=utcnow())
    session.commit()
    if done is None:
        raise _not_awaiting(session, cred)
    notify.credential_changed(cred.id)  # a waiting claim answers 410 now
    log.info("denied", extra={"credential": cred.id, "task": cred.task_id, "by": key.name})
    return ApiJSON({"id": cred.id, "state": CredState.denied})
