"""Workload identity: a JWT (an OIDC ID token or a SPIFFE JWT-SVID) presented at a claim.

Verification is PyJWT's; this module only decides which key and which algorithm
it may use, and where keys come from. It knows no HTTP framework and no ledger.

- Keys come only from LEASEHOLD_JWT_JWKS (a file, or an https URL; http only on
  loopback outside production). Header parameters that name keys (`jku`, `x5u`,
  `jwk`, `x5c`) are never looked at, let alone fetched.
- Only asymmetric algorithms (RS*, PS*, ES*, EdDSA), and only the ones a key's
  type allows: a token claiming HS256 (or `none`) is refused before any key is
  touched, and symmetric (`oct`) keys in a JWKS are dropped.
- A JWKS URL is cached; an unknown `kid` (or a set older than MAX_AGE) refetches
  it, at most once per `LEASEHOLD_JWT_JWKS_REFRESH` seconds for the whole process,
  each fetch bounded in time and size. A JWKS file is re-read when it changes.
- `exp` and `sub` are required, `aud` and `iss` must be the configured ones,
  `nbf`/`iat`/`exp` are checked with LEEWAY seconds of clock skew.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

logger = logging.getLogger("leasehold")

LEEWAY = 30  # seconds of clock skew allowed on exp, nbf and iat
MAX_TOKEN_CHARS = 16 * 1024
MAX_JWKS_BYTES = 1024 * 1024
FETCH_TIMEOUT = 5.0  # seconds, the whole fetch
MAX_AGE = 3600.0  # a fetched set is refetched (rate limit permitting) after this long
_RSA = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
_EC = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
ALGORITHMS = frozenset(_RSA | set(_EC) | {"EdDSA"})
_ASYMMETRIC_KTY = {"RSA", "EC", "OKP"}
# "jwt-svid": a SPIFFE trust bundle's JWT keys (its "x509-svid" keys sign no JWT).
_SIGNING_USES = {"sig", "jwt-svid"}
_LOOPBACK_NAMES = {"localhost"}


class IdentityError(Exception):
    """The JWT proves nothing; the message says why (never the token itself)."""


@dataclass(frozen=True)
class Identity:
    subject: str  # `sub`: the workload the token proves
    issuer: str


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts (a claim token has a `lhc.` prefix, checked first)."""
    return token.count(".") == 2 and not token.startswith("lhc.")


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_source(source: str, *, production: bool) -> None:
    """A JWKS URL must be https (http only on loopback, and not in production)."""
    if "://" not in source:
        return  # a file path
    parts = urlsplit(source)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        if production:
            raise IdentityError("LEASEHOLD_JWT_JWKS: production needs an https URL")
        return
    raise IdentityError("LEASEHOLD_JWT_JWKS: a JWKS URL must be https (http only on loopback)")


@dataclass(frozen=True)
class _Key:
    jwk: jwt.PyJWK
    declared_alg: str | None  # the JWK's own `alg`, when it names one


def _key_set(raw: bytes) -> dict[str, _Key]:
    """kid -> key: signing keys of asymmetric types only; the others are skipped."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise IdentityError("the JWKS is not JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise IdentityError("the JWKS has no `keys` list")
    found: dict[str, _Key] = {}
    for k in keys:
        if not (
            isinstance(k, dict)
            and k.get("kty") in _ASYMMETRIC_KTY
            and k.get("use", "sig") in _SIGNING_USES
            and isinstance(k.get("kid"), str)
            and "d" not in k  # a private key has no business in a JWKS
        ):
            continue
        alg = k.get("alg")
        if alg is not None and alg not in ALGORITHMS:
            continue
        try:
            found.setdefault(k["kid"], _Key(jwt.PyJWK(k), alg))
        except (jwt.PyJWTError, ValueError, TypeError):
            continue  # a malformed key spoils only itself
    return found


def _compatible(key: _Key, alg: str) -> bool:
    """May a token signed with `alg` be checked with this key? (No confusion across
    types: an RSA key never verifies an HMAC, an ES256 token needs a P-256 key.)"""
    if key.declared_alg is not None and key.declared_alg != alg:
        return False
    public = key.jwk.key
    if alg in _RSA:
        return isinstance(public, rsa.RSAPublicKey)
    if alg in _EC:
        return isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, _EC[alg])
    if alg == "EdDSA":
        return isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


@dataclass
class _Cache:
    keys: dict[str, _Key] = field(default_factory=dict)
    loaded: bool = False
    fetched_at: float = 0.0  # monotonic time of the last good load
    last_try: float | None = None  # monotonic time of the last fetch attempt
    file_signature: tuple[int, int, int] | None = None
    fetches: int = 0  # attempts, for tests and logs


class Verifier:
    """Checks JWTs against one JWKS source, audience and issuer."""

    def __init__(
        self,
        source: str,
        *,
        audience: str,
        issuer: str,
        refresh_interval: float,
        production: bool = False,
    ) -> None:
        check_source(source, production=production)
        self.source, self.audience, self.issuer = source, audience, issuer
        self.refresh_interval = refresh_interval
        self.is_url = "://" in source
        self._lock = threading.Lock()
        self._cache = _Cache()

    @property
    def fetches(self) -> int:
        return self._cache.fetches

    # --- keys ---------------------------------------------------------------

    def _fetch_url(self) -> bytes:
        deadline = time.monotonic() + FETCH_TIMEOUT
        body = bytearray()
        # No redirects: a 3xx could lead anywhere, including plain http.
        with (
            httpx.Client(timeout=FETCH_TIMEOUT, follow_redirects=False) as client,
            client.stream("GET", self.source, headers={"Accept": "application/json"}) as answer,
        ):
            if answer.status_code != 200:
                raise IdentityError(f"the JWKS URL answered {answer.status_code}")
            for chunk in answer.iter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise IdentityError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise IdentityError(f"the JWKS took longer than {FETCH_TIMEOUT}s")
        return bytes(body)

    def _load_url(self, kid: str) -> dict[str, _Key]:
        cache = self._cache
        with self._lock:
            now = time.monotonic()
            fresh = cache.loaded and now - cache.fetched_at < MAX_AGE
            if fresh and kid in cache.keys:
                return cache.keys
            # The one global rate limit: however many requests name unknown kids,
            # at most one fetch per interval.
            if cache.last_try is not None and now - cache.last_try < self.refresh_interval:
                return cache.keys
            cache.last_try = now
            cache.fetches += 1
        try:
            keys = _key_set(self._fetch_url())
        except (IdentityError, httpx.HTTPError, OSError) as exc:
            logger.error(
                "JWKS fetch failed; the keys fetched before stay in use",
                extra={"jwks": self.source, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            return cache.keys
        with self._lock:
            cache.keys, cache.loaded, cache.fetched_at = keys, True, time.monotonic()
        logger.info("JWKS fetched", extra={"jwks": self.source, "keys": len(keys)})
        return keys

    def _load_file(self) -> dict[str, _Key]:
        cache = self._cache
        path = Path(self.source)
        try:
            st = os.stat(path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            raise IdentityError("the JWKS file cannot be read") from None
        with self._lock:
            if signature == cache.file_signature:
                return cache.keys
            cache.fetches += 1
            cache.file_signature = signature  # a bad version is not re-read per request
            try:
                if st.st_size > MAX_JWKS_BYTES:
                    raise IdentityError(f"the JWKS file is larger than {MAX_JWKS_BYTES} bytes")
                try:
                    raw = path.read_bytes()
                except OSError:
                    raise IdentityError("the JWKS file cannot be read") from None
                cache.keys, cache.loaded = _key_set(raw), True
            except IdentityError as exc:
                # Half-written while being replaced, say: the last good keys stay.
                logger.error(
                    "JWKS file refused; the keys read before stay in use",
                    extra={"jwks": self.source, "error": str(exc)},
                )
            return cache.keys

    def key_for(self, kid: str) -> _Key | None:
        keys = self._load_url(kid) if self.is_url else self._load_file()
        return keys.get(kid)

    # --- tokens -------------------------------------------------------------

    def verify(self, token: str) -> Identity:
        """The proven identity, or IdentityError."""
        if len(token) > MAX_TOKEN_CHARS:
            raise IdentityError("the JWT is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise IdentityError("the JWT cannot be parsed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise IdentityError(f"algorithm {str(alg)[:20]!r} is not accepted (asymmetric only)")
        if "crit" in header or "b64" in header:
            raise IdentityError("critical JWS extensions are not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise IdentityError("the JWT names no key (kid)")
        # `jku`, `x5u`, `jwk` and `x5c` are deliberately ignored: keys come only
        # from the configured JWKS.
        key = self.key_for(kid)
        if key is None:
            raise IdentityError("the JWT's key (kid) is not in the JWKS")
        if not _compatible(key, alg):
            raise IdentityError(f"algorithm {alg} does not fit the key {kid[:64]!r}")
        try:
            claims = jwt.decode(
                token,
                key=key.jwk.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={
                    "require": ["exp", "sub", "aud", "iss"],
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,
                    "verify_aud": True,
                    "verify_iss": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise IdentityError("the JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise IdentityError("the JWT is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise IdentityError("the JWT's audience is not Leasehold's") from None
        except jwt.InvalidIssuerError:
            raise IdentityError("the JWT's issuer is not the configured one") from None
        except jwt.MissingRequiredClaimError as exc:
            raise IdentityError(f"the JWT lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise IdentityError("the JWT's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise IdentityError(f"the JWT is not valid: {type(exc).__name__}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise IdentityError("the JWT's sub is empty")
        return Identity(subject=sub, issuer=str(claims.get("iss")))


_verifiers: dict[tuple[Any, ...], Verifier] = {}
_verifiers_lock = threading.Lock()


def verifier() -> Verifier:
    """The verifier for the configured JWKS, audience and issuer (one per process and
    configuration); IdentityError when JWT claims are not (fully) configured."""
    from app.core.settings import get_settings

    settings = get_settings()
    source, audience, issuer = settings.jwt_jwks, settings.jwt_audience, settings.jwt_issuer
    if not source:
        raise IdentityError("JWT claims are not configured (LEASEHOLD_JWT_JWKS)")
    if not audience or not issuer:
        # Fail closed: without both there is nothing to bind the token to Leasehold.
        raise IdentityError("JWT claims need LEASEHOLD_JWT_AUDIENCE and LEASEHOLD_JWT_ISSUER")
    production = settings.env == "production"
    key = (source, audience, issuer, settings.jwt_jwks_refresh, production)
    found = _verifiers.get(key)
    if found is None:
        with _verifiers_lock:
            found = _verifiers.get(key)
            if found is None:
                found = Verifier(
                    source,
                    audience=audience,
                    issuer=issuer,
                    refresh_interval=settings.jwt_jwks_refresh,
                    production=production,
                )
                _verifiers[key] = found
    return found


def verify(token: str) -> Identity:
    """Check a presented JWT with the configured verifier (IdentityError if not)."""
    return verifier().verify(token)
