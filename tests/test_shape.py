"""The code's shape: issuers own their backends, one error taxonomy, one list of
sweep counters, and a judge that decides without I/O. Pure: no service is used."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac.exceptions as hv
import pytest
import redis
import requests

from app.core.models import SWEEP_COUNTS, CredState, Sweep, TaskState
from app.core.redact import clip
from app.core.settings import Settings
from app.issuers import backend_identity, revoke_ref
from app.issuers.base import MarkedObject, PermanentIssuerError, TemporaryIssuerError, mark
from app.issuers.errors import MAX_DELAY
from app.issuers.postgres import ERRORS as POSTGRES
from app.issuers.redis import ERRORS as REDIS
from app.issuers.vault_gateway import ERRORS as VAULT
from app.ledger import HeldRow
from app.profiles import PostgresProfile, RedisProfile, VaultTokenProfile
from schedules.judge import Act, judge
from schedules.report import SweepReport, render_report
from workers.backoff import retry_in

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2030, 1, 1, tzinfo=UTC)


def test_each_backend_table_maps_to_temporary_or_permanent() -> None:
    assert isinstance(REDIS.map("mint", redis.ConnectionError("down")), TemporaryIssuerError)
    # A wrong admin password is configuration: AuthenticationError is a ConnectionError.
    assert isinstance(REDIS.map("mint", redis.AuthenticationError("no")), PermanentIssuerError)
    assert isinstance(VAULT.map("read", requests.Timeout()), TemporaryIssuerError)
    assert isinstance(VAULT.map("read", hv.Forbidden("denied")), PermanentIssuerError)
    assert isinstance(VAULT.map("read", hv.VaultDown("sealed")), TemporaryIssuerError)
    assert str(VAULT.map("read", requests.Timeout())) == "vault read: timed out"


def test_unknown_exceptions_are_permanent_and_say_only_their_type() -> None:
    for table in (POSTGRES, REDIS, VAULT):
        mapped = table.map("mint", KeyError("hvs.secret-in-a-key-name"))
        assert isinstance(mapped, PermanentIssuerError)
        assert str(mapped) == f"{table.backend} mint: unexpected KeyError"
    with pytest.raises(PermanentIssuerError) as caught, REDIS.guard("list"):
        raise ValueError("oops")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_guard_scrubs_secrets_and_passes_issuer_errors_through() -> None:
    with pytest.raises(TemporaryIssuerError) as caught, REDIS.guard("mint", "hunter2"):
        raise redis.ConnectionError("cannot log in as admin:hunter2")
    assert "hunter2" not in str(caught.value) and "***" in str(caught.value)
    with pytest.raises(PermanentIssuerError, match=r"^as raised$"), REDIS.guard("mint"):
        raise PermanentIssuerError("as raised")


def test_a_temporary_error_may_carry_a_bounded_delay_that_callers_honour() -> None:
    limited = VAULT.map("create token", hv.RateLimitExceeded("slow down"))
    assert isinstance(limited, TemporaryIssuerError) and limited.delay == 2.0
    assert retry_in(limited, retries=9) == 2.0
    assert TemporaryIssuerError("x", delay=10**6).delay == MAX_DELAY
    plain = TemporaryIssuerError("x")
    assert plain.delay is None and 0.5 <= retry_in(plain, retries=0) <= 1.0


def test_issuers_name_refs_and_group_backends() -> None:
    settings = Settings(vault_addr="http://bao:8200")
    on = [
        PostgresProfile(
            name=name,
            issuer="postgres",
            dsn=f"postgresql://a@DB:5433/{name}",
            grants=("x",),
            max_ttl=60,
        )
        for name in ("one", "two")
    ]
    # Roles are cluster-wide: two databases of one server are one backend.
    assert backend_identity(on[0], settings) == backend_identity(on[1], settings)
    assert str(backend_identity(on[0], settings)) == "postgres db:5433"
    cache = RedisProfile(name="c", issuer="redis", url="redis://h/3", acl="+get", max_ttl=60)
    assert str(backend_identity(cache, settings)) == "redis h:6379"
    kv = VaultTokenProfile(name="kv", issuer="vault-token", policies=("p",), max_ttl=60)
    assert str(backend_identity(kv, settings)) == "vault http://bao:8200#kv"

    name = mark("0123456789abcdef", "c1")
    assert name == "lh_0123456789ab_c1"
    pending = row(backend_ref=None, backend_name=name)
    assert revoke_ref("postgres", pending) == name  # the name is the ref
    assert revoke_ref("vault-token", pending) is None  # nothing minted yet
    assert revoke_ref("vault-dynamic", row(backend_ref="acc")) == "acc"


def test_nothing_outside_the_issuers_knows_a_backend() -> None:
    backend_words = re.compile(r"""["'](postgres|redis|vault-token|vault-dynamic)["']|lh_\{""")
    for folder in ("schedules", "workers"):
        for path in (ROOT / folder).glob("*.py"):
            assert not backend_words.search(path.read_text()), path
    assert not backend_words.search((ROOT / "app" / "ledger.py").read_text())
    assert not (ROOT / "app" / "vault.py").exists()


def test_sweep_counters_are_named_once() -> None:
    assert set(SWEEP_COUNTS) <= set(Sweep.model_fields)
    report = SweepReport(**{name: i + 1 for i, name in enumerate(SWEEP_COUNTS)}, id="s")
    assert list(report.counts()) == list(SWEEP_COUNTS)
    printed = render_report(report)
    for i in range(len(SWEEP_COUNTS)):
        assert re.search(rf"\s{i + 1}\b", printed), printed
    assert clip("x" * 600) == "x" * 500


def row(**changes: object) -> HeldRow:
    values: dict[str, object] = {
        "id": "c1",
        "tenant": "t",
        "task_id": "t1",
        "state": CredState.active,
        "profile": "p",
        "backend_name": "lh_x_c1",
        "backend_ref": "lh_x_c1",
        "updated_at": NOW,
        "minted_at": NOW,
        "expires_at": NOW + timedelta(hours=1),
        "task_state": TaskState.running,
    }
    values.update(changes)
    return HeldRow(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("held", "act"),
    [
        (None, Act.revoke_orphan),
        (row(), Act.held),
        (row(state=CredState.revoked), Act.revoke_again),
        (row(state=CredState.revoked, backend_ref="other"), Act.revoke_orphan),
        (row(state=CredState.failed), Act.revoke_orphan),
        (row(state=CredState.revoking), Act.revoking),
        (row(task_state=TaskState.succeeded), Act.queue_revoke),
        (row(task_state=TaskState.succeeded, backend_ref=None), Act.orphan_and_queue),
        (row(state=CredState.pending, backend_ref=None, updated_at=NOW), Act.in_flight),
        (
            row(state=CredState.pending, backend_ref=None, updated_at=NOW - timedelta(hours=1)),
            Act.revoke_orphan,
        ),
    ],
)
def test_the_judge_decides_about_one_object(held: HeldRow | None, act: Act) -> None:
    obj = MarkedObject(ref="lh_x_c1", credential_id="c1")
    # Vault-like: the ref is known only once recorded.
    ref = held.backend_ref if held is not None else None
    assert judge(obj, held, ref, now=NOW, pending_grace=timedelta(minutes=2)).act == act
