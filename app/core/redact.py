"""Remove secrets from anything that leaves the process: log lines and Sentry events.

Defence in depth: no code path should put a secret into a log record or an
error report in the first place, but a message can quote a URL, a header or a
token by accident. Keys that name a secret lose their value; strings lose
anything shaped like one of our keys, claim tokens, sessions or Vault tokens.
"""

from __future__ import annotations

import re
from typing import Any

FILTERED = "[Filtered]"
ERROR_TEXT = 500  # characters of an error kept in a log line, an audit entry, a detail
LONG_TEXT = 2000  # characters kept in a credential's last_error or a longer audit detail


def clip(text: object, limit: int = ERROR_TEXT) -> str:
    """An error's text cut to `limit` characters: one bound for every place it is kept."""
    return str(text)[:limit]


# A key whose lower-cased name contains one of these loses its value.
SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "token",
    "secret",
    "dsn",
    "authorization",
    "claim_token",
    "sealed_secret",
    "cookie",
    "session",
    "api_key",
    "apikey",
    "private_key",
    "csrf",
)

_VALUE_PATTERNS = [
    re.compile(r"lhk_[A-Za-z0-9_\-]{8,}"),  # Leasehold API keys
    re.compile(r"lh[cs]\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+"),  # claim tokens, dashboard sessions
    re.compile(r"\bhv[sbr]\.[A-Za-z0-9_\-]{8,}"),  # Vault/OpenBao service, batch, recovery tokens
    re.compile(r"(?<![A-Za-z0-9_.])[sbr]\.[A-Za-z0-9]{24}\b"),  # legacy Vault tokens
    re.compile(r"SCRAM-SHA-256\$[^\s'\"]+"),  # PostgreSQL password verifiers
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9_\-.=:/+]{8,}"),  # Authorization values
]
# user:password@ in URLs keeps the user, loses the password.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.\-]*://[^\s:/@]*):[^\s@/]+@", re.I)


def is_secret_key(key: object) -> bool:
    name = str(key).lower()
    return any(part in name for part in SECRET_KEY_PARTS)


def redact_text(text: str) -> str:
    text = _URL_PASSWORD.sub(rf"\g<head>:{FILTERED}@", text)
    for pattern in _VALUE_PATTERNS:
        text = pattern.sub(FILTERED, text)
    return text


def scrub(value: Any, *, depth: int = 0) -> Any:
    """A copy of `value` (dicts, lists, strings) with secrets replaced."""
    if depth > 32:  # a pathological nesting is dropped rather than walked
        return FILTERED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {
            k: (FILTERED if is_secret_key(k) and v not in (None, "") else scrub(v, depth=depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        items = [scrub(v, depth=depth + 1) for v in value]
        # Header lists come as [name, value] pairs.
        if len(items) == 2 and isinstance(items[0], str) and is_secret_key(items[0]):
            items[1] = FILTERED
        return items if isinstance(value, list) else tuple(items)
    return value
