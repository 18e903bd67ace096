"""GET /v1/audit: a task's story, scoped to the key's tenant, paged, newest first."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.api import auth, claim_url, event, started, unique
from tests.support.procs import wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")


def _audit(client: Any, key: str, **params: Any) -> Any:
    return client.get("/v1/audit", params=params, headers=auth(key))


def test_audit_tells_a_tasks_story(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("audit/story")
    first = app_client.post(
        "/v1/events", json=started(name, {"kv": "kv-reader"}), headers=auth(keys["emitter"])
    )
    assert first.status_code == 202, first.text
    token = first.json()["claim_token"]
    claimed = app_client.post(
        claim_url(name, "kv", wait=10), headers={"Authorization": f"Bearer {token}"}
    )
    assert claimed.status_code == 200, claimed.text
    secret = claimed.json()["secret"]["token"]
    again = app_client.post(claim_url(name, "kv"), headers={"Authorization": f"Bearer {token}"})
    assert again.status_code == 410
    ended = app_client.post(
        "/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"])
    )
    assert ended.status_code == 202

    def story() -> list[dict[str, Any]] | None:
        items = _audit(app_client, keys["operator"], task=name).json()["items"]
        return items if any(i["action"] == "revoked" for i in items) else None

    items = wait_until(story)
    actions = [i["action"] for i in reversed(items)]  # oldest first
    for expected in ("event", "task_started", "minted", "claimed", "second_claim", "revoked"):
        assert expected in actions, actions
    assert actions.index("claimed") < actions.index("second_claim") < actions.index("revoked")
    events = [i for i in items if i["action"] == "event"]
    assert {e["reason"] for e in events} == {"started", "succeeded"}
    assert all(e["actor"].startswith("emitter-") for e in events)
    assert all(i["task"] == name and i["tenant"] == "t1" for i in items)
    assert [i["id"] for i in items] == sorted((i["id"] for i in items), reverse=True)
    revoked = next(i for i in items if i["action"] == "revoked")
    assert revoked["reason"] == "succeeded" and revoked["credential"]
    by_cred = _audit(app_client, keys["operator"], credential=revoked["credential"]).json()
    assert {i["credential"] for i in by_cred["items"]} == {revoked["credential"]}
    only = _audit(app_client, keys["operator"], task=name, action="claimed").json()["items"]
    assert [i["action"] for i in only] == ["claimed"]
    # Never a secret in the trail.
    assert secret not in _audit(app_client, keys["admin"], task=name, limit=500).text


def test_audit_is_scoped_and_paged(app_client: Any, keys: dict[str, str]) -> None:
    name = unique("audit/scope")
    for _ in range(3):
        ok = app_client.post(
            "/v1/events", json=event("heartbeat", name), headers=auth(keys["emitter"])
        )
        assert ok.status_code == 404  # unknown task: refused, and not in the trail
    assert _audit(app_client, keys["operator"], task=name).json()["items"] == []
    started_ = app_client.post(
        "/v1/events", json=started(name, {"kv": "kv-reader"}), headers=auth(keys["emitter"])
    )
    assert started_.status_code == 202
    for _ in range(2):
        hb = app_client.post(
            "/v1/events",
            json=event("heartbeat", name, {"max_duration": 120}),
            headers=auth(keys["emitter"]),
        )
        assert hb.status_code == 202, hb.text
    # Another tenant's operator sees none of it; an emitter may not read the trail.
    assert _audit(app_client, keys["operator-t2"], task=name).json()["items"] == []
    assert _audit(app_client, keys["emitter"], task=name).status_code == 403
    assert _audit(app_client, "lhk_nope").status_code == 401
    # Pages of one, newest first, until the cursor runs out.
    seen: list[str] = []
    cursor = None
    while True:
        params = {"task": name, "action": "event", "limit": 1}
        if cursor:
            params["cursor"] = cursor
        body = _audit(app_client, keys["operator"], **params).json()
        seen += [i["reason"] for i in body["items"]]
        cursor = body["next"]
        if cursor is None:
            break
    assert seen == ["heartbeat", "heartbeat", "started"]
    admin = _audit(app_client, keys["admin"], task=name, action="event").json()["items"]
    assert len(admin) == 3
    assert _audit(app_client, keys["operator"], limit=501).status_code == 422
