"""Every error answers an RFC 9457 problem document that names the problem.

`application/problem+json` with `type`, `title`, `status` and `detail`, plus the
`error` member (the same text as `detail`) that existing clients read, and any
extension members of the problem (e.g. `state`). `type` is always `about:blank`:
the status code is the kind of problem and `title` its HTTP phrase (as RFC 9457
asks of `about:blank`); `detail` says what exactly was wrong.

`problem_body` is the one place the shape is made: the handlers below, the
limits middleware and ApiJSON (an error status with an `error` member) use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from app.core.logs import log
from app.ledger import LedgerError

PROBLEM_JSON = "application/problem+json"
PROBLEM_TYPE = "about:blank"
# The members every problem carries; an extension member never replaces one.
PROBLEM_MEMBERS = frozenset({"type", "title", "status", "detail", "error"})


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


def title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """The problem document for `status`; `extra` are its extension members."""
    clash = PROBLEM_MEMBERS.intersection(extra)
    if clash:
        raise ValueError(f"extension members may not replace {sorted(clash)}")
    return {
        "type": PROBLEM_TYPE,
        "title": title(status),
        "status": status,
        "detail": message,
        "error": message,
        **extra,
    }


def error_body(message: str, **extra: Any) -> dict[str, Any]:
    """The legacy shape: ApiJSON (or `problem`) turns it into a problem document."""
    return {"error": message, **extra}


class ProblemJSON(JSONResponse):
    media_type = PROBLEM_JSON


def problem(
    status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return ProblemJSON(problem_body(status, message, **extra), status, headers)


def describe_validation(exc: ValidationError | RequestValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        parts.append(f"{prefix}{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return problem(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(LedgerError)
    async def _ledger(_: Request, exc: LedgerError) -> JSONResponse:
        return problem(exc.status, exc.message, **exc.extra)

    # Starlette's, not only FastAPI's subclass: unknown paths, wrong methods and a body
    # FastAPI cannot parse answer a problem too.
    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return problem(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return problem(422, describe_validation(exc))

    async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("ledger unavailable", extra={"error": type(exc).__name__})
        return problem(503, "the ledger is unavailable; try again", {"Retry-After": "1"})

    for kind in (OperationalError, PoolTimeout):
        app.add_exception_handler(kind, _unavailable)

    # Anything else: Starlette's outermost middleware answers this and re-raises, so
    # Sentry and the log still see the exception; the client sees no internals.
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return problem(500, "internal error")

    app.add_exception_handler(Exception, _unexpected)
