"""POST /v1/sweeps: run the reconciliation now; GET /v1/sweeps: what recent ones did (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from sqlmodel import select

from app.api.auth import AdminKey
from app.api.errors import ApiError
from app.api.paging import page
from app.api.schemas import ApiJSON, errors
from app.core.db import SessionDep
from app.core.models import SWEEP_COUNTS, Sweep
from app.observability.overview import SweepInfo

router = APIRouter(tags=["sweeps"], responses=errors(401, 403))


class SweepOut(SweepInfo):
    detail: dict[str, Any] | None = Field(None, description="in a single sweep's answer")


class SweepPage(BaseModel):
    items: list[SweepOut]
    next: str | None


def sweep_view(sweep: Sweep, *, detail: bool = False) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": sweep.id,
        "started_at": sweep.started_at,
        "finished_at": sweep.finished_at,
        **{name: getattr(sweep, name) for name in SWEEP_COUNTS},
    }
    if detail:
        view["detail"] = sweep.detail or {}
    return view


def _run(actor: str) -> dict[str, Any] | None:
    from schedules.reconcile import reconcile

    report = reconcile(trigger=f"api:{actor}")
    if report.skipped:
        return None
    return {
        "id": report.id,
        "started_at": report.started_at,
        "finished_at": report.finished_at,
        **report.counts(),
        "detail": report.detail,
    }


@router.post("/v1/sweeps", response_class=ApiJSON, response_model=SweepOut, responses=errors(409))
async def run_sweep(key: AdminKey) -> ApiJSON:
    """Run the reconciliation now and answer what it checked, found and did."""
    done = await run_in_threadpool(_run, key.name)
    if done is None:
        raise ApiError(409, "a sweep is already running; try again when it ends", skipped=True)
    return ApiJSON(done)


@router.get("/v1/sweeps", response_class=ApiJSON, response_model=SweepPage, responses=errors(422))
def list_sweeps(
    _: AdminKey,
    session: SessionDep,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = None,
) -> ApiJSON:
    rows, nxt = page(session, select(Sweep), Sweep.id, limit, cursor)
    return ApiJSON({"items": [sweep_view(r) for r in rows], "next": nxt})


@router.get(
    "/v1/sweeps/{sweep_id}",
    response_class=ApiJSON,
    response_model=SweepOut,
    responses=errors(404, 422),
)
def get_sweep(sweep_id: str, _: AdminKey, session: SessionDep) -> ApiJSON:
    sweep = session.get(Sweep, sweep_id)
    if sweep is None:
        raise ApiError(404, f"no sweep {sweep_id!r}")
    return ApiJSON(sweep_view(sweep, detail=True))
