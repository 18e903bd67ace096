"""The exported audit trail's hash chain (PRODUCT.md, "Audit export").

Each line is one JSON object: the audit entry's fields as GET /v1/audit shows them, plus
`seq` (1, 2, ...), `prev` (the previous line's hash; 64 zeros for the first) and `hash`:
SHA-256 (hex) of `prev` followed by the RFC 8785 canonical JSON of every member except
`hash`. Lines are ASCII (JSON escapes), so no line separator hides inside one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import rfc8785

from app.core.models import AuditEntry

GENESIS = "0" * 64
_HEX64 = re.compile(r"[0-9a-f]{64}")


def iso(value: Any) -> str:
    return str(value.isoformat()).replace("+00:00", "Z")


def view(entry: AuditEntry, task_name: str | None) -> dict[str, Any]:
    """The entry as GET /v1/audit shows it (`task` is the orchestrator's task id);
    `at` stays a datetime for the API's JSON to render."""
    return {
        "id": entry.id,
        "at": entry.at,
        "tenant": entry.tenant,
        "actor": entry.actor,
        "action": entry.action,
        "task": task_name,
        "credential": entry.credential_id,
        "reason": entry.reason,
        "detail": entry.detail,
    }


def record(entry: AuditEntry, task_name: str | None) -> dict[str, Any]:
    """The entry as GET /v1/audit shows it, `at` as RFC 3339 text: what is hashed."""
    return {**view(entry, task_name), "at": iso(entry.at)}


def chain_hash(prev: str, unhashed: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode("ascii") + rfc8785.dumps(unhashed)).hexdigest()


def link(fields: dict[str, Any], *, seq: int, prev: str) -> dict[str, Any]:
    """`fields` as line `seq` of the chain after `prev`."""
    line = {**fields, "seq": seq, "prev": prev}
    line["hash"] = chain_hash(prev, line)
    return line


def encode(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=True, separators=(",", ":")) + "\n").encode("ascii")


def is_hash(value: object) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


@dataclass
class Verdict:
    ok: bool
    lines: int  # lines checked (all of them when ok)
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    bad_line: int | None = None  # 1-based line number in the file
    problem: str | None = None


def verify(lines: Iterable[bytes], *, first_prev: str | None = None) -> Verdict:
    """Check seq continuity and every hash; names the first bad line.

    Without `first_prev` the chain must start at seq 1 after 64 zeros; with it (a file
    that starts mid-chain, after rotation) the first line's `prev` must be that hash."""
    expected_prev = first_prev if first_prev is not None else GENESIS
    expected_seq: int | None = None if first_prev is not None else 1
    verdict = Verdict(ok=True, lines=0)

    def bad(number: int, problem: str) -> Verdict:
        verdict.ok, verdict.bad_line, verdict.problem = False, number, problem
        return verdict

    number = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):
            return bad(number, "incomplete line (no newline at the end)")
        try:
            line = json.loads(raw)
        except ValueError:
            return bad(number, "not a JSON object")
        if not isinstance(line, dict):
            return bad(number, "not a JSON object")
        seq, prev, given = line.get("seq"), line.get("prev"), line.get("hash")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            return bad(number, "no valid seq")
        if not is_hash(prev) or not is_hash(given):
            return bad(number, "no valid prev or hash")
        if expected_seq is not None and seq != expected_seq:
            return bad(number, f"seq {seq} where {expected_seq} was expected")
        if prev != expected_prev:
            return bad(number, "prev is not the previous line's hash")
        unhashed = {k: v for k, v in line.items() if k != "hash"}
        try:
            computed = chain_hash(prev, unhashed)
        except (TypeError, ValueError, rfc8785.CanonicalizationError):
            return bad(number, "cannot be canonicalised (RFC 8785)")
        if computed != given:
            return bad(number, "hash does not match the line's content")
        if verdict.first_seq is None:
            verdict.first_seq = seq
        verdict.lines, verdict.last_seq, verdict.last_hash = number, seq, given
        expected_seq, expected_prev = seq + 1, given
    return verdict
