"""Echo redaction: an upstream answer must never hand the static secret to the workload.

The secret is looked for as it is, percent-encoded (upper- and lower-case hex, `+` for
space), base64 (standard and URL-safe, at each of the three alignments it can have
inside a longer base64 text) and JSON-escaped, in headers and in the body, also
where a chunk boundary cuts it: the streaming `Redactor` holds back the last
(longest form - 1) bytes until the next chunk or the end.
"""

from __future__ import annotations

import base64
import json
import re
from urllib.parse import quote, quote_plus

REDACTED = b"[redacted]"
MIN_BASE64 = 8  # shorter base64 fragments would match ordinary text


def _base64_cores(secret: bytes) -> set[bytes]:
    """The base64 characters that encode only the secret's bytes, at every alignment."""
    cores = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for pad in range(3):
            encoded = encode(b"\0" * pad + secret)
            start = -(-pad * 8 // 6)  # first character made of the secret's bits only
            end = (pad + len(secret)) * 8 // 6  # last character made of them only
            core = encoded[start:end]
            if len(core) >= MIN_BASE64:
                cores.add(core)
    return cores


def forms(secret: str) -> set[bytes]:
    """Every form of the secret the proxy redacts."""
    raw = secret.encode()
    found = {raw}
    for encoded in (quote(secret, safe=""), quote_plus(secret, safe="")):
        found.add(encoded.encode())
        found.add(re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), encoded).encode())
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        found.add(escaped.encode())
        found.add(escaped.replace("/", "\\/").encode())
    found |= _base64_cores(raw)
    return {f for f in found if f}


class Patterns:
    """The compiled forms of one secret (longest first, so a longer form wins)."""

    def __init__(self, secret: str) -> None:
        ordered = sorted(forms(secret), key=len, reverse=True)
        self.regex = re.compile(b"|".join(re.escape(f) for f in ordered))
        self.longest = len(ordered[0])

    def sub(self, data: bytes) -> tuple[bytes, int]:
        return self.regex.subn(REDACTED, data)

    def header(self, value: str) -> tuple[str, int]:
        out, n = self.sub(value.encode("latin-1", "replace"))
        return out.decode("latin-1"), n


class Redactor:
    """Redact a body streamed in chunks; `found` counts the echoes replaced."""

    def __init__(self, patterns: Patterns) -> None:
        self.patterns = patterns
        self.tail = b""
        self.found = 0

    def feed(self, chunk: bytes) -> bytes:
        """What may be sent now; the bytes that could start a form stay held back."""
        return self._scan(self.tail + chunk, final=False)

    def finish(self) -> bytes:
        return self._scan(self.tail, final=True)

    def _scan(self, buf: bytes, *, final: bool) -> bytes:
        limit = len(buf) if final else max(0, len(buf) - (self.patterns.longest - 1))
        out: list[bytes] = []
        pos = 0
        for match in self.patterns.regex.finditer(buf):
            if match.start() >= limit:
                break  # wholly in the held-back part: found again with the next chunk
            out.append(buf[pos : match.start()])
            out.append(REDACTED)
            pos = match.end()
            self.found += 1
        cut = max(pos, limit)
        out.append(buf[pos:cut])
        self.tail = buf[cut:]
        return b"".join(out)
