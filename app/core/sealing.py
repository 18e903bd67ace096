"""Encryption of unclaimed secrets, and the one signer (claim tokens, dashboard sessions).

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

from app.core.settings import get_settings

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
        secret: dict[str, Any] = json.loads(_fernet(_keys()).decrypt(sealed.encode()))
        return secret
    except InvalidToken:
        raise ValueError("sealed secret cannot be decrypted with the configured keys") from None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- the one signer: claim tokens, dashboard sessions and their CSRF tokens ----
# A tag is HMAC-SHA256 under a key derived per purpose, so a tag made for one
# purpose never verifies for another. The current key signs; any configured key
# verifies (a key being rotated out keeps its tokens readable).

CLAIM = b"leasehold-claim"


def _tag(key: bytes, purpose: bytes, message: bytes) -> bytes:
    return hmac.new(_derive(key, purpose), message, hashlib.sha256).digest()


def mac(purpose: bytes, message: bytes) -> str:
    """The tag of `message` for `purpose` under the current key, base64url."""
    return _b64(_tag(_keys()[0], purpose, message))


def mac_ok(purpose: bytes, message: bytes, given: str | None) -> bool:
    """Whether `given` is the tag of `message` for `purpose` under any configured key."""
    if not given:
        return False
    try:
        raw = _unb64(given)
    except ValueError:
        return False
    return any(hmac.compare_digest(_tag(k, purpose, message), raw) for k in _keys())


def sign(prefix: str, purpose: bytes, payload: list[Any]) -> str:
    """`prefix.payload.tag`: a JSON list, readable by anyone, forgeable by no one."""
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{prefix}.{body}.{mac(purpose, body.encode())}"


def unsign(prefix: str, purpose: bytes, token: str) -> list[Any] | None:
    """The payload of a token `sign` made with this prefix and purpose; None otherwise."""
    try:
        given_prefix, body, tag = token.split(".")
        if given_prefix != prefix or not mac_ok(purpose, body.encode(), tag):
            return None
        payload = json.loads(_unb64(body))
    except (ValueError, TypeError):
        return None
    return payload if isinstance(payload, list) else None


def claim_token(tenant: str, task_pk: str, generation: int = 0) -> str:
    """A token bound to tenant, task and the task's claim generation: deterministic, so
    a repeated start gets the same; a rotation moves the generation on, and the task
    refuses older tokens. Generation 0 keeps the original two-field payload."""
    payload: list[Any] = [tenant, task_pk]
    if generation:
        payload.append(generation)
    return sign("lhc", CLAIM, payload)


def read_claim_token(token: str) -> tuple[str, str, int] | None:
    """(tenant, task primary key, generation) when the signature holds under any
    configured key."""
    payload = unsign("lhc", CLAIM, token)
    if payload is None or len(payload) not in (2, 3):
        return None
    generation = payload[2] if len(payload) == 3 else 0
    if not isinstance(generation, int) or isinstance(generation, bool):
        return None
    return str(payload[0]), str(payload[1]), generation


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
