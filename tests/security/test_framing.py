"""Framing and request heads: ambiguous framing is 400 and closes; slow heads are cut off."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest
from tests.security.conftest import (
    KEY,
    Gateway,
    Seen,
    balance,
    config,
    raw_exchange,
    serve,
    upstream,
)

AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
SMUGGLED = b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n"
HEAD_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[str, Seen]]:
    """One recording upstream for the module."""
    with upstream() as found:
        yield found


@pytest.fixture(scope="module")
def gateway(
    recorded: tuple[str, Seen], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """`metergate serve` with a one-second deadline on request heads."""
    cfg = config(recorded[0], "memory://", proxy={"header_timeout_s": HEAD_TIMEOUT_S})
    with serve(cfg, tmp_path_factory.mktemp("framing")) as gw:
        yield gw


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/things HTTP/1.1\r\nHost: x\r\n"
        + AUTH
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /v1/things HTTP/1.1\r\nHost: x\r\n"
        + AUTH
        + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"POST /v1/things HTTP/1.0\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["cl-then-te", "te-then-cl", "te-on-http-1.0"],
)
def test_ambiguous_framing_is_400_and_the_connection_closes(
    gateway: Gateway, recorded: tuple[str, Seen], head: bytes
) -> None:
    """The bytes after an ambiguous request are never read as a second one; nothing is charged
    or forwarded."""
    before_seen = len(recorded[1].requests)
    before = balance(gateway, "acme")
    answer, closed = raw_exchange(gateway.port, head + b"0\r\n\r\n" + SMUGGLED)
    assert closed
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.count(b"HTTP/1.1 ") == 1  # one answer: no second request was parsed
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/problem+json" in head_part
    assert json.loads(body)["type"] == "urn:metergate:problem:bad-request"
    assert len(recorded[1].requests) == before_seen
    assert balance(gateway, "acme") == before


def test_a_chunked_request_without_content_length_is_served(
    gateway: Gateway, recorded: tuple[str, Seen]
) -> None:
    """Plain chunked HTTP/1.1 stays allowed: the framing rule refuses only ambiguity."""
    data = (
        b"POST /v1/things HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    answer, _ = raw_exchange(gateway.port, data)
    assert answer.startswith(b"HTTP/1.1 200")
    assert recorded[1].requests[-1]["body"] == 3


def test_a_dripping_request_head_is_cut_off(gateway: Gateway) -> None:
    """A client sending header bytes slowly is answered 408 and disconnected at the head deadline."""
    answer, closed = b"", False
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/hello HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.1)
        try:
            for _ in range(200):  # one header byte every 0.1 s, far past the deadline
                sock.sendall(b"X")
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                answer += chunk
                if not chunk:
                    closed = True
                    break
        except (BrokenPipeError, ConnectionResetError):
            closed = True
    assert closed
    assert answer in (
        b"",
        b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )


def test_a_silent_connection_is_closed(gateway: Gateway) -> None:
    """A client that connects and sends nothing is disconnected at the head deadline."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        assert sock.recv(65536) == b""  # closed by the server (a hang would time out the test)
