"""Sentry, when LEASEHOLD_SENTRY_DSN is set: errors, failing revocations, second claims.

Secrets must never reach Sentry: no local variables in stack frames (a frame
of the mint holds the minted secret), no request bodies, no auto-enabled
integrations (their breadcrumbs quote SQL and Redis commands), and a
`before_send` / `before_breadcrumb` scrubber as the last line of defence.
"""

from __future__ import annotations

import logging
from typing import Any

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.fastapi import FastApiIntegration
from sentry_sdk.integrations.starlette import StarletteIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
from sentry_sdk.types import Breadcrumb, BreadcrumbHint, Event, Hint

from app import __version__
from app.core.redact import SECRET_KEY_PARTS, scrub
from app.core.settings import Settings

logger = logging.getLogger("leasehold")
_active_dsn: str | None = None


def scrub_event(event: Event, hint: Hint | None = None) -> Event:
    """before_send: the event with every secret-looking key and value replaced."""
    scrubbed: Event = scrub(event)
    return scrubbed


def scrub_breadcrumb(crumb: Breadcrumb, hint: BreadcrumbHint | None = None) -> Breadcrumb:
    scrubbed: Breadcrumb = scrub(crumb)
    return scrubbed


def init_sentry(settings: Settings, *, component: str) -> bool:
    """Start reporting if a DSN is configured; idempotent per DSN. True when active."""
    global _active_dsn
    if settings.sentry_dsn is None:
        return False
    dsn = settings.sentry_dsn.get_secret_value()
    if dsn == _active_dsn:
        return True
    sentry_sdk.init(
        dsn=dsn,
        release=f"leasehold@{__version__}",
        environment=settings.env,
        integrations=[StarletteIntegration(), FastApiIntegration(), CeleryIntegration()],
        auto_enabling_integrations=False,
        # send_default_pii is left at its default (off); newer SDKs deprecate passing it.
        include_local_variables=False,
        max_request_body_size="never",
        traces_sample_rate=None,
        before_send=scrub_event,
        before_breadcrumb=scrub_breadcrumb,
        event_scrubber=EventScrubber(
            denylist=[*DEFAULT_DENYLIST, *SECRET_KEY_PARTS], recursive=True
        ),
    )
    sentry_sdk.set_tag("component", component)
    sentry_sdk.set_tag("instance", settings.instance)
    _active_dsn = dsn
    logger.info("error reporting to Sentry is on", extra={"component": component})
    return True


def shutdown_sentry() -> None:
    """Flush and stop reporting (tests, and a clean process exit)."""
    global _active_dsn
    client = sentry_sdk.get_client()
    if client.is_active():
        client.flush(timeout=5)
        client.close()
    sentry_sdk.init(dsn=None)
    _active_dsn = None


def report(
    message: str,
    *,
    level: str,
    tags: dict[str, str],
    fingerprint: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """One Sentry event, grouped by `fingerprint`; nothing when Sentry is off."""
    if not sentry_sdk.get_client().is_active():
        return
    with sentry_sdk.new_scope() as scope:
        for name, value in tags.items():
            scope.set_tag(name, value)
        for name, value in (extra or {}).items():
            scope.set_extra(name, value)
        scope.fingerprint = fingerprint
        sentry_sdk.capture_message(message, level=level)  # type: ignore[arg-type]
