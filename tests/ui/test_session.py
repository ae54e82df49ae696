"""Dashboard sessions and CSRF tokens: signed, expiring, bound to the admin token and the session."""

from __future__ import annotations

from conftest import Clock
from metergate.ui.session import SESSION_TTL_S, Sessions


def test_a_session_expires_and_a_new_token_signs_everyone_out() -> None:
    """A session cookie is valid for its lifetime only, and only under the token that issued it."""
    clock = Clock()
    sessions = Sessions("token-one-0123456789", clock)
    cookie = sessions.issue()
    assert sessions.session_id(cookie) is not None
    assert Sessions("token-two-0123456789", clock).session_id(cookie) is None
    clock.advance(SESSION_TTL_S + 1)
    assert sessions.session_id(cookie) is None


def test_tampered_cookies_and_foreign_csrf_tokens_are_refused() -> None:
    """Changing any part of a cookie voids it; one session's CSRF token is no good for another."""
    sessions = Sessions("token-one-0123456789", Clock())
    issued, sid, mac = sessions.issue().split(".")
    assert sessions.session_id(f"{int(issued) + 3600}.{sid}.{mac}") is None
    assert sessions.session_id(f"{issued}.{sid}x.{mac}") is None
    assert sessions.session_id("garbage") is None
    other = sessions.session_id(sessions.issue())
    assert other is not None
    assert sessions.csrf_ok(sid, sessions.csrf(sid))
    assert not sessions.csrf_ok(sid, sessions.csrf(other))
    assert not sessions.csrf_ok(sid, "")
    assert not sessions.login_csrf_ok(None, sessions.login_csrf("nonce"))


def test_without_an_admin_token_nobody_signs_in() -> None:
    """With no admin token configured, no token matches and no cookie is valid."""
    sessions = Sessions(None, Clock())
    assert not sessions.token_matches("")
    assert sessions.session_id(sessions.issue()) is None
