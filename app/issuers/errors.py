"""What an issuer's failure means to its caller: try again, or give up.

Every issuer maps its backend's exceptions through one `ErrorTable` (after hvac's
`exceptions.py`: one table of exception kinds) into exactly two outcomes, after
kopf's `TemporaryError(delay=)` / `PermanentError`:

- TemporaryIssuerError: the backend was unreachable or busy; the caller retries
  with backoff, or after `delay` seconds when the backend said how long.
- PermanentIssuerError: the backend refused for good; the caller records it.

An exception nobody classified (a bug, a response of an unexpected shape) is
logged by type and becomes PERMANENT: it fails the mint (closed) or gives the
revoke up (the reconciliation still removes an object a backend shows), and is
never re-driven for ever. Messages are safe to log: never a secret.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger(__name__)

MAX_DELAY = 300.0  # a backend's "come back in" is honoured up to five minutes


class IssuerError(Exception):
    """Base of issuer errors; the message is safe to log (never a secret)."""


class TemporaryIssuerError(IssuerError):
    """The backend could not be reached or was busy: try again later.

    `delay`, when the backend said when to come back, is how many seconds to wait
    (at most MAX_DELAY); None: the caller's own backoff.
    """

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = None if delay is None else min(max(0.0, float(delay)), MAX_DELAY)


class PermanentIssuerError(IssuerError):
    """The backend refused for good (bad config, object never existed)."""


class Kind(StrEnum):
    temporary = "temporary"
    permanent = "permanent"


@dataclass(frozen=True)
class ErrorTable:
    """One backend's exceptions and what each means, first match wins.

    `rules` pairs an exception class with its kind (and optionally a delay);
    `default` is the kind of any other exception of `catches` (the backend's
    own base class); `describe` turns one into safe text (secrets are scrubbed
    after it); `predicates` classify by content where a class is too coarse.
    """

    backend: str
    catches: tuple[type[BaseException], ...]
    rules: tuple[tuple[type[BaseException], Kind], ...]
    default: Kind
    describe: Callable[[BaseException], str] = lambda exc: (
        (str(exc).splitlines() or [""])[0] or type(exc).__name__
    )
    predicates: tuple[tuple[Callable[[BaseException], bool], Kind], ...] = ()
    delays: tuple[tuple[type[BaseException], float], ...] = ()

    def kind(self, exc: BaseException) -> Kind:
        for test, kind in self.predicates:
            if test(exc):
                return kind
        for cls, kind in self.rules:
            if isinstance(exc, cls):
                return kind
        return self.default

    def map(self, action: str, exc: BaseException, secrets: tuple[str, ...] = ()) -> IssuerError:
        """The issuer error for `exc`, raised during `action`."""
        if isinstance(exc, IssuerError):
            return exc
        if not isinstance(exc, self.catches):
            return unknown(self.backend, action, exc)
        text = self.describe(exc)
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        message = f"{self.backend} {action}: {text}"
        if self.kind(exc) is Kind.temporary:
            delay = next((d for cls, d in self.delays if isinstance(exc, cls)), None)
            return TemporaryIssuerError(message, delay=delay)
        return PermanentIssuerError(message)

    @contextmanager
    def guard(self, action: str, *secrets: str) -> Iterator[None]:
        """Raise what the block raises as an issuer error (`from None`: a traceback
        keeps no response body or statement)."""
        try:
            yield
        except IssuerError:
            raise
        except Exception as exc:
            raise self.map(action, exc, secrets) from None


def unknown(backend: str, action: str, exc: BaseException) -> PermanentIssuerError:
    """An exception no table knows: logged by type, then permanent (see the module)."""
    name = type(exc).__name__
    log.error("unclassified %s error during %s: %s (treated as permanent)", backend, action, name)
    return PermanentIssuerError(f"{backend} {action}: unexpected {name}")
