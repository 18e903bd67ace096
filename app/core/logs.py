"""Logging: one line per record, text or JSON (LEASEHOLD_LOG_FORMAT)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from app.core.redact import FILTERED, is_secret_key, redact_text
from app.core.settings import Settings

log = logging.getLogger("leasehold")

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    # Defence in depth: a field named like a secret, or a value shaped like one, is filtered.
    return {
        k: FILTERED if is_secret_key(k) else redact_text(v) if isinstance(v, str) else v
        for k, v in record.__dict__.items()
        if k not in _STANDARD
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            body["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(body, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = redact_text(super().format(record))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        return f"{line} {extra}" if extra else line


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # httpx logs every request URL at INFO; keep it quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Celery logs every task received and returned; our own lines say what matters.
    for name in ("celery.worker.strategy", "celery.app.trace", "celery.beat"):
        logging.getLogger(name).setLevel(logging.WARNING)
