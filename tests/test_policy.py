"""Cedar policies decide every mint and extension (PRODUCT.md, 'Policies')."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, func, select

from app.authority import policy
from app.core.db import session_scope
from app.core.models import AuditEntry, Credential, Event, Task, utcnow
from tests.support.api import auth, event, started, states, unique
from tests.support.procs import wait_until
from tests.support.world import RUN

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

# kv-reader (max_ttl 900) only for workloads of the example.org trust domain, for at
# most 600 s; task-cache only from one source and the second emitter key.
MATRIX = """
@id("kv-in-example-org")
permit (principal, action, resource == Profile::"kv-reader")
when { principal.trust_domain == "example.org" && context.max_duration <= 600 };

@id("cache-from-ci")
permit (principal, action == Action::"mint", resource == Profile::"task-cache")
when { context.source == "pytest://ci" && context.emitter like "emitter-b-*" };

@id("no-kv-for-tmp-tasks")
forbid (principal, action, resource)
when { resource.issuer == "vault-token" && context.task like "tmp/*" };
"""
WORKLOAD = "spiffe://example.org/ns/reports/sa/job"


def post(client: Any, key: str, body: Any) -> Any:
    return client.post("/v1/events", json=body, headers=auth(key))


def check(client: Any, key: str, body: Any, **params: str) -> list[dict[str, Any]]:
    answer = client.post("/v1/policy/check", json=body, headers=auth(key), params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()["grants"]


def audit_of(tenant: str, task: str) -> list[AuditEntry]:
    with session_scope() as s:
        t = s.exec(select(Task).where(Task.tenant == tenant, Task.name == task)).one()
        return list(
            s.exec(
                select(AuditEntry).where(AuditEntry.task_id == t.id).order_by(col(AuditEntry.id))
            )
        )


def test_allow_deny_matrix(app_client: Any, keys: dict[str, str], policy_file: Any) -> None:
    policy_file(MATRIX)
    op = keys["operator"]
    cases: list[tuple[str, dict[str, Any], dict[str, str], str, str]] = [
        # (why, started() kwargs, query, decision, reason fragment)
        ("in the trust domain", {"workload": WORKLOAD}, {}, "allow", "kv-in-example-org"),
        ("another trust domain", {"workload": "spiffe://evil.org/x"}, {}, "deny", "no permit"),
        ("not a SPIFFE id", {"workload": "example.org"}, {}, "deny", "no permit"),
        ("upper case is no trust domain", {"workload": "spiffe://EXAMPLE.org/x"}, {}, "deny", ""),
        ("no workload", {}, {}, "deny", "no permit"),
        ("over the limit", {"workload": WORKLOAD, "max_duration": 601}, {}, "deny", "no permit"),
    ]
    for why, kw, query, decision, reason in cases:
        body = started(unique("m"), {"kv": "kv-reader"}, **kw)
        [grant] = check(app_client, op, body, **query)
        assert grant["decision"] == decision, why
        assert reason in grant["reason"], why
    # A forbid wins over the permit: its id decides.
    body = started(f"tmp/{unique('m')}", {"kv": "kv-reader"}, workload=WORKLOAD)
    [grant] = check(app_client, op, body)
    assert grant["decision"] == "deny" and grant["policies"] == ["no-kv-for-tmp-tasks"]
    # Emitters and sources: task-cache needs both the emitter-b key and pytest://ci.
    body = started(unique("m"), {"cache": "task-cache"})
    body["source"] = "pytest://ci"
    assert check(app_client, op, body, emitter=f"emitter-b-{RUN}")[0]["decision"] == "allow"
    assert check(app_client, op, body, emitter=f"emitter-{RUN}")[0]["decision"] == "deny"
    body["source"] = "pytest://elsewhere"
    assert check(app_client, op, body, emitter=f"emitter-b-{RUN}")[0]["decision"] == "deny"

    # The real thing, with the worker: one grant minted, one denied and never minted.
    name = unique("matrix")
    body = started(name, {"kv": "kv-reader", "cache": "task-cache"}, workload=WORKLOAD)
    body["source"] = "pytest://ci"
    assert post(app_client, keys["emitter"], body).status_code == 202
    wait_until(lambda: states("t1", name) == {"kv": "active", "cache": "denied"})
    time.sleep(0.3)  # a mint of the denied grant, were one enqueued, would show by now
    with session_scope() as s:
        denied = s.exec(select(Credential).where(Credential.grant == "cache")).all()
        cache = next(c for c in denied if c.task_id == audit_of("t1", name)[0].task_id)
        assert cache.state == "denied" and cache.minted_at is None and cache.backend_ref is None
    trail = {(a.action, a.reason, a.detail) for a in audit_of("t1", name)}
    assert ("denied", "policy", "mint denied by policy: no permit") in trail
    assert any(a == "policy_allowed" and "kv-in-example-org" in (d or "") for a, _, d in trail)
    # The same start from the emitter-b key mints the cache too.
    name_b = unique("matrix-b")
    body = started(name_b, {"cache": "task-cache"})
    body["source"] = "pytest://ci"
    assert post(app_client, keys["emitter-b"], body).status_code == 202
    wait_until(lambda: states("t1", name_b) == {"cache": "active"})
    for n, k in ((name, "emitter"), (name_b, "emitter-b")):
        post(app_client, keys[k], event("succeeded", n))


def test_max_duration_at_start_and_heartbeat(
    app_client: Any, keys: dict[str, str], policy_file: Any
) -> None:
    policy_file(MATRIX)
    emitter = keys["emitter"]
    too_long = unique("long")
    body = started(too_long, {"kv": "kv-reader"}, max_duration=700, workload=WORKLOAD)
    assert post(app_client, emitter, body).status_code == 202
    assert states("t1", too_long) == {"kv": "denied"}

    name = unique("beat")
    body = started(name, {"kv": "kv-reader"}, max_duration=300, workload=WORKLOAD)
    deadline = post(app_client, emitter, body).json()["task"]["deadline"]
    wait_until(lambda: states("t1", name) == {"kv": "active"})
    ok = post(app_client, emitter, event("heartbeat", name, {"max_duration": 600}))
    assert ok.status_code == 202 and ok.json()["task"]["deadline"] > deadline
    deadline = ok.json()["task"]["deadline"]
    refused = post(app_client, emitter, event("heartbeat", name, {"max_duration": 601}))
    assert refused.status_code == 403, refused.text
    assert "no permit" in refused.json()["error"] and refused.json()["profile"] == "kv-reader"
    task = app_client.get(f"/v1/tasks/{name.replace('/', '%2F')}", headers=auth(emitter)).json()
    assert task["deadline"] == deadline  # nothing changed
    assert states("t1", name) == {"kv": "active"}
    trail = [a for a in audit_of("t1", name) if a.action == "extend_denied"]
    assert len(trail) == 1 and "601s denied by policy: no permit" in (trail[0].detail or "")
    # Not stored: the same event id may be retried once a policy allows it.
    with session_scope() as s:
        assert (
            s.exec(select(func.count()).select_from(Event).where(Event.subject == name)).one() == 2
        )
    post(app_client, emitter, event("succeeded", name))


def test_deny_by_default_and_erroring_forbid(
    app_client: Any, keys: dict[str, str], policy_file: Any
) -> None:
    # A file that permits nothing these grants match: deny.
    policy_file('permit (principal, action, resource == Profile::"short-lived");\n')
    name = unique("default-deny")
    assert post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"})).status_code == 202
    assert states("t1", name) == {"kv": "denied"}
    # A permit for everything and a forbid that errors (integer overflow) at evaluation:
    # Cedar skips the erroring forbid; Leasehold denies.
    policy_file(
        "permit (principal, action, resource);\n"
        '@id("overflowing")\n'
        "forbid (principal, action, resource)\n"
        "when { context.max_duration * 9223372036854775807 > 0 };\n"
    )
    name = unique("error-deny")
    assert post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"})).status_code == 202
    assert states("t1", name) == {"kv": "denied"}
    [entry] = [a for a in audit_of("t1", name) if a.action == "denied"]
    assert "evaluation error" in (entry.detail or "") and "overflowing (line 2)" in entry.detail


def test_hot_reload_and_invalid_file_keeps_last_good(
    app_client: Any, keys: dict[str, str], policy_file: Any, caplog: Any
) -> None:
    path = policy_file("forbid (principal, action, resource);\n")
    body = started(unique("reload"), {"kv": "kv-reader"}, workload=WORKLOAD)
    op = keys["operator"]
    assert check(app_client, op, body)[0]["decision"] == "deny"
    # Changed on disk: picked up without a restart (no refresh_now here).
    path.write_text(MATRIX)
    wait_until(lambda: check(app_client, op, body)[0]["decision"] == "allow", timeout=5)
    good_sha = policy.engine().current().sha  # type: ignore[union-attr]
    metrics = app_client.get("/metrics").text
    assert f'leasehold_policy_info{{policies="3",sha="{good_sha}"}} 1.0' in metrics
    assert "leasehold_policy_file_refused 0.0" in metrics

    # An invalid file is refused with its line, the last good set stays, an alert fires.
    before = _reload_errors(metrics)
    with caplog.at_level(logging.ERROR, logger="leasehold"):
        path.write_text(
            MATRIX + "\npermit (principal, action, resource)\nwhen { principal.nope };\n"
        )
        wait_until(lambda: policy.engine().status().error, timeout=5)
    status = policy.engine().status()
    assert "line 14" in (status.error or "") and "nope" in (status.error or "")
    assert any("policy file refused" in r.getMessage() for r in caplog.records)
    assert check(app_client, op, body)[0]["decision"] == "allow"
    assert status.in_force is not None and status.in_force.sha == good_sha
    metrics = app_client.get("/metrics").text
    assert "leasehold_policy_file_refused 1.0" in metrics
    assert _reload_errors(metrics) == before + 1
    page = _dashboard_live(app_client)
    assert "file refused, the last good set stays" in page and "line 14" in page
    assert good_sha[:12] in page
    # Removed: the last good set still decides.
    path.unlink()
    wait_until(lambda: "removed" in (policy.engine().status().error or ""), timeout=5)
    assert check(app_client, op, body)[0]["decision"] == "allow"
    # A good file again clears the alert.
    path.write_text(MATRIX.replace("600", "500"))
    wait_until(lambda: policy.engine().status().error is None, timeout=5)
    assert policy.engine().current().sha != good_sha  # type: ignore[union-attr]


def _dashboard_live(client: Any) -> str:
    from app.api.dashboard import COOKIE, open_session
    from app.core.models import ApiKey

    with session_scope() as s:
        key = s.exec(select(ApiKey).where(ApiKey.name == f"operator-{RUN}")).one()
        token = open_session(s, key.id)
    client.cookies.set(COOKIE, token, path="/dashboard")
    try:
        page = client.get("/dashboard/live")
    finally:
        client.cookies.clear()
    assert page.status_code == 200, page.text
    return page.text


def _reload_errors(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("leasehold_policy_reload_errors_total "):
            return float(line.split()[1])
    raise AssertionError("no leasehold_policy_reload_errors_total")


def test_start_refuses_an_invalid_file_and_warns_without_one(tmp_path: Path, caplog: Any) -> None:
    bad = tmp_path / "bad.cedar"
    bad.write_text(
        "permit (principal, action, resource);\n\n"
        'permit (principal,\n  action == Action::"nope", resource);\n'
    )
    with pytest.raises(policy.PolicyError, match="line 3"):
        policy.Engine(bad).start()
    bad.write_text("permit (principal, action, resource)\nwhen { 1 + };\n")
    with pytest.raises(policy.PolicyError, match="line 1: unexpected token"):
        policy.Engine(bad).start()
    missing = tmp_path / "missing.cedar"
    with caplog.at_level(logging.WARNING, logger="leasehold"):
        assert policy.Engine(missing).start() is None
    assert any("LEASEHOLD_POLICY_FILE" in r.getMessage() for r in caplog.records)
    with pytest.raises(policy.PolicyError, match="production"):
        policy.Engine(missing, production=True).start()
    # The sample that `leasehold up` writes is valid and permits the sample profile.
    sample = policy.load(Path(policy.__file__).parent.parent / "sample" / "policies.cedar")
    ask = policy.Ask(
        "mint", None, "demo-kv", "vault-token", "default", "emitter", "cli", "t", None, 60
    )
    assert policy.decide(sample, [ask])[0].allowed


def test_dry_run_stores_nothing(app_client: Any, keys: dict[str, str], policy_file: Any) -> None:
    policy_file(MATRIX)
    name = unique("dry")
    body = started(name, {"kv": "kv-reader", "db": "reports-readonly"}, workload=WORKLOAD)
    since = utcnow()

    def stored() -> tuple[int, int, int]:
        """Events and tasks (only the API writes them), and audit entries written since
        by anyone but the session worker's background jobs (timeouts, re-drives)."""
        with session_scope() as s:
            return (
                s.exec(select(func.count()).select_from(Event)).one(),
                s.exec(select(func.count()).select_from(Task)).one(),
                s.exec(
                    select(func.count())
                    .select_from(AuditEntry)
                    .where(
                        col(AuditEntry.at) >= since,
                        col(AuditEntry.actor).not_in(["system", "reconcile"]),
                    )
                ).one(),
            )

    before = stored()
    grants = check(app_client, keys["operator"], body)
    assert grants == [
        {
            "name": "kv",
            "profile": "kv-reader",
            "decision": "allow",
            "policies": ["kv-in-example-org"],
            "reason": "permitted by kv-in-example-org (line 2)",
        },
        {
            "name": "db",
            "profile": "reports-readonly",
            "decision": "deny",
            "policies": [],
            "reason": "no permit",
        },
    ]
    assert stored() == before
    # Operators only; a task.started only; unknown profiles as the real event answers.
    denied = app_client.post("/v1/policy/check", json=body, headers=auth(keys["emitter"]))
    assert denied.status_code == 403
    beat = app_client.post(
        "/v1/policy/check", json=event("heartbeat", name), headers=auth(keys["operator"])
    )
    assert beat.status_code == 422
    unknown = started(name, {"x": "no-such-profile"})
    answer = app_client.post("/v1/policy/check", json=unknown, headers=auth(keys["operator"]))
    assert answer.status_code == 422 and "no-such-profile" in answer.json()["error"]
    # An admin names the tenant.
    admin = app_client.post(
        "/v1/policy/check", json=body, headers=auth(keys["admin"]), params={"tenant": "t1"}
    )
    assert admin.status_code == 200 and admin.json()["grants"][0]["decision"] == "allow"


def test_no_policy_file_allows_everything(app_client: Any, keys: dict[str, str]) -> None:
    body = started(unique("open"), {"kv": "kv-reader"}, max_duration=900)
    [grant] = check(app_client, keys["operator"], body)
    assert grant["decision"] == "allow" and grant["reason"] == policy.NO_POLICY
