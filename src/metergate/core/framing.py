"""Request framing that a gateway must refuse (sans-I/O): RFC 9112 sections 6.1 and 6.3.

A request with both Transfer-Encoding and Content-Length, or with Transfer-Encoding on HTTP/1.0,
is read one way by one hop and another way by the next: whatever one reads as the body, the
other may read as a second request ("request smuggling"). The server answers 400 and closes the
connection, so the bytes after such a request are never read as another.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["framing_problem"]


def framing_problem(http_version: str, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Return why a request's framing is ambiguous, or None when it is not."""
    names = {name.lower() for name, _ in headers}
    if b"transfer-encoding" not in names:
        return None
    if b"content-length" in names:
        return "the request has both Transfer-Encoding and Content-Length"
    if http_version in ("1.0", "0.9"):
        return "Transfer-Encoding is not allowed on HTTP/1.0"
    return None
