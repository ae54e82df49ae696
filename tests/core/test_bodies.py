"""Costs read from bodies: JSON pointers, the JSON and event-stream scanners, the request reserve."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metergate.core.bodies import (
    MAX_UNITS,
    BodyCost,
    JsonPointer,
    RequestBodyReader,
    RequestReserve,
    ResponseScan,
    ResponseScanner,
)

TOTAL = JsonPointer("/usage/total_tokens")
SSE = "text/event-stream"


def chunk_event(text: str, usage: Any = None) -> dict[str, Any]:
    """One chunk of an OpenAI-style streamed chat completion."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}}] if text else [],
        "usage": usage,
    }


def sse(events: Iterable[Any], newline: str = "\n") -> bytes:
    """An event stream: each event's JSON in a `data:` field, then `data: [DONE]`."""
    out = "".join(f"data: {json.dumps(e, ensure_ascii=False)}{newline}{newline}" for e in events)
    return (out + f"data: [DONE]{newline}{newline}").encode()


OPENAI_STREAM = sse(
    [
        chunk_event("Hel"),
        chunk_event("lo, "),
        chunk_event("wörld"),
        chunk_event("", {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}),
    ]
)


def scan(body: bytes, content_type: str | None, cuts: Iterable[int] = (), **kw: Any) -> int | None:
    """Feed `body` cut at `cuts` and return the value the scanner found."""
    scanner = ResponseScanner(kw.pop("pointer", TOTAL), content_type, **kw)
    start = 0
    for cut in sorted(set(cuts)):
        scanner.feed(body[start:cut])
        start = cut
    scanner.feed(body[start:])
    scanner.finish()
    return scanner.value


def test_pointer_reads_escapes_and_array_indices() -> None:
    """RFC 6901: `~1` is '/', `~0` is '~', digits index arrays, and a missing step is missing."""
    doc = {"a/b": {"m~n": [10, 20]}, "": 5}
    assert units(JsonPointer("/a~1b/m~0n/1"), doc) == 20
    assert units(JsonPointer("/"), doc) == 5
    assert units(JsonPointer("/a~1b/m~0n/2"), doc) is None
    assert units(JsonPointer("/a~1b/m~0n/01"), doc) is None
    assert units(JsonPointer("/a~1b/m~0n/-"), doc) is None


def units(pointer: JsonPointer, doc: Any) -> int | None:
    """Scan `doc` as a JSON body with `pointer`."""
    return scan(json.dumps(doc).encode(), "application/json", pointer=pointer)


@pytest.mark.parametrize("text", ["usage", "/a~2", "/a~"])
def test_pointer_refuses_malformed_text(text: str) -> None:
    """A pointer that does not start with '/' or has a bad '~' escape is refused with a reason."""
    with pytest.raises(ValueError, match="JSON pointer"):
        JsonPointer(text)


def test_json_body_is_read_whole() -> None:
    """An application/json body (with parameters, or a +json type) gives the pointer's integer."""
    body = json.dumps({"usage": {"total_tokens": 42}, "choices": []}).encode()
    assert scan(body, "application/json; charset=utf-8") == 42
    assert scan(body, "Application/Vnd.Api+JSON") == 42


@pytest.mark.parametrize(
    "value",
    [1.5, 12.0, True, "12", -1, MAX_UNITS + 1, 10**400, None, [12], {"n": 12}],
)
def test_values_that_are_not_units_are_unreadable(value: Any) -> None:
    """Floats, booleans, strings, negative or too large numbers, null and containers read as none."""
    body = b'{"usage": {"total_tokens": ' + json.dumps(value).encode() + b"}}"
    assert scan(body, "application/json") is None


def test_largest_safe_integer_is_read() -> None:
    """2**53 - 1 is still a valid count of units."""
    body = json.dumps({"usage": {"total_tokens": MAX_UNITS}}).encode()
    assert scan(body, "application/json") == MAX_UNITS


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"usage": {"total_tokens": 5}', b"\xff\xfe", b"[1, 2]", b"null", b"NaN"],
)
def test_unparseable_or_truncated_json_is_unreadable(body: bytes) -> None:
    """A body that is not a complete JSON document holding the pointer reads as none."""
    assert scan(body, "application/json") is None


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "text/html", "application/octet-stream", "multipart/x"]
)
def test_non_json_bodies_are_not_read(content_type: str | None) -> None:
    """Only JSON and event-stream bodies are read: others read as none, whatever they hold."""
    body = json.dumps({"usage": {"total_tokens": 42}}).encode()
    assert scan(body, content_type) is None


def scan_encoded(body: bytes, content_type: str, encoding: str, piece: int = 5) -> dict[str, int]:
    """Feed an encoded body in small pieces through a ResponseScan and return what it found."""
    cost = BodyCost("tokens", pointer=TOTAL)
    response = ResponseScan.start(
        [cost], {"content-type": content_type, "content-encoding": encoding}
    )
    for i in range(0, len(body), piece):
        response.feed(body[i : i + piece])
    response.finish()
    return response.found()


def test_gzip_and_deflate_bodies_are_inflated_as_they_pass() -> None:
    """A client asking for gzip or deflate cannot make its usage unreadable: the scan inflates."""
    body = json.dumps({"usage": {"total_tokens": 42}}).encode()
    assert scan_encoded(gzip.compress(body), "application/json", "gzip") == {"tokens": 42}
    assert scan_encoded(zlib.compress(body), "application/json", "deflate") == {"tokens": 42}
    assert scan_encoded(gzip.compress(OPENAI_STREAM), SSE, "gzip") == {"tokens": 12}


def test_other_encodings_and_broken_compression_are_not_read() -> None:
    """An unknown Content-Encoding, a corrupt or a truncated gzip body read as none."""
    body = json.dumps({"usage": {"total_tokens": 42}}).encode()
    assert scan_encoded(body, "application/json", "br") == {}
    assert scan_encoded(b"not gzip at all", "application/json", "gzip") == {}
    assert scan_encoded(gzip.compress(body)[:-12], "application/json", "gzip") == {}


def test_compression_bomb_is_inflated_in_bounded_memory() -> None:
    """A gzip body inflating to 50 MB is scanned piece by piece: memory stays near the limit."""
    bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]", compresslevel=9)
    tracemalloc.start()
    try:
        found = scan_encoded(bomb, "application/json", "gzip", piece=64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == {}
    assert peak < 4 * 1024 * 1024


def test_json_body_over_the_limit_is_not_parsed() -> None:
    """A JSON body one byte over `max_scan_bytes` reads as none; at the limit it is read."""
    body = json.dumps({"usage": {"total_tokens": 7}}).encode()
    assert scan(body, "application/json", max_scan_bytes=len(body)) == 7
    assert scan(body, "application/json", max_scan_bytes=len(body) - 1) is None


def test_fifty_megabyte_json_body_keeps_memory_bounded() -> None:
    """A 50 MB JSON body fed in 64 KiB chunks never makes the scanner hold more than ~1 MiB."""
    piece = b'{"text": "' + b"x" * (64 * 1024 - 20) + b'"},'
    scanner = ResponseScanner(TOTAL, "application/json")
    tracemalloc.start()
    try:
        scanner.feed(b'{"items": [')
        for _ in range(50 * 1024 * 1024 // len(piece)):
            scanner.feed(piece)
        scanner.feed(b'{}], "usage": {"total_tokens": 3}}')
        scanner.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scanner.value is None
    assert peak < 2 * 1024 * 1024 + len(piece)


def test_openai_stream_gives_the_final_usage() -> None:
    """The final usage chunk of an OpenAI-style stream gives the total; `[DONE]` is skipped."""
    assert scan(OPENAI_STREAM, SSE) == 12


@settings(max_examples=300, deadline=None)
@given(
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=len(OPENAI_STREAM) * 2), max_size=40),
)
def test_stream_split_anywhere_gives_the_same_value(newline: str, cuts: list[int]) -> None:
    """Events cut at any byte (inside a CRLF, a UTF-8 character, a field name) give the same value."""
    body = OPENAI_STREAM.replace(b"\n", newline.encode())
    assert scan(body, SSE, [c % (len(body) + 1) for c in cuts]) == 12


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_json_split_anywhere_gives_the_same_value(cuts: list[int]) -> None:
    """A JSON body cut at any byte gives the same value as in one piece."""
    doc = {"choices": [{"text": "héllo"}], "usage": {"total_tokens": 31}}
    body = json.dumps(doc, ensure_ascii=False).encode()
    assert scan(body, "application/json", [c % (len(body) + 1) for c in cuts]) == 31


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.integers(0, 10**6)), min_size=1, max_size=6),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    data=st.data(),
)
def test_last_event_with_the_pointer_wins(
    values: list[int | None], newline: str, data: Any
) -> None:
    """Whatever events carry usage, the last one carrying it decides, however the stream is cut."""
    events = [chunk_event("x", None if v is None else {"total_tokens": v}) for v in values]
    body = sse(events, newline)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=20))
    expected = next((v for v in reversed(values) if v is not None), None)
    assert scan(body, SSE, cuts) == expected


def test_usage_in_the_middle_then_more_events() -> None:
    """A usage event followed by events without usage keeps the usage event's value."""
    body = sse(
        [
            chunk_event("a"),
            chunk_event("", {"total_tokens": 40}),
            chunk_event("b"),
            chunk_event("c", None),
        ]
    )
    assert scan(body, SSE) == 40


def test_multi_line_data_is_joined() -> None:
    """The `data:` lines of one event are joined with LF before parsing (the SSE rule)."""
    body = b'event: x\nid: 3\ndata: {"usage":\ndata:  {"total_tokens":\ndata:8}}\n\n'
    assert scan(body, SSE) == 8


def test_comments_other_fields_and_non_json_data_are_skipped() -> None:
    """Comments, `event:`/`id:`/`retry:` fields and data that is not JSON do not disturb the scan."""
    body = (
        b": keep-alive\n\nretry: 10\n\ndata: hello\n\n"
        b'data:{"usage":{"total_tokens":5}}\n\ndata: not {json\n\ndata: [DONE]\n\n'
    )
    assert scan(body, SSE) == 5


def test_event_not_terminated_by_a_blank_line_is_discarded() -> None:
    """As the SSE specification says, an event cut off before its blank line is not dispatched."""
    body = b'data: {"usage":{"total_tokens":5}}\n\ndata: {"usage":{"total_tokens":9}}\n'
    assert scan(body, SSE) == 5


def test_byte_order_mark_is_ignored_even_when_split() -> None:
    """A UTF-8 BOM opening the stream is skipped, even cut in two."""
    body = b"\xef\xbb\xbf" + OPENAI_STREAM
    assert scan(body, SSE, [1]) == 12
    assert scan(body, SSE, [2, 3]) == 12


def test_oversized_event_is_skipped_and_memory_stays_bounded() -> None:
    """An event over `max_scan_bytes` is skipped without being kept; the next event is read."""
    scanner = ResponseScanner(TOTAL, SSE, max_scan_bytes=4096)
    tracemalloc.start()
    try:
        scanner.feed(b'data: {"usage":{"total_tokens":1}}\n\ndata: {"pad": "')
        for _ in range(1000):
            scanner.feed(b"y" * 10_000)
        scanner.feed(b'", "usage": {"total_tokens": 99}}\n\n')
        assert scanner.value == 1
        scanner.feed(b'data: {"usage":{"total_tokens":3}}\n\n')
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scanner.value == 3
    assert peak < 256 * 1024


def test_value_reported_so_far_is_kept_when_the_stream_stops() -> None:
    """Without `finish` (a client gone mid-stream) the value of the last complete event stands."""
    scanner = ResponseScanner(TOTAL, SSE)
    scanner.feed(b'data: {"usage":{"total_tokens":4}}\n\ndata: {"usage":{"total_tok')
    assert scanner.value == 4


def test_trailer_gives_the_units() -> None:
    """A trailer-priced cost reads its integer trailer field; an unreadable one reads as none."""
    cost = BodyCost("tokens", trailer="x-usage-tokens")
    response = ResponseScan.start([cost], {"content-type": "text/plain"})
    response.trailers([("x-usage-tokens", "1.5")])
    assert response.found() == {}
    response.trailers([("x-other", "3"), ("x-usage-tokens", " 17 ")])
    assert response.found() == {"tokens": 17}


RESERVE = {"tokens": RequestReserve(JsonPointer("/max_tokens"), 8000)}


def reserves(body: bytes, headers: dict[str, str] | None = None, limit: int = 1024) -> Any:
    """Feed a request body in 7-byte chunks and return the reserves read from it."""
    reader = RequestBodyReader(RESERVE, headers or {}, limit)
    for i in range(0, max(len(body), 1), 7):
        if not reader.wanted:
            break
        reader.feed(body[i : i + 7], i + 7 < len(body))
    return reader.result()


def test_request_reserve_is_read_from_the_body() -> None:
    """`max_tokens` of a JSON request sizes the hold."""
    body = json.dumps({"model": "m", "messages": [], "max_tokens": 256}).encode()
    assert reserves(body) == {"tokens": 256}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"model=m&max_tokens=5",
        b'{"max_tokens": 2.5}',
        b'{"max_tokens": "5"}',
        b'{"max_tokens": -5}',
        b'{"max_tokens": null}',
        b'{"model": "m"}',
        b'{"max_tokens": 5',
        b'{"max_tokens": 1, "max_tokens": 5}',
    ],
)
def test_request_without_a_readable_reserve_uses_the_default(body: bytes) -> None:
    """A body that is not JSON, or whose pointer is missing or not an integer, holds the default."""
    assert reserves(body) == {"tokens": 8000}


def test_request_over_the_limit_or_compressed_uses_the_default() -> None:
    """A body larger than the limit, declared or streamed, or compressed, is not read."""
    body = json.dumps({"max_tokens": 5, "pad": "z" * 2000}).encode()
    assert reserves(body) == {"tokens": 8000}
    small = json.dumps({"max_tokens": 5}).encode()
    assert reserves(small, {"content-length": "5000"}) == {"tokens": 8000}
    assert reserves(small, {"content-encoding": "gzip"}) == {"tokens": 8000}
    assert not RequestBodyReader(RESERVE, {"content-length": "5000"}, 1024).wanted


def test_keys_spelled_with_escapes_are_still_found() -> None:
    """A key written with JSON escapes (`total\\u005ftokens`, `a\\/b`) is the same key."""
    assert scan(b'{"usage": {"total\\u005ftokens": 3}}', "application/json") == 3
    assert scan(b'data: {"a\\/b": 4}\n\n', SSE, pointer=JsonPointer("/a~1b")) == 4
    assert scan(b'data: {"usage": {"total_tokens": 5}, "c": "x\\ny"}\n\n', SSE) == 5
