"""What the orchestrator integrations share: one attempt of a task, its claim
token and the secrets claimed so far, read through a mapping by grant name."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from ._base import LeaseholdError
from .client import Client

log = logging.getLogger("leasehold_client")


class Attempt:
    """One execution of a leasehold task: its claim token and the secrets claimed so far."""

    def __init__(self, client: Client, task_id: str, grants: dict[str, str]) -> None:
        self.client, self.task_id, self.grants = client, task_id, grants
        self.claim_token: str | None = None
        self.error: Exception | None = None
        self.secrets: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def __repr__(self) -> str:  # never the claim token or a secret
        return f"<leasehold attempt {self.task_id!r}>"

    def start(self, max_duration: int, workload: str | None) -> None:
        """Send `task.started`. A failure is kept, not raised: the orchestrator's hook
        must not break the run, and the first read of a secret fails closed with it."""
        try:
            answer = self.client.started(
                self.task_id, grants=self.grants, max_duration=max_duration, workload=workload
            )
            self.claim_token = answer.claim_token
        except Exception as exc:
            self.error = exc
            log.error("leasehold: task.started for %r failed: %s", self.task_id, exc)

    def end(self, kind: str) -> None:
        """Forget the secrets and send `kind`; a failure is logged (the deadline
        still ends the task)."""
        with self.lock:
            self.secrets.clear()
            self.claim_token = None
        try:
            self.client.emit(kind, self.task_id, {})
        except Exception as exc:
            log.error("leasehold: %s for %r failed: %s", kind, self.task_id, exc)

    def secret(self, grant: str) -> dict[str, Any]:
        with self.lock:
            if grant in self.secrets:
                return self.secrets[grant]
            if grant not in self.grants:
                raise KeyError(f"the task declares no grant {grant!r}")
            if self.error is not None:
                raise LeaseholdError(
                    getattr(self.error, "status", 0) or 503,
                    f"Leasehold did not start this task: {self.error}",
                ) from None
            if self.claim_token is None:
                raise LeaseholdError(410, "the task has ended; nothing to claim")
            try:
                secret = self.client.claim_secret(self.task_id, grant, self.claim_token)
            except LeaseholdError as exc:
                if exc.status != 410 or exc.state != "claimed":
                    raise
                # A redelivered or re-run attempt: it claimed this before. Rotation
                # revokes that copy and mints a fresh one.
                log.warning("leasehold: %r was claimed before; rotating", grant)
                self.claim_token = self.client.rotate(self.task_id, grant)
                secret = self.client.claim_secret(self.task_id, grant, self.claim_token)
            self.secrets[grant] = secret
            return secret


class Credentials(Mapping[str, dict[str, Any]]):
    """The running attempt's secrets by grant name, each claimed on first access."""

    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt

    def __getitem__(self, grant: str) -> dict[str, Any]:
        return self._attempt.secret(grant)

    def __iter__(self) -> Iterator[str]:
        return iter(self._attempt.grants)

    def __len__(self) -> int:
        return len(self._attempt.grants)

    def __repr__(self) -> str:  # never the secrets
        return f"<leasehold credentials {sorted(self._attempt.grants)}>"


def declaration(opts: Any) -> tuple[dict[str, str], int, str | None]:
    """Grants, max_duration and workload from a `{"grants": {...}, "max_duration":
    seconds, "workload": optional}` declaration; ValueError when it is malformed."""
    if not isinstance(opts, Mapping):
        raise ValueError("the leasehold declaration must be a mapping")
    grants = opts.get("grants")
    if not isinstance(grants, Mapping) or not grants:
        raise ValueError("the leasehold declaration needs grants: {name: profile}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in grants.items()):
        raise ValueError("leasehold grants map names to profile names (strings)")
    workload = opts.get("workload")
    if workload is not None and not isinstance(workload, str):
        raise ValueError("the leasehold workload must be a string")
    return dict(grants), int(opts.get("max_duration", 600)), workload
