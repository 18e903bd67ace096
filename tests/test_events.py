"""Event semantics and access rules of the API (PRODUCT.md, 'Events in')."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import func, select

from app.core.db import session_scope
from app.core.models import Credential, Event, Task
from tests.support.api import (
    auth,
    claim_url,
    credentials_of,
    event,
    started,
    states,
    task_path,
    unique,
)
from tests.support.procs import wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


def post(client: Any, key: str, body: Any, **kw: Any) -> Any:
    return client.post("/v1/events", json=body, headers=auth(key), **kw)


def counts() -> tuple[int, int, int]:
    with session_scope() as s:
        return (
            s.exec(select(func.count()).select_from(Event)).one(),
            s.exec(select(func.count()).select_from(Task)).one(),
            s.exec(select(func.count()).select_from(Credential)).one(),
        )


def test_duplicate_event_has_one_effect(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("dup")
    body = started(name, {"kv": "kv-reader"})
    first = post(app_client, keys["emitter"], body)
    again = post(app_client, keys["emitter"], body)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["claim_token"] == first.json()["claim_token"]
    # A new event id for the same task answers the same token and mints nothing more.
    later = post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"}))
    assert later.status_code == 202 and later.json()["claim_token"] == first.json()["claim_token"]
    assert len(states("t1", name)) == 1
    # Same idempotency key, another body: 409.
    changed = dict(body, data={**body["data"], "max_duration": 30})
    assert post(app_client, keys["emitter"], changed).status_code == 409
    post(app_client, keys["emitter"], event("succeeded", name))


def test_terminal_before_start_mints_nothing(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("early-end")
    ended = post(app_client, keys["emitter"], event("cancelled", name))
    assert ended.status_code == 202
    assert ended.json()["task"]["state"] == "cancelled"
    late = post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"}))
    assert late.status_code == 202
    assert late.json()["task"]["state"] == "cancelled"
    assert states("t1", name) == {}
    task = app_client.get(f"/v1/tasks/{task_path(name)}", headers=auth(keys["emitter"])).json()
    assert task["started_at"] is None and task["deadline"] is None
    # The first terminal event wins.
    again = post(app_client, keys["emitter"], event("succeeded", name))
    assert again.json()["task"]["state"] == "cancelled"


def test_another_keys_event_is_forbidden(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("owned")
    assert post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"})).status_code == 202
    assert post(app_client, keys["emitter-b"], event("succeeded", name)).status_code == 403
    assert (
        post(app_client, keys["emitter-b"], started(name, {"kv": "kv-reader"})).status_code == 403
    )
    # Another tenant's key sees no such task (its own namespace).
    other = post(app_client, keys["emitter-t2"], event("heartbeat", name))
    assert other.status_code == 404
    post(app_client, keys["emitter"], event("succeeded", name))


def test_claim_rules(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("claims")
    token = post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"})).json()[
        "claim_token"
    ]
    # Wrong tokens answer 403 whether or not the task exists.
    assert app_client.post(claim_url(name, "kv"), headers=auth("lhc.bogus.sig")).status_code == 403
    assert app_client.post(claim_url("no-such", "kv"), headers=auth("nope")).status_code == 403
    assert app_client.post(claim_url("no-such", "kv"), headers=auth(token)).status_code == 403
    assert app_client.post(claim_url(name, "kv")).status_code == 403
    assert app_client.post(claim_url(name, "nope"), headers=auth(token)).status_code == 404
    first = app_client.post(claim_url(name, "kv", wait=15), headers=auth(token))
    assert first.status_code == 200 and first.json()["secret"]["token"]
    assert first.headers["cache-control"] == "no-store"
    second = app_client.post(claim_url(name, "kv"), headers=auth(token))
    assert second.status_code == 410 and second.json()["state"] == "claimed"
    with session_scope() as s:
        from app.core.models import AuditEntry

        actions = s.exec(select(AuditEntry.action).where(AuditEntry.action == "second_claim"))
        assert list(actions)
    post(app_client, keys["emitter"], event("succeeded", name))
    # After the end, a claim of the claimed credential is still a second claim (contract).
    gone = app_client.post(claim_url(name, "kv"), headers=auth(token))
    assert gone.status_code == 410 and gone.json()["state"] == "claimed"


def test_claim_while_pending_answers_409_with_retry_after(
    app_client: Any, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.api.events

    # Hold the mint message back: the credential stays pending, no race with the worker.
    held: list[str] = []
    send_mints = app.api.events.enqueue_mint
    monkeypatch.setattr(app.api.events, "enqueue_mint", held.extend)
    name = unique("pending")
    token = post(app_client, keys["emitter"], started(name, {"db": "reports-readonly"})).json()[
        "claim_token"
    ]
    assert len(held) == 1
    early = app_client.post(claim_url(name, "db"), headers=auth(token))
    assert early.status_code == 409, early.text
    assert early.json()["state"] == "pending"
    assert int(early.headers["retry-after"]) >= 1
    assert "secret" not in early.json()
    send_mints(held)  # now the worker mints it, and a waiting claim gets it
    waited = app_client.post(claim_url(name, "db", wait=15), headers=auth(token))
    assert waited.status_code == 200
    post(app_client, keys["emitter"], event("succeeded", name))


def test_roles_and_tenants(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("roles")
    post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"}))
    path = f"/v1/tasks/{task_path(name)}"
    assert app_client.get(path).status_code == 401
    assert app_client.get(path, headers=auth("lhk_unknown")).status_code == 401
    assert app_client.get(path, headers=auth(keys["emitter"])).status_code == 200
    assert app_client.get(path, headers=auth(keys["operator"])).status_code == 200
    assert app_client.get(path, headers=auth(keys["operator-t2"])).status_code == 404
    assert app_client.get("/v1/credentials", headers=auth(keys["emitter"])).status_code == 403
    assert post(app_client, keys["operator"], event("succeeded", name)).status_code == 403
    listed = app_client.get(
        f"/v1/credentials?task={task_path(name)}", headers=auth(keys["operator"])
    ).json()
    assert [c["grant"] for c in listed["items"]] == ["kv"]
    assert (
        app_client.get(
            f"/v1/credentials?task={task_path(name)}", headers=auth(keys["operator-t2"])
        ).json()["items"]
        == []
    )
    post(app_client, keys["emitter"], event("succeeded", name))


def test_manual_revoke(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("manual")
    post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"}))
    wait_until(lambda: states("t1", name) == {"kv": "active"})
    cred_id = app_client.get(f"/v1/tasks/{task_path(name)}", headers=auth(keys["operator"])).json()[
        "credentials"
    ][0]["id"]
    path = f"/v1/credentials/{cred_id}/revoke"
    assert app_client.post(path, headers=auth(keys["emitter"])).status_code == 403
    assert app_client.post(path, headers=auth(keys["operator-t2"])).status_code == 404
    assert app_client.post(path, headers=auth(keys["operator"])).status_code == 202
    wait_until(lambda: states("t1", name) == {"kv": "revoked"})
    again = app_client.post(path, headers=auth(keys["operator"]))
    assert again.status_code == 409 and again.json()["state"] == "revoked"
    post(app_client, keys["emitter"], event("succeeded", name))


def test_task_ids_with_slashes_and_pages(app_client: Any, keys: dict[str, str]) -> None:
    names = [unique("page/a"), unique("page/b"), unique("page/c")]
    for n in names:
        post(app_client, keys["emitter"], started(n, {"kv": "kv-reader"}))
    got = app_client.get(f"/v1/tasks/{task_path(names[0])}", headers=auth(keys["emitter"]))
    assert got.status_code == 200 and got.json()["id"] == names[0]
    first = app_client.get("/v1/tasks?limit=2&state=running", headers=auth(keys["operator"])).json()
    assert len(first["items"]) == 2 and first["next"]
    rest = app_client.get(
        f"/v1/tasks?limit=2&state=running&cursor={first['next']}", headers=auth(keys["operator"])
    ).json()
    ids = [t["id"] for t in first["items"]] + [t["id"] for t in rest["items"]]
    assert ids[:3] == list(reversed(names)) or set(names) <= set(ids)
    assert len(set(ids)) == len(ids)
    for n in names:
        post(app_client, keys["emitter"], event("succeeded", n))


def test_heartbeat_rules(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("beat")
    assert post(app_client, keys["emitter"], event("heartbeat", name)).status_code == 404
    start = post(app_client, keys["emitter"], started(name, {"kv": "kv-reader"}, 60)).json()
    later = post(app_client, keys["emitter"], event("heartbeat", name, {"max_duration": 120}))
    assert later.status_code == 202
    assert later.json()["task"]["deadline"] > start["task"]["deadline"]
    shorter = post(app_client, keys["emitter"], event("heartbeat", name, {"max_duration": 30}))
    assert shorter.json()["task"]["deadline"] == later.json()["task"]["deadline"]
    too_long = post(app_client, keys["emitter"], event("heartbeat", name, {"max_duration": 901}))
    assert too_long.status_code == 422 and "max_ttl" in too_long.json()["error"]
    post(app_client, keys["emitter"], event("succeeded", name))


def test_child_tasks(app_client: Any, keys: dict[str, str]) -> None:
    parent = unique("parent")
    child = unique("child")
    orphan = post(
        app_client, keys["emitter"], started(child, {"kv": "kv-reader"}, parent="no-such-parent")
    )
    assert orphan.status_code == 422 and "no-such-parent" in orphan.json()["error"]
    post(app_client, keys["emitter"], started(parent, {"kv": "kv-reader"}, 30))
    kid = post(
        app_client,
        keys["emitter"],
        started(child, {"kv": "kv-reader", "db": "reports-readonly"}, 600, parent=parent),
    )
    assert kid.status_code == 202
    parent_view = app_client.get(
        f"/v1/tasks/{task_path(parent)}", headers=auth(keys["emitter"])
    ).json()
    assert kid.json()["task"]["deadline"] == parent_view["deadline"]  # capped by the parent
    wait_until(lambda: states("t1", child) == {"kv": "active", "db": "denied"})
    post(app_client, keys["emitter"], event("succeeded", parent))
    wait_until(lambda: states("t1", child) == {"kv": "revoked", "db": "denied"})
    view = app_client.get(f"/v1/tasks/{task_path(child)}", headers=auth(keys["emitter"])).json()
    assert view["state"] == "cancelled" and view["parent"] == parent
    assert {c["revoke_reason"] for c in view["credentials"]} == {"parent_ended", None}
    ended = post(
        app_client, keys["emitter"], started(unique("late"), {"kv": "kv-reader"}, parent=parent)
    )
    assert ended.status_code == 422 and "ended" in ended.json()["error"]


def _old_time() -> str:
    return (datetime.now(UTC) - timedelta(days=31)).isoformat()


MALFORMED: list[tuple[str, Any, int, str]] = [
    ("not json", b"{nope", 400, "JSON"),
    ("not an object", [1, 2], 400, "object"),
    (
        "missing subject",
        {"specversion": "1.0", "id": "x", "source": "s", "type": "task.started"},
        400,
        "subject",
    ),
    ("unknown type", event("exploded", "t"), 400, "type"),
    ("bad specversion", dict(event("succeeded", "t"), specversion="0.3"), 400, "specversion"),
    ("no data", event("started", "t"), 400, "data"),
    ("unknown profile", started("t", {"db": "nope"}), 422, "nope"),
    ("retired profile", started("t", {"db": "old"}), 422, "retired"),
    ("profile of another tenant", started("t", {"db": "other-tenant-only"}), 422, "tenant"),
    ("zero duration", started("t", {"db": "kv-reader"}, 0), 400, "max_duration"),
    ("fractional duration", started("t", {"db": "kv-reader"}, 1.5), 400, "max_duration"),
    ("duration over max_ttl", started("t", {"db": "kv-reader"}, 901), 422, "max_ttl"),
    ("too many grants", started("t", {f"g{i}": "kv-reader" for i in range(17)}), 400, "grants"),
    ("no grants", started("t", {}), 400, "grants"),
    ("bad grant name", started("t", {"bad name!": "kv-reader"}), 400, "name"),
    (
        "sql in data",
        dict(
            started("t", {"db": "kv-reader"}),
            data={
                "max_duration": 5,
                "grants": [{"name": "db", "profile": "kv-reader"}],
                "sql": "DROP TABLE x",
            },
        ),
        400,
        "sql",
    ),
    ("too old", dict(started("t", {"db": "kv-reader"}), time=_old_time()), 422, "retention"),
    (
        "naive time",
        dict(started("t", {"db": "kv-reader"}), time="2026-01-01T00:00:00"),
        400,
        "time",
    ),
]


@pytest.mark.parametrize(
    ("label", "body", "status", "word"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_events_store_nothing(
    app_client: Any, keys: dict[str, str], label: str, body: Any, status: int, word: str
) -> None:
    before = counts()
    if isinstance(body, bytes):
        answer = app_client.post(
            "/v1/events",
            content=body,
            headers={**auth(keys["emitter"]), "Content-Type": "application/json"},
        )
    else:
        answer = post(app_client, keys["emitter"], body)
    assert answer.status_code == status, answer.text
    assert word.lower() in answer.json()["error"].lower()
    assert counts() == before


def test_body_limits_and_content_type(app_client: Any, keys: dict[str, str]) -> None:
    before = counts()
    big = started("t", {"db": "kv-reader"}, workload="x" * 100)
    big["padding"] = "x" * 70_000
    assert post(app_client, keys["emitter"], big).status_code == 413
    wrong = app_client.post(
        "/v1/events", content=b"{}", headers={**auth(keys["emitter"]), "Content-Type": "text/plain"}
    )
    assert wrong.status_code == 415
    ce = app_client.post(
        "/v1/events",
        content=b'{"specversion":"1.0"}',
        headers={**auth(keys["emitter"]), "Content-Type": "application/cloudevents+json"},
    )
    assert ce.status_code == 400
    assert counts() == before


def test_jwt_only_profile_refuses_the_claim_token(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("jwt")
    # Such a profile needs the workload the JWT will prove: without one, 422.
    nameless = post(app_client, keys["emitter"], started(name, {"kv": "jwt-only"}))
    assert nameless.status_code == 422 and "workload" in nameless.json()["error"]
    assert states("t1", name) == {}
    body = started(name, {"kv": "jwt-only"}, workload="spiffe://example.org/w")
    token = post(app_client, keys["emitter"], body).json()["claim_token"]
    wait_until(lambda: states("t1", name) == {"kv": "active"})
    refused = app_client.post(claim_url(name, "kv"), headers=auth(token))
    assert refused.status_code == 403 and "JWT" in refused.json()["error"]
    post(app_client, keys["emitter"], event("succeeded", name))


# --- CloudEvents as senders send them (HTTP binding: binary and structured mode) ------


def ce_event(type_: str, subject: str, data: dict[str, Any] | None = None, **attrs: Any) -> Any:
    """An event as the `cloudevents` SDK builds it (its 2.x core API)."""
    from cloudevents.core.v1.event import CloudEvent as SdkEvent

    attributes = {"type": f"task.{type_}", "source": "pytest://sdk", "subject": subject, **attrs}
    if data is not None:
        attributes["datacontenttype"] = "application/json"
    return SdkEvent(attributes, data)


def send(client: Any, key: str, message: Any) -> Any:
    return client.post("/v1/events", content=message.body, headers={**auth(key), **message.headers})


def test_binary_and_structured_mode_from_the_sdk_are_one_event(
    app_client: Any, keys: dict[str, str]
) -> None:
    from cloudevents.core.bindings.http import to_binary_event, to_structured_event

    # Non-ASCII, a space, a quote and a percent sign: the SDK percent-encodes them in
    # binary mode; the task's name is the decoded subject.
    name = unique('ce "é 100%"')
    data = {"max_duration": 60, "grants": [{"name": "kv", "profile": "kv-reader"}]}
    start = ce_event("started", name, data)
    binary = to_binary_event(start)
    assert "ce-subject" in binary.headers and "%C3%A9%20100%25" in binary.headers["ce-subject"]
    first = send(app_client, keys["emitter"], binary)
    assert first.status_code == 202, first.text
    token = first.json()["claim_token"]
    wait_until(lambda: states("t1", name) == {"kv": "active"})
    # The same event in structured mode: the first answer again, nothing more minted.
    again = send(app_client, keys["emitter"], to_structured_event(start))
    assert again.status_code == 200, again.text
    assert again.json()["duplicate"] is True and again.json()["claim_token"] == token
    assert len(credentials_of("t1", name)) == 1
    # The same key with other data is another event, in either mode.
    other = ce_event("started", name, {**data, "max_duration": 30}, id=start.get_id())
    assert send(app_client, keys["emitter"], to_binary_event(other)).status_code == 409
    # The other way round: structured first, then binary (no data: no body, no type).
    beat = ce_event("heartbeat", name)
    assert send(app_client, keys["emitter"], to_structured_event(beat)).status_code == 202
    beat_again = to_binary_event(beat)
    assert beat_again.body == b"" and "content-type" not in beat_again.headers
    assert send(app_client, keys["emitter"], beat_again).json()["duplicate"] is True
    end = send(app_client, keys["emitter"], to_binary_event(ce_event("succeeded", name)))
    assert end.status_code == 202 and end.json()["task"]["state"] == "succeeded"
    wait_until(lambda: states("t1", name) == {"kv": "revoked"})


def test_binary_mode_from_the_sdks_v1_api(app_client: Any, keys: dict[str, str]) -> None:
    """The SDK's 1.x API (`cloudevents.v1.http`, once `cloudevents.http`) sends binary
    mode without a Content-Type for JSON data, and ce-time as +00:00."""
    from cloudevents.v1.conversion import to_binary, to_structured
    from cloudevents.v1.http import CloudEvent as V1Event

    name = unique("ce-v1")
    start = V1Event(
        {"type": "task.started", "source": "pytest://sdk-v1", "subject": name},
        {"max_duration": 60, "grants": [{"name": "kv", "profile": "kv-reader"}]},
    )
    headers, body = to_binary(start)
    assert "content-type" not in {h.lower() for h in headers}
    first = app_client.post(
        "/v1/events", content=body, headers={**auth(keys["emitter"]), **headers}
    )
    assert first.status_code == 202, first.text
    headers, body = to_structured(start)
    again = app_client.post(
        "/v1/events", content=body, headers={**auth(keys["emitter"]), **headers}
    )
    assert again.status_code == 200 and again.json()["claim_token"] == first.json()["claim_token"]
    post(app_client, keys["emitter"], event("cancelled", name))


def test_batch_mode_and_bad_binary_events_are_refused(
    app_client: Any, keys: dict[str, str]
) -> None:
    from cloudevents.core.bindings.http import to_binary_event, to_structured_event

    before = counts()
    start = ce_event(
        "started",
        unique("ce-bad"),
        {"max_duration": 60, "grants": [{"name": "kv", "profile": "kv-reader"}]},
    )
    one = to_structured_event(start)
    batch = app_client.post(
        "/v1/events",
        content=b"[" + one.body + b"]",
        headers={**auth(keys["emitter"]), "Content-Type": "application/cloudevents-batch+json"},
    )
    assert batch.status_code == 415 and "batch mode" in batch.json()["error"]
    good = to_binary_event(start)
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({**good.headers, "content-type": "text/plain"}, good.body, 415, "must be JSON"),
        (
            {k: v for k, v in good.headers.items() if k != "ce-subject"},
            good.body,
            400,
            "ce-subject",
        ),
        ({**good.headers, "ce-subject": "a%FFb"}, good.body, 400, "percent-encoded UTF-8"),
        ({**good.headers, "ce-subject": "a%00b"}, good.body, 400, "NUL"),
        ({**good.headers, "ce-specversion": "0.3"}, good.body, 400, "ce-specversion"),
        ({**good.headers, "ce-type": "task.exploded"}, good.body, 400, "ce-type"),
        (good.headers, b"[1]", 400, "JSON object"),
        (good.headers, b"{", 400, "not valid JSON"),
    ]
    for headers, body, status, word in cases:
        answer = app_client.post(
            "/v1/events", content=body, headers={**auth(keys["emitter"]), **headers}
        )
        assert answer.status_code == status, (headers, answer.text)
        assert word in answer.json()["error"], (word, answer.text)
    # A header sent twice is ambiguous.
    twice = app_client.post(
        "/v1/events",
        content=good.body,
        headers=[*auth(keys["emitter"]).items(), *good.headers.items(), ("ce-id", "other")],
    )
    assert twice.status_code == 400 and "ce-id appears more than once" in twice.json()["error"]
    assert counts() == before


# --- errors machines can read: RFC 9457 problem details -------------------------------


def assert_problem(answer: Any, status: int, word: str) -> dict[str, Any]:
    from http import HTTPStatus

    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json", answer.headers
    body = answer.json()
    assert body["type"] == "about:blank"
    assert body["title"] == HTTPStatus(status).phrase
    assert body["status"] == status
    assert body["detail"] == body["error"] and word in body["detail"], body
    return body


def test_every_kind_of_error_is_a_problem_document(app_client: Any, keys: dict[str, str]) -> None:
    emitter = auth(keys["emitter"])
    # The door (the limits middleware, before any route): NUL, declared length.
    assert_problem(app_client.get("/v1/tasks/a%00b", headers=emitter), 400, "NUL")
    big = app_client.post("/v1/events", content=b"x" * 70_000, headers=emitter)
    assert_problem(big, 413, "64 KiB")
    # Starlette's: no such path, wrong method; FastAPI's: bad parameters.
    assert_problem(app_client.get("/v1/nowhere", headers=emitter), 404, "Not Found")
    assert_problem(app_client.delete("/v1/events", headers=emitter), 405, "Method Not Allowed")
    bad_query = app_client.get("/v1/tasks", params={"state": "runing"}, headers=emitter)
    assert_problem(bad_query, 422, "query.state")
    # ApiError: no key, a bad event, a wrong Content-Type; LedgerError: a conflict.
    assert_problem(app_client.post("/v1/events", json={}), 401, "")
    assert_problem(post(app_client, keys["emitter"], {"specversion": "1.0"}), 400, "id")
    name = unique("problems")
    body = started(name, {"kv": "kv-reader"})
    token = post(app_client, keys["emitter"], body).json()["claim_token"]
    changed = dict(body, data={**body["data"], "max_duration": 30})
    assert_problem(post(app_client, keys["emitter"], changed), 409, "")
    # The claim's own answers keep their extension member.
    post(app_client, keys["emitter"], event("succeeded", name))
    ended = app_client.post(claim_url(name, "kv"), headers=auth(token))
    assert assert_problem(ended, 410, "ended")["state"] == "succeeded"
    # A 5xx nobody planned for: a problem too, without the exception's text.
    from fastapi.testclient import TestClient

    from app.api import create_app

    app = create_app()

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("internal text no client should see")

    crash = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert "internal text" not in assert_problem(crash, 500, "internal error")["detail"]


def test_a_problem_never_loses_its_own_members() -> None:
    from app.api.errors import problem_body
    from app.api.schemas import ApiJSON

    assert problem_body(409, "x", state="pending")["state"] == "pending"
    with pytest.raises(ValueError, match="type"):
        problem_body(409, "x", type="https://example.org/other")
    # ApiJSON turns the legacy {"error": ...} of an error status into a problem.
    answer = ApiJSON({"error": "gone", "state": "claimed"}, status_code=410)
    assert answer.media_type == "application/problem+json"
    assert b'"status":410' in answer.body and b'"state":"claimed"' in answer.body
    assert ApiJSON({"error": "a field, not a failure"}).media_type == "application/json"
