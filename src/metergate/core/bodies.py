"""Costs read from bodies, sans-I/O: JSON pointers, response scanners and the request reserve.

A response body is fed chunk by chunk as it passes through; nothing here ever holds a chunk back
or keeps more than a bounded amount of it:

- `application/json` (and `+json`): the body is kept up to `max_scan_bytes` and parsed whole at
  its end; a larger body is dropped as soon as it passes the limit and reads as no value.
- `text/event-stream`: lines are split as the SSE specification says (CRLF, LF or CR, a CR at the
  end of one chunk and an LF at the start of the next being one break), the `data:` fields of an
  event joined with LF, and each event's data parsed as JSON when it is dispatched. The last
  event whose JSON has the pointer wins. An event over `max_scan_bytes` is skipped.

A value counts only if it is a non-negative integer no larger than 2**53 - 1: floats, booleans,
strings, negative or huge numbers read as "unreadable", and the route's reserve is charged.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_SCAN_BYTES",
    "MAX_UNITS",
    "BodyCost",
    "JsonPointer",
    "RequestBodyReader",
    "RequestReserve",
    "ResponseScan",
    "ResponseScanner",
    "media_type",
    "read_reserve",
    "units_of",
]

MAX_SCAN_BYTES = 1024 * 1024
MAX_UNITS = 2**53 - 1

_MISSING: Any = object()
_LINE_END = re.compile(rb"[\r\n]")
_BOM = b"\xef\xbb\xbf"
_INFLATE_PIECE = 64 * 1024
# gzip and zlib-wrapped deflate, told apart by their header (`32 +`).
_INFLATABLE = {
    "gzip": 32 + zlib.MAX_WBITS,
    "x-gzip": 32 + zlib.MAX_WBITS,
    "deflate": 32 + zlib.MAX_WBITS,
}


class JsonPointer:
    """An RFC 6901 JSON pointer (`/usage/total_tokens`), parsed once."""

    __slots__ = ("escape", "needle", "text", "tokens")

    def __init__(self, text: str) -> None:
        if text and not text.startswith("/"):
            raise ValueError(f"a JSON pointer starts with '/', not {text[:1]!r}")
        if re.search(r"~(?![01])", text):
            raise ValueError("'~' in a JSON pointer must be followed by 0 or 1 (~0, ~1)")
        self.text = text
        self.tokens: tuple[str, ...] = tuple(
            t.replace("~1", "/").replace("~0", "~") for t in text.split("/")[1:]
        )
        # A token that cannot be an array index must be an object key, so a document holding the
        # pointer holds that key in quotes: a text without it (and without escapes that could
        # spell it otherwise) is skipped without being parsed.
        names = [t for t in self.tokens if t != "-" and not t.isdigit()]
        self.needle: bytes | None = json.dumps(names[-1]).encode() if names else None
        # A key of plain characters can only be spelled otherwise with `\uXXXX` escapes.
        plain = bool(names) and re.fullmatch(r"[A-Za-z0-9_. -]*", names[-1]) is not None
        self.escape = b"\\u" if plain else b"\\"

    def resolve(self, document: Any) -> Any:
        """Return the value the pointer designates in a parsed document, or `_MISSING`."""
        node = document
        for token in self.tokens:
            if isinstance(node, dict):
                if token not in node:
                    return _MISSING
                node = node[token]
            elif isinstance(node, list):
                if not re.fullmatch(r"0|[1-9][0-9]*", token) or int(token) >= len(node):
                    return _MISSING
                node = node[int(token)]
            else:
                return _MISSING
        return node

    def may_be_in(self, text: bytes) -> bool:
        """Whether `text` could hold the pointer (False only when it certainly cannot)."""
        return self.needle is None or self.needle in text or self.escape in text

    def __repr__(self) -> str:
        return f"JsonPointer({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonPointer) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def units_of(value: Any) -> int | None:
    """Return `value` as units if it is an integer in [0, 2**53 - 1], else None."""
    if type(value) is int and 0 <= value <= MAX_UNITS:
        return value
    return None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key")
    return out


def _parse(data: bytes, unique: bool = False) -> Any:
    """Parse JSON text; anything unreadable (bad UTF-8, bad JSON, absurd numbers) is `_MISSING`.

    With `unique`, an object with a duplicate key is unreadable too: parsers disagree on which
    of two `max_tokens` counts, so a request must not get to choose.
    """
    try:
        return json.loads(data, object_pairs_hook=_unique_keys if unique else None)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return _MISSING


def media_type(content_type: str | None) -> str:
    """Return the media type of a Content-Type value, lowercased, without parameters."""
    return (content_type or "").partition(";")[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


@dataclass(frozen=True, slots=True)
class RequestReserve:
    """A reserve read from the request body: the integer at `pointer`, else `default`."""

    pointer: JsonPointer
    default: int


@dataclass(frozen=True, slots=True)
class BodyCost:
    """One metric priced from the response body (`pointer`) or a trailer (`trailer`)."""

    metric: str
    pointer: JsonPointer | None = None
    trailer: str | None = None
    """Lowercased trailer field name."""
    max_scan_bytes: int = MAX_SCAN_BYTES


class ResponseScanner:
    """Find one JSON pointer's integer in a response body fed chunk by chunk, in bounded memory."""

    def __init__(
        self, pointer: JsonPointer, content_type: str | None, max_scan_bytes: int = MAX_SCAN_BYTES
    ) -> None:
        self.pointer = pointer
        self.limit = max_scan_bytes
        media = media_type(content_type)
        self.mode = "sse" if media == "text/event-stream" else "json" if _is_json(media) else None
        self.complete = False
        self._value: int | None = None
        self._found = False  # an event resolved the pointer (its value may still be unreadable)
        # json mode
        self._chunks: list[bytes] = []
        self._size = 0
        # sse mode
        self._line = bytearray()
        self._line_over = False
        self._data = bytearray()
        self._has_data = False
        self._event_over = False
        self._after_cr = False
        self._started = False

    @property
    def value(self) -> int | None:
        """The units found so far: the whole JSON body's, or the last SSE event's; None if none."""
        return self._value if self._found else None

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk of the body."""
        if not chunk or self.mode is None or self.complete:
            return
        if self.mode == "json":
            if self._size <= self.limit:
                self._size += len(chunk)
                if self._size > self.limit:
                    self._chunks.clear()  # too large to parse: drop what was kept
                else:
                    self._chunks.append(bytes(chunk))
            return
        self._feed_sse(bytes(chunk))

    def finish(self) -> None:
        """The body is over: parse a JSON body; an SSE event left unterminated is discarded."""
        if self.complete:
            return
        self.complete = True
        if self.mode == "json" and self._size <= self.limit:
            data = b"".join(self._chunks)
            self._chunks.clear()
            if self.pointer.may_be_in(data):
                self._take(_parse(data))
        self._line.clear()
        self._data.clear()

    def _take(self, document: Any) -> None:
        if document is _MISSING:
            return
        found = self.pointer.resolve(document)
        if found is _MISSING or found is None:
            return
        self._found = True
        self._value = units_of(found)

    # -- server-sent events -------------------------------------------------------------------

    def _feed_sse(self, chunk: bytes) -> None:
        pos = 0
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                pos = 1  # the LF of a CRLF whose CR ended the previous chunk
        if not self._started:
            if len(self._line) + len(chunk) - pos < len(_BOM) and _BOM.startswith(
                bytes(self._line) + chunk[pos:]
            ):
                self._line += chunk[pos:]  # too short to tell: wait for more
                return
            self._started = True
            head = bytes(self._line) + chunk[pos:]
            self._line.clear()
            chunk, pos = (head[len(_BOM) :] if head.startswith(_BOM) else head), 0
        end = len(chunk)
        while pos < end:
            match = _LINE_END.search(chunk, pos)
            if match is None:
                self._append_line(chunk, pos, end)
                return
            self._append_line(chunk, pos, match.start())
            self._line_done()
            pos = match.end()
            if chunk[match.start()] == 13:  # CR
                if pos < end:
                    if chunk[pos] == 10:
                        pos += 1
                else:
                    self._after_cr = True

    def _append_line(self, chunk: bytes, start: int, stop: int) -> None:
        if self._line_over or start == stop:
            return
        if len(self._line) + stop - start > self.limit:
            self._line_over = True
            self._line.clear()
        else:
            self._line += chunk[start:stop]

    def _line_done(self) -> None:
        line, over = self._line, self._line_over
        self._line_over = False
        if over:
            self._event_over = True  # a line too long to keep: this event cannot be read
            return
        if not line:
            self._dispatch()
            return
        if line[0] == 58:  # ':' starts a comment
            line.clear()
            return
        name, colon, value = bytes(line).partition(b":")
        line.clear()
        if name != b"data":
            return
        if colon and value[:1] == b" ":
            value = value[1:]
        if len(self._data) + len(value) + 1 > self.limit:
            self._event_over = True
            self._data.clear()
        elif not self._event_over:
            self._data += value
            self._data += b"\n"
        self._has_data = True

    def _dispatch(self) -> None:
        data, over, has = self._data, self._event_over, self._has_data
        self._event_over = self._has_data = False
        if has and not over:
            text = bytes(data[:-1])  # the LF after the last data line is not part of the data
            if text.strip() != b"[DONE]" and self.pointer.may_be_in(text):
                self._take(_parse(text))
        data.clear()


@dataclass(slots=True)
class ResponseScan:
    """All the body- and trailer-priced costs of one response, fed as the response passes.

    A gzip or deflate body is inflated piece by piece as it passes (a client asking for a
    compressed answer must not make it unreadable); any other Content-Encoding reads as no value.
    """

    costs: Sequence[BodyCost]
    scanners: dict[str, ResponseScanner]
    trailer_values: dict[str, int]
    inflater: Any = None

    @classmethod
    def start(cls, costs: Sequence[BodyCost], headers: Mapping[str, str]) -> ResponseScan:
        """Begin scanning a response whose header fields (lowercased names) are `headers`."""
        encoding = headers.get("content-encoding", "identity").strip().lower()
        content_type = headers.get("content-type")
        inflater = None
        if encoding in _INFLATABLE:
            inflater = zlib.decompressobj(_INFLATABLE[encoding])
        elif encoding not in ("", "identity"):
            content_type = None
        scanners = {
            c.metric: ResponseScanner(c.pointer, content_type, c.max_scan_bytes)
            for c in costs
            if c.pointer is not None
        }
        return cls(costs, scanners, {}, inflater if scanners else None)

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk of the body."""
        if self.inflater is None:
            self._scan(chunk)
            return
        try:
            data = chunk
            while data and not self.inflater.eof:
                self._scan(self.inflater.decompress(data, _INFLATE_PIECE))
                data = self.inflater.unconsumed_tail
        except zlib.error:
            self.inflater = None
            self.scanners.clear()  # a body that does not inflate cannot be read

    def _scan(self, data: bytes) -> None:
        for scanner in self.scanners.values():
            scanner.feed(data)

    def finish(self) -> None:
        """The whole body has passed."""
        if self.inflater is not None and not self.inflater.eof:
            self.scanners.clear()  # a truncated compressed body is not a complete answer
        for scanner in self.scanners.values():
            scanner.finish()

    def trailers(self, fields: Sequence[tuple[str, str]]) -> None:
        """Read trailer fields (lowercased names)."""
        for cost in self.costs:
            if cost.trailer is None:
                continue
            for name, raw in fields:
                if name == cost.trailer and re.fullmatch(r"\d{1,15}", raw.strip()):
                    self.trailer_values[cost.metric] = int(raw)

    def found(self) -> dict[str, int]:
        """The units read so far, per metric; a metric without a readable value is absent."""
        out = dict(self.trailer_values)
        for metric, scanner in self.scanners.items():
            if scanner.value is not None:
                out[metric] = scanner.value
        return out


def read_reserve(reserve: RequestReserve, body: bytes | None) -> int:
    """Return the reserve a request body asks for: the integer at the pointer, else the default."""
    if body is None:
        return reserve.default
    value = units_of(reserve.pointer.resolve(_parse(body, unique=True))) if body else None
    return reserve.default if value is None else value


class RequestBodyReader:
    """Read the reserves of a request from the start of its body, kept up to `limit` bytes.

    The adapters hold the chunks they feed here and hand them to the app afterwards, so the
    request still streams; a body over `limit`, or compressed, is not read and the defaults apply.
    """

    def __init__(
        self,
        reserves: Mapping[str, RequestReserve] | Iterable[tuple[str, RequestReserve]],
        headers: Mapping[str, str],
        limit: int = MAX_SCAN_BYTES,
    ) -> None:
        self.reserves = dict(reserves)
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        length = (headers.get("content-length") or "").strip()
        encoding = (headers.get("content-encoding") or "identity").strip().lower()
        too_long = length.isdigit() and int(length) > limit
        # While reading, `wanted` says more body is needed before the reserves can be told.
        self.wanted = bool(self.reserves) and not too_long and encoding in ("", "identity")

    def feed(self, chunk: bytes, more: bool) -> None:
        """Take the next chunk of the request body; `more` is False for the last one."""
        if not self.wanted:
            return
        self._size += len(chunk)
        if self._size > self.limit:
            self._chunks.clear()
            self.wanted = False
            return
        if chunk:
            self._chunks.append(bytes(chunk))
        if not more:
            self._complete = True
            self.wanted = False

    def result(self) -> dict[str, int]:
        """The reserve of each metric: read from a complete body, else its default."""
        body = b"".join(self._chunks) if self._complete else None
        self._chunks.clear()
        return {metric: read_reserve(r, body) for metric, r in self.reserves.items()}
