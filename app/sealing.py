"""Encryption of unclaimed secrets and signing of claim tokens.

Both derive from LEASEHOLD_SECRET_KEY (several keys, current first): old
sealed secrets and tokens stay readable while a key is rotated out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.settings import get_settings

if TYPE_CHECKING:
    from app.profiles import Profile


def _derive(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, purpose, hashlib.sha256).digest()


@lru_cache
def _fernet(keys: tuple[bytes, ...]) -> MultiFernet:
    return MultiFernet(
        [Fernet(base64.urlsafe_b64encode(_derive(k, b"leasehold-seal"))) for k in keys]
    )


def _keys() -> tuple[bytes, ...]:
    return tuple(get_settings().secret_keys)


def seal(secret: dict[str, Any]) -> str:
    return _fernet(_keys()).encrypt(json.dumps(secret).encode()).decode()


def unseal(sealed: str) -> dict[str, Any]:
    try:
        return json.loads(_fernet(_keys()).decrypt(sealed.encode()))
    except InvalidToken:
        raise ValueError("sealed secret cannot be decrypted with the configured keys") from None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claim_token(tenant: str, task_pk: str) -> str:
    """A token bound to tenant and task: deterministic, so a repeated start gets the same."""
    payload = _b64(json.dumps([tenant, task_pk], separators=(",", ":")).encode())
    sig = hmac.new(_derive(_keys()[0], b"leasehold-claim"), payload.encode(), "sha256").digest()
    return f"lhc.{payload}.{_b64(sig)}"


def read_claim_token(token: str) -> tuple[str, str] | None:
    """(tenant, task primary key) when the signature holds under any configured key."""
    try:
        prefix, payload, sig = token.split(".")
        if prefix != "lhc":
            return None
        given = _unb64(sig)
        for key in _keys():
            expected = hmac.new(_derive(key, b"leasehold-claim"), payload.encode(), "sha256")
            if hmac.compare_digest(expected.digest(), given):
                tenant, task_pk = json.loads(_unb64(payload))
                return str(tenant), str(task_pk)
    except (ValueError, TypeError):
        return None
    return None


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def task_digest(tenant: str, task_name: str) -> str:
    """The {task} placeholder: made by Leasehold, never event text."""
    return hashlib.sha256(f"{tenant}\0{task_name}".encode()).hexdigest()[:24]


def webhook_key(profile: Profile) -> bytes:
    """The key a profile's approval webhook is signed with: its own
    `approval_webhook_secret`, or one derived from the current LEASEHOLD_SECRET_KEY
    (`leasehold webhook-secret` prints it)."""
    if profile.approval_webhook_secret:
        return profile.approval_webhook_secret.encode()
    derived = hmac.new(
        get_settings().secret_keys[0],
        b"leasehold-approval-webhook:" + profile.name.encode(),
        hashlib.sha256,
    )
    return derived.hexdigest().encode()
