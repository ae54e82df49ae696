"""The HTTP/1.1 protocol `metergate serve` listens with: uvicorn's h11 protocol, made stricter.

Two things a server must decide before any application sees a request, so they live here:

- Ambiguous framing (`core.framing`) is answered 400 problem+json and the connection is closed
  before the application runs: nothing is admitted or charged, and the bytes after the request
  are never parsed as another one (RFC 9112 section 6.1).
- A request head must be complete within `header_timeout_s` of its first byte (or of the
  connection's start): a client dripping header bytes, or connecting and saying nothing, cannot
  hold a connection open. uvicorn's keep-alive timer stops at the first byte of a request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from metergate.core.framing import framing_problem
from metergate.core.http import problem

__all__ = ["StrictH11Protocol", "protocol_class"]

MAX_HEAD_BYTES = 16 * 1024
"""The longest request head accepted (h11's own default), unless uvicorn is told otherwise."""
TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class _StrictConnection(h11.Connection):
    """An h11 server connection that refuses ambiguous framing as a protocol error."""

    refusal: str | None = None

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            found = framing_problem(event.http_version.decode("ascii"), event.headers)
            if found is not None:
                self.refusal = found
                raise h11.RemoteProtocolError(found, 400)
        return event


class StrictH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with framing refusals and a deadline on request heads."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = self.config.h11_max_incomplete_event_size
        self.conn = _StrictConnection(h11.SERVER, limit if limit is not None else MAX_HEAD_BYTES)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def send_400_response(self, msg: str) -> None:
        """Answer a malformed or ambiguous request with 400 problem+json and close."""
        self._cancel_head_timer()
        detail = getattr(self.conn, "refusal", None) or "the request is not valid HTTP/1.1"
        answer = problem("bad-request", 400, detail)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
        headers.append((b"connection", b"close"))
        try:
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=answer.body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event) or b"")
        except h11.LocalProtocolError:
            pass  # nothing more can be said on this connection
        self.transport.close()

    def _watch_head(self) -> None:
        """Keep the head timer running exactly while a request head is incomplete."""
        if self.transport.is_closing():
            self._cancel_head_timer()
        elif self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()  # the head is in: the application's deadlines apply
        elif self.conn.trailing_data[0] and self._head_timer is None:
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.conn.trailing_data[0]:
                self.transport.write(TIMEOUT_ANSWER)
            self.transport.close()


def protocol_class(header_timeout_s: float) -> type[StrictH11Protocol]:
    """Return the strict protocol with the configured head deadline (uvicorn's `http=`)."""
    return type(
        "MetergateH11Protocol", (StrictH11Protocol,), {"header_timeout_s": header_timeout_s}
    )
