"""Cedar policies (LEASEHOLD_POLICY_FILE): may this workload mint or extend this profile?

Decisions only: this module knows no HTTP, no ledger rows and enqueues nothing.
The ledger asks it inside the event's transaction, so the API process decides
and a worker needs no policy.

Fail closed: no permit is a deny, and so is any evaluation error (Cedar skips
a policy that errors, so an erroring `forbid` would otherwise let a request
through). The file is validated strictly against the schema shipped here. It
is re-read when it changes (checked at most every RECHECK_SECONDS); a change
to an invalid file, or its removal, keeps the last good set in force and
raises an alert.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import cedarpy

logger = logging.getLogger("leasehold")

SCHEMA_FILE = Path(__file__).parent / "policy_schema.cedarschema"
RECHECK_SECONDS = 1.0
MAX_FILE_BYTES = 1024 * 1024
NO_POLICY = "no policy file: every grant is allowed"
_SPIFFE = re.compile(r"^spiffe://([a-z0-9._-]+)(/[^?#]*)?$")  # trust domains are lower case
_ERROR_POLICY = re.compile(r"policy `([^`]+)`")

Action = Literal["mint", "extend"]


class PolicyError(ValueError):
    """The policy file is unusable; the message names the file and the line."""


@dataclass(frozen=True)
class Ask:
    """One question: may `workload` do `action` on `profile`, in this context."""

    action: Action
    workload: str | None
    profile: str
    issuer: str
    tenant: str
    emitter: str
    source: str
    task: str
    parent: str | None
    max_duration: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policies: tuple[str, ...]  # the deciding policies' @id, else Cedar's positional id
    reason: str

    @property
    def word(self) -> str:
        return "allow" if self.allowed else "deny"


@dataclass(frozen=True)
class PolicySet:
    """A parsed and validated file: what is in force."""

    cedar: Any  # cedarpy.PolicySet
    sha: str
    path: Path
    loaded_at: datetime
    count: int
    names: dict[str, str] = field(default_factory=dict)  # policyN -> @id or policyN
    lines: dict[str, int] = field(default_factory=dict)  # policyN -> line of its start

    def describe(self, policy_id: str) -> str:
        name = self.names.get(policy_id, policy_id)
        line = self.lines.get(policy_id)
        return f"{name} (line {line})" if line else name


@lru_cache(maxsize=1)
def schema() -> Any:
    return cedarpy.Schema.from_str(SCHEMA_FILE.read_text())


def trust_domain(workload: str | None) -> str:
    """The SPIFFE trust domain of a valid spiffe:// id, else "" (never a guess)."""
    match = _SPIFFE.match(workload or "")
    return match.group(1) if match else ""


# --- parsing ------------------------------------------------------------------


def _statements(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each top-level `;`-terminated statement, comments and
    strings respected; a trailing unterminated part is returned too."""
    out: list[tuple[int, str]] = []
    start, line, start_line = 0, 1, None
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch == '"':
            if start_line is None:
                start_line = line
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                elif text[i] == "\n":
                    line += 1
                i += 1
        elif ch == ";":
            out.append((start_line or line, text[start : i + 1]))
            start, start_line = i + 1, None
        elif not ch.isspace() and start_line is None:
            start_line = line
        i += 1
    if start_line is not None:
        out.append((start_line, text[start:]))
    return out


def _annotation_ids(text: str) -> dict[str, str]:
    try:
        policies = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError:
        return {}
    names = {}
    for pid, body in (policies.get("staticPolicies") or {}).items():
        annotated = (body.get("annotations") or {}).get("id")
        names[pid] = annotated or pid
    return names


def parse(text: str, path: Path) -> PolicySet:
    """Parse and strictly validate; raise PolicyError naming the line."""
    statements = _statements(text)
    lines = {f"policy{i}": line for i, (line, _) in enumerate(statements)}
    try:
        cedar = cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        for line, stmt in statements:  # find the statement that does not parse
            try:
                cedarpy.PolicySet.from_str(stmt if stmt.rstrip().endswith(";") else stmt + ";")
            except ValueError as inner:
                raise PolicyError(f"{path}: line {line}: {inner}") from None
        if statements and not statements[-1][1].rstrip().endswith(";"):
            raise PolicyError(f"{path}: line {statements[-1][0]}: {exc} (a missing `;`?)") from None
        raise PolicyError(f"{path}: {exc}") from None
    result = cedarpy.validate_policies(text, schema())
    if not result.validation_passed:
        problems = []
        for err in result.errors[:10]:
            where = f"line {lines[err.policy_id]}: " if err.policy_id in lines else ""
            problems.append(f"{where}{err.error}")
        raise PolicyError(f"{path}: does not match the schema: " + "; ".join(problems))
    if len(cedar.templates()):
        raise PolicyError(f"{path}: templates (?principal, ?resource) are not supported")
    return PolicySet(
        cedar=cedar,
        sha=hashlib.sha256(text.encode()).hexdigest(),
        path=path,
        loaded_at=datetime.now(UTC),
        count=len(cedar),
        names=_annotation_ids(text),
        lines=lines,
    )


def load(path: Path) -> PolicySet:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PolicyError(f"{path}: larger than {MAX_FILE_BYTES // 1024} KiB")
        text = path.read_text()
    except FileNotFoundError:
        raise PolicyError(f"{path}: not found (LEASEHOLD_POLICY_FILE)") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, path)


# --- deciding -------------------------------------------------------------------


def _uid(type_: str, id_: str) -> dict[str, str]:
    return {"type": type_, "id": id_}


def _entities(asks: Sequence[Ask]) -> str:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for a in asks:
        w = a.workload or ""
        seen.setdefault(
            ("Workload", w),
            {
                "uid": _uid("Workload", w),
                "attrs": {"trust_domain": trust_domain(a.workload), "tenant": a.tenant},
                "parents": [],
            },
        )
        seen.setdefault(
            ("Profile", a.profile),
            {"uid": _uid("Profile", a.profile), "attrs": {"issuer": a.issuer}, "parents": []},
        )
    return json.dumps(list(seen.values()))


def _request(a: Ask) -> dict[str, Any]:
    return {
        "principal": _uid("Workload", a.workload or ""),
        "action": _uid("Action", a.action),
        "resource": _uid("Profile", a.profile),
        "context": {
            "tenant": a.tenant,
            "emitter": a.emitter,
            "source": a.source,
            "task": a.task,
            "parent": a.parent or "",
            "max_duration": int(a.max_duration),
        },
    }


def _judge(policies: PolicySet, result: Any) -> Decision:
    diag = result.diagnostics
    if diag.errors:  # any error denies: an erroring forbid must not be skipped
        ids = [m.group(1) for e in diag.errors if (m := _ERROR_POLICY.search(e))]
        first = diag.errors[0]
        for pid in ids[:1]:
            first = first.replace(f"`{pid}`", policies.describe(pid))
        return Decision(
            False,
            tuple(dict.fromkeys(policies.names.get(i, i) for i in ids)),
            f"evaluation error: {first[:300]}",
        )
    names = tuple(policies.names.get(i, i) for i in diag.reasons)
    described = ", ".join(policies.describe(i) for i in diag.reasons)
    if result.decision == cedarpy.Decision.Allow:
        return Decision(True, names, f"permitted by {described}")
    if diag.reasons:
        return Decision(False, names, f"forbidden by {described}")
    return Decision(False, (), "no permit")


def decide(policies: PolicySet | None, asks: Sequence[Ask]) -> list[Decision]:
    """One decision per ask, in order; None (no policy file) allows everything."""
    if not asks:
        return []
    if policies is None:
        return [Decision(True, (), NO_POLICY) for _ in asks]
    try:
        results = cedarpy.is_authorized_batch(
            [_request(a) for a in asks], policies.cedar, _entities(asks), schema()
        )
        return [_judge(policies, r) for r in results]
    except Exception as exc:  # fail closed, whatever went wrong
        logger.error("policy evaluation failed", extra={"error": f"{type(exc).__name__}: {exc}"})
        return [Decision(False, (), f"evaluation failed: {type(exc).__name__}") for _ in asks]


# --- the file in force ------------------------------------------------------------


@dataclass
class Status:
    """What the dashboard and /metrics show."""

    path: Path
    in_force: PolicySet | None
    error: str | None  # why the file on disk is not the set in force


class Engine:
    """The set in force for one file, re-read when the file changes."""

    def __init__(self, path: Path, *, production: bool = False) -> None:
        self.path = path
        self.production = production
        self._lock = threading.Lock()
        self._current: PolicySet | None = None
        self._signature: tuple[int, int, int] | None = None  # (mtime_ns, size, inode)
        self._next_check = 0.0
        self._error: str | None = None
        self._started = False

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def start(self) -> PolicySet | None:
        """The first load: an invalid file raises PolicyError (the start is refused)."""
        with self._lock:
            signature = self._stat()
            if signature is None:
                if self.production:
                    raise PolicyError(
                        f"{self.path}: not found; production refuses to start without "
                        "LEASEHOLD_POLICY_FILE"
                    )
                logger.warning(
                    "no policy file: every grant is allowed; set LEASEHOLD_POLICY_FILE "
                    "to a Cedar policy file to decide who may mint",
                    extra={"policy_file": str(self.path)},
                )
                self._current = None
            else:
                self._current = load(self.path)
                logger.info(
                    "policies loaded",
                    extra={"policy_file": str(self.path), "sha": self._current.sha[:12]},
                )
            self._signature, self._error, self._started = signature, None, True
            self._next_check = time.monotonic() + RECHECK_SECONDS
            return self._current

    def current(self) -> PolicySet | None:
        """The set in force; the file is looked at no more than once a second."""
        if not self._started:
            self.start()
        now = time.monotonic()
        if now < self._next_check:
            return self._current
        with self._lock:
            if now >= self._next_check:
                self._next_check = now + RECHECK_SECONDS
                self._refresh()
            return self._current

    def refresh_now(self) -> PolicySet | None:
        """Look at the file now (tests, and an operator's check)."""
        if not self._started:
            return self.start()
        with self._lock:
            self._refresh()
            self._next_check = time.monotonic() + RECHECK_SECONDS
            return self._current

    def _refresh(self) -> None:
        signature = self._stat()
        if signature == self._signature:
            return
        self._signature = signature
        if signature is None:
            if self._current is not None:
                self._refused(f"{self.path}: removed")
            return
        try:
            loaded = load(self.path)
        except PolicyError as exc:
            self._refused(str(exc))
            return
        if self._current is not None and loaded.sha == self._current.sha:
            self._error = None  # touched, not changed: keep the original load time
            return
        self._current, self._error = loaded, None
        logger.info(
            "policies reloaded", extra={"policy_file": str(self.path), "sha": loaded.sha[:12]}
        )

    def _refused(self, message: str) -> None:
        self._error = message
        in_force = self._current.sha[:12] if self._current else "none"
        # An error log reaches Sentry through the logging integration.
        logger.error(
            f"policy file refused, the last good set stays in force: {message}",
            extra={"policy_file": str(self.path), "in_force": in_force},
        )
        try:
            from app.observability import metrics

            metrics.get().policy_reload_errors.inc()
        except OSError as exc:
            logger.warning("metrics not recorded", extra={"error": str(exc)})

    def status(self) -> Status:
        self.current()
        return Status(self.path, self._current, self._error)


_engines: dict[tuple[Path, bool], Engine] = {}
_engines_lock = threading.Lock()


def engine() -> Engine:
    """The engine for the configured file (one per process and path)."""
    from app.core.settings import get_settings

    settings = get_settings()
    key = (settings.policy_file.resolve(), settings.env == "production")
    found = _engines.get(key)
    if found is None:
        with _engines_lock:
            found = _engines.setdefault(key, Engine(key[0], production=key[1]))
    return found


def authorize(asks: Sequence[Ask]) -> list[Decision]:
    """Decide with the set in force now."""
    decisions = decide(engine().current(), asks)
    try:
        from app.observability import metrics

        counter = metrics.get().policy_decisions
        for ask, decision in zip(asks, decisions, strict=True):
            counter.labels(ask.action, decision.word).inc()
    except OSError as exc:
        logger.warning("metrics not recorded", extra={"error": str(exc)})
    return decisions
