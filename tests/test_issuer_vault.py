"""Vault issuers against a real OpenBao dev server (and, for vault-dynamic, the
real PostgreSQL at 127.0.0.1:5432 through OpenBao's database secrets engine)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import hvac
import hvac.exceptions
import psycopg
import pytest
from pydantic import SecretStr

from app.core.settings import Settings
from app.issuers.base import MintRequest, PermanentIssuerError, TemporaryIssuerError
from app.issuers.vault import VaultDynamicIssuer, VaultTokenIssuer
from app.issuers.vault_gateway import VaultGateway, close_gateways, get_gateway, renew_own_token
from app.local.openbao_dev import DevServer
from app.profiles import VaultDynamicProfile, VaultTokenProfile
from tests.support.procs import wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
READ_POLICY = "lh-test-read"


def _settings(server: DevServer, **extra: object) -> Settings:
    values: dict[str, object] = {
        "vault_addr": server.addr,
        "vault_token": SecretStr(server.token),
        "vault_role_id": None,
        "vault_secret_id": None,
        "vault_timeout": 5.0,
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


def _root(server: DevServer) -> hvac.Client:
    return hvac.Client(url=server.addr, token=server.token, timeout=5)


def _request(seconds: float = 120, *, installation: str = "inst") -> MintRequest:
    credential_id = uuid.uuid4().hex
    return MintRequest(
        credential_id=credential_id,
        name=f"lh_{credential_id[:16]}",
        installation_id=installation,
        tenant="t1",
        task_id="job/try-1",
        task_digest="d" * 16,
        expires_at=datetime.now(UTC) + timedelta(seconds=seconds),
    )


@pytest.fixture(autouse=True)
def _fresh_gateways() -> Iterator[None]:
    yield
    close_gateways()


@pytest.fixture(scope="module")
def vault(openbao: DevServer) -> DevServer:
    """The session's OpenBao, with what these tests read (no test here restarts it)."""
    _root(openbao).sys.create_or_update_policy(
        READ_POLICY, 'path "secret/data/test/*" { capabilities = ["read"] }'
    )
    _root(openbao).secrets.kv.v2.create_or_update_secret(
        path="test/hello", secret={"v": "1"}, mount_point="secret"
    )
    return openbao


@pytest.fixture
def installation() -> str:
    return uuid.uuid4().hex


def _token_issuer(
    server: DevServer, installation: str, *, name: str = "kv-reader", max_ttl: int = 600
) -> VaultTokenIssuer:
    profile = VaultTokenProfile(
        name=name, issuer="vault-token", policies=(READ_POLICY,), max_ttl=max_ttl
    )
    return VaultTokenIssuer(profile, installation_id=installation, settings=_settings(server))


# -- vault-token ---------------------------------------------------------------


def test_token_has_only_profile_policies_and_the_mark(vault: DevServer, installation: str) -> None:
    issuer = _token_issuer(vault, installation)
    req = _request(120, installation=installation)
    minted = issuer.mint(req)

    assert set(minted.secret) == {"token", "accessor"}
    assert minted.ref == minted.secret["accessor"]
    assert minted.expires_at <= req.expires_at
    own = hvac.Client(url=vault.addr, token=minted.secret["token"], timeout=5)
    # lookup-self lives in the default policy, which the token must not have.
    with pytest.raises(hvac.exceptions.Forbidden):
        own.auth.token.lookup_self()
    data = _root(vault).auth.token.lookup_accessor(minted.ref)["data"]
    assert data["policies"] == [READ_POLICY]
    assert 0 < data["ttl"] <= 120
    assert data["explicit_max_ttl"] == 600
    assert data["renewable"] is True
    assert data["meta"]["leasehold"] == installation
    assert data["meta"]["credential"] == req.credential_id
    assert data["meta"]["task"] == req.task_digest
    assert data["display_name"].endswith(f"lh-{req.credential_id}")
    assert issuer.exists(minted.ref)
    issuer.revoke(minted.ref)


def test_token_ttl_never_passes_max_ttl(vault: DevServer, installation: str) -> None:
    issuer = _token_issuer(vault, installation, max_ttl=60)
    minted = issuer.mint(_request(3600, installation=installation))
    data = _root(vault).auth.token.lookup_accessor(minted.ref)["data"]
    assert 0 < data["ttl"] <= 60
    assert data["explicit_max_ttl"] == 60
    assert minted.expires_at <= datetime.now(UTC) + timedelta(seconds=60)
    issuer.revoke(minted.ref)


def test_revoke_removes_token_and_is_idempotent(vault: DevServer, installation: str) -> None:
    issuer = _token_issuer(vault, installation)
    minted = issuer.mint(_request(installation=installation))
    own = hvac.Client(url=vault.addr, token=minted.secret["token"], timeout=5)
    assert own.read("secret/data/test/hello")["data"]["data"] == {"v": "1"}

    issuer.revoke(minted.ref)

    assert not issuer.exists(minted.ref)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        _root(vault).auth.token.lookup_accessor(minted.ref)
    with pytest.raises(hvac.exceptions.Forbidden):
        own.read("secret/data/test/hello")
    issuer.revoke(minted.ref)  # again: nothing to do, no error
    issuer.revoke("no-such-accessor")


def test_list_marked_finds_own_tokens_only(vault: DevServer, installation: str) -> None:
    issuer = _token_issuer(vault, installation)
    other_installation = _token_issuer(vault, uuid.uuid4().hex)
    other_profile = _token_issuer(vault, installation, name="other-profile")
    mine = issuer.mint(_request(installation=installation))
    theirs = other_installation.mint(_request())
    sibling = other_profile.mint(_request(installation=installation))

    marked = {m.ref: m for m in issuer.list_marked()}

    assert set(marked) == {mine.ref}
    assert marked[mine.ref].credential_id is not None
    assert {m.ref for m in other_installation.list_marked()} == {theirs.ref}
    for who, minted in ((issuer, mine), (other_installation, theirs), (other_profile, sibling)):
        who.revoke(minted.ref)
    assert issuer.list_marked() == []


def test_extend_moves_ttl_within_max(vault: DevServer, installation: str) -> None:
    issuer = _token_issuer(vault, installation, max_ttl=600)
    minted = issuer.mint(_request(30, installation=installation))
    root = _root(vault)

    issuer.extend(minted.ref, datetime.now(UTC) + timedelta(seconds=300))
    assert 250 < root.auth.token.lookup_accessor(minted.ref)["data"]["ttl"] <= 300

    issuer.extend(minted.ref, datetime.now(UTC) + timedelta(hours=5))
    assert root.auth.token.lookup_accessor(minted.ref)["data"]["ttl"] <= 600

    issuer.revoke(minted.ref)
    with pytest.raises(PermanentIssuerError):
        issuer.extend(minted.ref, datetime.now(UTC) + timedelta(seconds=300))


def test_errors_are_classified_and_carry_no_token(vault: DevServer, installation: str) -> None:
    weak = _root(vault).auth.token.create(policies=[READ_POLICY], ttl="60s")["auth"]
    profile = VaultTokenProfile(
        name="kv-reader", issuer="vault-token", policies=(READ_POLICY,), max_ttl=60
    )
    settings = _settings(vault, vault_token=SecretStr(weak["client_token"]))
    issuer = VaultTokenIssuer(profile, installation_id=installation, settings=settings)
    with pytest.raises(PermanentIssuerError) as refused:
        issuer.list_marked()  # listing accessors needs sudo
    assert weak["client_token"] not in str(refused.value)

    down = _settings(vault, vault_addr="http://127.0.0.1:9", vault_timeout=1.0)
    issuer = VaultTokenIssuer(profile, installation_id=installation, settings=down)
    with pytest.raises(TemporaryIssuerError) as unreachable:
        issuer.mint(_request(installation=installation))
    assert vault.token not in str(unreachable.value)


# -- Leasehold's own token -----------------------------------------------------


@pytest.fixture(scope="module")
def approle(vault: DevServer) -> Callable[..., Settings]:
    root = _root(vault)
    root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy("lh-self", 'path "auth/token/*" { capabilities = ["read"] }')

    def make(name: str, **role: object) -> Settings:
        root.auth.approle.create_or_update_approle(name, token_policies=["lh-self"], **role)
        role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
        secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
        return _settings(
            vault, vault_token=None, vault_role_id=role_id, vault_secret_id=SecretStr(secret_id)
        )

    return make


def _own_accessor(gateway: VaultGateway) -> str:
    return str(gateway.client.auth.token.lookup_self()["data"]["accessor"])


def test_own_token_renewed_past_half_ttl(approle: Callable[..., Settings]) -> None:
    # A TTL of 6 s and steps of 3.5 s: past half the TTL, with 2.5 s to spare before it
    # runs out (a loaded machine's stall must not expire it between sleep and renewal).
    settings = approle("renewable", token_ttl="6s", token_max_ttl="60s")
    gateway = get_gateway(settings)
    gateway.ensure_token()
    first = _own_accessor(gateway)

    time.sleep(3.5)
    renew_own_token(settings)

    data = gateway.client.auth.token.lookup_self()["data"]
    assert data["accessor"] == first  # renewed, not replaced
    assert data["ttl"] >= 3
    time.sleep(3.5)  # past the first TTL: the token lives on only if renewed
    renew_own_token(settings)
    assert _own_accessor(gateway) == first


@pytest.mark.parametrize(
    ("role", "token_type"),
    [("batch", "batch"), ("capped", "service")],  # not renewable / renewal capped by max TTL
)
def test_own_token_relogin_when_not_renewable(
    approle: Callable[..., Settings], role: str, token_type: str
) -> None:
    settings = approle(role, token_ttl="2s", token_max_ttl="2s", token_type=token_type)
    gateway = get_gateway(settings)
    gateway.ensure_token()
    first = gateway.client.token

    time.sleep(1.2)
    renew_own_token(settings)

    assert gateway.client.token != first  # a fresh AppRole login
    gateway.client.auth.token.lookup_self()


def test_root_token_needs_nothing(vault: DevServer) -> None:
    settings = _settings(vault)
    renew_own_token(settings)
    assert get_gateway(settings).client.token == vault.token
    renew_own_token(Settings(vault_addr=None))  # no Vault: nothing to do


# -- vault-dynamic ---------------------------------------------------------------


@dataclass
class Database:
    mount: str
    role: str  # OpenBao role; generated usernames contain it (8 chars: not truncated)

    def roles(self) -> list[str]:
        with psycopg.connect(**PG, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (f"%{self.role}%",)
            ).fetchall()
        return [r[0] for r in rows]

    def has_role(self, name: str) -> bool:
        return name in self.roles()


@pytest.fixture(scope="module")
def database(vault: DevServer) -> Iterator[Database]:
    suffix = uuid.uuid4().hex[:8]
    db = Database(mount=f"lhdb{suffix}", role=f"r{suffix[:7]}")
    root = _root(vault)
    root.sys.enable_secrets_engine("database", path=db.mount)
    root.secrets.database.configure(
        "pg",
        plugin_name="postgresql-database-plugin",
        connection_url=(
            "postgresql://{{username}}:{{password}}@127.0.0.1:5432/postgres?sslmode=disable"
        ),
        allowed_roles=[db.role],
        username="postgres",
        password="unused-under-trust",
        mount_point=db.mount,
    )
    root.secrets.database.create_role(
        db.role,
        db_name="pg",
        creation_statements=[
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
            "VALID UNTIL '{{expiration}}';"
        ],
        revocation_statements=[
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
            'DROP ROLE IF EXISTS "{{name}}";',
        ],
        default_ttl="300s",
        max_ttl="600s",
        mount_point=db.mount,
    )
    yield db
    # Disabling the mount revokes its leases; drop anything left regardless.
    root.sys.disable_secrets_engine(db.mount)
    with psycopg.connect(**PG, connect_timeout=5, autocommit=True) as conn:
        for name in db.roles():
            conn.execute(f'DROP ROLE IF EXISTS "{name}"')


def _dynamic_issuer(
    server: DevServer, installation: str, db: Database, *, wrap: bool = False, role: str = ""
) -> VaultDynamicIssuer:
    profile = VaultDynamicProfile(
        name="reports-dynamic",
        issuer="vault-dynamic",
        path=f"{db.mount}/creds/{role or db.role}",
        wrap=wrap,
        max_ttl=600,
    )
    return VaultDynamicIssuer(profile, installation_id=installation, settings=_settings(server))


def test_dynamic_mint_gives_working_db_login_and_revoke_drops_it(
    vault: DevServer, database: Database, installation: str
) -> None:
    issuer = _dynamic_issuer(vault, installation, database)
    req = _request(120, installation=installation)
    minted = issuer.mint(req)

    username = minted.secret["username"]
    assert minted.secret["password"]
    assert minted.expires_at <= req.expires_at
    with psycopg.connect(**PG, connect_timeout=5) as conn:
        valid_until = conn.execute(
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (username,)
        ).fetchone()
    assert valid_until is not None and valid_until[0] is not None
    assert database.has_role(username)
    login = {**PG, "user": username, "password": minted.secret["password"]}
    with psycopg.connect(**login, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (username,)

    root = _root(vault)
    token = root.auth.token.lookup_accessor(minted.ref)["data"]
    assert token["policies"] == [issuer.policy]
    assert token["meta"]["leasehold"] == installation
    assert [m.ref for m in issuer.list_marked()] == [minted.ref]

    issuer.revoke(minted.ref)

    assert not issuer.exists(minted.ref)
    wait_until(lambda: not database.has_role(username), timeout=5)
    issuer.revoke(minted.ref)


def test_dynamic_wrapped_secret_unwraps_once(
    vault: DevServer, database: Database, installation: str
) -> None:
    issuer = _dynamic_issuer(vault, installation, database, wrap=True)
    minted = issuer.mint(_request(120, installation=installation))

    assert set(minted.secret) == {"wrap_token"}
    # The workload unwraps as the wrapping token itself.
    workload = hvac.Client(url=vault.addr, token=minted.secret["wrap_token"], timeout=5)
    data = workload.sys.unwrap()["data"]
    assert database.has_role(data["username"])
    with pytest.raises(hvac.exceptions.VaultError):
        workload.sys.unwrap()

    issuer.revoke(minted.ref)  # the lease hangs under the per-credential token
    wait_until(lambda: not database.has_role(data["username"]), timeout=5)


def test_dynamic_secret_goes_when_token_expires(
    vault: DevServer, database: Database, installation: str
) -> None:
    issuer = _dynamic_issuer(vault, installation, database)
    minted = issuer.mint(_request(2, installation=installation))
    username = minted.secret["username"]
    assert database.has_role(username)
    # Nobody revokes: the backend expires it on its own (Leasehold may be dead).
    wait_until(lambda: not database.has_role(username), timeout=10)
    assert not issuer.exists(minted.ref)


def test_dynamic_failed_read_leaves_no_token(
    vault: DevServer, database: Database, installation: str
) -> None:
    issuer = _dynamic_issuer(vault, installation, database, role="no-such-role")
    with pytest.raises(PermanentIssuerError) as failed:
        issuer.mint(_request(installation=installation))
    assert "no-such-role" in str(failed.value)
    assert issuer.list_marked() == []


def test_dynamic_extend_renews_the_token(
    vault: DevServer, database: Database, installation: str
) -> None:
    issuer = _dynamic_issuer(vault, installation, database)
    minted = issuer.mint(_request(30, installation=installation))
    issuer.extend(minted.ref, datetime.now(UTC) + timedelta(seconds=200))
    assert _root(vault).auth.token.lookup_accessor(minted.ref)["data"]["ttl"] > 150
    issuer.revoke(minted.ref)
    wait_until(lambda: not database.has_role(minted.secret["username"]), timeout=5)


def test_token_gets_default_policy_only_when_the_profile_lists_it(
    vault: DevServer, installation: str
) -> None:
    profile = VaultTokenProfile(
        name="with-default", issuer="vault-token", policies=(READ_POLICY, "default"), max_ttl=600
    )
    issuer = VaultTokenIssuer(profile, installation_id=installation, settings=_settings(vault))
    minted = issuer.mint(_request(120, installation=installation))
    data = _root(vault).auth.token.lookup_accessor(minted.ref)["data"]
    assert sorted(data["policies"]) == ["default", READ_POLICY]
    own = hvac.Client(url=vault.addr, token=minted.secret["token"], timeout=5)
    assert own.auth.token.lookup_self()["data"]["accessor"] == minted.ref  # default allows it
    issuer.revoke(minted.ref)


def _keys(listing: dict[str, Any] | None) -> list[str]:
    """A LIST answer's keys; Vault answers nothing at all for an empty prefix."""
    return list(((listing or {}).get("data") or {}).get("keys") or [])


def _live_leases(server: DevServer) -> list[dict[str, Any]]:
    """Every live lease under the test's database mounts."""
    root = _root(server)
    leases = []
    for mount in root.sys.list_mounted_secrets_engines()["data"]:
        if not mount.startswith("lhdb"):
            continue
        for role in _keys(root.list(f"sys/leases/lookup/{mount}creds")):
            prefix = f"{mount}creds/{role}"
            for key in _keys(root.list(f"sys/leases/lookup/{prefix}")):
                leases.append(root.sys.read_lease(f"{prefix}{key}")["data"])
    return leases


def test_dynamic_lease_ends_by_the_deadline_not_the_roles_default(
    vault: DevServer, database: Database, installation: str
) -> None:
    # The role's default_ttl is 300 s; the task's deadline is 40 s away.
    issuer = _dynamic_issuer(vault, installation, database)
    req = _request(40, installation=installation)
    minted = issuer.mint(req)
    username = minted.secret["username"]
    with psycopg.connect(**PG, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (username,)
        ).fetchone()
    assert row is not None and row[0] is not None
    # PostgreSQL's VALID UNTIL follows the lease (OpenBao adds a few seconds' slack).
    assert row[0] <= req.expires_at + timedelta(seconds=10)
    leases = _live_leases(vault)
    assert len(leases) == 1, leases  # the other tests' leases are gone
    assert 0 < leases[0]["ttl"] <= 40
    issuer.revoke(minted.ref)
    wait_until(lambda: not database.has_role(username), timeout=5)


def test_a_heartbeat_extends_the_dynamic_lease_with_the_token(
    vault: DevServer, database: Database, installation: str
) -> None:
    issuer = _dynamic_issuer(vault, installation, database)
    minted = issuer.mint(_request(30, installation=installation))
    assert minted.lease is not None and minted.lease.startswith(f"{database.mount}/creds/")
    [before] = _live_leases(vault)
    assert 0 < before["ttl"] <= 30
    # The heartbeat moved the deadline to 4 minutes from now (the role allows 5).
    later = datetime.now(UTC) + timedelta(seconds=240)
    issuer.extend(minted.ref, later, lease=minted.lease)
    [after] = _live_leases(vault)
    assert after["id"] == before["id"] and 200 < after["ttl"] <= 240
    token_ttl = _root(vault).auth.token.lookup_accessor(minted.ref)["data"]["ttl"]
    assert 200 < token_ttl <= 240
    issuer.revoke(minted.ref)
    wait_until(lambda: _live_leases(vault) == [], timeout=5)
