"""Installations of their own for the reconciliation and fault tests.

A private ledger database (so its own installation id, sharing PostgreSQL,
Redis and OpenBao with the session's), a TCP proxy to cut a connection on
purpose, and the environment of another installation's processes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import psycopg
import redis

from tests.support.procs import environment, free_port
from tests.support.world import (
    DATA_DB,
    HOME,
    LEDGER_DB,
    PG,
    PROFILES,
    REDIS_URL,
    RUN,
    admin_sql,
)

# A postgres profile reached through a TcpProxy, so tests can cut the backend.
PROXIED = """
[profiles.db-proxied]
issuer = "postgres"
dsn = "postgresql://postgres@127.0.0.1:{port}/{data_db}"
grants = ["GRANT CONNECT ON DATABASE {data_db} TO {{role}}"]
max_ttl = 3600
"""


def create_ledger(tag: str) -> tuple[str, str]:
    """A fresh, migrated ledger database: (database name, plain URL)."""
    from app.core.migrate import upgrade

    db = f"{LEDGER_DB}_{tag}"
    admin_sql(f"DROP DATABASE IF EXISTS {db}", f"CREATE DATABASE {db}")
    url = f"{PG}/{db}"
    upgrade("postgresql+psycopg" + url[len("postgresql") :])
    return db, url


def installation_of(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT id FROM installation").fetchone()
    assert row is not None
    return str(row[0])


def drop_ledger(db: str) -> None:
    from app.core.db import dispose_engines

    dispose_engines()
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as c:
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,)
        )
        c.execute(f"DROP DATABASE IF EXISTS {db}")  # type: ignore[arg-type]


def remove_installation_objects(inst: str) -> None:
    """Every role, ACL user and token this installation minted (groups last)."""
    with psycopg.connect(f"{PG}/{DATA_DB}", autocommit=True) as c:
        rows = c.execute(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s) AND "
            "shobj_description(oid, 'pg_authid') LIKE %s ORDER BY rolcanlogin DESC",
            (f"lh_{inst[:12]}_", f"%installation={inst}%"),
        ).fetchall()
        for (role,) in rows:
            c.execute(f'DROP OWNED BY "{role}"')  # type: ignore[arg-type]
            c.execute(f'DROP ROLE IF EXISTS "{role}"')  # type: ignore[arg-type]
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    for user in r.acl_users():
        if user.startswith(f"lh_{inst[:12]}_"):
            r.acl_deluser(user)
    r.close()
    client = vault_admin()
    for accessor in client.auth.token.list_accessors()["data"]["keys"]:
        with contextlib.suppress(hvac.exceptions.InvalidRequest):
            meta = client.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
            if meta.get("leasehold") == inst:
                client.auth.token.revoke_accessor(accessor)


def vault_admin() -> hvac.Client:
    return hvac.Client(
        url=os.environ["LEASEHOLD_VAULT_ADDR"], token=os.environ["LEASEHOLD_VAULT_TOKEN"], timeout=5
    )


def session_profiles() -> str:
    return PROFILES.format(data_db=DATA_DB, redis_url=REDIS_URL)


def write_profiles(path: Path, extra: str = "") -> Path:
    path.write_text(session_profiles() + extra)
    return path


@contextlib.contextmanager
def private_ledger(
    tag: str, profiles_extra: str = "", env: dict[str, str] | None = None
) -> Iterator[str]:
    """Point this process at a ledger (and installation) of its own; yields its id.

    Only for in-process tests: the session worker keeps the session's ledger.
    """
    from app.issuers import close_all

    db, url = create_ledger(tag)
    inst = installation_of(url)
    values = {"LEASEHOLD_DATABASE_URL": url, **(env or {})}
    if profiles_extra:
        path = write_profiles(HOME / f"profiles-{tag}.toml", profiles_extra)
        values["LEASEHOLD_PROFILES_FILE"] = str(path)
    try:
        with environment(values, settings=True):
            yield inst
    finally:
        close_all()
        drop_ledger(db)
        remove_installation_objects(inst)


# --- a TCP proxy that can be cut ------------------------------------------------------


class TcpProxy:
    """127.0.0.1:port -> target. stop() closes the listener and every connection
    (new ones are refused), start() listens again on the same port."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._server: socket.socket | None = None

    def start(self) -> TcpProxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(256)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
            server.close()
        with self._lock:
            socks, self._socks = self._socks, set()
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._server is not server:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._socks |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# --- broker and environment ------------------------------------------------------------


def flush_broker(prefix: str) -> int:
    """What a Redis restart without persistence does to one broker prefix."""
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}*"))
    if keys:
        r.delete(*keys)
    r.close()
    return len(keys)


def island_env(tag: str, ledger_url: str, profiles: Path, **more: str) -> dict[str, str]:
    """The environment of another installation's processes: own ledger, own queues."""
    home = HOME / f"island-{tag}"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "LEASEHOLD_HOME": str(home),
        "LEASEHOLD_DATABASE_URL": ledger_url,
        "LEASEHOLD_BROKER_KEY_PREFIX": f"lhtest{RUN}{tag}:",
        "LEASEHOLD_PROFILES_FILE": str(profiles),
        **more,
    }


def sql_rows(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


# --- driving a ledger in-process, as the API and the workers would ------------------------


class Driver:
    """Events into the current ledger through app.ledger, as the API applies them."""

    def __init__(self, tenant: str = "t1") -> None:
        from app.api.auth import create_key
        from app.core.db import session_scope
        from app.core.models import Role

        self.tenant = tenant
        with session_scope() as session:
            self.key, _ = create_key(
                session, name=f"emitter-{os.urandom(4).hex()}", role=Role.emitter, tenant=tenant
            )
            self.admin, self.admin_secret = create_key(
                session, name=f"admin-{os.urandom(4).hex()}", role=Role.admin, tenant=None
            )

    def apply(
        self,
        type_: str,
        subject: str,
        data: dict[str, Any] | None = None,
        event_id: str | None = None,
    ) -> Any:
        import hashlib
        import json

        from app import ledger
        from app.core.db import session_scope
        from app.core.models import utcnow
        from app.ledger import EventIn, installation_id
        from app.profiles import get_profiles

        event_id = event_id or f"evt-{os.urandom(6).hex()}"
        body = {"id": event_id, "type": type_, "subject": subject, "data": data}
        event = EventIn(
            source="pytest://reconcile",
            id=event_id,
            type=type_,
            subject=subject,
            time=utcnow(),
            data=data,
            body_hash=hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
        )
        with session_scope() as session:
            return ledger.apply_event(
                session,
                key=self.key,
                event=event,
                profiles=get_profiles(),
                installation_id=installation_id(),
                retention_days=30,
            )

    def start(
        self, subject: str, grants: dict[str, str], max_duration: int = 600
    ) -> dict[str, str]:
        data = {
            "max_duration": max_duration,
            "grants": [{"name": n, "profile": p} for n, p in grants.items()],
        }
        self.apply("task.started", subject, data)
        return {c.grant: c.id for c in self.credentials(subject)}

    def end(self, subject: str, kind: str = "task.succeeded") -> list[str]:
        return list(self.apply(kind, subject).to_revoke)

    def credentials(self, subject: str) -> list[Any]:
        from sqlmodel import select

        from app.core.db import session_scope
        from app.core.models import Credential, Task

        with session_scope() as session:
            task = session.exec(
                select(Task).where(Task.tenant == self.tenant, Task.name == subject)
            ).first()
            if task is None:
                return []
            return list(session.exec(select(Credential).where(Credential.task_id == task.id)))


def credential(cred_id: str) -> Any:
    from app.core.db import session_scope
    from app.core.models import Credential

    with session_scope() as session:
        return session.get(Credential, cred_id)


def issuer(profile: str, inst: str) -> Any:
    """This process's issuer for a profile of the current profiles file, for installation `inst`."""
    from app.core.settings import get_settings
    from app.issuers import get_issuer
    from app.profiles import get_profiles

    return get_issuer(get_profiles()[profile], installation_id=inst, settings=get_settings())


def mint_request(cred_id: str, name: str, inst: str, minutes: int = 10) -> Any:
    from datetime import timedelta

    from app.core.models import utcnow
    from app.issuers.base import MintRequest

    return MintRequest(
        credential_id=cred_id,
        name=name,
        installation_id=inst,
        tenant="t1",
        task_id="orphan-test",
        task_digest="d" * 16,
        expires_at=utcnow() + timedelta(minutes=minutes),
    )
