"""Load and validate profiles.toml: operator-defined credential templates.

Errors name the profile and the field, never the value (a DSN may hold a
password).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class ProfileError(ValueError):
    """The profiles file is unusable; the message is safe to print."""


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def webhook_url_problem(url: str, *, production: bool) -> str | None:
    """Why an approval webhook URL may not be called, or None: https anywhere, plain
    http only to this machine and only outside production."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        return "not a valid URL"
    if not host or parts.username is not None or parts.password is not None:
        return "must name a host and carry no user or password"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and is_loopback(host):
        return "plain http is refused in production" if production else None
    return "must be https (plain http only to a loopback address, outside production)"


class _Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    max_ttl: int = Field(ge=1, le=31 * 24 * 3600)
    tenants: tuple[str, ...] | None = None
    approval: bool = False
    claim: Literal["token", "jwt"] = "token"
    narrows: str | None = None
    retired: bool = False
    # Called (signed, no secret, no approve link) when a grant of this profile starts
    # waiting for approval; see workers/notify_approval.py.
    approval_webhook: str | None = Field(default=None, max_length=2048)
    approval_webhook_secret: str | None = Field(default=None, min_length=16, max_length=256)

    @field_validator("approval_webhook")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None:
            problem = webhook_url_problem(value, production=False)
            if problem is not None:
                raise ValueError(problem)
        return value

    def open_to(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants


class PostgresProfile(_Profile):
    issuer: Literal["postgres"]
    dsn: str = Field(pattern=r"^postgres(ql)?(\+psycopg)?://")
    grants: tuple[str, ...] = Field(min_length=1)


class RedisProfile(_Profile):
    issuer: Literal["redis"]
    url: str = Field(pattern=r"^rediss?://")
    acl: str = Field(min_length=1)


class VaultTokenProfile(_Profile):
    issuer: Literal["vault-token"]
    policies: tuple[str, ...] = Field(min_length=1)


class VaultDynamicProfile(_Profile):
    issuer: Literal["vault-dynamic"]
    path: str = Field(min_length=1)
    wrap: bool = False


# A header name (RFC 9110 token); the proxy never lets a profile set these.
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "forwarded",
        "accept-encoding",
        "content-encoding",
        "expect",
    }
)
_METHOD = re.compile(r"^[A-Z]{1,16}$")
_RATE = re.compile(r"^([1-9][0-9]{0,5})/(s|m|h)$")
_RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class ProxyProfile(_Profile):
    """A static secret kept behind `leasehold proxy` (PRODUCT.md "Brokered access")."""

    issuer: Literal["proxy"]
    upstream: str = Field(max_length=512)  # scheme, host and port only
    secret: str = Field(pattern=r"^[^#\s]+#[^#\s]+$", max_length=512)  # KV v2 path#field
    inject: str = Field(max_length=1024)  # "Header-Name: text with {secret}"
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    ca_file: str | None = None
    rate: str | None = None  # "10/s", "600/m", "1000/h": per credential

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            raise ValueError("not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be http:// or https:// with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must carry no user or password")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("names scheme, host and port only (no path, query or fragment)")
        return value

    @field_validator("inject")
    @classmethod
    def _inject(cls, value: str) -> str:
        name, sep, template = value.partition(":")
        if not sep or not _HEADER_NAME.match(name.strip()) or name != name.strip():
            raise ValueError('must be "Header-Name: value with {secret}"')
        if name.lower() in _RESERVED_HEADERS or name.lower().startswith(("proxy-", "x-forwarded-")):
            raise ValueError(f"header {name!r} is not one the proxy may set")
        if "{secret}" not in template or any(c in template for c in "\r\n\x00"):
            raise ValueError("the value must hold {secret} and no CR, LF or NUL")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not all(_METHOD.match(m) for m in value):
            raise ValueError("methods are upper-case HTTP method names")
        return value

    @field_validator("paths")
    @classmethod
    def _paths(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in value or ():
            if not pattern.startswith("/"):
                raise ValueError("each path starts with /")
            for segment in pattern.split("/"):
                if "*" in segment and segment not in ("*", "**"):
                    raise ValueError("* and ** stand for whole segments only")
                if segment in (".", "..") or any(c in segment for c in "%\\;?#"):
                    raise ValueError("a path pattern is plain, decoded text without . or ..")
        return value

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None and not _RATE.match(value):
            raise ValueError('must be like "10/s", "600/m" or "1000/h"')
        return value

    @property
    def header_name(self) -> str:
        return self.inject.partition(":")[0]

    @property
    def header_template(self) -> str:
        return self.inject.partition(":")[2].strip()

    @property
    def secret_path(self) -> str:
        return self.secret.partition("#")[0].strip("/")

    @property
    def secret_field(self) -> str:
        return self.secret.partition("#")[2]

    @property
    def rate_per_second(self) -> tuple[float, float] | None:
        """(requests per second, burst) of `rate`, or None for no limit."""
        if self.rate is None:
            return None
        match = _RATE.match(self.rate)
        assert match is not None
        count = int(match.group(1))
        return count / _RATE_PERIODS[match.group(2)], float(count)


Profile = Annotated[
    PostgresProfile | RedisProfile | VaultTokenProfile | VaultDynamicProfile | ProxyProfile,
    Field(discriminator="issuer"),
]
_profile_adapter: TypeAdapter[Profile] = TypeAdapter(Profile)

ISSUERS = ("postgres", "redis", "vault-token", "vault-dynamic", "proxy")


def _describe(name: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if p not in ISSUERS) or "issuer"
        if err["type"] == "union_tag_invalid":
            problems.append(f"field 'issuer': must be one of {', '.join(ISSUERS)}")
        elif err["type"] == "union_tag_not_found":
            problems.append("field 'issuer': missing")
        elif err["type"] == "extra_forbidden":
            problems.append(f"field '{loc}': unknown field")
        else:
            problems.append(f"field '{loc}': {err['msg']}")
    return f"profile '{name}': " + "; ".join(problems)


def parse_profiles(document: dict[str, Any]) -> dict[str, Profile]:
    """Validate a parsed TOML document; raise ProfileError naming what is wrong."""
    section = document.get("profiles")
    if not isinstance(section, dict) or not section:
        raise ProfileError("no [profiles.<name>] tables found")
    profiles: dict[str, Profile] = {}
    errors: list[str] = []
    for name, body in section.items():
        if not isinstance(body, dict):
            errors.append(f"profile '{name}': must be a table")
            continue
        try:
            profiles[name] = _profile_adapter.validate_python({**body, "name": name})
        except ValidationError as exc:
            errors.append(_describe(name, exc))
    for name, profile in profiles.items():
        if profile.narrows is not None and profile.narrows not in section:
            errors.append(f"profile '{name}': field 'narrows': no profile '{profile.narrows}'")
        if profile.approval_webhook is not None and not profile.approval:
            errors.append(f"profile '{name}': field 'approval_webhook': needs approval = true")
    if errors:
        raise ProfileError("\n".join(errors))
    return profiles


def load_profiles(path: Path) -> dict[str, Profile]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(f"profiles file not found: {path}") from None
    except OSError as exc:  # a directory (a bind mount of a missing file), no permission
        raise ProfileError(f"cannot read profiles file {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None
    return parse_profiles(document)


# Keyed by the path as configured (resolving it costs a syscall per component, on every
# event); the stamp follows symlinks, so a swapped link (a Kubernetes ConfigMap) is a
# new file: another inode, so it is read again even with the same mtime.
_cache: dict[Path, tuple[tuple[int, int, int, int], dict[str, Profile]]] = {}


def get_profiles(path: Path | None = None) -> dict[str, Profile]:
    """The profiles file, parsed once per process and again when it changes on disk."""
    from app.core.settings import get_settings

    path = path or get_settings().profiles_file
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ProfileError(f"profiles file not found: {path.resolve()}") from None
    stamp = (st.st_mtime_ns, st.st_ino, st.st_dev, st.st_size)
    cached = _cache.get(path)
    if cached is None or cached[0] != stamp:
        _cache[path] = (stamp, load_profiles(path))
    return _cache[path][1]
