"""PostgreSQL issuer: one LOGIN role per credential, joining a per-profile group.

The profile's grants go once to a NOLOGIN group role; a credential is
`CREATE ROLE ... LOGIN ... VALID UNTIL ... IN ROLE <group>`, so minting and
revoking never touch an ACL (concurrent GRANT/REVOKE on one object fails with
"tuple concurrently updated", and per-credential grants bloat ACLs).
Passwords travel only as SCRAM-SHA-256 verifiers: a failed statement lands in
the server log, and the plaintext must not.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.numeric import Oid
from psycopg_pool import ConnectionPool, PoolTimeout

from app.core.settings import Settings
from app.issuers.base import (
    BackendIdentity,
    Issuer,
    IssuerError,
    MarkedObject,
    Minted,
    MintRequest,
    PermanentIssuerError,
    TemporaryIssuerError,
)
from app.issuers.errors import ErrorTable, Kind
from app.profiles import PostgresProfile, Profile

# The verifier's iteration count: PostgreSQL's default. The server checks each new
# secret against the empty password at this count (3-7 ms of its CPU per CREATE ROLE,
# the largest single cost of a mint), and a random 256-bit password needs no stretching,
# but drivers enforce RFC 7677's minimum of 4096 (scramp, so pg8000, refuses less).
SCRAM_ITERATIONS = 4096
_COMMENT = re.compile(r"^leasehold installation=(?P<inst>\S+) (?:credential=(?P<cred>\S+)|group)$")


def scram_sha256_verifier(password: str, *, iterations: int = SCRAM_ITERATIONS) -> str:
    """The verifier PostgreSQL stores in pg_authid.rolpassword (RFC 5802/7677)."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _libpq_url(dsn: str) -> str:
    """libpq does not know SQLAlchemy's `+psycopg` driver suffix."""
    scheme, sep, rest = dsn.partition("://")
    return scheme.split("+", 1)[0] + sep + rest


# What of the admin DSN's query string a credential's DSN keeps: where the server
# is and how strictly to insist on TLS. Everything else (sslkey, sslpassword,
# sslcert, passfile, options, service, ...) is the admin's own and stays here.
_DSN_KEPT = frozenset(
    {"host", "hostaddr", "port", "dbname", "sslmode", "target_session_attrs", "connect_timeout"}
)


def credential_dsn(dsn: str, username: str, password: str) -> str:
    """The server's address with the credential's user and password, nothing more."""
    parts = urlsplit(_libpq_url(dsn))
    hosts = parts.netloc.rpartition("@")[2]
    userinfo = f"{quote(username, safe='')}:{quote(password, safe='')}"
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k in _DSN_KEPT],
        quote_via=quote,  # libpq reads "+" as a plus, not a space
    )
    return urlunsplit((parts.scheme, f"{userinfo}@{hosts}", parts.path, query, ""))


class PostgresIssuer(Issuer):
    """Mints login roles on the cluster behind `profile.dsn` (an admin connection)."""

    family = "postgres"
    name_is_ref = True  # the role's name, chosen by the ledger

    def __init__(
        self, profile: PostgresProfile, *, installation_id: str, settings: Settings
    ) -> None:
        super().__init__(profile, installation_id=installation_id, settings=settings)
        self.profile: PostgresProfile = profile
        self._group_pattern = re.compile(re.escape(self.prefix) + r"g_[0-9a-f]{12}")
        self._timeout = settings.backend_timeout
        self._conninfo = _libpq_url(profile.dsn)
        # Both spellings (percent-encoded in the URL, decoded by libpq) are scrubbed.
        self._dsn_passwords = tuple(
            p
            for p in (
                urlsplit(self._conninfo).password,
                conninfo_to_dict(self._conninfo).get("password"),
            )
            if isinstance(p, str) and p
        )
        self._pool_lock = threading.Lock()
        self._group_lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._group: str | None = None  # set once the group role is ensured

    # -- the Issuer face ---------------------------------------------------

    @classmethod
    def backend_identity(cls, profile: Profile, settings: Settings) -> BackendIdentity:
        # Roles are cluster-wide: every database of one server lists the same roles.
        assert isinstance(profile, PostgresProfile)
        info = conninfo_to_dict(_libpq_url(profile.dsn))
        host = str(info.get("hostaddr") or info.get("host") or "").lower()
        return BackendIdentity(cls.family, f"{host}:{info.get('port') or 5432}")

    def mint(self, req: MintRequest) -> Minted:
        name = self._own(req.name, "role")
        if self._group_pattern.fullmatch(name):
            raise PermanentIssuerError(f"postgres mint: {name} is a group role name")
        expires_at = self._cap(req.expires_at)
        password = secrets.token_urlsafe(32)
        verifier = scram_sha256_verifier(password)
        with self._errors("mint", password, verifier):
            group = self.ensure_group()
            try:
                self._create_login(name, verifier, expires_at, req.credential_id, group)
            except errors.DuplicateObject:
                # A retried mint: nobody holds the old password, start afresh.
                self._drop(name)
                self._create_login(name, verifier, expires_at, req.credential_id, group)
            except errors.UndefinedObject:
                # The group vanished under us (dropped by hand): make it again.
                with self._group_lock:
                    self._group = None
                group = self.ensure_group()
                self._create_login(name, verifier, expires_at, req.credential_id, group)
        return Minted(
            ref=name,
            secret={
                "username": name,
                "password": password,
                "dsn": credential_dsn(self.profile.dsn, name, password),
            },
            expires_at=expires_at,
        )

    def revoke(self, ref: str) -> None:
        failed = self.revoke_many([ref])
        if failed:
            raise failed[ref]

    def revoke_many(self, refs: list[str]) -> dict[str, IssuerError]:
        """One DROP ROLE for the batch (one transaction, one round trip), then its
        sessions ended and the roles verified gone; a role the fast path cannot drop
        (it owns an object) goes the long way, on its own."""
        failed: dict[str, IssuerError] = {}
        names: list[str] = []
        for ref in refs:
            try:
                name = self._own(ref, "role")
                if self._group_pattern.fullmatch(name):
                    raise PermanentIssuerError(f"postgres revoke: refusing group role {name}")
            except PermanentIssuerError as exc:
                failed[ref] = exc
                continue
            if name not in names:
                names.append(name)
        if not names:
            return failed
        unreachable = False
        try:
            with self._errors("revoke"):
                try:
                    self._drop_many(names)
                except PoolTimeout:
                    unreachable = True
                    raise
            return failed
        except IssuerError as exc:
            if unreachable:
                return {**failed, **_all_failed(names, exc)}
            # One of them (e.g. it owns an object), or a connection that broke: each on
            # its own, with its own error (a broken connection is replaced by the pool).
        for i, name in enumerate(names):
            try:
                with self._errors("revoke"):
                    try:
                        self._drop(name)
                    except PoolTimeout:
                        unreachable = True
                        raise
            except IssuerError as exc:
                failed[name] = exc
                if unreachable:
                    return {**failed, **_all_failed(names[i + 1 :], exc)}
        return failed

    def exists(self, ref: str) -> bool:
        with self._errors("exists"), self._connection() as conn:
            row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ref,)).fetchone()
        return row is not None

    def list_marked(self) -> list[MarkedObject]:
        query = """
            SELECT rolname, rolcanlogin, rolvaliduntil, shobj_description(oid, 'pg_authid')
            FROM pg_roles WHERE starts_with(rolname, %s) ORDER BY rolname
        """
        with self._errors("list"), self._connection() as conn:
            rows = conn.execute(query, (self.prefix,)).fetchall()
        marked = []
        for name, can_login, valid_until, comment in rows:
            match = _COMMENT.match(comment or "")
            if match and match["inst"] != self.installation_id:
                continue  # shares our 12-character prefix, but not ours
            if self._group_pattern.fullmatch(name) or (match and match["cred"] is None):
                continue  # a group role holds grants, it is no credential
            extra = {"login": str(can_login).lower()}
            if valid_until is not None:
                extra["valid_until"] = valid_until.isoformat()
            marked.append(
                MarkedObject(
                    ref=name,
                    # Unmarked by comment: fall back on the name lh_<inst>_<credential>.
                    credential_id=(match["cred"] if match else self.credential_of(name)),
                    name=name,
                    extra=extra,
                )
            )
        return marked

    def extend(self, ref: str, expires_at: datetime, *, lease: str | None = None) -> None:
        name = self._own(ref, "role")
        stmt = sql.SQL("ALTER ROLE {} VALID UNTIL {}").format(
            sql.Identifier(name), sql.Literal(self._cap(expires_at).isoformat())
        )
        with self._errors("extend"), self._connection() as conn:
            conn.execute(stmt)

    def check(self) -> list[str]:
        query = """
            SELECT current_database(),
                   has_database_privilege('public', current_database(), 'CONNECT'),
                   has_database_privilege('public', current_database(), 'TEMP'),
                   (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user),
                   pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')
        """
        with self._errors("check"), self._connection() as conn:
            row = conn.execute(query).fetchone()
        assert row is not None
        database, connect, temp, createrole, signal = row
        where = f"profile '{self.profile.name}': database '{database}'"
        warnings = []
        if connect:
            warnings.append(
                f"{where} grants CONNECT to PUBLIC, so every credential can connect to it"
                f" (REVOKE CONNECT ON DATABASE ... FROM PUBLIC)"
            )
        if temp:
            warnings.append(
                f"{where} grants TEMP to PUBLIC, so every credential can create temporary"
                f" tables (REVOKE TEMP ON DATABASE ... FROM PUBLIC)"
            )
        if not createrole:
            warnings.append(f"profile '{self.profile.name}': the DSN's user lacks CREATEROLE")
        if not signal:
            warnings.append(
                f"profile '{self.profile.name}': the DSN's user cannot terminate sessions"
                f" (GRANT pg_signal_backend)"
            )
        return warnings

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    # -- the group role ----------------------------------------------------

    def ensure_group(self) -> str:
        """Create the profile's group role and give it the grants, once per process."""
        if self._group is not None:
            return self._group
        with self._errors("group"), self._group_lock:
            if self._group is not None:
                return self._group
            with self._connection() as conn, conn.transaction():
                # Roles are cluster-wide, grants per database: the name holds
                # both, so a changed profile gets a new group.
                row = conn.execute("SELECT current_database()").fetchone()
                assert row is not None
                digest = hashlib.sha256("\n".join((row[0], *self.profile.grants)).encode())
                group = f"{self.prefix}g_{digest.hexdigest()[:12]}"
                # Concurrent GRANTs on one object fail ("tuple concurrently
                # updated"): serialise every group set-up in this database.
                conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('leasehold:group-grants', 0))"
                )
                found = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (group,))
                ident = sql.Identifier(group)
                if found.fetchone() is None:
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(ident))
                comment = f"leasehold installation={self.installation_id} group"
                conn.execute(
                    sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(comment))
                )
                # Granted at every start, so a group repairs itself and
                # "ALL TABLES" picks up tables created since.
                role = ident.as_string(conn)
                for grant in self.profile.grants:
                    conn.execute(grant.replace("{role}", role).encode())
            self._group = group
            return group

    # -- internals ---------------------------------------------------------

    def _create_login(
        self, name: str, verifier: str, expires_at: datetime, credential_id: str, group: str
    ) -> None:
        with self._connection() as conn:
            conn.execute(
                self._create_login_sql(
                    conn.info.server_version, name, verifier, expires_at, credential_id, group
                )
            )

    def _create_login_sql(
        self,
        server_version: int,
        name: str,
        verifier: str,
        expires_at: datetime,
        credential_id: str,
        group: str,
    ) -> sql.Composed:
        """One simple query, so one implicit transaction: atomic, one round trip.

        From PostgreSQL 16 the membership is INHERIT TRUE, SET FALSE: the login
        role uses the group's grants but cannot `SET ROLE` to the group, so what it
        creates is its own (and goes with it), never the shared group's. Before 16
        a membership always allows SET ROLE (README: "PostgreSQL 15").
        """
        ident = sql.Identifier(name)
        comment = f"leasehold installation={self.installation_id} credential={credential_id}"
        create = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} VALID UNTIL {}").format(
            ident, sql.Literal(verifier), sql.Literal(expires_at.isoformat())
        )
        if server_version >= 160000:
            member = sql.SQL("GRANT {} TO {} WITH INHERIT TRUE, SET FALSE").format(
                sql.Identifier(group), ident
            )
        else:
            member = sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), ident)
        note = sql.SQL("COMMENT ON ROLE {} IS {}").format(ident, sql.Literal(comment))
        return sql.SQL("; ").join([create, member, note])

    def _drop_many(self, names: list[str]) -> None:
        """End the sessions, DROP, end what sessions remain, verify: two round trips for
        the common case.

        The oids are read, the roles' sessions ended and the roles dropped in one simple
        query (one transaction), so the sessions of a role are still found by oid once
        it is gone. Ending them before the DROP too means that a connection lost just
        after the DROP commits (the retry finds no role, so nothing to end) leaves at
        most a session that logged in within that query. Once the DROP commits no new
        login is possible; a session that logged in before is ended by oid here. A role
        that owns an object makes the DROP fail (and roll back): the caller then takes
        the long way (_drop), its sessions already ended."""
        idents = sql.SQL(", ").join(sql.Identifier(n) for n in names)
        listed = sql.SQL(", ").join(sql.Literal(n) for n in names)
        deadline = time.monotonic() + self._timeout
        with self._connection() as conn:
            cur = conn.execute(
                sql.SQL(
                    "SELECT oid FROM pg_roles WHERE rolname IN ({listed}); "
                    "{mine} SELECT count(pg_terminate_backend(pid)) FROM mine; "
                    "DROP ROLE IF EXISTS {idents}"
                ).format(
                    listed=listed,
                    mine=_sessions_of(
                        sql.SQL("IN (SELECT oid FROM pg_roles WHERE rolname IN ({}))").format(
                            listed
                        )
                    ),
                    idents=idents,
                )
            )
            oids = [Oid(row[0]) for row in cur.fetchall()]
            if not oids:
                return  # none existed: revoking is idempotent
            self._end_sessions(conn, oids, deadline, names)

    def _drop(self, name: str) -> None:
        """NOLOGIN, end its sessions, DROP, verify: no gap for a new session."""
        ident = sql.Identifier(name)
        deadline = time.monotonic() + self._timeout
        with self._connection() as conn:
            try:
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
            except errors.UndefinedObject:
                return  # already gone: revoking is idempotent
            row = conn.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            if row is None:
                return  # dropped concurrently
            oid = row[0]
            self._end_sessions(conn, [Oid(oid)], deadline)
            try:
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
            except errors.DependentObjectsStillExist:
                # It owns something here (it should not): give it up, then drop.
                conn.execute(
                    sql.SQL("DROP OWNED BY {}; DROP ROLE IF EXISTS {}").format(ident, ident)
                )
            # A session that logged in just before NOLOGIN may show up late;
            # by oid it is still found after the role is gone.
            self._end_sessions(conn, [Oid(oid)], deadline, [name])

    def _end_sessions(
        self,
        conn: psycopg.Connection[Any],
        oids: list[Oid],
        deadline: float,
        gone: list[str] | None = None,
    ) -> None:
        """Terminate the roles' backends and wait until they are gone; with `gone`,
        verify in the same round trip that none of those roles exists any more."""
        # No server-side wait (pg_terminate_backend(pid, ms) polls every 100 ms):
        # signal, then look again soon; a signalled backend exits in about 1 ms.
        query = sql.SQL(
            "{mine} SELECT (SELECT count(pg_terminate_backend(pid)) FROM mine), "
            "(SELECT min(rolname) FROM pg_roles WHERE rolname = ANY(%s))"
        ).format(mine=_sessions_of(sql.SQL("= ANY(%s)")))
        pause = 0.002
        while True:
            row = conn.execute(query, (oids, gone or [])).fetchone()
            if row is None or row[0] == 0:
                if row is not None and row[1] is not None:
                    raise TemporaryIssuerError(
                        f"postgres revoke: role {row[1]} still exists after DROP"
                    )
                return
            if time.monotonic() + pause >= deadline:
                raise TemporaryIssuerError(
                    f"postgres revoke: {row[0]} session(s) still open after terminate"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _cap(self, expires_at: datetime) -> datetime:
        """Never let the backend expiry pass the profile's max_ttl."""
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        limit = datetime.now(UTC) + timedelta(seconds=self.profile.max_ttl)
        return min(expires_at.astimezone(UTC), limit)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._get_pool().connection() as conn:
            yield conn

    def _get_pool(self) -> ConnectionPool:
        pool = self._pool
        if pool is not None:
            return pool
        with self._pool_lock:
            if self._pool is None:
                pool = ConnectionPool(
                    self._conninfo,
                    min_size=1,
                    max_size=4,
                    timeout=self._timeout,
                    open=False,
                    name=f"leasehold-{self.profile.name}",
                    kwargs={
                        "autocommit": True,
                        "connect_timeout": max(2, math.ceil(self._timeout)),
                        "application_name": "leasehold-issuer",
                    },
                    configure=self._configure,
                )
                # A pool that failed to open is closed for good: keep none, so
                # the next call (a retry) builds a fresh one.
                pool.open(wait=True, timeout=self._timeout)
                self._pool = pool
            return self._pool

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            sql.SQL("SET statement_timeout = {}").format(
                sql.Literal(f"{max(1, int(self._timeout * 1000))}ms")
            )
        )

    @contextmanager
    def _errors(self, action: str, *secrets_: str) -> Iterator[None]:
        """Map backend errors to temporary/permanent, with messages safe to log."""
        with ERRORS.guard(action, *self._dsn_passwords, *secrets_):
            yield


def _describe(exc: BaseException) -> str:
    # diag.message_primary leaves out libpq's "LINE 1: <statement>" echo,
    # which would quote a password verifier.
    assert isinstance(exc, psycopg.Error)
    text = exc.diag.message_primary or (str(exc).splitlines() or [""])[0]
    text = text or type(exc).__name__
    return f"[{exc.sqlstate}] {text}" if exc.sqlstate else text


def _sessions_of(roles: sql.Composable) -> sql.Composed:
    """`WITH mine AS (...)`: the backends whose role's oid is `usesysid <roles>`, this
    one excepted. MATERIALIZED fences the filter: the planner may otherwise evaluate
    pg_terminate_backend() before it and end every session. pg_stat_get_activity()
    is what the pg_stat_activity view reads (the same rows, the same visibility)
    without the view's joins, which took more to plan than to run (a DROP makes
    psycopg forget its prepared statements, so this is planned on every revoke)."""
    return sql.SQL(
        "WITH mine AS MATERIALIZED (SELECT pid FROM pg_stat_get_activity(NULL) "
        "WHERE usesysid {} AND pid <> pg_backend_pid())"
    ).format(roles)


def _all_failed(names: list[str], exc: IssuerError) -> dict[str, IssuerError]:
    """No connection to be had within the pool's timeout (the backend is out of reach):
    each remaining role on its own would wait that timeout again, one after another,
    while the step holds its ledger rows. They fail with this error; the backoff and
    the re-drive bring them back."""
    return dict.fromkeys(names, exc)


def _concurrent_update(exc: BaseException) -> bool:
    primary = (exc.diag.message_primary if isinstance(exc, psycopg.Error) else None) or ""
    return "tuple concurrently updated" in primary or "tuple concurrently deleted" in primary


ERRORS = ErrorTable(
    backend="postgres",
    catches=(psycopg.Error,),
    # OperationalError covers lost connections, pool timeouts, statement and
    # lock timeouts, serialization failures and deadlocks.
    rules=(
        (psycopg.OperationalError, Kind.temporary),
        (psycopg.InterfaceError, Kind.temporary),
    ),
    predicates=((_concurrent_update, Kind.temporary),),
    default=Kind.permanent,
    describe=_describe,
)
