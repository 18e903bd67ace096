"""Ask a human: call a profile's `approval_webhook` when one of its grants starts waiting.

The call carries what an approver needs to decide (task, tenant, profile, workload,
source, the requested duration) and nothing that acts: no secret, no claim token, no
approve link; the decision is made on the dashboard or with the API, by a key. The
body is signed (HMAC-SHA256 over `<timestamp>.<body>`) so a receiver can tell it
came from this installation and is fresh. Delivery is at least once: the receiver
de-duplicates on `Leasehold-Delivery` (the credential id).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.exc import OperationalError

from app import queue
from app.core.db import session_scope
from app.core.logs import log
from app.core.models import Credential, CredState, Task
from app.core.sealing import webhook_key
from app.core.settings import get_settings
from app.profiles import get_profiles, webhook_url_problem
from workers.job import job

SIGNATURE_HEADER = "Leasehold-Signature"
DELIVERY_HEADER = "Leasehold-Delivery"
MAX_RETRIES = 8  # with backoff(): about four minutes in all
RETRY_STATUSES = {408, 425, 429}


class WebhookRetry(Exception):
    """A failure worth another try; the message names the host only (a webhook URL's
    path is often itself a secret, e.g. chat tools' incoming webhooks)."""


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: `t=<unix seconds>,v1=<hex HMAC-SHA256(key, t.body)>`."""
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def payload(cred: Credential, task: Task) -> dict[str, Any]:
    requested = None
    if task.deadline is not None and task.started_at is not None:
        requested = int((task.deadline - task.started_at).total_seconds())
    return {
        "type": "approval.requested",
        "credential": cred.id,
        "tenant": cred.tenant,
        "task": task.name,
        "grant": cred.grant,
        "profile": cred.profile,
        "issuer": cred.issuer,
        "workload": task.workload,
        "source": task.source,
        "max_duration": requested,
        "deadline": task.deadline.isoformat().replace("+00:00", "Z") if task.deadline else None,
        "requested_at": cred.created_at.isoformat().replace("+00:00", "Z"),
    }


def request_approval(credential_id: str) -> str:
    """Idempotent: only a credential still awaiting approval is announced."""
    with session_scope() as session:
        cred = session.get(Credential, credential_id)
        if cred is None or cred.state != CredState.awaiting_approval:
            return "skipped"  # decided (or gone) meanwhile: nobody needs asking
        task = session.get(Task, cred.task_id)
        assert task is not None
        body = json.dumps(payload(cred, task), separators=(",", ":")).encode()
    profile = get_profiles().get(cred.profile)
    if profile is None or not profile.approval_webhook:
        return "skipped"
    url = profile.approval_webhook
    host = urlsplit(url).hostname or "?"
    fields = {"credential": credential_id, "profile": cred.profile, "host": host}
    settings = get_settings()
    problem = webhook_url_problem(url, production=settings.env == "production")
    if problem is not None:  # fail closed: never send where the profile may not point
        log.error("approval webhook refused", extra={**fields, "problem": problem})
        return "refused"
    timestamp = int(time.time())  # signed afresh on every attempt: receivers check freshness
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "leasehold-approval-webhook",
        SIGNATURE_HEADER: sign(webhook_key(profile), timestamp, body),
        DELIVERY_HEADER: credential_id,
    }
    try:
        # Streamed and never read: the receiver's answer body is not ours to hold.
        with httpx.stream(
            "POST",
            url,
            content=body,
            headers=headers,
            timeout=settings.backend_timeout,
            follow_redirects=False,
        ) as answer:
            status = answer.status_code
    except httpx.HTTPError as exc:
        raise WebhookRetry(f"approval webhook at {host}: {type(exc).__name__}") from None
    if 200 <= status < 300:
        log.info("approval webhook sent", extra={**fields, "status": status})
        return "sent"
    if status >= 500 or status in RETRY_STATUSES:
        raise WebhookRetry(f"approval webhook at {host} answered {status}")
    log.error("approval webhook rejected", extra={**fields, "status": status})
    return "rejected"


# The ledger out of reach (a dropped connection: the worker does not ping its pool)
# is retried like the webhook.
@job(queue.REQUEST_APPROVAL, max_retries=MAX_RETRIES, retry_on=(WebhookRetry, OperationalError))
def request_approval_task(credential_id: str) -> str:
    return request_approval(credential_id)
