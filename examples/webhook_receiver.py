"""A webhook receiver for metergate's billing events: verifies signatures, handles each event once.

Run it next to `metergate serve --config examples/gateway.yaml` (whose `webhooks` entry points at
http://127.0.0.1:9100/billing):

    METERGATE_WEBHOOK_SECRET=whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw \\
        python examples/webhook_receiver.py --port 9100

Delivery is at least once: the same event may arrive again (a lost response, a worker that died
after sending). Every copy carries the same `webhook-id`, so the receiver remembers the ids it has
handled and acknowledges a repeat without handling it twice. This example keeps them in memory; a
real receiver records the id in the same database transaction as the effect of the event.
During a secret rotation, pass both secrets (comma-separated): either signature is accepted.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from metergate.worker import WebhookVerificationError, verify

Handler = Callable[[str, dict[str, Any]], None]


def print_event(webhook_id: str, event: dict[str, Any]) -> None:
    """Show one verified event on stdout."""
    data = json.dumps(event["data"], sort_keys=True)
    print(f"{event['timestamp']}  {event['type']:<22} {webhook_id}  {data}", flush=True)


def create_app(
    secrets: list[str], handle: Handler = print_event, *, remember: int = 100_000
) -> Starlette:
    """Build the receiver: POST /billing verifies, dedupes on webhook-id, then calls `handle`."""
    seen: OrderedDict[str, None] = OrderedDict()

    async def billing(request: Request) -> Response:
        body = await request.body()
        try:
            event = verify(body, request.headers, secrets)
        except WebhookVerificationError as exc:
            # 4xx other than 410: the sender retries, and gives up after its last attempt.
            return JSONResponse({"error": str(exc)}, status_code=400)
        webhook_id = request.headers["webhook-id"]
        if webhook_id in seen:
            return Response(status_code=204)  # handled before: acknowledge the repeat only
        handle(webhook_id, event)
        seen[webhook_id] = None
        while len(seen) > remember:
            seen.popitem(last=False)
        return Response(status_code=204)

    return Starlette(routes=[Route("/billing", billing, methods=["POST"])])


def main() -> None:
    """Serve the receiver with uvicorn."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument(
        "--secret",
        default=os.environ.get("METERGATE_WEBHOOK_SECRET", ""),
        help="whsec_... (or several, comma-separated); default $METERGATE_WEBHOOK_SECRET",
    )
    args = parser.parse_args()
    secrets = [s.strip() for s in args.secret.split(",") if s.strip()]
    if not secrets:
        parser.error("give the endpoint's secret with --secret or METERGATE_WEBHOOK_SECRET")

    import uvicorn

    uvicorn.run(create_app(secrets), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
