"""What the sync and async clients share: configuration, events, ids, requests, retry
decisions, answers, and the task block's state."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

log = logging.getLogger("leasehold_client")

DEFAULT_URL = "http://127.0.0.1:8700"
DEFAULT_SOURCE = "leasehold-client"
TERMINAL = ("task.succeeded", "task.failed", "task.cancelled")
# The server long-polls a claim for at most 30 s.
MAX_CLAIM_WAIT = 30.0
# Answers worth another try: the server was busy or briefly unavailable.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CLAIM_RETRY = frozenset({429, 500, 503})
ROTATE_RETRY = frozenset({429, 503})


class LeaseholdError(Exception):
    """The server refused a request (a 4xx, or a 5xx that outlasted the retries).

    `status` is the HTTP status, `reason` the server's `error` member, `body` the
    whole JSON answer (error answers never carry a secret)."""

    def __init__(self, status: int, reason: str, body: dict[str, Any] | None = None) -> None:
        # args are the constructor's: Celery and pickle rebuild the error from them.
        super().__init__(status, reason, body)
        self.status = status
        self.reason = reason
        self.body: dict[str, Any] = body if body is not None else {"error": reason}

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"

    @property
    def state(self) -> str | None:
        """The credential's or task's state when the answer names one (409, 410)."""
        value = self.body.get("state")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class TaskAnswer:
    """The server's answer to an event: the task as it stands, and for
    `task.started` the claim token its workload claims credentials with."""

    task: str
    state: str | None
    deadline: datetime | None
    claim_token: str | None
    duplicate: bool
    body: dict[str, Any]

    def __repr__(self) -> str:  # the claim token stays out of logs and tracebacks
        return (
            f"TaskAnswer(task={self.task!r}, state={self.state!r}, deadline={self.deadline!r}, "
            f"duplicate={self.duplicate!r})"
        )


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def task_answer(task: str, body: dict[str, Any]) -> TaskAnswer:
    view = body.get("task")
    if not isinstance(view, dict):
        view = {}
    return TaskAnswer(
        task=task,
        state=view.get("state"),
        deadline=parse_time(view.get("deadline")),
        claim_token=body.get("claim_token"),
        duplicate=bool(body.get("duplicate")),
        body=body,
    )


def segment(value: str) -> str:
    """One percent-encoded path segment: a task id's `/` is `%2F`."""
    return quote(value, safe="")


def event_id(source: str, task: str, type_: str, seq: int) -> str:
    """The same call gives the same id, so a retried or repeated send is a duplicate."""
    digest = hashlib.sha256("\0".join((source, task, type_, str(seq))).encode()).hexdigest()
    return f"lhc-{digest[:40]}"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def started_data(
    grants: dict[str, str], max_duration: int, workload: str | None, parent: str | None
) -> dict[str, Any]:
    if not grants:
        raise ValueError("a task needs at least one grant")
    data: dict[str, Any] = {
        "max_duration": int(max_duration),
        "grants": [{"name": name, "profile": profile} for name, profile in grants.items()],
    }
    if workload is not None:
        data["workload"] = workload
    if parent is not None:
        data["parent"] = parent
    return data


class Config:
    """URL, key and source, from arguments or LEASEHOLD_URL / LEASEHOLD_KEY; and the
    per-task, per-type event sequence that makes event ids deterministic."""

    def __init__(
        self,
        url: str | None,
        key: str | None,
        source: str | None,
        retries: int,
        max_retry_wait: float,
    ) -> None:
        self.url = (url or os.environ.get("LEASEHOLD_URL") or DEFAULT_URL).rstrip("/")
        self._key = key if key is not None else os.environ.get("LEASEHOLD_KEY")
        self.source = source or DEFAULT_SOURCE
        self.retries = max(0, int(retries))
        self.max_retry_wait = max_retry_wait
        self._seq: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def auth(self) -> dict[str, str]:
        if not self._key:
            raise ValueError("no emitter key: pass key= or set LEASEHOLD_KEY")
        return {"Authorization": f"Bearer {self._key}"}

    def next_id(self, task: str, type_: str) -> str:
        with self._lock:
            seq = self._seq.get((task, type_), 0) + 1
            if type_ in TERMINAL:
                # The task is over here: forget its counters (memory stays bounded),
                # and a repeated end is the same event again.
                for kind in ("task.started", "task.heartbeat", *TERMINAL):
                    self._seq.pop((task, kind), None)
            else:
                self._seq[(task, type_)] = seq
        return event_id(self.source, task, type_, seq)

    def event(
        self, type_: str, task: str, data: dict[str, Any] | None, event_id: str | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "specversion": "1.0",
            "id": event_id or self.next_id(task, type_),
            "source": self.source,
            "type": type_,
            "subject": task,
            "time": now_rfc3339(),
        }
        if data is not None:
            body["data"] = data
        return body

    def backoff(self, attempt: int, answer: httpx.Response | None) -> float:
        """Seconds before try `attempt + 1`: Retry-After when the server says, else
        exponential with jitter; never more than max_retry_wait."""
        if answer is not None:
            after = answer.headers.get("Retry-After", "")
            if after.strip().isdigit():
                return min(float(after), self.max_retry_wait)
        return min(0.5 * 2.0**attempt * (0.5 + random.random() / 2), self.max_retry_wait)  # noqa: S311


def json_body(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def raise_for(answer: httpx.Response) -> dict[str, Any]:
    """The answer's JSON, or LeaseholdError for a 4xx/5xx."""
    body = json_body(answer)
    if answer.status_code >= 400:
        reason = body.get("error")
        if not isinstance(reason, str):
            reason = answer.reason_phrase or "error"
        raise LeaseholdError(answer.status_code, reason, body or None)
    return body


def retry_worth(answer: httpx.Response) -> bool:
    return answer.status_code in RETRY_STATUSES


# A claim or a rotation must not be sent twice when the first may have arrived: only
# errors raised before anything was sent are retried for them.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class Request:
    """One call to the server, as both clients send it, and what retries it."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    params: dict[str, Any] | None = None
    # Added to the client's timeout (a claim's long poll).
    extra_timeout: float = 0.0
    retry_errors: tuple[type[Exception], ...] = (httpx.TransportError,)
    # None: RETRY_STATUSES.
    retry_statuses: frozenset[int] | None = field(default=None)

    def send_args(self, timeout: float) -> dict[str, Any]:
        """The keyword arguments of httpx's `request`."""
        return {
            "method": self.method,
            "url": self.path,
            "headers": self.headers,
            "json": self.json,
            "params": self.params,
            "timeout": timeout + self.extra_timeout,
        }


def ending(exc_type: type[BaseException] | None) -> str:
    """The event that ends a block left with `exc_type`."""
    if exc_type is None:
        return "task.succeeded"
    if issubclass(exc_type, KeyboardInterrupt | asyncio.CancelledError):
        return "task.cancelled"
    return "task.failed"


def extension(started_at: float, max_duration: int) -> int:
    """The max_duration (counted from the start) that puts the deadline max_duration ahead."""
    return math.ceil(time.monotonic() - started_at) + max_duration


def heartbeat_data(max_duration: int | None) -> dict[str, Any]:
    return {"max_duration": int(max_duration)} if max_duration is not None else {}


def claim_wait(wait: float) -> float:
    return max(0.0, min(float(wait), MAX_CLAIM_WAIT))


def claim_again(exc: LeaseholdError, end: float) -> bool:
    """A 409 with time left: the long poll ended early (e.g. a busy server); ask again."""
    return exc.status == 409 and end - time.monotonic() > 0.5


def claimed_secret(answer: dict[str, Any]) -> dict[str, Any]:
    secret = answer.get("secret")
    if not isinstance(secret, dict):
        raise LeaseholdError(200, "the claim answered no secret")
    return secret


def rotated_token(answer: httpx.Response) -> str:
    token = raise_for(answer).get("claim_token")
    if not isinstance(token, str):
        raise LeaseholdError(answer.status_code, "the rotation answered no claim_token")
    return token


class ClientCore:
    """The sync and async clients' shared half: configuration, the requests they
    send, and when to retry; each adds only its own transport."""

    def __init__(
        self,
        url: str | None,
        key: str | None,
        source: str | None,
        timeout: float,
        retries: int,
        max_retry_wait: float,
    ) -> None:
        self._config = Config(url, key, source, retries, max_retry_wait)
        self._timeout = timeout

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(url={self._config.url!r}, source={self._config.source!r})"

    @property
    def url(self) -> str:
        return self._config.url

    @property
    def source(self) -> str:
        return self._config.source

    def _retry_wait(
        self, request: Request, attempt: int, answer: httpx.Response | None
    ) -> float | None:
        """Seconds before the next try of `request`, or None when there is none.
        `answer` None: a retried error was raised."""
        if attempt >= self._config.retries:
            return None
        if answer is not None:
            statuses = request.retry_statuses
            worth = answer.status_code in statuses if statuses else retry_worth(answer)
            if not worth:
                return None
        wait = self._config.backoff(attempt, answer)
        path = request.path.split("?")[0]
        log.info("leasehold: retrying %s %s in %.1fs", request.method, path, wait)
        return wait

    def _emit_request(
        self, type_: str, task: str, data: dict[str, Any] | None, event_id: str | None
    ) -> Request:
        kind = type_ if type_.startswith("task.") else f"task.{type_}"
        event = self._config.event(kind, task, data, event_id)
        return Request("POST", "/v1/events", self._config.auth(), json=event)

    def _claim_request(self, task: str, grant: str, claim_token: str, wait: float) -> Request:
        return Request(
            "POST",
            f"/v1/tasks/{segment(task)}/credentials/{segment(grant)}/claim",
            {"Authorization": f"Bearer {claim_token}"},
            params={"wait": wait} if wait else None,
            extra_timeout=wait,
            retry_errors=NOT_SENT,
            retry_statuses=CLAIM_RETRY,
        )

    def _rotate_request(self, task: str, grant: str) -> Request:
        return Request(
            "POST",
            f"/v1/tasks/{segment(task)}/credentials/{segment(grant)}/rotate",
            self._config.auth(),
            retry_errors=NOT_SENT,
            retry_statuses=ROTATE_RETRY,
        )


C = TypeVar("C", bound=ClientCore)


class RunCore(Generic[C]):
    """The sync and async task blocks' shared half: the task's grants, its claim
    token, deadline and the secrets claimed so far. `_prepare` adds the block's own
    lock and heartbeat machinery."""

    def __init__(
        self,
        client: C,
        task: str,
        *,
        grants: dict[str, str],
        max_duration: int,
        workload: str | None,
        parent: str | None,
        heartbeat_every: float | None,
        claim_timeout: float,
    ) -> None:
        self.id = task
        self._client = client
        self._grants = dict(grants)
        self._max_duration = int(max_duration)
        self._workload, self._parent = workload, parent
        self._heartbeat_every = heartbeat_every
        self._claim_timeout = claim_timeout
        self._token: str | None = None
        self._secrets: dict[str, dict[str, Any]] = {}
        self._t0 = 0.0
        self.deadline: datetime | None = None
        self.answer: TaskAnswer | None = None
        self._prepare()

    def _prepare(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, deadline={self.deadline!r})"

    def _started_args(self) -> dict[str, Any]:
        """Marks the start; the keyword arguments of the client's `started`."""
        self._t0 = time.monotonic()
        return {
            "grants": self._grants,
            "max_duration": self._max_duration,
            "workload": self._workload,
            "parent": self._parent,
        }

    def _begun(self, answer: TaskAnswer) -> None:
        self.answer = answer
        self._token, self.deadline = answer.claim_token, answer.deadline

    def _claim_token_for(self, grant: str) -> str:
        """The token to claim `grant` with (not yet claimed), or why not."""
        if grant not in self._grants:
            raise KeyError(f"the task has no grant {grant!r}")
        if self._token is None:
            raise LeaseholdError(410, "the task has ended; nothing to claim")
        return self._token

    def _extension(self) -> int:
        return extension(self._t0, self._max_duration)

    def _beaten(self, answer: TaskAnswer) -> None:
        self.deadline = answer.deadline or self.deadline

    def _refused(self, exc: LeaseholdError) -> None:
        # 422: past the profiles' max_ttl; 404/403: not ours to extend. The
        # deadline stands; further heartbeats would be refused alike.
        log.warning("leasehold: heartbeat for %r refused (%s); stopping", self.id, exc)

    def _beat_failed(self, exc: httpx.HTTPError) -> None:
        log.warning("leasehold: heartbeat for %r failed: %s", self.id, type(exc).__name__)
