"""Cursor pagination over time-ordered ids: newest first."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlmodel import Session, col
from sqlmodel.sql.expression import SelectOfScalar

T = TypeVar("T")
MAX_LIMIT = 500


def page(
    session: Session, query: SelectOfScalar[T], id_column: Any, limit: int, cursor: str | None
) -> tuple[list[T], str | None]:
    limit = max(1, min(limit, MAX_LIMIT))
    if cursor:
        query = query.where(col(id_column) < cursor)
    rows = list(session.exec(query.order_by(col(id_column).desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (getattr(rows[-1], "id", None) if more and rows else None)
