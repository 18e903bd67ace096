"""The request path as the proxy matches and forwards it: decoded once, normalised,
refused when anything ambiguous is left (PRODUCT.md "Brokered access").

The upstream receives exactly the path that was matched (re-encoded from its
segments), so an allow-list cannot be walked around by an encoding the upstream
decodes differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

# Left in a path after one decoding, these mean a second decoding (or a server's own
# rules) could change it: refused. Compared case-insensitively.
_AMBIGUOUS = ("..", "%2e", "%2f", "%5c", "\\", ";")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Kept as they are in a re-encoded segment (RFC 3986 pchar without ";" and "%").
_SAFE = "!$&'()*+,=:@-._~"


class PathRefused(ValueError):
    """The path cannot be matched safely; the message is safe to answer."""


@dataclass(frozen=True)
class CleanPath:
    segments: tuple[str, ...]  # decoded; a trailing "" for a trailing slash

    @property
    def text(self) -> str:
        return "/" + "/".join(self.segments)

    @property
    def encoded(self) -> str:
        """The path for the upstream, every segment percent-encoded from its decoded form."""
        return "/" + "/".join(quote(s, safe=_SAFE) for s in self.segments)


def _decode(raw: bytes) -> str:
    """Percent-decode once, strictly: a malformed escape or non-UTF-8 is refused."""
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25:  # %
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not all(b in _HEX for b in pair):
                raise PathRefused("malformed percent-encoding")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(byte)
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise PathRefused("not UTF-8 after decoding") from None


def clean(raw: bytes) -> CleanPath:
    """The raw (still encoded) request path after the credential's prefix, cleaned."""
    if not raw:
        raw = b"/"
    if not raw.startswith(b"/"):
        raise PathRefused("the path must start with /")
    text = _decode(raw)
    lowered = text.lower()
    for bad in _AMBIGUOUS:
        if bad in lowered:
            raise PathRefused(f"the path holds {bad!r} after decoding")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise PathRefused("the path holds a control character")
    return CleanPath(_segments(text))


def _segments(text: str) -> tuple[str, ...]:
    """Empty (//) and "." segments mean nothing: dropped, as servers do; a trailing
    slash is kept as a last empty segment."""
    parts = text.split("/")[1:]
    segments = [p for p in parts if p not in ("", ".")]
    if parts and parts[-1] == "" and segments:
        segments.append("")
    return tuple(segments)


def matches(path: CleanPath, pattern: str) -> bool:
    """`*` is one (non-empty) segment, `**` any number of segments (also none)."""
    return _match(_segments(pattern), path.segments)


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    if not pattern:
        return not segments
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, segments[i:]) for i in range(len(segments) + 1))
    if not segments:
        return False
    if head == "*":
        return segments[0] != "" and _match(rest, segments[1:])
    return head == segments[0] and _match(rest, segments[1:])


def allowed(path: CleanPath, patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or any(matches(path, p) for p in patterns)
