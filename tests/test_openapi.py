"""/openapi.json describes the API truthfully: a valid document, and schemathesis
finds no 5xx and no answer outside it (status codes, bodies) on the real app."""

from __future__ import annotations

import itertools
import secrets
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.api.auth import create_key
from app.core.db import session_scope
from app.core.models import Role

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

FUZZ_EXAMPLES = 25  # per operation; derandomized, so every run sends the same requests


def test_the_document_is_valid_openapi(app_client: Any) -> None:
    doc = app_client.get("/openapi.json").json()
    validate(doc)  # raises on an invalid document (e.g. an unresolved path parameter)

    claim = doc["paths"]["/v1/tasks/{task_id}/credentials/{grant}/claim"]["post"]
    assert {p["name"] for p in claim["parameters"] if p["in"] == "path"} == {"task_id", "grant"}
    assert claim["security"] == [{"ClaimToken": []}]
    schemes = doc["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "a Leasehold API key (lhk_...)",
    }
    # Every 4xx/5xx is the real error shape, an RFC 9457 problem, never FastAPI's
    # default validation body.
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if status[0] in "45":
                    assert list(answer["content"]) == ["application/problem+json"], status
                    ref = answer["content"]["application/problem+json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorOut", (method, path, status)
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    error_out = doc["components"]["schemas"]["ErrorOut"]
    assert error_out["required"] == ["type", "title", "status", "detail", "error"]
    assert error_out["properties"]["type"]["const"] == "about:blank"
    # The event body: a structured-mode CloudEvent, with task.started's data.
    events = doc["paths"]["/v1/events"]["post"]
    body = events["requestBody"]["content"]["application/cloudevents+json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CloudEvent"}
    event = doc["components"]["schemas"]["CloudEvent"]
    assert set(event["required"]) == {"specversion", "id", "source", "type", "subject"}
    assert "StartedData" in doc["components"]["schemas"]
    assert events["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EventAnswer"
    }


def test_a_state_filter_with_a_typo_is_refused(app_client: Any, keys: dict[str, str]) -> None:
    auth = {"Authorization": f"Bearer {keys['operator']}"}
    for path, typo, good in (
        ("/v1/tasks", "runing", "running"),
        ("/v1/credentials", "actve", "active"),
    ):
        answer = app_client.get(path, params={"state": typo}, headers=auth)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"].startswith("query.state: Input should be")
        assert app_client.get(path, params={"state": good}, headers=auth).status_code == 200


# --- schemathesis ------------------------------------------------------------
# Cases come from the served /openapi.json; they go through the session's
# TestClient (the app with its lifespan already running), and schemathesis judges
# each answer. Its pytest plugin is not used: it does not run under pytest 9.


@pytest.fixture(scope="module")
def fuzz_keys(keys: dict[str, str]) -> dict[str, str]:
    """Keys of a tenant of their own, so what the fuzzer stores touches no other test."""
    made = {"admin": keys["admin"]}
    tenant = f"fuzz-{secrets.token_hex(4)}"
    with session_scope() as session:
        for role in (Role.emitter, Role.operator):
            _, made[role] = create_key(session, name=f"{tenant}-{role}", role=role, tenant=tenant)
    return made


def key_for(fuzz_keys: dict[str, str], path: str) -> str:
    """A valid key of the role the operation wants, so the fuzzer gets past the door."""
    if path == "/v1/events":
        return fuzz_keys[Role.emitter]
    if path.startswith("/v1/sweeps"):
        return fuzz_keys["admin"]
    return fuzz_keys[Role.operator]


def send(client: Any, case: Any, token: str) -> Any:
    """The case as schemathesis would send it (requests' arguments), through `client`."""
    sent = case.as_transport_kwargs(
        base_url="http://testserver", headers={"Authorization": f"Bearer {token}"}
    )
    body: dict[str, Any] = {}
    if "data" in sent:
        data = sent["data"]
        body["content"] = data.encode() if isinstance(data, str) else data
    if "json" in sent:
        body["json"] = sent["json"]
    if sent.get("cookies"):
        client.cookies.clear()
        client.cookies.update(sent["cookies"])
    try:
        return client.request(
            sent["method"], sent["url"], params=sent["params"], headers=sent["headers"], **body
        )
    finally:
        client.cookies.clear()


def fuzz(client: Any, operation: Any, mode: GenerationMode, token: str, checks: list[Any]) -> int:
    """Send FUZZ_EXAMPLES generated cases of one operation; a failed check raises."""
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def one(case: Any) -> None:
        nonlocal sent
        response = send(client, case, token)
        sent += 1
        case.validate_response(response, checks=checks)

    one()
    return sent


def test_schemathesis_finds_no_error_and_no_undocumented_answer(
    app_client: Any, fuzz_keys: dict[str, str]
) -> None:
    schema = schemathesis.openapi.from_dict(app_client.get("/openapi.json").json())
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,  # errors: application/problem+json
        response_schema_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures: list[str] = []
    for operation, mode in itertools.product(operations, GenerationMode):
        token = key_for(fuzz_keys, operation.path)
        try:
            sent = fuzz(app_client, operation, mode, token, checks)
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing to get wrong: no parameter
            continue
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises a group
            failures.append(f"{operation.method.upper()} {operation.path} ({mode}): {exc}")
        else:
            assert sent >= 1, operation.path
    assert not failures, "\n\n".join(failures)
