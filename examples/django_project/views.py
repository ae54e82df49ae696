"""The example's endpoints: a stand-in chat completion that reports its tokens, models, health."""

from __future__ import annotations

import json
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST


def reply_to(messages: list[dict[str, Any]]) -> tuple[list[str], int]:
    """A stand-in for a model: echo the prompt's words; usage is prompt plus completion words."""
    prompt = " ".join(str(m.get("content", "")) for m in messages).split()
    completion = ["you", "said:", *prompt]
    return completion, len(prompt) + len(completion)


@csrf_exempt
@require_POST
def chat_completions(request: HttpRequest) -> HttpResponse:
    """Answer a chat completion; the tokens used go out in `X-Usage-Tokens`."""
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        body = {}
    words, tokens = reply_to(body.get("messages", []))
    response = JsonResponse({"content": " ".join(words), "usage": {"tokens": tokens}})
    response["X-Usage-Tokens"] = str(tokens)
    return response


@require_GET
def models(request: HttpRequest) -> HttpResponse:
    """List the models (metered as one api call)."""
    return JsonResponse({"data": [{"id": "echo-1"}]})


@require_GET
def healthz(request: HttpRequest) -> HttpResponse:
    """Health check: `meter: []` in the config, so no key is needed."""
    return JsonResponse({"status": "ok"})
