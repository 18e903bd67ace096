"""Task ids with `/` travel as one percent-encoded segment; Starlette decodes
before routing, so read the segment from the raw path."""

from __future__ import annotations

from urllib.parse import unquote

from fastapi import Path, Request

from app.api.errors import ApiError

# The `{task_id:path}` routes declare this parameter so /openapi.json names it; the
# handlers read the raw segment (raw_segment), never the decoded value.
TASK_ID = Path(description="the task id, percent-encoded as one path segment (a/b: a%2Fb)")


def raw_segment(request: Request, index: int) -> str:
    """Segment `index` (0 = the first after the leading /) of the undecoded path."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    parts = raw.decode("latin-1").split("?", 1)[0].lstrip("/").split("/")
    try:
        value = unquote(parts[index], errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "a path segment is not valid percent-encoded UTF-8") from None
    if "\x00" in value:
        raise ApiError(400, "the path contains a NUL character")
    return value
