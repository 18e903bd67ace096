"""Hooks where metrics and error reports attach; the issue that adds them fills these in."""

from __future__ import annotations

from app.logs import log
from app.models import Credential


def claimed(cred: Credential) -> None:
    log.info("claimed", extra={"credential": cred.id, "task": cred.task_id,
                               "issuer": cred.issuer, "profile": cred.profile})


def second_claim(cred: Credential) -> None:
    log.warning("second claim: possible interception",
                extra={"credential": cred.id, "task": cred.task_id, "issuer": cred.issuer,
                       "profile": cred.profile})
