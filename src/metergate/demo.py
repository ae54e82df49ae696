"""`metergate demo`: a sample upstream, the gateway on the embedded backend, and a guided walk.

One customer is walked through every level and policy: a throttle, overage, a hard limit, a grace
limit on tokens priced from the response body (an OpenAI-style completion's `usage`, as JSON or as
the last event of a stream), a suspension, running out of credit and a top-up, a reservation, and
the signed webhooks the billing provider would receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from metergate.config import GatewayConfig, parse_config
from metergate.serve import _server, serve

__all__ = ["DEMO_ADMIN_TOKEN", "demo_config", "run_demo"]

DEMO_ADMIN_TOKEN = "demo-admin-token-0123456789"
DEMO_KEY = "demo-key"
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_config(upstream_port: int, webhook_port: int) -> GatewayConfig:
    """Return the demo's gateway configuration (small numbers, so every tier is reached fast)."""
    return parse_config(
        {
            "storage": {"url": "memory://demo", "timeout_ms": 1000},
            "metrics": {
                "api_calls": {"type": "CumulativeCounter", "unit": "requests"},
                "tokens": {"type": "CumulativeCounter", "unit": "tokens"},
                "seats": {"type": "Gauge", "unit": "seats"},
            },
            "plans": {
                "demo": {
                    "assets": {
                        "api_calls": {
                            "period": "month",
                            "balance": "credits",
                            "tiers": [
                                {
                                    "from": 0,
                                    "level": "Normal",
                                    "policy": "NotifyOnly",
                                    "price": {"per_unit": 1},
                                },
                                {
                                    "from": 4,
                                    "level": "Warning",
                                    "policy": "NotifyOnly",
                                    "price": {"per_unit": 1},
                                },
                                {
                                    "from": 6,
                                    "level": "Critical",
                                    "policy": "RateLimit",
                                    "rate": {"limit": 2, "per": "1s"},
                                    "price": {"per_unit": 2},
                                },
                                {
                                    "from": 10,
                                    "level": "OverUsage",
                                    "policy": "AllowWithOverage",
                                    "price": {"base": 5, "per_unit": 3},
                                },
                                {"from": 14, "level": "OverUsage", "policy": "Deny"},
                            ],
                        },
                        "tokens": {
                            "period": "month",
                            "balance": "credits",
                            "tiers": [
                                {
                                    "from": 0,
                                    "level": "Normal",
                                    "policy": "NotifyOnly",
                                    "price": {"per_unit": 1, "per": 100},
                                },
                                {
                                    "from": 2000,
                                    "level": "OverUsage",
                                    "policy": "AllowWithGrace",
                                    "grace": 1500,
                                    "price": {"per_unit": 2, "per": 100},
                                },
                            ],
                        },
                        "seats": {
                            "tiers": [
                                {"from": 0, "level": "Normal", "policy": "NotifyOnly"},
                                {"from": 3, "level": "Critical", "policy": "NotifyOnly"},
                                {"from": 5, "level": "OverUsage", "policy": "SuspendUsage"},
                            ]
                        },
                    }
                }
            },
            "customers": {
                "acme": {
                    "api_keys": [DEMO_KEY],
                    "entitlement": {"plan": "demo"},
                    "balances": {"credits": {"amount": 120, "overage": 10, "low_at": 60}},
                }
            },
            "routes": [
                {
                    # Hold the request's max_tokens (500 without one) while the model works, then
                    # charge what the completion's `usage` says: the JSON body's, or the last
                    # event's of a stream. A request the model refuses (4xx) costs nothing.
                    "path": "/v1/chat",
                    "methods": ["POST"],
                    "meter": [
                        {
                            "metric": "tokens",
                            "cost": {
                                "response_json": "/usage/total_tokens",
                                "reserve": {"request_json": "/max_tokens", "default": 500},
                            },
                        },
                    ],
                    "refund_on": ["4xx", "5xx"],
                },
                {"path": "/v1/seats", "meter": [{"metric": "seats"}]},
                {
                    "path": "/v1/complete",
                    "methods": ["POST"],
                    "meter": [
                        {
                            "metric": "tokens",
                            "cost": {"response_json": "/usage/total_tokens", "reserve": 500},
                        }
                    ],
                },
                {"path": "/v1/{rest:path}", "meter": [{"metric": "api_calls"}]},
            ],
            "proxy": {"upstream": f"http://127.0.0.1:{upstream_port}", "timeout_s": 10},
            "webhooks": [
                {
                    "url": f"http://127.0.0.1:{webhook_port}/billing",
                    "secret": WEBHOOK_SECRET,
                    "events": ["*"],
                }
            ],
            "usage_report_interval": "5s",
            "admin": {"token": DEMO_ADMIN_TOKEN},
        }
    )


REPLY = "hello from the upstream"


def _usage(request: dict[str, Any]) -> dict[str, int]:
    """The sample model's `usage`: a token per word of the prompt, and it writes `max_tokens`."""
    messages = request.get("messages") or []
    if not isinstance(messages, list):
        raise ValueError("'messages' must be a list")
    prompt = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
    completion = request.get("max_tokens", 300)
    if type(completion) is not int or not 1 <= completion <= 100_000:
        raise ValueError("'max_tokens' must be an integer from 1 to 100000")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _events(usage: dict[str, int] | None) -> AsyncIterator[bytes]:
    """An OpenAI-style streamed completion: a chunk per word, a last chunk carrying `usage` when
    `stream_options: {include_usage: true}` asks for it, then `data: [DONE]`."""

    async def stream() -> AsyncIterator[bytes]:
        base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": "demo-1"}
        for i, word in enumerate(REPLY.split()):
            delta = {"content": word if i == 0 else " " + word}
            chunk = {**base, "choices": [{"index": 0, "delta": delta}], "usage": None}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            await asyncio.sleep(0.01)
        if usage is not None:
            last = {**base, "choices": [], "usage": usage}
            yield b"data: " + json.dumps(last).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return stream()


def _upstream() -> Starlette:
    async def chat(request: Request) -> Response:
        body = await request.body()
        try:
            asked = json.loads(body) if body else {}
            if not isinstance(asked, dict):
                raise ValueError("the body must be a JSON object")
            usage = _usage(asked)
        except ValueError as exc:
            error = {"message": str(exc), "type": "invalid_request_error"}
            return JSONResponse({"error": error}, status_code=400)
        if asked.get("stream") is True:
            options = asked.get("stream_options")
            wanted = isinstance(options, dict) and options.get("include_usage") is True
            # without include_usage the stream reports no usage: the gateway charges the reserve
            events = _events(usage if wanted else None)
            return StreamingResponse(events, media_type="text/event-stream")
        message = {"role": "assistant", "content": REPLY}
        return JSONResponse(
            {
                "id": "chatcmpl-demo",
                "object": "chat.completion",
                "model": "demo-1",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    async def anything(request: Request) -> Response:
        return JSONResponse({"path": request.url.path, "ok": True})

    return Starlette(
        routes=[
            Route("/v1/chat", chat, methods=["POST"]),
            Route("/v1/complete", chat, methods=["POST"]),
            Route("/{rest:path}", anything, methods=["GET", "POST", "PUT", "DELETE"]),
        ]
    )


@dataclass
class Step:
    """One line of the walk, with the status it is there to show."""

    what: str
    status: int | str = ""
    problem: str = ""
    level: str = ""
    value: str = ""
    balance: str = ""
    expected: int = 200
    tokens: str = ""
    charged: str = ""

    @property
    def as_intended(self) -> bool:
        """Whether the step answered the status it is there to show."""
        return self.status == self.expected


class Walk:
    """Drives the gateway and the admin API, and keeps the table the terminal shows."""

    def __init__(self, proxy: str, admin: str, render: Callable[[], None]) -> None:
        self.proxy = httpx.AsyncClient(
            base_url=proxy, headers={"Authorization": f"Bearer {DEMO_KEY}"}
        )
        self.admin = httpx.AsyncClient(
            base_url=admin, headers={"Authorization": f"Bearer {DEMO_ADMIN_TOKEN}"}
        )
        self.steps: list[Step] = []
        self.render = render

    async def call(
        self, what: str, method: str, path: str, expect: int = 200, **kwargs: Any
    ) -> httpx.Response:
        response = await self.proxy.request(method, path, **kwargs)
        self._record(what, response, expect)
        return response

    def _record(self, what: str, response: httpx.Response, expect: int, **extra: str) -> None:
        problem: dict[str, Any] = {}
        if response.headers.get("content-type") == "application/problem+json":
            problem = response.json()
        step = Step(
            what,
            response.status_code,
            problem.get("type", "").rsplit(":", 1)[-1],
            response.headers.get("metergate-level", ""),
            response.headers.get("ratelimit", "")[:40],
            response.headers.get("metergate-balance", ""),
            expect,
        )
        for name, value in extra.items():
            setattr(step, name, value)
        self.steps.append(step)
        self.render()

    async def chat(
        self, what: str, tokens: int, *, stream: bool, path: str = "/v1/chat", expect: int = 200
    ) -> None:
        """Ask for a completion of `tokens` tokens in all, as JSON or streamed, and show the tokens
        its `usage` reported (read here, from the body) beside the credits the gateway charged."""
        prompt = "Say hello"
        body: dict[str, Any] = {
            "model": "demo-1",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens - len(prompt.split()),
        }
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        before = await self._credits()
        reported: int | None = None
        async with self.proxy.stream("POST", path, json=body) as response:
            kind = response.headers.get("content-type", "")
            if response.status_code == 200 and kind.startswith("text/event-stream"):
                # the last event carrying `usage` wins; `data: [DONE]` ends the stream
                async for line in response.aiter_lines():
                    data = line.removeprefix("data:").strip()
                    if line.startswith("data:") and data != "[DONE]":
                        usage = json.loads(data).get("usage")
                        if usage:
                            reported = int(usage["total_tokens"])
            else:
                await response.aread()
                if response.status_code == 200 and kind.startswith("application/json"):
                    reported = int(response.json()["usage"]["total_tokens"])
        after = await self._credits()
        extra = {"balance": str(after)}
        if reported is not None:
            extra.update(tokens=str(reported), charged=str(before - after))
        self._record(what, response, expect, **extra)

    async def act(
        self, what: str, method: str, path: str, expect: int = 200, **kwargs: Any
    ) -> httpx.Response:
        response = await self.admin.request(method, path, **kwargs)
        detail = ""
        if response.headers.get("content-type", "").startswith("application/json"):
            data = response.json()
            if "available" in data:
                detail = str(data["available"])
        self.steps.append(Step(what, response.status_code, balance=detail, expected=expect))
        self.render()
        return response

    async def run(self) -> None:
        """Walk acme through every tier and policy; each step says the status it shows."""
        things = "/v1/things"
        for i in range(4):
            await self.call(f"call {i + 1}: Normal tier, 1 credit each", "GET", things)
        for i in range(2):
            await self.call(f"call {5 + i}: Warning tier", "GET", things)
        for i in range(2):
            await self.call(f"call {7 + i}: Critical tier, throttled to 2/s", "GET", things)
        for _ in range(2):
            await self.call("over the throttle: refused", "GET", things, expect=429)
        await asyncio.sleep(1.1)
        await self.call("call 9: after the Retry-After, admitted", "GET", things)
        await self.call("call 10: still within the throttle", "GET", things)
        for i in range(4):
            await self.call(f"call {11 + i}: OverUsage, priced as overage", "GET", things)
        await self.call("call 15: past the Deny limit", "GET", things, expect=429)
        for what, tokens, stream in (
            ("chat, streamed: usage from its last event", 400, True),
            ("chat, JSON: usage.total_tokens of the body", 374, False),
            ("chat, streamed: usage from its last event", 348, True),
        ):
            await self.chat(what, tokens, stream=stream)
        await self.act(
            "top up 500 credits (admin API)",
            "POST",
            "/v1/customers/acme/balances/credits/topup",
            json={"amount": 500},
        )
        for what, tokens, stream in (
            ("chat, JSON: more tokens", 300, False),
            ("chat, streamed: more tokens", 337, True),
            ("chat, streamed: into the grace tier", 374, True),
            ("chat, JSON: inside the grace tier, admitted", 411, False),
        ):
            await self.chat(what, tokens, stream=stream)
        held = await self.act(
            "reserve 50 credits for 60 s",
            "POST",
            "/v1/customers/acme/balances/credits/reservations",
            expect=201,
            json={"amount": 50, "ttl_s": 60},
        )
        if held.status_code == 201:
            reservation = held.json()["id"]
            await self.act(
                "commit 20 of the 50 held",
                "POST",
                f"/v1/reservations/{reservation}/commit",
                json={"amount": 20},
            )
        for seats in (2, 4, 6):
            await self.act(
                f"report {seats} seats in use",
                "POST",
                "/v1/customers/acme/usage",
                json={"metric": "seats", "value": seats},
            )
        await self.call("seats over the limit: suspended", "GET", "/v1/seats", expect=403)
        await self.act("resume the seats asset", "POST", "/v1/customers/acme/assets/seats/resume")
        await self.act(
            "withdraw the rest of the credits",
            "POST",
            "/v1/customers/acme/balances/credits/withdraw",
            json={"amount": await self._available()},
        )
        await self.chat("completion drawing on the overage", 300, stream=False, path="/v1/complete")
        await self.chat(
            "completion with no credit left", 300, stream=False, path="/v1/complete", expect=402
        )

    async def _credits(self) -> int:
        response = await self.admin.get("/v1/customers/acme/balances/credits")
        return int(response.json()["available"])

    async def _available(self) -> int:
        return max(1, await self._credits())

    async def aclose(self) -> None:
        await self.proxy.aclose()
        await self.admin.aclose()


async def _receiver(received: list[dict[str, Any]], port: int) -> Any:
    async def billing(request: Request) -> Response:
        body = await request.body()
        received.append({"id": request.headers.get("webhook-id"), **json.loads(body)})
        return Response(status_code=204)

    app = Starlette(routes=[Route("/billing", billing, methods=["POST"])])
    return _server(app, "127.0.0.1", port)


def _table(
    walk: Walk | None, events: list[dict[str, Any]], last: int | None = None, width: int = 160
) -> Table:
    """The walk so far: every step, or only the `last` ones (a live view fits the screen).

    Every number keeps its full width; on a narrow terminal the step names are shortened and
    then the RateLimit column (the header as sent, the least needed to follow the walk) is left out.
    """
    table = Table(title="metergate demo: customer acme on plan 'demo'", expand=False)
    numbers = {"status": 6, "problem": 20, "level": 9, "credits": 7, "tokens": 6, "charged": 7}
    room = width - sum(numbers.values()) - 3 * (len(numbers) + 1) - 1
    rate = min(28, room - 44 - 3)
    table.add_column("step", no_wrap=True, max_width=max(16, min(44, room)))
    for column in ("status", "problem", "level", "RateLimit", "credits", "tokens", "charged"):
        if column == "RateLimit":
            if rate >= 12:
                table.add_column(column, no_wrap=True, max_width=rate)
        else:
            table.add_column(column, no_wrap=True, max_width=numbers[column])
    steps = walk.steps if walk else []
    for step in steps[-last:] if last else steps:
        color = "green" if str(step.status).startswith("2") else "red"
        cells = [step.what, f"[{color}]{step.status}[/]", step.problem, step.level]
        cells += [step.value] if rate >= 12 else []
        table.add_row(*cells, step.balance, step.tokens, step.charged)
    kinds: dict[str, int] = {}
    for event in events:
        kinds[event.get("type", "?")] = kinds.get(event.get("type", "?"), 0) + 1
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none yet"
    table.caption = f"webhooks received: {summary}"
    return table


async def run_demo(*, keep_running: bool = False, console: Console | None = None) -> int:
    """Run the whole demo; return the process exit status."""
    console = console or Console(width=None if Console().is_terminal else 160)
    upstream_port, webhook_port, port, admin_port = (_free_port() for _ in range(4))
    config = demo_config(upstream_port, webhook_port)
    events: list[dict[str, Any]] = []
    upstream = _server(_upstream(), "127.0.0.1", upstream_port)
    receiver = await _receiver(events, webhook_port)
    side = [asyncio.ensure_future(upstream.serve()), asyncio.ensure_future(receiver.serve())]
    ready, stop = asyncio.Event(), asyncio.Event()
    gateway = asyncio.ensure_future(
        serve(
            config,
            port=port,
            admin_port=admin_port,
            ready=ready.set,
            stop=stop,
            background=_worker(),
        )
    )
    while not (ready.is_set() and upstream.started and receiver.started):
        await asyncio.sleep(0.02)
    walk: Walk | None = None
    # A terminal watches the walk live (the last rows that fit); a file or a pipe gets only the
    # whole table at the end, since a live view there would keep only its last frame.
    live = Live(
        _table(None, events, width=console.width),
        console=console,
        refresh_per_second=8,
        transient=True,
    )
    fits = max(5, console.size.height - 10)
    with live if console.is_terminal else contextlib.nullcontext():
        walk = Walk(
            f"http://127.0.0.1:{port}",
            f"http://127.0.0.1:{admin_port}",
            lambda: (
                live.update(_table(walk, events, fits, console.width))
                if console.is_terminal
                else None
            ),
        )
        await walk.run()
        # let the worker deliver what the walk caused, up to the first usage report
        for _ in range(150):
            if console.is_terminal:
                live.update(_table(walk, events, fits, console.width))
            if any(e.get("type") == "usage.reported" for e in events):
                break
            await asyncio.sleep(0.1)
    await walk.aclose()
    console.print(_table(walk, events, width=console.width))
    astray = [step for step in walk.steps if not step.as_intended]
    if astray:
        for step in astray:
            console.print(
                f"[red]step '{step.what}' answered {step.status}, it is there to show "
                f"{step.expected}[/]"
            )
    else:
        console.print(f"All {len(walk.steps)} steps answered as intended.")
    console.print(
        "tokens: what each completion's `usage` reported, in its JSON body or in the last event of"
        " its stream;\ncharged: the credits the gateway drew for them (1 per 100 tokens, 2 in the"
        " grace tier)."
    )
    console.print(
        f"\n[bold]{len(events)}[/] signed webhooks delivered to http://127.0.0.1:{webhook_port}/billing"
    )
    console.print("\nTry it by hand (the walk spent every credit, so top up first):")
    user = f"-H 'Authorization: Bearer {DEMO_KEY}' http://127.0.0.1:{port}"
    admin = f"-H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' http://127.0.0.1:{admin_port}"
    chat = (
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 99, "stream": true, '
        '"stream_options": {"include_usage": true}}'
    )
    for command in (
        f"curl -s -X POST -d '{{\"amount\": 100}}' {admin}/v1/customers/acme/balances/credits/topup",
        f"curl -i {user}/v1/things",
        f"curl -N -d '{chat}' {user}/v1/chat",
        f"curl -s {admin}/v1/customers/acme/usage",
        f"curl -s {admin}/v1/customers/acme/ledger",
    ):
        # one line each, whatever the width, so that it can be copied whole
        console.print(f"  {command}", soft_wrap=True, markup=False, highlight=False)
    if keep_running:
        console.print(
            f"\nDashboard: http://127.0.0.1:{admin_port}/ui/ (sign in with the admin token "
            f"{DEMO_ADMIN_TOKEN})"
        )
        console.print("\nThe gateway keeps running; press Ctrl-C to stop.")
        await gateway
    else:
        console.print("\n(run `metergate demo --keep-running` to keep the gateway up for these)")
    stop.set()
    upstream.should_exit = receiver.should_exit = True
    await asyncio.gather(*side, return_exceptions=True)
    await asyncio.gather(gateway, return_exceptions=True)
    return 0


def _worker() -> Any:
    """Return the background worker coroutine factory, if the worker is available."""
    try:
        from metergate.worker import run_worker
    except ImportError:
        return None
    return run_worker
