"""Costs read from JSON bodies and event streams, over real servers, in all three modes.

An OpenAI-compatible app (the one of `examples/llm_gateway`, plus scripted answers chosen by the
`x-script` request header) runs behind the ASGI middleware (uvicorn), the WSGI middleware
(wsgiref) and the reverse proxy (uvicorn in front of the app on uvicorn).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from examples.llm_gateway import upstream
from tests.builders import asset, counters, customer, gateway, plan, route, tier

from conftest import Clock, RedisProcess, with_storage
from metergate import Meter, MeteringMiddleware, WSGIMeteringMiddleware, create_app

from .conftest import Served
from .harness import eventually, serve_asgi

KEY = {"authorization": "Bearer llm-key"}
RESERVE_DEFAULT = 500
BIG_CHUNK = 64 * 1024
BIG_CHUNKS = 50 * 1024 * 1024 // BIG_CHUNK  # a 50 MB body

CONFIG: dict[str, Any] = gateway(
    metrics=counters("requests", "tokens"),
    plans={
        "llm": plan(
            requests=asset(tier(0), period="month"),
            tokens=asset(tier(0, per_unit=1), period="month", balance="credits"),
        )
    },
    customers={"acme": customer("llm", credits=100_000, api_keys=["llm-key"])},
    routes=[
        route(
            "/v1/chat/completions",
            "requests",
            {
                "metric": "tokens",
                "cost": {
                    "response_json": "/usage/total_tokens",
                    "reserve": {"request_json": "/max_tokens", "default": RESERVE_DEFAULT},
                },
            },
            methods=["POST"],
        )
    ],
)


def _event(data: Any, newline: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(data).encode() + newline + newline


def _delta(text: str, usage: Any = None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"delta": {"content": text}}],
        "usage": usage,
    }


def script(name: str) -> tuple[str, Iterator[bytes], float]:
    """A scripted answer: its content type, its body chunks and the pause before each chunk."""
    if name == "middle":
        events = [_delta("a"), _delta("", {"total_tokens": 40}), _delta("b"), _delta("c")]
        return "text/event-stream", iter([*map(_event, events), b"data: [DONE]\n\n"]), 0
    if name == "split":
        # CRLF line ends, the usage event cut into 3-byte pieces (a CRLF cut in two, too).
        body = b"".join(_event(_delta(w), b"\r\n") for w in ["one", "two"])
        body += _event(_delta("", {"total_tokens": 23}), b"\r\n") + b"data: [DONE]\r\n\r\n"
        return "text/event-stream", iter([body[i : i + 3] for i in range(0, len(body), 3)]), 0
    if name == "slow-usage-first":
        first = _event(_delta("", {"total_tokens": 5}))
        return "text/event-stream", iter([first] + [_event(_delta("x"))] * 3000), 0.01
    if name == "slow-no-usage":
        return "text/event-stream", iter([_event(_delta("x"))] * 3000), 0.01
    if name == "text":
        return "text/plain", iter([b'{"usage": {"total_tokens": 3}}']), 0
    if name == "big":

        def big() -> Iterator[bytes]:
            yield b'{"items": ['
            piece = b'"' + b"z" * (BIG_CHUNK - 3) + b'",'
            for _ in range(BIG_CHUNKS):
                yield piece
            yield b'0], "usage": {"total_tokens": 3}}'

        return "application/json", big(), 0
    raise AssertionError(name)


async def llm_asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The example upstream, or a scripted answer when the request names one."""
    name = dict(scope.get("headers", ())).get(b"x-script", b"").decode()
    if scope["type"] != "http" or not name:
        await upstream.app(scope, receive, send)
        return
    while (await receive()).get("more_body", False):
        pass
    content_type, chunks, pause = script(name)
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.ensure_future(watch())
    try:
        start = [(b"content-type", content_type.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": start})
        for chunk in chunks:
            if pause:
                await asyncio.sleep(pause)
            if gone.is_set():
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()


def llm_wsgi(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """The WSGI twin of `llm_asgi`."""
    name = environ.get("HTTP_X_SCRIPT")
    if not name:
        return upstream.wsgi_app(environ, start_response)
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    content_type, chunks, pause = script(name)
    start_response("200 OK", [("Content-Type", content_type)])

    def body() -> Iterator[bytes]:
        for chunk in chunks:
            if pause:
                time.sleep(pause)
            yield chunk

    return body()


async def _close_session(proxy: Any) -> None:
    await proxy.aclose()


@dataclass
class Llm:
    """The LLM app behind metering in one mode, and a Meter to look at storage."""

    mode: str
    client: httpx.Client
    meter: Meter

    def tokens(self) -> tuple[int, int, int]:
        """(tokens counted, tokens pending, credits held)."""
        usage = self.meter.usage("acme", "tokens")
        held = self.meter.balance("acme", "credits").held
        return int(usage["value"]), int(usage["pending"]), held

    def available(self) -> int:
        """The credits the customer has left."""
        return self.meter.balance("acme", "credits").available


@pytest.fixture(scope="module")
def llm_upstream() -> Iterator[str]:
    """The LLM app on uvicorn, for the proxy to forward to."""
    with serve_asgi(llm_asgi) as url:
        yield url


@pytest.fixture
def start_llm(
    request: pytest.FixtureRequest, clock: Clock, asgi_server: Served, wsgi_server: Served
) -> Iterator[Callable[..., Llm]]:
    """Put the LLM app behind metering in a mode, on a storage URL; take it down afterwards."""
    with ExitStack() as stack:

        def start(mode: str, storage_url: str, **storage: Any) -> Llm:
            config = with_storage(copy.deepcopy(CONFIG), storage_url)
            config["storage"].update(storage)
            served = wsgi_server if mode == "wsgi" else asgi_server
            if mode == "wsgi":
                app: Any = WSGIMeteringMiddleware(llm_wsgi, config, clock=clock)
                stack.callback(app.meter.close)
            else:
                if mode == "proxy":
                    config["proxy"] = {"upstream": request.getfixturevalue("llm_upstream")}
                    app = create_app(config, clock=clock)
                    proxy = app.app  # its client session is closed by a lifespan, which the
                    # shared server keeps to itself: close it here
                    stack.callback(lambda: served.switch.run(_close_session(proxy)))
                else:
                    app = MeteringMiddleware(llm_asgi, config, clock=clock)
                stack.callback(lambda: served.switch.run(app.meter.aclose()))
            served.switch.app = app
            meter = Meter(config, clock=clock)
            stack.callback(meter.close)
            client = httpx.Client(base_url=served.url, timeout=30, headers=KEY)
            stack.callback(client.close)
            return Llm(mode, client, meter)

        yield start


@pytest.fixture(params=["asgi", "wsgi", "proxy"])
def llm(request: pytest.FixtureRequest, start_llm: Callable[..., Llm], storage_url: str) -> Llm:
    """The LLM app behind metering in each mode, on each backend."""
    return start_llm(str(request.param), storage_url)


def chat(**extra: Any) -> dict[str, Any]:
    """A chat completion request whose completion is 'You said: <4 words>'."""
    return {
        "model": "echo-1",
        "messages": [{"role": "user", "content": "one two three four"}],
        **extra,
    }


# prompt 4 words + completion "You said: one two three four" (6 words)
TOTAL = 10


def test_json_completion_charges_its_usage(llm: Llm) -> None:
    """A JSON completion is charged its `usage.total_tokens`; the body reaches the client intact."""
    response = llm.client.post("/v1/chat/completions", json=chat(max_tokens=50))
    assert response.status_code == 200
    assert response.json()["usage"]["total_tokens"] == TOTAL
    assert response.headers["metergate-balance"] == str(100_000 - 50)  # max_tokens held
    assert llm.tokens() == (TOTAL, 0, 0)
    assert llm.available() == 100_000 - TOTAL


def test_streamed_completion_charges_the_final_usage_event(llm: Llm) -> None:
    """A stream with `include_usage` is charged from its last usage event, chunks passing as sent."""
    body = chat(max_tokens=50, stream=True, stream_options={"include_usage": True})
    with llm.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = b"".join(response.iter_bytes())
    events = [line[6:] for line in text.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    assert json.loads(events[-2])["usage"]["total_tokens"] == TOTAL
    assert llm.tokens() == (TOTAL, 0, 0)
    assert llm.available() == 100_000 - TOTAL


def test_stream_without_usage_charges_the_request_reserve(llm: Llm) -> None:
    """A stream that never reports usage is charged the reserve: the request's max_tokens."""
    body = chat(max_tokens=7, stream=True)
    with llm.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert b"[DONE]" in b"".join(response.iter_bytes())
    assert llm.tokens() == (7, 0, 0)


def test_request_without_max_tokens_holds_the_default(llm: Llm) -> None:
    """Without max_tokens the default reserve is held while the response streams."""
    headers = {"x-script": "slow-usage-first"}
    with llm.client.stream("POST", "/v1/chat/completions", json=chat(), headers=headers) as r:
        assert r.headers["metergate-balance"] == str(100_000 - RESERVE_DEFAULT)
        chunks = r.iter_bytes()  # an unreferenced iterator would close the response
        assert next(chunks)
        assert llm.tokens() == (0, RESERVE_DEFAULT, RESERVE_DEFAULT)


def test_large_request_streams_through_and_holds_the_default(llm: Llm) -> None:
    """A request over max_scan_bytes reaches the app whole; its reserve is the default."""
    words = " ".join(["w"] * 600_000)  # 1.2 MB of prompt
    body = {"messages": [{"role": "user", "content": words}], "max_tokens": 3}
    response = llm.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == 600_000  # every byte arrived
    assert response.headers["metergate-balance"] == str(100_000 - RESERVE_DEFAULT)
    assert llm.tokens() == (usage["total_tokens"], 0, 0)


def test_usage_event_in_the_middle_then_more_events(llm: Llm) -> None:
    """A usage event followed by more events without usage is what is charged."""
    response = llm.client.post("/v1/chat/completions", json=chat(), headers={"x-script": "middle"})
    assert response.text.count("data: ") == 5
    assert llm.tokens() == (40, 0, 0)


def test_events_cut_in_small_pieces_with_crlf(llm: Llm) -> None:
    """CRLF events sent in 3-byte pieces are read as one stream."""
    response = llm.client.post("/v1/chat/completions", json=chat(), headers={"x-script": "split"})
    assert response.text.endswith("data: [DONE]\r\n\r\n")
    assert llm.tokens() == (23, 0, 0)


def test_non_json_body_charges_the_reserve(llm: Llm) -> None:
    """A text/plain body is not read, whatever it holds: the reserve is charged."""
    response = llm.client.post(
        "/v1/chat/completions", json=chat(max_tokens=9), headers={"x-script": "text"}
    )
    assert response.text == '{"usage": {"total_tokens": 3}}'
    assert llm.tokens() == (9, 0, 0)


def test_client_error_without_usage_charges_the_reserve(llm: Llm) -> None:
    """An upstream 400 without usage is charged the reserve (refund_on decides refunds)."""
    response = llm.client.post("/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400
    assert llm.tokens() == (RESERVE_DEFAULT, 0, 0)


@pytest.mark.parametrize(("name", "expected"), [("slow-usage-first", 5), ("slow-no-usage", 11)])
def test_client_disconnect_mid_stream_settles_once(llm: Llm, name: str, expected: int) -> None:
    """A client gone mid-stream is charged what the stream reported so far, else the reserve."""
    headers = {"x-script": name}
    with llm.client.stream(
        "POST", "/v1/chat/completions", json=chat(max_tokens=11), headers=headers
    ) as response:
        chunks = response.iter_bytes()
        assert next(chunks).startswith(b"data: ")
        assert llm.tokens() == (0, 11, 11)
    eventually(lambda: _assert_tokens(llm, (expected, 0, 0)), timeout=20)
    time.sleep(0.3)  # nothing more arrives later: settled once
    assert llm.tokens() == (expected, 0, 0)
    assert llm.available() == 100_000 - expected
    usage = [e for e in llm.meter.ledger("acme") if e["kind"] == "usage"]
    assert sum(e["count"] for e in usage) == 1 and sum(e["delta"] for e in usage) == -expected


def _assert_tokens(llm: Llm, expected: tuple[int, int, int]) -> None:
    assert llm.tokens() == expected


@pytest.mark.parametrize("mode", ["asgi", "wsgi", "proxy"])
def test_fifty_megabyte_json_body_streams_through_in_bounded_memory(
    start_llm: Callable[..., Llm], mode: str
) -> None:
    """A 50 MB JSON response passes whole, is not parsed (the reserve is charged), memory bounded."""
    llm = start_llm(mode, f"memory://big-{mode}-{time.monotonic_ns()}")
    digest, size = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        with llm.client.stream(
            "POST", "/v1/chat/completions", json=chat(max_tokens=13), headers={"x-script": "big"}
        ) as response:
            for chunk in response.iter_bytes():
                digest.update(chunk)
                size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expected = hashlib.sha256()
    for chunk in script("big")[1]:
        expected.update(chunk)
    assert size > 50_000_000 and digest.hexdigest() == expected.hexdigest()
    assert llm.tokens() == (13, 0, 0)
    # Server, gateway and client all run in this process: together they stay far below the body.
    assert peak < 16 * 1024 * 1024, peak


def test_readme_walkthrough_with_the_example_config(
    asgi_server: Served, llm_upstream: str, clock: Clock
) -> None:
    """The README's LLM walkthrough: examples/llm_gateway/gateway.yaml meters 6 + 8 tokens."""
    path = Path(__file__).parents[2] / "examples" / "llm_gateway" / "gateway.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["proxy"]["upstream"] = llm_upstream
    raw["storage"]["url"] = f"memory://readme-{time.monotonic_ns()}"
    raw["admin"]["token"] = "dev-token-0123456"
    app = create_app(raw, clock=clock)
    asgi_server.switch.app = app
    meter = Meter(raw, clock=clock)
    headers = {"authorization": "Bearer acme-dev-key"}
    try:
        with httpx.Client(base_url=asgi_server.url, headers=headers, timeout=30) as client:
            hello = {"model": "echo-1", "messages": [{"role": "user", "content": "hello there"}]}
            assert client.post("/v1/chat/completions", json=hello).json()["usage"] == {
                "prompt_tokens": 2,
                "completion_tokens": 4,
                "total_tokens": 6,
            }
            stream = {
                "model": "echo-1",
                "max_tokens": 100,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "stream this please"}],
            }
            text = client.post("/v1/chat/completions", json=stream).text
            assert '"total_tokens": 8' in text and text.endswith("data: [DONE]\n\n")
        assert meter.usage("acme", "tokens")["value"] == 14
        assert meter.balance("acme", "credits").available == 100_000 - 14
    finally:
        meter.close()
        asgi_server.switch.run(_close_session(app.app))
        asgi_server.switch.run(app.meter.aclose())


@pytest.mark.parametrize("mode", ["asgi", "wsgi", "proxy"])
def test_usage_read_while_storage_was_down_is_recorded_when_it_is_back(
    start_llm: Callable[..., Llm], tmp_path: Path, mode: str
) -> None:
    """Under `on_failure: open`, a body's usage read while storage was down is recorded later."""
    redis_server = RedisProcess(tmp_path / "late-redis")
    llm = start_llm(mode, redis_server.url, on_failure="open")
    try:
        body = chat(max_tokens=50, stream=True, stream_options={"include_usage": True})
        response = llm.client.post("/v1/chat/completions", json=body)
        assert response.headers["metergate-degraded"] == "?1"
        redis_server.start()
        sent = 1

        def served_live() -> None:
            # How soon a client reconnects after the server is back depends on the redis-py
            # release; every request let through meanwhile is recorded later too.
            nonlocal sent
            sent += 1
            live = llm.client.post("/v1/chat/completions", json=chat(max_tokens=50))
            assert "metergate-degraded" not in live.headers

        eventually(served_live, timeout=10.0)
        eventually(lambda: _assert_tokens(llm, (sent * TOTAL, 0, 0)))
    finally:
        redis_server.stop()


def test_idempotency_key_replays_body_priced_completions_free(llm: Llm) -> None:
    """A JSON and a streamed completion retried with their Idempotency-Keys are charged their
    usage once each, and the retries get the same bodies, replayed."""
    first = llm.client.post(
        "/v1/chat/completions", json=chat(max_tokens=50), headers={"idempotency-key": "j-1"}
    )
    again = llm.client.post(
        "/v1/chat/completions", json=chat(max_tokens=50), headers={"idempotency-key": "j-1"}
    )
    assert (first.status_code, again.status_code) == (200, 200)
    assert first.headers["metergate-balance"] == str(100_000 - 50)  # max_tokens held
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.content == first.content
    assert llm.tokens() == (TOTAL, 0, 0)
    body = chat(max_tokens=50, stream=True, stream_options={"include_usage": True})
    streamed = []
    for _ in range(2):
        headers = {"idempotency-key": "s-1"}
        with llm.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            streamed.append((r.status_code, b"".join(r.iter_bytes()), r.headers))
    assert [s[0] for s in streamed] == [200, 200]
    assert streamed[1][1] == streamed[0][1]
    assert b"[DONE]" in streamed[1][1]
    assert streamed[1][2].get("idempotent-replayed") == "true"
    assert llm.tokens() == (2 * TOTAL, 0, 0)
    assert llm.available() == 100_000 - 2 * TOTAL


def test_a_stream_the_client_left_is_not_replayed_cut_short(llm: Llm) -> None:
    """A keyed stream the client left mid-way is charged once and never stored: a retry with its
    Idempotency-Key is forwarded and metered as new, not answered with the cut-off stream."""
    headers = {"x-script": "slow-usage-first", "idempotency-key": "left"}
    body = chat(max_tokens=11)
    with llm.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert next(r.iter_bytes()).startswith(b"data: ")
    eventually(lambda: _assert_tokens(llm, (5, 0, 0)), timeout=20)
    time.sleep(0.5)
    retry = llm.client.post(
        "/v1/chat/completions", json=body, headers={**headers, "x-script": "middle"}
    )
    assert retry.headers.get("idempotent-replayed") != "true", retry.text[:200]
    # forwarded and metered as new, as a response too large to store is
    assert retry.status_code == 200 and retry.text.count("data: ") == 5
    assert llm.tokens() == (5 + 40, 0, 0)
