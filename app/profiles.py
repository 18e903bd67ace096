"""Load and validate profiles.toml: operator-defined credential templates.

Errors name the profile and the field, never the value (a DSN may hold a
password).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class ProfileError(ValueError):
    """The profiles file is unusable; the message is safe to print."""


class _Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    max_ttl: int = Field(ge=1, le=31 * 24 * 3600)
    tenants: tuple[str, ...] | None = None
    approval: bool = False
    claim: Literal["token", "jwt"] = "token"
    narrows: str | None = None
    retired: bool = False

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


Profile = Annotated[
    PostgresProfile | RedisProfile | VaultTokenProfile | VaultDynamicProfile,
    Field(discriminator="issuer"),
]
_profile_adapter: TypeAdapter[Profile] = TypeAdapter(Profile)

ISSUERS = ("postgres", "redis", "vault-token", "vault-dynamic")


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


def parse_profiles(document: dict) -> dict[str, Profile]:
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


_cache: dict[Path, tuple[float, dict[str, Profile]]] = {}


def get_profiles(path: Path | None = None) -> dict[str, Profile]:
    """The profiles file, parsed once per process and again when it changes on disk."""
    from app.settings import get_settings

    path = (path or get_settings().profiles_file).resolve()
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        raise ProfileError(f"profiles file not found: {path}") from None
    cached = _cache.get(path)
    if cached is None or cached[0] != mtime:
        _cache[path] = (mtime, load_profiles(path))
    return _cache[path][1]
