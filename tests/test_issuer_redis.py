"""RedisIssuer against the real server at 127.0.0.1:6379.

Each run uses its own installation id (so its own user names) and key prefix,
and deletes its users and keys afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.core.settings import Settings
from app.issuers.base import MintRequest, PermanentIssuerError, TemporaryIssuerError
from app.issuers.redis import RedisIssuer, credential_url
from app.profiles import RedisProfile

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

URL = "redis://127.0.0.1:6379/0"
ACL = "~task:{task}:* +get +set +del"


def make_issuer(installation_id: str, *, url: str = URL, acl: str = ACL) -> RedisIssuer:
    profile = RedisProfile(name="task-cache", issuer="redis", url=url, acl=acl, max_ttl=600)
    return RedisIssuer(
        profile, installation_id=installation_id, settings=Settings(backend_timeout=2.0)
    )


@pytest.fixture(scope="module")
def admin() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="module")
def installations(admin: redis.Redis) -> Iterator[list[str]]:
    """Installation ids of this run; their users and keys go at the end."""
    used: list[str] = []
    yield used
    for installation in used:
        for user in admin.acl_users():
            if user.startswith(f"lh_{installation[:12]}_"):
                admin.acl_deluser(user)


@pytest.fixture(scope="module")
def issuer(installations: list[str]) -> Iterator[RedisIssuer]:
    installations.append(secrets.token_hex(8))
    issuer = make_issuer(installations[-1])
    yield issuer
    issuer.close()


@pytest.fixture
def request_(issuer: RedisIssuer, admin: redis.Redis) -> Iterator[MintRequest]:
    credential_id = secrets.token_hex(6)
    req = MintRequest(
        credential_id=credential_id,
        name=issuer.prefix + credential_id,
        installation_id=issuer.installation_id,
        tenant="acme",
        task_id="cache/try-1",
        task_digest=secrets.token_hex(8),
        expires_at=datetime.now(UTC) + timedelta(minutes=5),
    )
    yield req
    keys = list(admin.scan_iter(match=f"task:{req.task_digest}:*"))
    if keys:
        admin.delete(*keys)
    admin.delete(f"other:{req.task_digest}")


def connect(url: str) -> redis.Redis:
    # No retry: a killed connection must show, not be silently reopened.
    return redis.Redis.from_url(url, decode_responses=True, retry=Retry(NoBackoff(), 0))


def test_user_reaches_its_prefix_only(
    issuer: RedisIssuer, request_: MintRequest, admin: redis.Redis
) -> None:
    minted = issuer.mint(request_)
    secret = minted.secret
    assert minted.ref == request_.name == secret["username"]
    assert secret["key_prefix"] == request_.task_digest
    assert secret["url"].startswith(f"redis://{request_.name}:")
    assert secret["url"].endswith("@127.0.0.1:6379/0")

    client = connect(secret["url"])
    key = f"task:{request_.task_digest}:result"
    assert client.set(key, "done")
    assert client.get(key) == "done"
    assert client.ping()
    admin.set(f"other:{request_.task_digest}", "x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get(f"other:{request_.task_digest}")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get(f"task:{secrets.token_hex(8)}:result")  # another task's key
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.keys("*")
    client.close()
    issuer.revoke(minted.ref)


def test_revoke_kills_open_connection_and_refuses_new_ones(
    issuer: RedisIssuer, request_: MintRequest
) -> None:
    minted = issuer.mint(request_)
    client = connect(minted.secret["url"])
    assert client.ping()

    issuer.revoke(minted.ref)

    with pytest.raises(redis.ConnectionError):
        client.ping()
    with pytest.raises(redis.AuthenticationError):
        connect(minted.secret["url"]).ping()
    assert not issuer.exists(minted.ref)
    issuer.revoke(minted.ref)  # twice is fine
    issuer.revoke(issuer.prefix + "never-minted")


def test_password_travels_and_rests_only_as_sha256(
    issuer: RedisIssuer, request_: MintRequest, admin: redis.Redis, monkeypatch: Any
) -> None:
    sent: list[bytes] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def spy(self: Any, command: Any, check_health: bool = True) -> None:
        parts = [command] if isinstance(command, bytes | bytearray | memoryview) else command
        sent.append(b"".join(bytes(part) for part in parts))
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", spy)
    minted = issuer.mint(request_)
    monkeypatch.undo()

    password = minted.secret["password"]
    digest = hashlib.sha256(password.encode()).hexdigest()
    wire = b"".join(sent)
    assert f"#{digest}".encode() in wire  # the spy saw the SETUSER
    assert password.encode() not in wire
    user = admin.acl_getuser(minted.ref)
    assert user["passwords"] == [digest]
    assert password not in repr(user)
    issuer.revoke(minted.ref)


def test_retried_mint_replaces_the_password(issuer: RedisIssuer, request_: MintRequest) -> None:
    first = issuer.mint(request_)
    second = issuer.mint(request_)
    with pytest.raises(redis.AuthenticationError):
        connect(first.secret["url"]).ping()
    assert connect(second.secret["url"]).ping()
    issuer.revoke(second.ref)


def test_list_marked_sees_own_users_only(
    issuer: RedisIssuer, request_: MintRequest, installations: list[str]
) -> None:
    installations.append(secrets.token_hex(8))
    other = make_issuer(installations[-1])
    mine = issuer.mint(request_)
    foreign = other.mint(dataclasses.replace(request_, name=other.prefix + "x1"))
    try:
        marked = {m.ref: m for m in issuer.list_marked()}
        assert marked[mine.ref].credential_id == request_.credential_id
        assert foreign.ref not in marked
        assert [m.ref for m in other.list_marked()] == [foreign.ref]
        assert issuer.exists(mine.ref)
    finally:
        issuer.revoke(mine.ref)
        other.revoke(foreign.ref)
        other.close()
    assert mine.ref not in {m.ref for m in issuer.list_marked()}


def test_refuses_names_without_the_mark(issuer: RedisIssuer, request_: MintRequest) -> None:
    for name in ("default", "lh_other_x", issuer.prefix):
        with pytest.raises(PermanentIssuerError):
            issuer.revoke(name)
    with pytest.raises(PermanentIssuerError):
        issuer.mint(dataclasses.replace(request_, name="cache_admin"))


@pytest.mark.parametrize("acl", ["nopass ~* +@all", "~x:* >hunter2 +get", "~x:* #abc", "on"])
def test_profile_may_not_touch_password_or_switch(installations: list[str], acl: str) -> None:
    installations.append(secrets.token_hex(8))
    issuer = make_issuer(installations[-1], acl=acl)
    req = MintRequest(
        credential_id="c1",
        name=issuer.prefix + "c1",
        installation_id=installations[-1],
        tenant="acme",
        task_id="t",
        task_digest="abc",
        expires_at=datetime.now(UTC) + timedelta(minutes=1),
    )
    with pytest.raises(PermanentIssuerError) as caught:
        issuer.mint(req)
    assert "hunter2" not in str(caught.value)
    assert not issuer.exists(req.name)
    issuer.close()


def test_unsafe_placeholder_value_is_refused(issuer: RedisIssuer, request_: MintRequest) -> None:
    with pytest.raises(PermanentIssuerError):
        issuer.mint(dataclasses.replace(request_, task_digest="*"))
    assert not issuer.exists(request_.name)


def test_extend_and_check_are_no_ops(issuer: RedisIssuer, request_: MintRequest) -> None:
    minted = issuer.mint(request_)
    issuer.extend(minted.ref, datetime.now(UTC) + timedelta(hours=1))
    assert issuer.exists(minted.ref)
    assert issuer.check() == []
    issuer.revoke(minted.ref)


def test_unreachable_server_is_temporary_and_hides_password(installations: list[str]) -> None:
    installations.append(secrets.token_hex(8))
    issuer = make_issuer(installations[-1], url="redis://admin:hunter2-hidden@127.0.0.1:1/0")
    with pytest.raises(TemporaryIssuerError) as caught:
        issuer.list_marked()
    assert "hunter2-hidden" not in str(caught.value)
    assert caught.value.__suppress_context__
    issuer.close()


def test_credential_url_replaces_userinfo() -> None:
    url = credential_url("rediss://admin:s3cret@cache.example:6380/2?password=x", "lh_a_1", "p@ss")
    assert url == "rediss://lh_a_1:p%40ss@cache.example:6380/2"
