"""Hostile input at the door, before any route, key, session or CSRF check.

A pure ASGI middleware: a declared Content-Length over the path's limit answers
413 at once; a body sent without one (chunked) is counted while the app reads
it, and the read that passes the limit raises `BodyTooLarge` (answered 413,
with the connection closed so the rest of the upload is cut). A NUL in the path
or in a query parameter answers 400: no text column may ever receive one.
"""

from __future__ import annotations

import json
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import PROBLEM_JSON, problem, problem_body

MAX_EVENT_BODY = 64 * 1024  # PRODUCT.md: an event body is at most 64 KiB
MAX_FORM_BODY = 4 * 1024  # the dashboard's forms carry a key or a CSRF token, nothing more


def body_limit(path: str) -> int:
    """The most bytes a request to `path` may send; endpoints that read none get the event's."""
    if path == "/dashboard" or path.startswith("/dashboard/"):
        return MAX_FORM_BODY
    return MAX_EVENT_BODY


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is over {limit // 1024} KiB")
        self.limit = limit


def too_large(limit: int) -> JSONResponse:
    # Connection: close makes the server drop the connection and the rest of the upload.
    return problem(413, str(BodyTooLarge(limit)), {"Connection": "close"})


def nul_problem(scope: Scope) -> str | None:
    """What in the path or query string carries a NUL, named; None if nothing does."""
    if "\x00" in scope.get("path", ""):
        return "the path contains a NUL character"
    query: bytes = scope.get("query_string", b"")
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        raw_name = unquote_to_bytes(name.replace(b"+", b" "))
        if b"\x00" in raw_name or b"\x00" in unquote_to_bytes(value.replace(b"+", b" ")):
            shown = raw_name.replace(b"\x00", b"").decode("utf-8", "replace")[:64]
            return f"query parameter {shown!r} contains a NUL character"
    return None


async def _answer(send: Send, status: int, message: str, *, close: bool = False) -> None:
    body = json.dumps(problem_body(status, message)).encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = nul_problem(scope)
        if problem is not None:
            await _answer(send, 400, problem)
            return
        limit = body_limit(scope.get("path", ""))
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _answer(send, 400, "Content-Length is not a number", close=True)
                    return
                if declared > limit:
                    await _answer(send, 413, str(BodyTooLarge(limit)), close=True)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


def install(app: FastAPI) -> None:
    # Inside Starlette's error middleware, outside the routes: every request passes here.
    app.add_middleware(Guard)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return too_large(exc.limit)
