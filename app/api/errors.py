"""Every error answers JSON that names the problem."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from app.ledger import LedgerError
from app.logs import log


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": message, **extra}


def describe_validation(exc: ValidationError | RequestValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        parts.append(f"{prefix}{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, **exc.extra), exc.status, exc.headers)

    @app.exception_handler(LedgerError)
    async def _ledger(_: Request, exc: LedgerError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, **exc.extra), exc.status)

    # Starlette's, not only FastAPI's subclass: unknown paths, wrong methods and a body
    # FastAPI cannot parse answer {"error": ...} too.
    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail)), exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(describe_validation(exc)), 422)

    async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("ledger unavailable", extra={"error": type(exc).__name__})
        return JSONResponse(
            error_body("the ledger is unavailable; try again"), 503, {"Retry-After": "1"}
        )

    for kind in (OperationalError, PoolTimeout):
        app.add_exception_handler(kind, _unavailable)
