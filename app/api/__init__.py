"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi

from app import __version__, notify, startup
from app.api import (
    audit,
    credentials,
    dashboard,
    errors,
    events,
    keys,
    limits,
    metrics,
    revocations,
    sweeps,
    tasks,
)
from app.api import policy as policy_api
from app.api.schemas import (
    COMMON_ERRORS,
    ApiJSON,
    Health,
    event_components,
    problem_media_types,
)
from app.authority import policy as cedar_policy
from app.core.db import session_scope
from app.core.logs import configure_logging
from app.core.settings import get_settings
from app.observability.metrics import prepare as prepare_metrics
from app.observability.sentry import init_sentry


def _startup_checks() -> None:
    with session_scope() as session:
        startup.check(session)
    cedar_policy.engine().start()  # an invalid policy file refuses the start


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    configure_logging(get_settings())
    await run_in_threadpool(_startup_checks)
    await run_in_threadpool(prepare_metrics)  # the metrics directory, dead processes' files merged
    await notify.waiters.start()
    try:
        yield
    finally:
        await notify.waiters.stop()


def create_app() -> FastAPI:
    # Before the app exists: Sentry's Starlette/FastAPI hooks wrap what is built after.
    init_sentry(get_settings(), component="api")
    app = FastAPI(
        title="Leasehold",
        version=__version__,
        summary="Just-in-time, task-scoped, short-lived credentials",
        lifespan=lifespan,
        default_response_class=ApiJSON,
        responses=COMMON_ERRORS,
    )
    errors.install(app)
    limits.install(app)
    app.add_middleware(events.count_events)
    app.include_router(events.router)
    app.include_router(credentials.router)
    app.include_router(tasks.router)
    app.include_router(sweeps.router)
    app.include_router(audit.router)
    app.include_router(metrics.router)
    app.include_router(policy_api.router)
    app.include_router(revocations.router)
    app.include_router(keys.router)
    dashboard.install(app)

    @app.get("/healthz", tags=["health"], response_model=Health)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    def openapi() -> dict[str, Any]:
        # FastAPI's document, plus the CloudEvent body schema that the event routes
        # reference (they read the raw body, so FastAPI does not see the model), with
        # errors under their media type.
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            doc.setdefault("components", {}).setdefault("schemas", {}).update(event_components())
            problem_media_types(doc)  # errors answer application/problem+json
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
