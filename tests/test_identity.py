"""Workload identity on claim: a JWT instead of the claim token (PRODUCT.md, 'Credentials
out' and 'Policies'), with a real key pair and a JWKS from a file and from a real local
HTTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlmodel import col, select

from app.authority import identity
from app.core.db import session_scope
from app.core.models import AuditEntry, Credential
from app.core.settings import get_settings
from tests.support.api import auth, claim_url, credentials_of, event, started, states, unique
from tests.support.procs import wait_until

# The run's services (OpenBao, the ledger, the data database), started once per session.
pytestmark = pytest.mark.usefixtures("services")

AUD, ISS = "leasehold-test", "https://issuer.example.org"
WORKLOAD = "spiffe://example.org/ns/reports/sa/job"
JWT_ENV = ("JWKS", "AUDIENCE", "ISSUER", "JWKS_REFRESH")


class Signer:
    """A key pair and its public JWK."""

    def __init__(self, kid: str, private: Any = None) -> None:
        self.kid = kid
        self.private = private or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        is_rsa = isinstance(self.private, rsa.RSAPrivateKey)
        algo = jwt.algorithms.RSAAlgorithm if is_rsa else jwt.algorithms.ECAlgorithm
        self.jwk = {**algo.to_jwk(self.private.public_key(), as_dict=True), "kid": kid}
        self.alg = "RS256" if is_rsa else "ES256"

    def token(self, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"sub": WORKLOAD, "aud": AUD, "iss": ISS, "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(
            body, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})}
        )

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def jwks(*signers: Signer) -> bytes:
    return json.dumps({"keys": [s.jwk for s in signers]}).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token made by hand, as an attacker would (PyJWT refuses to make these)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = b""
    if hmac_key is not None:
        sig = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


class JWKSServer:
    """A real HTTP server on loopback serving a JWKS, counting requests."""

    def __init__(self, body: bytes) -> None:
        self.body, self.hits, self.delay = body, 0, 0.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                time.sleep(owner.delay)
                self.wfile.write(owner.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[bytes], JWKSServer]]:
    servers: list[JWKSServer] = []

    def start(body: bytes) -> JWKSServer:
        servers.append(JWKSServer(body))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def jwt_config() -> Iterator[Callable[..., None]]:
    """Point LEASEHOLD_JWT_* at a JWKS for one test; restored afterwards."""
    saved = {n: os.environ.get(f"LEASEHOLD_JWT_{n}") for n in JWT_ENV}

    def configure(source: str | None, refresh: float = 60.0) -> None:
        values = {"JWKS": source, "AUDIENCE": AUD, "ISSUER": ISS, "JWKS_REFRESH": str(refresh)}
        for n, v in values.items():
            if v is None:
                os.environ.pop(f"LEASEHOLD_JWT_{n}", None)
            else:
                os.environ[f"LEASEHOLD_JWT_{n}"] = v
        get_settings.cache_clear()

    yield configure
    for n, v in saved.items():
        if v is None:
            os.environ.pop(f"LEASEHOLD_JWT_{n}", None)
        else:
            os.environ[f"LEASEHOLD_JWT_{n}"] = v
    get_settings.cache_clear()


def claim(client: Any, task: str, grant: str, token: str, tenant: str | None = "t1") -> Any:
    params = {"tenant": tenant} if tenant else {}
    return client.post(claim_url(task, grant), headers=auth(token), params=params)


def start(client: Any, key: str, grants: dict[str, str], workload: str = WORKLOAD) -> tuple:
    name = unique("jwt")
    answer = client.post(
        "/v1/events", json=started(name, grants, workload=workload), headers=auth(key)
    )
    assert answer.status_code == 202, answer.text
    wait_until(lambda: set(states("t1", name).values()) == {"active"})
    return name, answer.json()["claim_token"]


def audit_actions(name: str) -> list[AuditEntry]:
    [first] = credentials_of("t1", name)[:1]
    with session_scope() as s:
        return list(
            s.exec(
                select(AuditEntry)
                .where(AuditEntry.task_id == first.task_id)
                .order_by(col(AuditEntry.id))
            )
        )


# Why each wrong token is refused: the check that refused it, not some other one.
NOT_FOR_TASK = "not valid for this task"
REASONS = {
    "audience": "audience",
    "issuer": "issuer",
    "subject": NOT_FOR_TASK,
    "tenant": NOT_FOR_TASK,
    "no tenant": "?tenant=",
    "expired": "expired",
    "not yet valid": "not valid yet",
    "issued in the future": "not valid yet",
    "no exp": "'exp'",
    "no sub": "'sub'",
    "unknown kid": "not in the JWKS",
    "jku": "not in the JWKS",
    "jku with our kid": "signature does not verify",
    "x5u": "not in the JWKS",
    "embedded jwk": "signature does not verify",
    "alg none": "'none' is not accepted",
    "HS256 with the public key": "'HS256' is not accepted",
    "HS256 with the JWK's modulus": "'HS256' is not accepted",
    "ES256 header on an RSA key": "does not fit the key",
    "not a JWT": "cannot be parsed",
}


def test_jwt_claims_with_a_jwks_file(
    app_client: Any, keys: dict[str, str], jwt_config: Any, serve: Any, tmp_path: Path
) -> None:
    good, attacker = Signer("good-1"), Signer("evil-1")
    path = tmp_path / "jwks.json"
    path.write_text(jwks(good).decode())
    name, claim_token = start(app_client, keys["emitter"], {"kv": "kv-reader", "kv2": "kv-reader"})

    # Without JWKS configured a JWT proves nothing.
    jwt_config(None)
    refused = claim(app_client, name, "kv", good.token())
    assert refused.status_code == 403 and "not configured" in refused.json()["error"]

    jwt_config(str(path))
    evil_server = serve(jwks(attacker))
    now = int(time.time())
    claims = {"sub": WORKLOAD, "aud": AUD, "iss": ISS, "iat": now, "exp": now + 300}
    wrong: dict[str, tuple[str, str | None]] = {
        "audience": (good.token(aud="someone-else"), "t1"),
        "issuer": (good.token(iss="https://evil.example.org"), "t1"),
        "subject": (good.token(sub="spiffe://example.org/other"), "t1"),
        "tenant": (good.token(), "t2"),
        "no tenant": (good.token(), None),
        "expired": (good.token(iat=now - 900, exp=now - 120), "t1"),
        "not yet valid": (good.token(nbf=now + 600), "t1"),
        "issued in the future": (good.token(iat=now + 600), "t1"),
        "no exp": (good.token(exp=None), "t1"),
        "no sub": (good.token(sub=None), "t1"),
        "unknown kid": (Signer("nobody").token(), "t1"),
        # Signed by the attacker, pointing at the attacker's JWKS: never fetched.
        "jku": (attacker.token(headers={"jku": evil_server.url}), "t1"),
        "jku with our kid": (
            Signer("good-1", attacker.private).token(headers={"jku": evil_server.url}),
            "t1",
        ),
        "x5u": (attacker.token(headers={"x5u": evil_server.url}), "t1"),
        "embedded jwk": (
            Signer("good-1", attacker.private).token(headers={"jwk": attacker.jwk}),
            "t1",
        ),
        "alg none": (forged({"alg": "none", "typ": "JWT", "kid": "good-1"}, claims, None), "t1"),
        "HS256 with the public key": (
            forged({"alg": "HS256", "typ": "JWT", "kid": "good-1"}, claims, good.public_pem()),
            "t1",
        ),
        "HS256 with the JWK's modulus": (
            forged({"alg": "HS256", "kid": "good-1"}, claims, good.jwk["n"].encode()),
            "t1",
        ),
        "ES256 header on an RSA key": (
            forged({"alg": "ES256", "kid": "good-1"}, claims, None),
            "t1",
        ),
        "not a JWT": ("a.b.c", "t1"),
    }
    for why, (token, tenant) in wrong.items():
        answer = claim(app_client, name, "kv", token, tenant)
        assert answer.status_code == 403, (why, answer.text)
        assert "secret" not in answer.json(), why
        assert REASONS[why] in answer.json()["error"], (why, answer.text)
    assert evil_server.hits == 0  # jku/x5u are never fetched

    # A valid JWT for a task that does not exist: the same 403 as a wrong sub.
    ghost = claim(app_client, "no/such/task", "kv", good.token())
    wrong_sub = claim(app_client, name, "kv", good.token(sub="spiffe://example.org/other"))
    assert ghost.status_code == wrong_sub.status_code == 403
    assert ghost.json() == wrong_sub.json()
    assert states("t1", name) == {"kv": "active", "kv2": "active"}

    # The right token claims, once; the audit names the proven identity.
    ok = claim(app_client, name, "kv", good.token())
    assert ok.status_code == 200, ok.text
    assert ok.json()["secret"]["token"]
    again = claim(app_client, name, "kv", good.token())
    assert again.status_code == 410 and again.json()["state"] == "claimed"
    # Other profiles take the claim token as before.
    assert claim(app_client, name, "kv2", claim_token, None).status_code == 200
    trail = [(a.action, a.actor) for a in audit_actions(name)]
    assert ("claimed", WORKLOAD) in trail and ("second_claim", WORKLOAD) in trail
    assert ("claimed", "claim") in trail

    # A rotated file is read again: a token of the new key works, the old key's does not.
    name2, _ = start(app_client, keys["emitter"], {"kv": "kv-reader"})
    rotated = Signer("good-2")
    path.write_text(jwks(rotated).decode())
    assert claim(app_client, name2, "kv", good.token()).status_code == 403
    # A broken version of the file (half-written) keeps the keys read before.
    path.write_text('{"keys": [')
    assert identity.verify(rotated.token()).subject == WORKLOAD
    assert claim(app_client, name2, "kv", rotated.token()).status_code == 200
    for n in (name, name2):
        app_client.post("/v1/events", json=event("succeeded", n), headers=auth(keys["emitter"]))


REFRESH = 4.0


def test_jwks_url_cached_and_refreshed_at_most_once_per_interval(
    app_client: Any, keys: dict[str, str], jwt_config: Any, serve: Any
) -> None:
    first, ec_key = Signer("url-1"), Signer("url-ec", ec.generate_private_key(ec.SECP256R1()))
    server = serve(jwks(first, ec_key))
    # An interval the 16 claims below fit in with room to spare on a loaded machine.
    jwt_config(server.url, refresh=REFRESH)
    name, _ = start(app_client, keys["emitter"], {"a": "kv-reader", "b": "kv-reader"})

    # Many requests naming unknown kids: one fetch (the first load) in the interval.
    for i in range(15):
        answer = claim(app_client, name, "a", Signer(f"unknown-{i}", first.private).token())
        assert answer.status_code == 403
    assert server.hits == 1
    # The key is rotated at the source: not seen until the interval has passed...
    second = Signer("url-2")
    server.body = jwks(second)
    assert claim(app_client, name, "a", second.token()).status_code == 403
    assert server.hits == 1
    time.sleep(REFRESH + 0.1)
    # ...then one unknown kid fetches again, and the new key works.
    ok = claim(app_client, name, "a", second.token())
    assert ok.status_code == 200, ok.text
    assert server.hits == 2
    # The cached set answers a known kid without fetching; an EC key works too
    # (re-served, and fetched once more after the interval).
    server.body = jwks(second, ec_key)
    time.sleep(REFRESH + 0.1)
    assert claim(app_client, name, "b", ec_key.token()).status_code == 200
    assert server.hits == 3
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))


def test_jwks_fetch_bounds_and_url_rules(serve: Any, monkeypatch: Any, tmp_path: Path) -> None:
    signer = Signer("b-1")
    # Plain http only on loopback, and never in production.
    for url in ("http://jwks.example.org/keys", "ftp://127.0.0.1/keys", "https:///x"):
        with pytest.raises(identity.IdentityError, match="https"):
            identity.Verifier(url, audience=AUD, issuer=ISS, refresh_interval=1)
    with pytest.raises(identity.IdentityError, match="production"):
        identity.Verifier(
            "http://127.0.0.1:9/k", audience=AUD, issuer=ISS, refresh_interval=1, production=True
        )
    # Too large: refused, no keys.
    big = serve(json.dumps({"keys": [signer.jwk], "pad": "x" * (2 << 20)}).encode())
    v = identity.Verifier(big.url, audience=AUD, issuer=ISS, refresh_interval=60)
    with pytest.raises(identity.IdentityError, match="not in the JWKS"):
        v.verify(signer.token())
    # Too slow: the fetch is bounded in time.
    monkeypatch.setattr(identity, "FETCH_TIMEOUT", 0.5)
    slow = serve(jwks(signer))
    slow.delay = 3.0
    v = identity.Verifier(slow.url, audience=AUD, issuer=ISS, refresh_interval=60)
    began = time.monotonic()
    with pytest.raises(identity.IdentityError, match="not in the JWKS"):
        v.verify(signer.token())
    assert time.monotonic() - began < 2.5
    # A symmetric key in the JWKS is never used, whatever the token claims.
    secret = b"s" * 32
    oct_key = {"kty": "oct", "kid": "hmac", "k": _b64(secret)}
    mixed = serve(json.dumps({"keys": [oct_key, signer.jwk]}).encode())
    v = identity.Verifier(mixed.url, audience=AUD, issuer=ISS, refresh_interval=60)
    hs = jwt.encode(
        {"sub": WORKLOAD, "aud": AUD, "iss": ISS, "exp": int(time.time()) + 60},
        secret,
        algorithm="HS256",
        headers={"kid": "hmac"},
    )
    with pytest.raises(identity.IdentityError, match="not accepted"):
        v.verify(hs)
    assert v.verify(signer.token()).subject == WORKLOAD
    # A SPIFFE trust bundle (`spire-server bundle show -format spiffe`): its jwt-svid
    # keys verify JWT-SVIDs, its x509-svid keys are not used for JWTs.
    x509 = Signer("x509-key")
    bundle = tmp_path / "bundle.json"
    bundle.write_text(
        json.dumps(
            {
                "keys": [{**signer.jwk, "use": "jwt-svid"}, {**x509.jwk, "use": "x509-svid"}],
                "spiffe_sequence": 1,
            }
        )
    )
    v = identity.Verifier(str(bundle), audience=AUD, issuer=ISS, refresh_interval=60)
    assert v.verify(signer.token()).subject == WORKLOAD
    with pytest.raises(identity.IdentityError, match="not in the JWKS"):
        v.verify(x509.token())


POLICY_OPEN = """
@id("jwt-only-in-example-org")
permit (principal, action == Action::"mint", resource == Profile::"jwt-only")
when { principal.trust_domain == "example.org" && context.emitter like "emitter-*"
       && context.max_duration <= 600 && context.tenant == "t1" };
"""
POLICY_CLOSED = (
    POLICY_OPEN
    + f"""
@id("no-claims-for-reporter")
forbid (principal == Workload::"{WORKLOAD}", action == Action::"mint", resource);
"""
)


def test_jwt_only_profile_and_mint_evaluated_again_at_claim(
    app_client: Any, keys: dict[str, str], jwt_config: Any, policy_file: Any, tmp_path: Path
) -> None:
    signer = Signer("p-1")
    path = tmp_path / "jwks.json"
    path.write_text(jwks(signer).decode())
    jwt_config(str(path))
    policy_file(POLICY_OPEN)
    name, claim_token = start(app_client, keys["emitter"], {"a": "jwt-only", "b": "jwt-only"})

    # The claim token is refused for such a profile; the JWT is accepted.
    refused = claim(app_client, name, "a", claim_token, None)
    assert refused.status_code == 403 and "JWT" in refused.json()["error"]
    ok = claim(app_client, name, "a", signer.token())
    assert ok.status_code == 200, ok.text

    # The policy changes between start and claim: the proven principal is forbidden.
    policy_file(POLICY_CLOSED)
    denied = claim(app_client, name, "b", signer.token())
    assert denied.status_code == 403, denied.text
    assert "no-claims-for-reporter" in denied.json()["error"]
    [b] = [c for c in credentials_of("t1", name) if c.grant == "b"]
    assert b.state == "active" and b.claimed_at is None and b.sealed_secret is not None
    [entry] = [a for a in audit_actions(name) if a.action == "claim_denied"]
    assert entry.actor == WORKLOAD and entry.credential_id == b.id
    assert "no-claims-for-reporter" in (entry.detail or "")
    # Allowed again: the credential that stayed unclaimed can be claimed now.
    policy_file(POLICY_OPEN)
    assert claim(app_client, name, "b", signer.token()).status_code == 200
    with session_scope() as s:
        claimed = s.exec(select(Credential).where(Credential.id == b.id)).one()
        assert claimed.claimed_at is not None and claimed.sealed_secret is None
    app_client.post("/v1/events", json=event("succeeded", name), headers=auth(keys["emitter"]))
