"""GET /metrics: Prometheus text format; LEASEHOLD_METRICS_TOKEN, when set, as a bearer token."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response, Security
from fastapi.security import HTTPBearer

from app.api.auth import bearer
from app.api.errors import ApiError
from app.api.schemas import errors
from app.core.settings import get_settings
from app.observability import metrics

router = APIRouter(tags=["metrics"])
# Documentation only: scrape() compares the token itself (and needs none when unset).
metrics_scheme = HTTPBearer(
    scheme_name="MetricsToken", description="LEASEHOLD_METRICS_TOKEN, when set", auto_error=False
)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {}}},
        **errors(401),
    },
    dependencies=[Security(metrics_scheme)],
)
def scrape(request: Request) -> Response:
    token = get_settings().metrics_token
    if token is not None:
        given = bearer(request) or ""
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise ApiError(
                401, "a valid metrics token is required", headers={"WWW-Authenticate": "Bearer"}
            )
    return Response(
        metrics.render(), media_type=metrics.CONTENT_TYPE, headers={"Cache-Control": "no-store"}
    )
