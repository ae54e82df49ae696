"""A small OpenAI-compatible chat completions server, to try metergate in front of.

It answers `POST /v1/chat/completions` like the OpenAI API (and vLLM, llama.cpp's server) do: a JSON
completion with a `usage` object, or, with `"stream": true`, server-sent events, one chunk per
token, ending with a chunk carrying `usage` when `stream_options: {include_usage: true}` is asked,
then `data: [DONE]`. The "model" echoes the last message; a token is a word.

Run it on port 9000 (where `gateway.yaml` beside this file sends its requests):

    python examples/llm_gateway/upstream.py

The same application exists as ASGI (`app`) and WSGI (`wsgi_app`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["app", "completion", "wsgi_app"]

MODEL = "echo-1"
DEFAULT_MAX_TOKENS = 64


class BadRequest(Exception):
    """The request is not a chat completion request."""


def _words(request: dict[str, Any]) -> tuple[int, list[str], str]:
    """Count the prompt's tokens and pick the completion's: (prompt tokens, words, finish reason)."""
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    contents = [str(m.get("content", "")) if isinstance(m, dict) else "" for m in messages]
    prompt = sum(len(c.split()) for c in contents)
    limit = request.get("max_tokens", request.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if type(limit) is not int or limit < 1:
        raise BadRequest("'max_tokens' must be a positive integer")
    words = ["You", "said:", *contents[-1].split()]
    finish = "length" if len(words) > limit else "stop"
    return prompt, words[:limit], finish


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(request: dict[str, Any]) -> dict[str, Any]:
    """The JSON answer to a chat completion request that does not stream."""
    prompt, words, finish = _words(request)
    return {
        "id": "chatcmpl-echo",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", MODEL),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "finish_reason": finish,
            }
        ],
        "usage": _usage(prompt, len(words)),
    }


def chunks(request: dict[str, Any]) -> Iterator[bytes]:
    """The server-sent events answering a chat completion request that streams."""
    prompt, words, finish = _words(request)
    options = request.get("stream_options") or {}
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    base = {
        "id": "chatcmpl-echo",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.get("model", MODEL),
    }

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body = {**base, "choices": choices}
        if with_usage:
            body["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
    for i, word in enumerate(words):
        text = word if i == 0 else " " + word
        yield event([{"index": 0, "delta": {"content": text}, "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": finish}])
    if with_usage:
        yield event([], _usage(prompt, len(words)))
    yield b"data: [DONE]\n\n"


def _answer(method: str, path: str, body: bytes) -> tuple[int, str, Iterator[bytes]]:
    """Status, content type and body chunks for one request."""
    if path == "/v1/models" and method == "GET":
        data = {"object": "list", "data": [{"id": MODEL, "object": "model"}]}
        return 200, "application/json", iter([json.dumps(data).encode()])
    if path != "/v1/chat/completions" or method != "POST":
        error = {"error": {"message": f"no route for {method} {path}", "type": "not_found"}}
        return 404, "application/json", iter([json.dumps(error).encode()])
    try:
        request = json.loads(body)
        if not isinstance(request, dict):
            raise BadRequest("the body must be a JSON object")
        if request.get("stream") is True:
            stream = chunks(request)
            first = next(stream)  # validate before answering 200
            return 200, "text/event-stream", iter([first, *stream])
        return 200, "application/json", iter([json.dumps(completion(request)).encode()])
    except (ValueError, BadRequest) as exc:
        error = {"error": {"message": str(exc), "type": "invalid_request_error"}}
        return 400, "application/json", iter([json.dumps(error).encode()])


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The server as an ASGI application."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    status, content_type, parts = _answer(scope["method"], scope["path"], body)
    headers = [(b"content-type", content_type.encode())]
    if content_type == "text/event-stream":
        headers.append((b"cache-control", b"no-cache"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    for part in parts:
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    """The server as a WSGI application."""
    length = environ.get("CONTENT_LENGTH") or "0"
    body = environ["wsgi.input"].read(int(length)) if length.isdigit() else b""
    status, content_type, parts = _answer(environ["REQUEST_METHOD"], environ["PATH_INFO"], body)
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    start_response(f"{status} {reason}", [("Content-Type", content_type)])
    return parts


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=9000, log_level="info")
