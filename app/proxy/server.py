"""`leasehold proxy`, reverse mode: `<proxy>/p/<credential id><path>` with the
credential's proxy token goes to the profile's one upstream with the static secret
added (PRODUCT.md "Brokered access"). Forward mode (app/proxy/forward.py) shares the
port and everything after the token: `Proxy.serve` and `Proxy.checked`.

An ASGI app (Starlette, served by uvicorn) forwarding with httpx, streaming both
ways. Order of checks: the token against the credential in the URL (401 without
one, 403 for anything else), the credential `active` for a running task, the rate,
the method, the path (app/proxy/paths.py), the body's declared size; only then is
the secret read (app/issuers/proxy.py, cached briefly in memory) and the request
sent. Refusals are JSON `{"error", "reason"}`; nothing refused reaches the upstream.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import Message, Receive, Scope, Send

from app.core.settings import Settings, get_settings
from app.issuers import get_issuer
from app.issuers.base import IssuerError
from app.issuers.proxy import ProxyIssuer, token_digest
from app.observability import metrics
from app.profiles import ProfileError, ProxyProfile, get_profiles
from app.proxy import forward
from app.proxy.forward import Forward
from app.proxy.paths import CleanPath, PathRefused, allowed, clean
from app.proxy.redact import Patterns, Redactor
from app.proxy.state import Gate, Gates, Journal, in_thread
from app.startup import upstream_problem

log = logging.getLogger("leasehold.proxy")

SECRET_SECONDS = 10.0  # how long a static secret stays in this process's memory
BUFFERED = 1024 * 1024  # answers up to this size get a corrected Content-Length
_PREFIX = re.compile(rb"^/p/([0-9a-f]{1,32})(/.*)?$", re.DOTALL)
_QUERY = re.compile(rb"^[\x21-\x7e]*$")
# Hop-by-hop headers (RFC 9110 7.6.1): never forwarded either way.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded from the workload (besides the injected header's name).
_DROP_REQUEST = _HOP_BY_HOP | {
    "authorization",
    "host",
    "forwarded",
    "expect",
    "accept-encoding",
    "content-length",  # set again below from the checked value
}
_DROP_RESPONSE = _HOP_BY_HOP | {
    "content-length",  # recomputed after redaction, or chunked
    "content-encoding",  # httpx decodes whatever the upstream sent anyway
}


class Refused(Exception):
    """A refusal, answered as JSON; `reason` is also the metric outcome and audit reason."""

    def __init__(self, status: int, reason: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.extra = status, reason, message, extra


class _TooLarge(Exception):
    """The request body passed the limit while it streamed."""


class _ClientGone(Exception):
    """The workload hung up while its body streamed."""


class _CutOff(Exception):
    """The answer had started: the connection is dropped, never completed."""


@dataclass
class Exchange:
    """One request's account: what the audit entry and the metric say."""

    method: str
    credential_id: str
    started: float = field(default_factory=time.monotonic)
    gate: Gate | None = None
    profile: str = "-"
    path: str = ""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    echoes: dict[str, int] = field(default_factory=dict)
    answered: bool = False  # the answer's start went out

    def detail(self, **more: Any) -> str:
        body = {
            "method": self.method[:16],
            "path": self.path[:512],
            "status": self.status,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "duration": round(time.monotonic() - self.started, 4),
            **more,
        }
        return json.dumps(body, separators=(",", ":"))


class Secrets:
    """Static secrets by profile, in memory for SECRET_SECONDS at most."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[float, str, Patterns]] = {}

    async def get(self, issuer: ProxyIssuer) -> tuple[str, Patterns]:
        key = issuer.profile.secret
        hit = self._held.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1], hit[2]
        value = await in_thread(issuer.read_secret)
        patterns = Patterns(value)
        self._held[key] = (time.monotonic() + SECRET_SECONDS, value, patterns)
        return value, patterns

    def clear(self) -> None:
        self._held.clear()


class Buckets:
    """Per-credential token buckets for a profile's `rate`."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, credential_id: str, rate: tuple[float, float]) -> float:
        """0 when admitted, else the seconds until a request would be."""
        per_second, burst = rate
        now = time.monotonic()
        tokens, then = self._state.get(credential_id, (burst, now))
        tokens = min(burst, tokens + (now - then) * per_second)
        if tokens >= 1:
            if len(self._state) > 100_000:
                self._state.clear()
            self._state[credential_id] = (tokens - 1, now)
            return 0.0
        self._state[credential_id] = (tokens, now)
        return (1 - tokens) / per_second


class Proxy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gates = Gates()
        self.journal = Journal()
        self.secrets = Secrets()
        self.buckets = Buckets()
        self.installation = ""
        self._clients: dict[tuple[str, str | None], httpx.AsyncClient] = {}
        self.forward = Forward()  # forward mode's caches (app/proxy/forward.py)

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        from app import ledger
        from app.core.db import session_scope

        def installation() -> str:
            with session_scope() as session:
                return ledger.installation(session).id

        self.installation = await in_thread(installation)
        await self.gates.start()
        await self.journal.start()

    async def stop(self) -> None:
        await self.gates.stop()
        await self.journal.stop()
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()
        self.secrets.clear()

    def client(self, profile: ProxyProfile) -> httpx.AsyncClient:
        key = (profile.upstream, profile.ca_file)
        client = self._clients.get(key)
        if client is None:
            timeout = self.settings.proxy_timeout
            client = self._clients[key] = httpx.AsyncClient(
                verify=ssl.create_default_context(cafile=profile.ca_file),
                follow_redirects=False,
                trust_env=False,  # never an HTTP(S)_PROXY from the environment
                timeout=httpx.Timeout(timeout, pool=5.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=20),
            )
        return client

    # -- one request ------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        found = _PREFIX.match(raw)
        ex = Exchange(
            method=scope["method"], credential_id=found.group(1).decode() if found else ""
        )

        async def work(tracked: Send) -> None:
            if found is None:
                raise Refused(404, "not_found", "no such proxy address: /p/<credential id>/...")
            await self._handle(ex, scope, receive, tracked, found.group(2) or b"/")

        await self.serve(ex, send, work)

    async def serve(
        self, ex: Exchange, send: Send, work: Callable[[Send], Awaitable[None]]
    ) -> None:
        """One request, reverse or forward mode: `work` answers it through the send it
        is given; a refusal, a cut-off or a failure is answered, audited and counted here."""

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.answered = True
            await send(message)

        try:
            await work(tracked)
            outcome = "forwarded"
        except Refused as refusal:
            outcome = refusal.reason
            ex.status = refusal.status
            await self._refuse(ex, refusal, tracked)
        except _CutOff:
            outcome = "cut_off"  # returning without completing drops the connection
        except _ClientGone:
            outcome = "client_gone"
        except Exception:
            outcome = "error"
            log.exception("proxy: request failed", extra={"credential": ex.credential_id})
            if not ex.answered:
                await _json(tracked, 502, {"error": "the proxy failed", "reason": "error"})
        self._count(ex.profile, outcome)

    async def _refuse(self, ex: Exchange, refusal: Refused, send: Send) -> None:
        if not ex.answered:
            headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
            if refusal.status == 407:
                headers["Proxy-Authenticate"] = 'Basic realm="leasehold"'
            if "retry_after" in refusal.extra:
                headers["Retry-After"] = str(refusal.extra.pop("retry_after"))
            body = {"error": refusal.message, "reason": refusal.reason, **refusal.extra}
            await _json(send, refusal.status, body, headers)
        log.info(
            "proxy refused",
            extra={"credential": ex.credential_id, "reason": refusal.reason, "status": ex.status},
        )
        if ex.gate is not None:
            await self.journal.add(
                "proxy_refused", ex.gate, reason=refusal.reason, detail=ex.detail()
            )

    def _count(self, profile: str, outcome: str) -> None:
        try:
            metrics.get().proxy_requests.labels(profile, outcome).inc()
        except OSError as exc:
            log.warning("metrics not recorded: %s", exc)

    async def _handle(
        self, ex: Exchange, scope: Scope, receive: Receive, send: Send, rest: bytes
    ) -> None:
        headers = [(k.decode("latin-1").lower(), v) for k, v in scope["headers"]]
        token = _bearer(headers)
        gate = await self.gates.get(ex.credential_id)
        authentic = (
            gate is not None
            and gate.token_digest is not None
            and token is not None
            and hmac.compare_digest(token_digest(token), gate.token_digest)
        )
        if gate is not None and gate.issuer == "proxy":
            ex.gate, ex.profile = gate, gate.profile  # refusals about it are audited
        if token is None:
            raise Refused(401, "no_token", "a proxy token is required (Authorization: Bearer)")
        if not authentic or gate is None:
            raise Refused(403, "bad_token", "this token is not valid for this credential")
        await self.checked(ex, gate, rest, scope.get("query_string") or b"", headers, receive, send)

    async def checked(
        self,
        ex: Exchange,
        gate: Gate,
        rest: bytes,
        query: bytes,
        headers: list[tuple[str, bytes]],
        receive: Receive,
        send: Send,
    ) -> None:
        """Everything after the token, shared by reverse and forward mode: the credential
        live, the rate, the method, the path, the size; then the secret and the upstream."""
        ex.gate, ex.profile = gate, gate.profile
        if not gate.live():
            raise Refused(403, "not_active", gate.why_not)
        profile = self._profile(gate)
        issuer = get_issuer(profile, installation_id=self.installation, settings=self.settings)
        assert isinstance(issuer, ProxyIssuer)
        if profile.rate_per_second is not None:
            wait = self.buckets.take(gate.id, profile.rate_per_second)
            if wait > 0:
                raise Refused(
                    429,
                    "rate",
                    f"over this credential's rate ({profile.rate})",
                    retry_after=max(1, round(wait + 0.5)),
                )
        if profile.methods is not None and ex.method not in profile.methods:
            raise Refused(403, "method", f"method {ex.method} is not allowed for this credential")
        try:
            path = clean(rest)
        except PathRefused as exc:
            ex.path = _printable(rest)
            raise Refused(403, "path", f"path refused: {exc}") from None
        ex.path = path.text
        if not allowed(path, profile.paths):
            raise Refused(403, "path", "this path is not allowed for this credential")
        if not _QUERY.match(query):
            raise Refused(400, "query", "the query holds characters a URL may not")
        declared = _content_length(headers)
        if declared is not None and declared > self.settings.proxy_max_request_bytes:
            raise Refused(413, "too_large", "the request body is over the proxy's limit")
        try:
            secret, patterns = await self.secrets.get(issuer)
        except IssuerError as exc:
            log.error("proxy: the static secret cannot be read: %s", exc)
            raise Refused(
                502, "secret_unavailable", "the upstream's secret is unavailable"
            ) from None
        await self._forward(
            ex, profile, path, query, headers, declared, secret, patterns, receive, send
        )

    def _profile(self, gate: Gate) -> ProxyProfile:
        try:
            profile = get_profiles().get(gate.profile)
        except ProfileError as exc:
            log.error("proxy: profiles unusable: %s", exc)
            raise Refused(503, "profiles", "the proxy's profiles are unusable") from None
        if not isinstance(profile, ProxyProfile):
            raise Refused(403, "profile", "this credential's profile is not a proxy profile")
        problem = upstream_problem(profile)
        if problem is not None:
            raise Refused(502, "insecure_upstream", f"upstream refused: {problem}")
        return profile

    async def _forward(
        self,
        ex: Exchange,
        profile: ProxyProfile,
        path: CleanPath,
        query: bytes,
        headers: list[tuple[str, bytes]],
        declared: int | None,
        secret: str,
        patterns: Patterns,
        receive: Receive,
        send: Send,
    ) -> None:
        assert ex.gate is not None
        upstream = httpx.URL(profile.upstream).copy_with(
            raw_path=path.encoded.encode() + (b"?" + query if query else b"")
        )
        outgoing = _outgoing(headers, profile, secret, declared)
        chunked = any(k == "transfer-encoding" for k, _ in headers)
        limit = self.settings.proxy_max_request_bytes

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                ex.bytes_in += len(chunk)
                if ex.bytes_in > limit:
                    raise _TooLarge
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        content = body() if (declared or chunked) else None
        client = self.client(profile)
        response: httpx.Response | None = None
        with self.gates.streaming(ex.gate.id) as cut:
            try:
                request = client.build_request(
                    ex.method, upstream, headers=outgoing, content=content
                )
                response = await client.send(request, stream=True)
            except _TooLarge:
                raise Refused(
                    413, "too_large", "the request body is over the proxy's limit"
                ) from None
            except httpx.TimeoutException:
                raise Refused(
                    504, "upstream_timeout", "the upstream did not answer in time"
                ) from None
            except httpx.HTTPError as exc:
                log.warning("proxy: upstream unreachable: %s", type(exc).__name__)
                raise Refused(502, "upstream_error", "the upstream cannot be reached") from None
            try:
                await self._relay(ex, response, patterns, send)
            except _CutOff:
                await self._echoed(ex)
                await self.journal.add(
                    "proxy_refused", ex.gate, reason="response_too_large", detail=ex.detail()
                )
                raise
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()
        if cut.cancel_called:  # its credential stopped being live meanwhile
            if not ex.answered:
                raise Refused(403, "not_active", "the credential was revoked")
            log.info(
                "proxy: stream cut off, its credential is no longer active",
                extra={"credential": ex.gate.id},
            )
            await self._echoed(ex)
            await self.journal.add("proxy_refused", ex.gate, reason="cut_off", detail=ex.detail())
            raise _CutOff
        await self._echoed(ex)
        await self.journal.add("proxy_request", ex.gate, reason=None, detail=ex.detail())

    async def _relay(
        self, ex: Exchange, response: httpx.Response, patterns: Patterns, send: Send
    ) -> None:
        """The upstream's answer, redacted, to the workload."""
        ex.status = response.status_code
        headers: list[tuple[bytes, bytes]] = []
        connection = {t.strip().lower() for t in response.headers.get("connection", "").split(",")}
        for name, value in response.headers.multi_items():
            lower = name.lower()
            if lower in _DROP_RESPONSE or lower in connection or lower.startswith("proxy-"):
                continue
            value, found = patterns.header(value)
            if found:
                ex.echoes["headers"] = ex.echoes.get("headers", 0) + found
            headers.append((lower.encode("latin-1"), value.encode("latin-1")))
        no_body = (
            ex.method == "HEAD"
            or response.status_code in (204, 304)
            or (100 <= response.status_code < 200)
        )
        limit = self.settings.proxy_max_response_bytes
        redactor = Redactor(patterns)
        declared = _content_length(
            [(k.lower(), v.encode("latin-1")) for k, v in response.headers.multi_items()]
        )
        if no_body:
            await send({"type": "http.response.start", "status": ex.status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if declared is not None and declared <= BUFFERED:
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > BUFFERED:  # said less than it sent, or a compressed bomb
                    raise Refused(502, "upstream_error", "the upstream's answer is malformed")
            out, found = patterns.sub(bytes(data))
            if found:
                ex.echoes["body"] = found
            headers.append((b"content-length", str(len(out)).encode()))
            await send({"type": "http.response.start", "status": ex.status, "headers": headers})
            await send({"type": "http.response.body", "body": out})
            ex.bytes_out = len(out)
            return
        await send({"type": "http.response.start", "status": ex.status, "headers": headers})
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > limit:
                log.warning(
                    "proxy: upstream answer over the limit; cut off",
                    extra={"credential": ex.credential_id},
                )
                raise _CutOff
            out = redactor.feed(chunk)
            if redactor.found:
                ex.echoes["body"] = redactor.found
            if out:
                ex.bytes_out += len(out)
                await send({"type": "http.response.body", "body": out, "more_body": True})
        out = redactor.finish()
        ex.bytes_out += len(out)
        if redactor.found:
            ex.echoes["body"] = redactor.found
        await send({"type": "http.response.body", "body": out})

    async def _echoed(self, ex: Exchange) -> None:
        """An answer that held the secret: audited as proxy_echo, and an error (Sentry)."""
        assert ex.gate is not None
        if not ex.echoes:
            return
        log.error(
            "proxy: the upstream echoed the secret; redacted",
            extra={"credential": ex.gate.id, "profile": ex.profile, "where": sorted(ex.echoes)},
        )
        await self.journal.add(
            "proxy_echo", ex.gate, reason="echo", detail=ex.detail(echoes=ex.echoes)
        )


def _bearer(headers: list[tuple[str, bytes]]) -> str | None:
    for name, value in headers:
        if name == "authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _content_length(headers: list[tuple[str, bytes]]) -> int | None:
    for name, value in headers:
        if name == "content-length":
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None


def _outgoing(
    headers: list[tuple[str, bytes]], profile: ProxyProfile, secret: str, declared: int | None
) -> list[tuple[bytes, bytes]]:
    """The workload's headers minus everything the proxy owns, plus the injected one."""
    injected = profile.header_name.lower()
    connection = {
        t.strip().lower()
        for name, value in headers
        if name == "connection"
        for t in value.decode("latin-1").split(",")
    }
    kept = [
        (name.encode("latin-1"), value)
        for name, value in headers
        if name not in _DROP_REQUEST
        and name != injected
        and name not in connection
        and not name.startswith(("proxy-", "x-forwarded-"))
    ]
    kept.append((b"accept-encoding", b"identity"))
    if declared is not None:
        kept.append((b"content-length", str(declared).encode()))
    value = profile.header_template.replace("{secret}", secret)
    kept.append((profile.header_name.encode("latin-1"), value.encode("utf-8")))
    return kept


def _printable(raw: bytes) -> str:
    return raw.decode("latin-1")[:512].encode("unicode_escape").decode("ascii")


async def _json(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(body).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


class _QuietAbort(logging.Filter):
    """A cut-off stream is an answer the proxy chose not to complete: said by its own
    log line, not as uvicorn's error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing response" not in record.getMessage()


def create_app() -> Starlette:
    from app.core.logs import configure_logging
    from app.observability.sentry import init_sentry

    settings = get_settings()
    init_sentry(settings, component="proxy")
    proxy = Proxy(settings)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        configure_logging(settings)
        logging.getLogger("uvicorn.error").addFilter(_QuietAbort())
        await in_thread(metrics.prepare)
        try:
            metrics.serve(settings)  # LEASEHOLD_METRICS_PORT: this process's counters
        except OSError as exc:
            log.error("metrics: cannot listen on LEASEHOLD_METRICS_PORT: %s", exc)
        await proxy.start()
        forward.install(proxy)
        try:
            yield
        finally:
            await proxy.stop()

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def not_found(_: Request, __: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": "no such proxy address: /p/<credential id>/...", "reason": "not_found"},
            status_code=404,
        )

    return Starlette(
        routes=[Route("/healthz", healthz), Mount("/p", app=proxy)],
        lifespan=lifespan,
        exception_handlers={404: not_found},
    )
