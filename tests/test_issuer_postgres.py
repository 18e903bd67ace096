"""PostgresIssuer against the real server at 127.0.0.1:5432 (user postgres, trust).

Each run makes its own database and installation id and drops both afterwards.
Password logins need a scram-sha-256 pg_hba line for lh_ roles ahead of the
trust lines: run `.ci/pg-setup.sh` (as root) once per machine.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import hashlib
import os
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from app.core.settings import Settings
from app.issuers.base import MintRequest, PermanentIssuerError, TemporaryIssuerError
from app.issuers.postgres import (
    SCRAM_ITERATIONS,
    PostgresIssuer,
    credential_dsn,
    scram_sha256_verifier,
)
from app.profiles import PostgresProfile
from tests.support.procs import wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

SERVER = "postgresql://postgres@127.0.0.1:5432"
# On PostgreSQL < 16 pg_hba has no regex user names; .ci/pg-setup.sh adds a
# `+leasehold_scram_login` line instead, and each group role joins that role.
HBA_ROLE = "leasehold_scram_login"
SETUP_HINT = "run `sudo .ci/pg-setup.sh` to make lh_ roles log in with scram-sha-256"


# Every installation id this run used: their roles are dropped at the end.
INSTALLATIONS: list[str] = []


def admin(dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(f"{SERVER}/{dbname}", autocommit=True)


def new_installation(installation_id: str | None = None) -> str:
    installation_id = installation_id or secrets.token_hex(8)
    INSTALLATIONS.append(installation_id)
    return installation_id


@pytest.fixture(scope="module")
def installation_id() -> str:
    return new_installation()


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    name = f"lh_issuer_{secrets.token_hex(4)}"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        # Every statement the issuer sends lands in the server log, where the
        # leak test looks for the plaintext password.
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET log_statement = 'all'").format(sql.Identifier(name))
        )
    try:
        with admin(name) as conn:
            conn.execute("CREATE TABLE granted (x int); INSERT INTO granted VALUES (42)")
            conn.execute("CREATE TABLE withheld (x int); INSERT INTO withheld VALUES (7)")
            # Only the profile's grants let a credential in.
            conn.execute(
                sql.SQL("REVOKE CONNECT, TEMP ON DATABASE {} FROM PUBLIC").format(
                    sql.Identifier(name)
                )
            )
        yield name
    finally:
        with admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            for installation in INSTALLATIONS:
                roles = conn.execute(
                    "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)",
                    (f"lh_{installation[:12]}_",),
                ).fetchall()
                for (role,) in roles:
                    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def make_profile(database: str, *extra_grants: str, name: str = "reports") -> PostgresProfile:
    db = sql.Identifier(database).as_string()
    return PostgresProfile(
        name=name,
        issuer="postgres",
        dsn=f"{SERVER}/{database}",
        grants=(
            f"GRANT CONNECT ON DATABASE {db} TO {{role}}",
            "GRANT USAGE ON SCHEMA public TO {role}",
            "GRANT SELECT ON granted TO {role}",
            *extra_grants,
        ),
        max_ttl=3600,
    )


def make_issuer(profile: PostgresProfile, installation_id: str) -> PostgresIssuer:
    return PostgresIssuer(
        profile, installation_id=installation_id, settings=Settings(backend_timeout=5.0)
    )


def allow_password_logins(issuer: PostgresIssuer) -> None:
    """On PostgreSQL < 16, put the issuer's group under pg-setup's `+role` line."""
    with admin() as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        if version is not None and int(version[0]) < 160000:
            conn.execute(
                sql.SQL("GRANT {} TO {}").format(
                    sql.Identifier(HBA_ROLE), sql.Identifier(issuer.ensure_group())
                )
            )


@pytest.fixture(scope="module")
def hba() -> None:
    """Fail (not skip) when password logins of lh_ roles are not enforced."""
    with admin() as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        assert version is not None
        wanted = "/^lh_" if int(version[0]) >= 160000 else f"+{HBA_ROLE}"
        rules = conn.execute(
            "SELECT user_name, auth_method FROM pg_hba_file_rules"
            " WHERE type = 'host' AND error IS NULL ORDER BY line_number"
        ).fetchall()
        role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (HBA_ROLE,)).fetchone()
    lines = [(users, method) for users, method in rules]
    scram = next(
        (i for i, (u, m) in enumerate(lines) if wanted in u and m == "scram-sha-256"), None
    )
    trust = next((i for i, (u, m) in enumerate(lines) if "all" in u and m == "trust"), len(lines))
    if scram is None or scram > trust or (wanted.startswith("+") and role is None):
        pytest.fail(f"pg_hba.conf: no scram-sha-256 line for {wanted} before trust; {SETUP_HINT}")


@pytest.fixture(scope="module")
def issuer(database: str, installation_id: str, hba: None) -> Iterator[PostgresIssuer]:
    issuer = make_issuer(make_profile(database), installation_id)
    allow_password_logins(issuer)
    yield issuer
    issuer.close()


def request(issuer: PostgresIssuer, *, ttl: int = 300) -> MintRequest:
    credential_id = secrets.token_hex(6)
    return MintRequest(
        credential_id=credential_id,
        name=issuer.prefix + credential_id,
        installation_id=issuer.installation_id,
        tenant="acme",
        task_id="report/try-1",
        task_digest=secrets.token_hex(8),
        expires_at=datetime.now(UTC) + timedelta(seconds=ttl),
    )


def login(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=3)


def test_mint_logs_in_with_password_and_reads_only_granted(issuer: PostgresIssuer) -> None:
    req = request(issuer)
    minted = issuer.mint(req)
    secret = minted.secret
    assert minted.ref == req.name == secret["username"]
    assert minted.expires_at == req.expires_at
    assert secret["dsn"].startswith(f"postgresql://{req.name}:")
    assert secret["dsn"].endswith(f"@127.0.0.1:5432/{issuer.profile.dsn.rsplit('/', 1)[1]}")

    with login(secret["dsn"]) as conn:
        assert conn.execute("SELECT current_user, x FROM granted").fetchall() == [(req.name, 42)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT x FROM withheld")

    wrong = credential_dsn(issuer.profile.dsn, req.name, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        login(wrong).close()

    with admin() as conn:
        row = conn.execute(
            "SELECT rolvaliduntil, rolcanlogin, shobj_description(oid, 'pg_authid')"
            " FROM pg_roles WHERE rolname = %s",
            (req.name,),
        ).fetchone()
    assert row is not None
    assert abs((row[0] - req.expires_at).total_seconds()) < 1
    assert row[1] is True
    assert row[2] == (
        f"leasehold installation={issuer.installation_id} credential={req.credential_id}"
    )
    issuer.revoke(minted.ref)


def test_revoke_cuts_open_session_and_refuses_new_login(issuer: PostgresIssuer) -> None:
    minted = issuer.mint(request(issuer))
    session = login(minted.secret["dsn"])
    assert session.execute("SELECT x FROM granted").fetchone() == (42,)

    issuer.revoke(minted.ref)

    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT x FROM granted")
    session.close()
    with pytest.raises(psycopg.OperationalError):
        login(minted.secret["dsn"]).close()
    assert not issuer.exists(minted.ref)
    issuer.revoke(minted.ref)  # twice is fine
    issuer.revoke(issuer.prefix + "never-minted")


def test_revoke_drops_a_role_that_owns_an_object(issuer: PostgresIssuer, database: str) -> None:
    # DROP ROLE refuses (2BP01, DependentObjectsStillExist): the revoke gives the
    # object up (DROP OWNED) and drops the role all the same.
    minted = issuer.mint(request(issuer))
    table = sql.Identifier(f"owned_{secrets.token_hex(4)}")
    with admin(database) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} ()").format(table))
        conn.execute(
            sql.SQL("ALTER TABLE {} OWNER TO {}").format(table, sql.Identifier(minted.ref))
        )

    issuer.revoke(minted.ref)

    assert not issuer.exists(minted.ref)
    with admin(database) as conn:
        found = conn.execute("SELECT to_regclass(%s)", (table.as_string(conn),)).fetchone()
    assert found == (None,)


def test_retried_mint_replaces_the_role(issuer: PostgresIssuer) -> None:
    req = request(issuer)
    first = issuer.mint(req)
    second = issuer.mint(req)
    assert first.secret["password"] != second.secret["password"]
    with pytest.raises(psycopg.OperationalError):
        login(first.secret["dsn"]).close()
    with login(second.secret["dsn"]) as conn:
        assert conn.execute("SELECT x FROM granted").fetchone() == (42,)
    issuer.revoke(second.ref)


def test_refuses_roles_without_the_mark(issuer: PostgresIssuer) -> None:
    for name in ("postgres", "lh_other_x", issuer.prefix, issuer.ensure_group()):
        with pytest.raises(PermanentIssuerError):
            issuer.revoke(name)
    with pytest.raises(PermanentIssuerError):
        issuer.mint(dataclasses.replace(request(issuer), name="reports_admin"))
    with admin() as conn:
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'postgres'").fetchone()


def test_concurrent_mints_and_revokes(database: str, installation_id: str, hba: None) -> None:
    # A fresh profile (so a fresh group) and one issuer per "process": the
    # group set-up races too, not only the login roles.
    profile = make_profile(database, "GRANT SELECT ON granted TO {role} -- concurrent")
    issuers = [make_issuer(profile, installation_id) for _ in range(4)]
    barrier = threading.Barrier(20)

    def lifecycle(n: int) -> str:
        issuer = issuers[n % len(issuers)]
        barrier.wait()
        minted = issuer.mint(request(issuer))
        issuer.revoke(minted.ref)
        return minted.ref

    try:
        with ThreadPoolExecutor(max_workers=20) as pool:
            futures = [pool.submit(lifecycle, n) for n in range(20)]
            errors = [f.exception() for f in futures if f.exception() is not None]
        assert errors == [], [str(e) for e in errors]
        refs = [f.result() for f in futures]
        assert len(set(refs)) == 20
        assert not any(issuers[0].exists(ref) for ref in refs)
    finally:
        for issuer in issuers:
            issuer.close()


def test_list_marked_sees_own_roles_only(
    issuer: PostgresIssuer, database: str, installation_id: str
) -> None:
    mine = issuer.mint(request(issuer))
    # Another installation, and one that even shares our 12-character prefix.
    others = [
        make_issuer(make_profile(database, name="other"), new_installation()),
        make_issuer(
            make_profile(database, "GRANT SELECT ON granted TO {role} -- twin", name="twin"),
            new_installation(installation_id[:12] + "ffff"),
        ),
    ]
    try:
        foreign = [other.mint(request(other)) for other in others]
        marked = {m.ref: m for m in issuer.list_marked()}
        assert mine.ref in marked
        assert marked[mine.ref].credential_id == mine.ref.removeprefix(issuer.prefix)
        assert marked[mine.ref].extra["login"] == "true"
        assert issuer.ensure_group() not in marked
        for minted in foreign:
            assert minted.ref not in marked
        assert foreign[1].ref in {m.ref for m in others[1].list_marked()}
        assert issuer.exists(mine.ref)

        issuer.revoke(mine.ref)
        assert mine.ref not in {m.ref for m in issuer.list_marked()}
        for other, minted in zip(others, foreign, strict=True):
            other.revoke(minted.ref)
    finally:
        for other in others:
            other.close()


def test_extend_moves_valid_until_within_max_ttl(issuer: PostgresIssuer) -> None:
    minted = issuer.mint(request(issuer, ttl=60))
    later = datetime.now(UTC) + timedelta(minutes=30)
    issuer.extend(minted.ref, later)
    too_late = datetime.now(UTC) + timedelta(days=2)
    with admin() as conn:
        query = "SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s"
        row = conn.execute(query, (minted.ref,)).fetchone()
        assert row is not None and abs((row[0] - later).total_seconds()) < 1
        issuer.extend(minted.ref, too_late)
        row = conn.execute(query, (minted.ref,)).fetchone()
    cap = datetime.now(UTC) + timedelta(seconds=issuer.profile.max_ttl)
    assert row is not None and abs((row[0] - cap).total_seconds()) < 5
    issuer.revoke(minted.ref)


def test_check_warns_while_public_may_connect(issuer: PostgresIssuer, database: str) -> None:
    assert not [w for w in issuer.check() if "PUBLIC" in w]
    db = sql.Identifier(database)
    with admin() as conn:
        conn.execute(sql.SQL("GRANT CONNECT, TEMP ON DATABASE {} TO PUBLIC").format(db))
        try:
            warnings = issuer.check()
        finally:
            conn.execute(sql.SQL("REVOKE CONNECT, TEMP ON DATABASE {} FROM PUBLIC").format(db))
    assert any("CONNECT to PUBLIC" in w for w in warnings)
    assert any("TEMP to PUBLIC" in w for w in warnings)


def test_password_only_ever_a_scram_verifier(issuer: PostgresIssuer) -> None:
    req = request(issuer)
    issuer.mint(req)
    # A retried mint fails its first CREATE ROLE: the server logs that statement.
    minted = issuer.mint(req)
    password = minted.secret["password"]
    with admin() as conn:
        rows = conn.execute("SELECT rolname, rolpassword FROM pg_authid").fetchall()
    stored = dict(rows)[minted.ref]
    assert stored.startswith(f"SCRAM-SHA-256${SCRAM_ITERATIONS}:")
    assert not [name for name, secret in rows if secret and password in secret]

    logs = [p for p in glob.glob("/var/log/postgresql/postgresql-*.log") if os.access(p, os.R_OK)]
    if logs:
        text = "".join(Path(p).read_text(errors="replace") for p in logs)
        # The log is live: it holds both CREATE ROLE statements, one failed.
        assert f'CREATE ROLE "{minted.ref}" LOGIN PASSWORD \'SCRAM-SHA-256$' in text
        assert f'role "{minted.ref}" already exists' in text
        assert password not in text
    issuer.revoke(minted.ref)


def test_scram_verifier_format() -> None:
    verifier = scram_sha256_verifier("pencil")
    head, keys = verifier.rsplit("$", 1)
    assert head.startswith(f"SCRAM-SHA-256${SCRAM_ITERATIONS}:")
    assert len(keys.split(":")) == 2
    assert verifier != scram_sha256_verifier("pencil")  # salted
    assert "pencil" not in verifier


def scram_login(verifier: str, password: str) -> None:
    """A whole SCRAM-SHA-256 exchange (RFC 5802) with an independent implementation:
    scramp's server holding `verifier`, scramp's client knowing `password`."""
    from scramp import ScramClient, ScramMechanism

    head, keys = verifier.split("$", 1)[1].rsplit("$", 1)
    iterations, salt = head.split(":")
    stored, server_key = (base64.b64decode(k) for k in keys.split(":"))
    auth = (base64.b64decode(salt), stored, server_key, int(iterations))
    server = ScramMechanism("SCRAM-SHA-256").make_server(lambda _user: auth)
    client = ScramClient(["SCRAM-SHA-256"], "lh_user", password)
    server.set_client_first(client.get_client_first())
    client.set_server_first(server.get_server_first())
    server.set_client_final(client.get_client_final())
    client.set_server_final(server.get_server_final())


def test_scram_verifier_proves_the_password_to_another_implementation() -> None:
    from scramp import ScramException

    password = secrets.token_urlsafe(32)
    verifier = scram_sha256_verifier(password)
    scram_login(verifier, password)
    with pytest.raises(ScramException):
        scram_login(verifier, password + "x")
    # Why the count stays at 4096, though less would spare the server most of a mint's
    # cost: drivers such as this one (pg8000's SCRAM) refuse anything under RFC 7677's.
    with pytest.raises(ScramException, match="4096"):
        scram_login(scram_sha256_verifier(password, iterations=1024), password)


def test_credential_dsn_keeps_the_address() -> None:
    dsn = credential_dsn(
        "postgresql+psycopg://admin:s3cret@db.example:5433/reports?sslmode=require&password=x",
        "lh_abc_1",
        "p@ss/word",
    )
    assert dsn == "postgresql://lh_abc_1:p%40ss%2Fword@db.example:5433/reports?sslmode=require"


ADMIN_ONLY = {
    "sslpassword": "key-passphrase-do-not-hand-out",
    "sslkey": "/etc/leasehold/admin.key",
    "sslcert": "/etc/leasehold/admin.crt",
    "passfile": "/etc/leasehold/pgpass",
    "options": "-c role=postgres",
    "service": "admin-service",
    "application_name": "leasehold-admin",
    "user": "postgres",
    "password": "admin-password",
}


def test_credential_dsn_carries_none_of_the_admins_parameters() -> None:
    from urllib.parse import urlencode

    query = urlencode({**ADMIN_ONLY, "sslmode": "verify-full", "connect_timeout": "3"})
    dsn = credential_dsn(f"postgresql://admin:s3cret@db.example/reports?{query}", "lh_a_1", "pw")
    assert dsn == (
        "postgresql://lh_a_1:pw@db.example/reports?sslmode=verify-full&connect_timeout=3"
    )


def test_minted_dsn_from_an_admin_dsn_with_extra_parameters(
    database: str, installation_id: str, hba: None
) -> None:
    from urllib.parse import quote, urlencode

    # Parameters a real admin connection can carry here (no TLS on the test server).
    extra = {"options": "-c statement_timeout=4000", "application_name": "lh-admin-side"}
    profile = make_profile(database, name="reports-extra")
    profile = profile.model_copy(
        update={"dsn": f"{profile.dsn}?{urlencode(extra, quote_via=quote)}"}
    )
    issuer = make_issuer(profile, installation_id)
    try:
        allow_password_logins(issuer)
        minted = issuer.mint(request(issuer))
        handed_out = minted.secret["dsn"]
        for key, value in extra.items():
            assert key not in handed_out and value not in handed_out
        with login(handed_out) as conn:  # the address alone is enough
            assert conn.execute("SHOW statement_timeout").fetchone() != ("4s",)
            assert conn.execute("SELECT x FROM granted").fetchone() == (42,)
        issuer.revoke(minted.ref)
    finally:
        issuer.close()


def server_version() -> int:
    with admin() as conn:
        return conn.info.server_version


def test_membership_sql_for_each_server_version(issuer: PostgresIssuer) -> None:
    when = datetime.now(UTC) + timedelta(minutes=5)
    args = ("lh_x_1", "SCRAM-SHA-256$4096:AA==$AA==:AA==", when, "cred", "lh_x_g_1")
    with admin() as conn:
        new = issuer._create_login_sql(160000, *args).as_string(conn)
        old = issuer._create_login_sql(150004, *args).as_string(conn)
    assert 'GRANT "lh_x_g_1" TO "lh_x_1" WITH INHERIT TRUE, SET FALSE' in new
    assert 'GRANT "lh_x_g_1" TO "lh_x_1";' in old and "SET FALSE" not in old
    assert "IN ROLE" not in new + old


def test_credential_cannot_set_role_to_its_group_from_16(issuer: PostgresIssuer) -> None:
    """From 16 the group is out of reach; on 15 (README) it is, and the SQL for 15 works."""
    minted = issuer.mint(request(issuer))
    group = sql.Identifier(issuer.ensure_group())
    with admin() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
            " WHERE r.rolname = %s",
            (minted.ref,),
        ).fetchone()
    assert row == (1,)  # one membership: the group (pg-setup's HBA role joins the group)
    with login(minted.secret["dsn"]) as conn:
        assert conn.execute("SELECT x FROM granted").fetchone() == (42,)  # inherited
        if server_version() >= 160000:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql.SQL("SET ROLE {}").format(group))
        else:
            conn.execute(sql.SQL("SET ROLE {}").format(group))  # what README says of 15
            assert conn.execute("SELECT current_user").fetchone() == (issuer.ensure_group(),)
    issuer.revoke(minted.ref)


def unreachable_issuer(installation_id: str) -> PostgresIssuer:
    """An issuer whose server does not answer (nothing listens on port 1)."""
    profile = PostgresProfile(
        name="down",
        issuer="postgres",
        dsn="postgresql://admin:hunter2-hidden@127.0.0.1:1/x",
        grants=("GRANT CONNECT ON DATABASE x TO {role}",),
        max_ttl=60,
    )
    return PostgresIssuer(
        profile, installation_id=installation_id, settings=Settings(backend_timeout=0.3)
    )


def test_unreachable_server_is_temporary_and_hides_password(installation_id: str) -> None:
    issuer = unreachable_issuer(installation_id)
    with pytest.raises(TemporaryIssuerError) as caught:
        issuer.exists("lh_x")
    assert "hunter2-hidden" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    issuer.close()


def test_bad_grant_is_permanent(database: str, installation_id: str) -> None:
    profile = make_profile(database, "GRANT SELECT ON no_such_table TO {role}", name="bad")
    issuer = make_issuer(profile, installation_id)
    req = request(issuer)
    digest = hashlib.sha256("\n".join((database, *profile.grants)).encode()).hexdigest()
    try:
        with pytest.raises(PermanentIssuerError, match="no_such_table"):
            issuer.mint(req)
        assert not issuer.exists(f"{issuer.prefix}g_{digest[:12]}")  # rolled back whole
        assert not issuer.exists(req.name)
    finally:
        issuer.close()


def test_an_unreachable_backend_fails_a_revoke_batch_at_once(installation_id: str) -> None:
    """No connection to be had (the pool's timeout): every role of the batch fails with
    that error, temporary, without each waiting for a connection again."""
    issuer = unreachable_issuer(installation_id)
    names = [issuer.prefix + secrets.token_hex(6) for _ in range(3)]
    tried: list[str] = []
    real_drop = issuer._drop

    def drop(name: str) -> None:
        tried.append(name)
        real_drop(name)

    issuer._drop = drop  # type: ignore[method-assign]
    failed = issuer.revoke_many(names)
    issuer.close()
    assert set(failed) == set(names)
    assert all(isinstance(e, TemporaryIssuerError) for e in failed.values())
    assert "hunter2-hidden" not in " ".join(str(e) for e in failed.values())
    assert tried == []  # the batch's failure said it all


def test_a_broken_connection_sends_a_revoke_batch_role_by_role(issuer: PostgresIssuer) -> None:
    """A connection that broke (no SQLSTATE: the server restarted, the network dropped)
    is no unreachable backend: each role goes on its own, on a fresh connection."""
    refs = [issuer.mint(request(issuer)).ref for _ in range(3)]
    real_many = issuer._drop_many

    def broken(names: list[str]) -> None:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    issuer._drop_many = broken  # type: ignore[method-assign]
    try:
        assert issuer.revoke_many(refs) == {}
    finally:
        issuer._drop_many = real_many  # type: ignore[method-assign]
    assert not any(issuer.exists(ref) for ref in refs)


def test_a_pool_timeout_role_by_role_fails_the_rest_at_once(issuer: PostgresIssuer) -> None:
    from psycopg_pool import PoolTimeout

    refs = [issuer.mint(request(issuer)).ref for _ in range(3)]
    tried: list[str] = []

    def broken(names: list[str]) -> None:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    def timing_out(name: str) -> None:
        tried.append(name)
        raise PoolTimeout("couldn't get a connection after 5.00 sec")

    real_many, real_drop = issuer._drop_many, issuer._drop
    issuer._drop_many, issuer._drop = broken, timing_out  # type: ignore[method-assign]
    try:
        failed = issuer.revoke_many(refs)
    finally:
        issuer._drop_many, issuer._drop = real_many, real_drop  # type: ignore[method-assign]
    assert tried == refs[:1]
    assert set(failed) == set(refs)
    assert all(isinstance(e, TemporaryIssuerError) for e in failed.values())
    assert issuer.revoke_many(refs) == {}  # reachable again: they go
    assert not any(issuer.exists(ref) for ref in refs)


def test_a_connection_lost_after_the_drop_leaves_no_session(issuer: PostgresIssuer) -> None:
    """The DROP commits, then the connection is lost before the sessions are ended: the
    retry finds no role, so nothing is left for it to end. The sessions were ended in
    the DROP's own query already."""
    minted = issuer.mint(request(issuer))
    session = login(minted.secret["dsn"])
    pid = session.info.backend_pid
    real_end = issuer._end_sessions

    def lost(*_: Any, **__: Any) -> None:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    issuer._end_sessions = lost  # type: ignore[method-assign]
    try:
        # The batch fails after its DROP; role by role, the role is gone already.
        assert issuer.revoke_many([minted.ref]) == {}
    finally:
        issuer._end_sessions = real_end  # type: ignore[method-assign]
    assert not issuer.exists(minted.ref)
    with admin() as conn:
        wait_until(
            lambda: (
                conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
                is None
            ),
            timeout=5,
        )
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT x FROM granted")
    session.close()
