"""`leasehold proxy`, forward mode (PRODUCT.md "Forward mode"): an ordinary HTTP proxy on
the same port as the reverse mode.

`Sniffer` is the uvicorn protocol of every connection: it reads the first request
line and hands the connection either to uvicorn (an origin-form target: reverse mode,
/healthz) or to `ForwardConnection` (`CONNECT host:port`, or an absolute-form
`http://...` target). Forward connections are parsed with h11; each request is turned
into ASGI receive/send callables and goes through the reverse path's own checks,
injection, echo redaction, audit, metrics and cut-off (`Proxy.serve`, `Proxy.checked`).

Authentication: `Proxy-Authorization: Basic` with a proxy token as the password (none
407, a wrong or dead one 403). A token opens every proxy grant of its task; the
requested scheme, host and port pick the grant (the first by grant name when several
share one upstream). Anything else answers 403 and opens nothing. A `CONNECT` to a
grant's upstream is answered 200 and TLS is terminated with a leaf for that host,
issued by the task's CA (app/proxy/ca.py) whose key is unsealed only to issue it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import h11
from sqlmodel import col, select

from app.core import sealing
from app.core.db import session_scope
from app.core.models import Credential, TaskCA
from app.issuers.proxy import token_digest
from app.profiles import ProfileError, ProxyProfile, get_profiles
from app.proxy.ca import Issued, issue_leaf
from app.proxy.state import Gate, in_thread

log = logging.getLogger("leasehold.proxy")

READ_SECONDS = 30.0  # a request's head, or the next request on a kept-alive connection
HANDSHAKE_SECONDS = 10.0
LEAF_SECONDS = 60.0  # a leaf's TLS context is kept this long in memory at most
MAX_HEAD = 16 * 1024
CACHE_SECONDS = 0.5  # a token's task siblings (their liveness is the gates')
MAX_CONNECTIONS = 1000  # forward connections at once (uvicorn's limit counts its own)
_DEFAULT_PORTS = {"http": 80, "https": 443}

_proxy: Any = None  # the app's Proxy (app/proxy/server.py), set at its start
_open_connections = 0


def install(proxy: Any) -> None:
    global _proxy
    _proxy = proxy


# --- the first bytes decide --------------------------------------------------------


class Sniffer(asyncio.Protocol):
    """uvicorn's protocol class for the proxy's port (uvicorn.Config(http=Sniffer))."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._args = (config, server_state, app_state, _loop)
        self._state = server_state
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._state.connections.add(self)  # uvicorn's shutdown and concurrency limit see it
        self._timer = asyncio.get_running_loop().call_later(READ_SECONDS, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done()

    def shutdown(self) -> None:  # uvicorn's graceful shutdown
        if self._transport is not None:
            self._transport.close()

    def _done(self) -> None:
        self._state.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        head = bytes(self._buffer[:64])
        method, space, target = head.partition(b" ")
        if not space:
            if len(head) < 32:
                return  # the method has not arrived whole yet
            self._to_uvicorn()  # it answers 400
        elif method == b"CONNECT" or (target and target[:1] not in (b"/", b"*")):
            self._to_forward()
        elif target:
            self._to_uvicorn()

    def _to_uvicorn(self) -> None:
        from uvicorn.config import HTTP_PROTOCOLS
        from uvicorn.importer import import_from_string

        assert self._transport is not None
        self._done()
        config, state, app_state, loop = self._args
        protocol = import_from_string(HTTP_PROTOCOLS["auto"])(
            config=config, server_state=state, app_state=app_state, _loop=loop
        )
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        protocol.data_received(bytes(self._buffer))

    def _to_forward(self) -> None:
        assert self._transport is not None
        if _proxy is None or _open_connections >= MAX_CONNECTIONS:  # not started, or full
            self._transport.close()
            return
        self._done()
        reader = asyncio.StreamReader(limit=MAX_HEAD * 4)
        # With a callback the protocol is a server's: start_tls then handshakes as one.
        protocol = asyncio.StreamReaderProtocol(
            reader, lambda r, w: ForwardConnection(_proxy, r, w).run()
        )
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        reader.feed_data(bytes(self._buffer))


# --- a token's task, and the grant a host picks ------------------------------------


@dataclass(frozen=True)
class Siblings:
    token_credential: str
    credentials: tuple[str, ...]  # the task's proxy credentials, by grant name


def read_siblings(digest: str) -> Siblings | None:
    with session_scope() as session:
        owner = session.exec(
            select(Credential.id, Credential.task_id).where(Credential.token_digest == digest)
        ).first()
        if owner is None:
            return None
        ids = session.exec(
            select(Credential.id)
            .where(Credential.task_id == owner[1], Credential.issuer == "proxy")
            .order_by(col(Credential.grant), col(Credential.generation).desc())
        ).all()
        return Siblings(owner[0], tuple(ids))


def read_ca(task_pk: str) -> tuple[str, str | None, datetime] | None:
    with session_scope() as session:
        row = session.get(TaskCA, task_pk)
        return None if row is None else (row.cert_pem, row.sealed_key, row.not_after)


def _target(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int] | None:
    if not host:
        return None
    return scheme, host.lower(), port or _DEFAULT_PORTS[scheme]


def upstream_of(profile: ProxyProfile) -> tuple[str, str, int] | None:
    parts = urlsplit(profile.upstream)
    return _target(parts.scheme, parts.hostname, parts.port)


class Leaves:
    """TLS contexts for (task, host), each holding a leaf from the task's CA."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], tuple[float, ssl.SSLContext]] = {}

    async def context(self, task_pk: str, host: str) -> ssl.SSLContext | None:
        hit = self._held.get((task_pk, host))
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        found = await in_thread(read_ca, task_pk)
        if found is None or found[1] is None:  # no CA, or its key destroyed (task over)
            return None
        cert_pem, sealed_key, _ = found
        ctx = await in_thread(_leaf_context, cert_pem, sealed_key, host)
        if len(self._held) > 1000:
            self._held.clear()
        self._held[(task_pk, host)] = (time.monotonic() + LEAF_SECONDS, ctx)
        return ctx

    def forget(self, task_pk: str) -> None:
        for key in [k for k in self._held if k[0] == task_pk]:
            del self._held[key]


def _leaf_context(cert_pem: str, sealed_key: str, host: str) -> ssl.SSLContext:
    ca = Issued(cert_pem, sealing.unseal(sealed_key)["key"])
    leaf = issue_leaf(ca, host)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    chain = (leaf.cert_pem + cert_pem + leaf.key_pem).encode()
    # ssl loads keys from files only: an anonymous in-memory file where there is one.
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("leasehold-leaf")
        try:
            os.write(fd, chain)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
    else:  # pragma: no cover
        with tempfile.NamedTemporaryFile() as file:
            file.write(chain)
            file.flush()
            ctx.load_cert_chain(file.name)
    return ctx


class Forward:
    """What forward connections share: the token cache and the leaves."""

    def __init__(self) -> None:
        self.siblings: dict[str, tuple[float, Siblings | None]] = {}
        self.leaves = Leaves()

    async def task_of(self, proxy: Any, digest: str) -> Siblings | None:
        hit = self.siblings.get(digest)
        if hit is not None and proxy.gates.connected and hit[0] > time.monotonic():
            return hit[1]
        found = await in_thread(read_siblings, digest)
        if proxy.gates.connected:
            if len(self.siblings) > 10_000:
                self.siblings.clear()
            self.siblings[digest] = (time.monotonic() + CACHE_SECONDS, found)
        return found


def _basic_password(headers: list[tuple[str, bytes]]) -> str | None:
    for name, value in headers:
        if name == "proxy-authorization":
            scheme, _, rest = value.decode("latin-1").partition(" ")
            if scheme.lower() != "basic":
                return None
            try:
                decoded = base64.b64decode(rest.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return None
            password = decoded.partition(":")[2]
            return password or None
    return None


# --- one connection ------------------------------------------------------------------


class _Closed(Exception):
    """The workload hung up, or said something h11 refuses: the connection ends."""


class ForwardConnection:
    def __init__(
        self, proxy: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.forward: Forward = proxy.forward
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    async def run(self) -> None:
        global _open_connections
        _open_connections += 1
        try:
            await self._requests(tunnel=None)
        except (TimeoutError, _Closed, ConnectionError, ssl.SSLError):
            pass
        except Exception:
            log.exception("proxy: forward connection failed")
        finally:
            _open_connections -= 1
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 1)

    async def _next(self) -> Any:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._raw_error(exc.error_status_hint)
                raise _Closed from None
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(65536), READ_SECONDS)
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise _Closed
            return event

    async def _write(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _raw_error(self, status: int) -> None:
        with contextlib.suppress(Exception):
            await self._write(h11.Response(status_code=status, headers=[("content-length", "0")]))

    async def _requests(self, tunnel: Tunnel | None) -> None:
        """Requests on this connection (inside a tunnel once one is opened), one by one."""
        while True:
            request = await self._next()
            assert isinstance(request, h11.Request)
            opened = await self._one(request, tunnel)
            if opened is not None:  # 200 Connection established: TLS from here
                await self._open(opened)
                return
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY:
                # A bodiless request (a GET) whose end no one asked for: h11 has it
                # parsed already; take it so the connection can be kept alive.
                with contextlib.suppress(h11.RemoteProtocolError):
                    if self.conn.next_event() is h11.NEED_DATA:
                        return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return  # a body left unread (a refusal), a cut-off, or asked to close
            self.conn.start_next_cycle()

    async def _one(self, request: h11.Request, tunnel: Tunnel | None) -> Tunnel | None:
        from app.proxy.server import Exchange

        headers = [(k.decode("latin-1").lower(), v) for k, v in request.headers]
        ex = Exchange(method=request.method.decode("latin-1"), credential_id="")
        opened: list[Tunnel] = []

        async def work(send: Any) -> None:
            found = await self._pick(ex, request, headers, tunnel)
            if isinstance(found, Tunnel):
                await self._answer_connect(found, send)
                opened.append(found)
                return
            gate, rest, query = found
            await self.proxy.checked(ex, gate, rest, query, headers, self._receive, send)

        await self.proxy.serve(ex, self._send, work)
        return opened[0] if opened else None

    async def _pick(
        self,
        ex: Any,
        request: h11.Request,
        headers: list[tuple[str, bytes]],
        tunnel: Tunnel | None,
    ) -> tuple[Gate, bytes, bytes] | Tunnel:
        """The grant for this request (or the tunnel to open), after the token."""
        from app.proxy.server import Refused

        target = request.target
        if tunnel is not None:  # inside: the CONNECT chose the grant; origin-form only
            await self._live(tunnel.token_credential, ex)
            picked = await self.proxy.gates.get(tunnel.credential)
            if picked is None:
                raise Refused(403, "not_active", "the credential is gone")
            if not target.startswith(b"/"):
                raise Refused(400, "target", "inside a tunnel a request names a path")
            rest, _, query = target.partition(b"?")
            return picked, rest, query
        token = _basic_password(headers)
        if token is None:
            raise Refused(407, "no_token", "a proxy token is required (Proxy-Authorization: Basic)")
        siblings = await self.forward.task_of(self.proxy, token_digest(token))
        if siblings is None:
            raise Refused(403, "bad_token", "this token is not valid")
        await self._live(siblings.token_credential, ex)
        if request.method == b"CONNECT":
            host = urlsplit("//" + target.decode("latin-1"))
            try:
                wanted = _target("https", host.hostname, host.port)
            except ValueError:
                wanted = None
        else:
            parts = urlsplit(target.decode("latin-1"))
            try:
                wanted = (
                    _target(parts.scheme, parts.hostname, parts.port)
                    if parts.scheme in _DEFAULT_PORTS
                    else None
                )
            except ValueError:
                wanted = None
        ex.path = target.decode("latin-1")[:512]
        if wanted is None:
            raise Refused(400, "target", "the request names no http:// or host:port target")
        picked = await self._grant(siblings, wanted)
        if picked is None:
            raise Refused(403, "host", "no grant of this task is for this host", host=wanted[1])
        ex.credential_id = picked.id
        if not picked.live():  # the host's grant ended before the token's news arrived
            raise Refused(403, "not_active", picked.why_not)
        if request.method == b"CONNECT":
            return Tunnel(siblings.token_credential, picked.id, picked.task_id, wanted[1])
        parts = urlsplit(target.decode("latin-1"))
        raw = target.split(b"?", 1)
        path_start = raw[0].find(b"/", len(parts.scheme) + 3)
        rest = raw[0][path_start:] if path_start >= 0 else b"/"
        return picked, rest, raw[1] if len(raw) > 1 else b""

    async def _live(self, credential_id: str, ex: Any) -> Gate:
        """The token's own credential, live (a refusal is audited against it)."""
        from app.proxy.server import Refused

        gate: Gate | None = await self.proxy.gates.get(credential_id)
        if gate is None or gate.issuer != "proxy":
            raise Refused(403, "bad_token", "this token is not valid")
        ex.gate, ex.profile, ex.credential_id = gate, gate.profile, gate.id
        if not gate.live():
            raise Refused(403, "not_active", gate.why_not)
        return gate

    async def _grant(self, siblings: Siblings, wanted: tuple[str, str, int]) -> Gate | None:
        """The task's live grant for `wanted`; else one for it that is no longer live (the
        caller refuses it as not_active, not as a host it never had); None: no grant."""
        try:
            profiles = get_profiles()
        except ProfileError:
            return None
        ended: Gate | None = None
        for credential_id in siblings.credentials:
            gate: Gate | None = await self.proxy.gates.get(credential_id)
            if gate is None:
                continue
            profile = profiles.get(gate.profile)
            if not (isinstance(profile, ProxyProfile) and upstream_of(profile) == wanted):
                continue
            if gate.live():
                return gate
            ended = ended or gate
        return ended

    async def _answer_connect(self, tunnel: Tunnel, send: Any) -> None:
        """A leaf for the host first (no CA, or its key gone: 403), then the 200."""
        from app.proxy.server import Refused

        ctx = await self.forward.leaves.context(tunnel.task_pk, tunnel.host)
        if ctx is None:
            raise Refused(403, "no_ca", "this task has no forward-mode CA (any more)")
        tunnel.context.append(ctx)
        while not isinstance(await self._next(), h11.EndOfMessage):
            pass  # a CONNECT's body, if it sent one, is dropped
        if self.conn.trailing_data[0]:  # TLS before the 200: not a client to trust
            raise _Closed
        await send({"type": "leasehold.tunnel"})

    async def _open(self, tunnel: Tunnel) -> None:
        """After the 200: TLS with a leaf for the host, then the requests inside."""
        await self.writer.start_tls(tunnel.context[0], ssl_handshake_timeout=HANDSHAKE_SECONDS)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        await self._requests(tunnel)

    # -- ASGI faces for Proxy.serve / Proxy.checked ---------------------------------

    async def _receive(self) -> dict[str, Any]:
        try:
            event = await self._next()
        except (TimeoutError, _Closed, ConnectionError):
            return {"type": "http.disconnect"}
        if isinstance(event, h11.Data):
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        return {"type": "http.request", "body": b"", "more_body": False}  # EndOfMessage

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "leasehold.tunnel":
            await self._write(
                h11.Response(status_code=200, headers=[], reason=b"Connection established")
            )
        elif kind == "http.response.start":
            await self._write(
                h11.Response(status_code=message["status"], headers=message.get("headers", []))
            )
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if body:
                await self._write(h11.Data(data=body))
            if not message.get("more_body", False):
                await self._write(h11.EndOfMessage())


@dataclass
class Tunnel:
    token_credential: str
    credential: str
    task_pk: str
    host: str
    context: list[ssl.SSLContext] = field(default_factory=list)
