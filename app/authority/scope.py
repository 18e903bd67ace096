"""Emitter scope: what one emitter key may start tasks for.

A key may be limited to event sources, workloads and profiles (each a list;
none means no limit), so one compromised orchestrator cannot mint for everybody.

Matching, exactly (strings are compared case-sensitively, nothing is decoded):

- profiles: the profile's name equals an entry.
- sources: the event's `source` equals an entry, or begins with the entry
  followed by `/` (`airflow://prod` covers `airflow://prod/dags`, never
  `airflow://prod-evil`).
- workloads: an entry `spiffe://<trust domain>` (no path) covers every
  workload whose trust domain, the text between `spiffe://` and the next `/`,
  equals it (`spiffe://example.org` covers `spiffe://example.org/agent`, never
  `spiffe://example.org.evil/agent` nor `spiffe://example.org@evil/agent`). Any
  other entry covers the workload equal to it, or beginning with it followed by
  `/`. A prefix covers only a remainder without empty, `.` or `..` segments, `?`
  or `#`, so `.../agent/../admin` is not under `.../agent`. A task without a
  workload is outside a workload-limited key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from app.profiles import NAME_PATTERN

SPIFFE = "spiffe://"
MAX_ENTRIES = 64  # per list
MAX_ENTRY = 512  # as long as a source or workload may be
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")  # SPIFFE: lowercase letters, digits, . - _
_BAD_TEXT = re.compile(r"[\x00-\x20\x7f]")  # no whitespace or control characters


class ScopeError(ValueError):
    pass


def normalise(kind: str, entries: Iterable[str] | None) -> list[str] | None:
    """Checked, de-duplicated entries for one list; None (no limit) stays None.

    Refuses an empty list: a key limited to nothing is an error, not a key."""
    if entries is None:
        return None
    out: list[str] = []
    for raw in entries:
        entry = raw.strip()
        if kind != "profiles":
            entry = entry.rstrip("/") if not entry.endswith("://") else entry
        _check_entry(kind, entry)
        if entry not in out:
            out.append(entry)
    if not out:
        raise ScopeError(f"--{kind} is empty; leave it out to allow every {kind[:-1]}")
    if len(out) > MAX_ENTRIES:
        raise ScopeError(f"--{kind} has more than {MAX_ENTRIES} entries")
    return out


def _check_entry(kind: str, entry: str) -> None:
    if not entry or len(entry) > MAX_ENTRY or _BAD_TEXT.search(entry):
        raise ScopeError(
            f"{kind} entry {entry[:80]!r} must be 1-{MAX_ENTRY} characters without spaces"
        )
    if kind == "profiles":
        if not re.match(NAME_PATTERN, entry):
            raise ScopeError(f"profiles entry {entry!r} is not a profile name")
        return
    if kind == "workloads" and entry.startswith(SPIFFE):
        domain, _, path = entry[len(SPIFFE) :].partition("/")
        if not _TRUST_DOMAIN.match(domain):
            raise ScopeError(f"workloads entry {entry!r}: {domain!r} is not a SPIFFE trust domain")
        if path and not _clean_path(path):
            raise ScopeError(f"workloads entry {entry!r} has an empty, '.' or '..' segment")


def _clean_path(path: str) -> bool:
    return (
        "?" not in path
        and "#" not in path
        and all(s not in ("", ".", "..") for s in path.split("/"))
    )


def _under(value: str, entry: str) -> bool:
    """`value` is `entry`, or `entry` followed by `/` and a clean remainder."""
    if value == entry:
        return True
    return value.startswith(entry + "/") and _clean_path(value[len(entry) + 1 :])


def workload_in(workload: str, entries: list[str]) -> bool:
    # `spiffe://<trust domain>` needs no case of its own: `/` is where a trust domain
    # ends, so the segment-boundary rule is exactly "same trust domain".
    return any(_under(workload, entry) for entry in entries)


def source_in(source: str, entries: list[str]) -> bool:
    return any(_under(source, entry) for entry in entries)


def source_refusal(sources: list[str] | None, source: str) -> str | None:
    """Why this key may not send events from `source`; None when it may."""
    if sources is None or source_in(source, sources):
        return None
    return f"source {source!r} is outside this key's sources ({', '.join(sources)})"


def grant_refusal(
    workloads: list[str] | None, profiles: list[str] | None, workload: str | None, profile: str
) -> str | None:
    """Why this key may not start a grant of `profile` for `workload`; None when it may."""
    if profiles is not None and profile not in profiles:
        return f"profile {profile!r} is outside this key's profiles ({', '.join(profiles)})"
    if workloads is not None:
        if workload is None:
            return f"no workload named; this key is limited to workloads ({', '.join(workloads)})"
        if not workload_in(workload, workloads):
            return f"workload {workload!r} is outside this key's workloads ({', '.join(workloads)})"
    return None


def describe(
    sources: list[str] | None, workloads: list[str] | None, profiles: list[str] | None
) -> str:
    """One line for `leasehold keys list`: the limits, or `-` for none."""
    parts = [
        f"{name}={','.join(values)}"
        for name, values in (("sources", sources), ("workloads", workloads), ("profiles", profiles))
        if values is not None
    ]
    return " ".join(parts) or "-"
