"""Dashboard sign-in: a signed session cookie and CSRF tokens bound to it, keyed by the admin token.

The signing key is derived from the admin token, so changing the token signs every session out.
The session cookie is HttpOnly and SameSite=Strict; each form carries a CSRF token derived from
the session's random id, and the sign-in form one derived from a random pre-session cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "SESSION_TTL_S", "Sessions"]

SESSION_COOKIE = "mg_session"
LOGIN_COOKIE = "mg_login"
SESSION_TTL_S = 12 * 3600


class Sessions:
    """Issues and checks session cookies and CSRF tokens for one admin token."""

    def __init__(self, token: str | None, clock: Callable[[], float] = time.time) -> None:
        self.token = token
        self.clock = clock
        self._key = hmac.new(
            (token or "").encode(), b"metergate dashboard session", hashlib.sha256
        ).digest()

    def _mac(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}.{value}".encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        """Compare a submitted admin token with the configured one in constant time."""
        if not self.token:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def issue(self) -> str:
        """Return a new session cookie value: issue time, random id, signature."""
        body = f"{int(self.clock())}.{secrets.token_urlsafe(18)}"
        return f"{body}.{self._mac('session', body)}"

    def session_id(self, cookie: str | None) -> str | None:
        """Return the random id of a valid, unexpired session cookie, else None."""
        if not self.token or not cookie or cookie.count(".") != 2:
            return None
        issued, sid, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac("session", f"{issued}.{sid}")):
            return None
        if not issued.isdigit() or self.clock() - int(issued) > SESSION_TTL_S:
            return None
        return sid

    def csrf(self, sid: str) -> str:
        """Return the CSRF token of a session's forms."""
        return self._mac("csrf", sid)

    def csrf_ok(self, sid: str | None, given: str) -> bool:
        """Whether a submitted CSRF token belongs to the session."""
        return bool(sid) and hmac.compare_digest(given.encode(), self.csrf(str(sid)).encode())

    @staticmethod
    def login_nonce() -> str:
        """Return the random value of a pre-session cookie, for the sign-in form's CSRF token."""
        return secrets.token_urlsafe(18)

    def login_csrf(self, nonce: str) -> str:
        """Return the CSRF token of the sign-in form shown with a pre-session cookie."""
        return self._mac("login", nonce)

    def login_csrf_ok(self, nonce: str | None, given: str) -> bool:
        """Whether a submitted sign-in CSRF token matches the pre-session cookie."""
        return bool(nonce) and hmac.compare_digest(
            given.encode(), self.login_csrf(str(nonce)).encode()
        )
