"""The background worker: outbox delivery (Standard Webhooks, Stripe), usage reports, period closes.

Receivers verify what the worker sends with `metergate.worker.verify`.
"""

from metergate.worker.destinations import Destination, WebhookEndpoint
from metergate.worker.entry import run_worker
from metergate.worker.events import OutboxEvent
from metergate.worker.loop import PassReport, Worker, WorkerSettings, alive_workers
from metergate.worker.schedule import RETRY_SCHEDULE_S, DeliveryState, Outcome, next_attempt
from metergate.worker.signing import WebhookVerificationError, sign, sign_headers, verify
from metergate.worker.stripe import StripeMeterEvents

__all__ = [
    "RETRY_SCHEDULE_S",
    "DeliveryState",
    "Destination",
    "OutboxEvent",
    "Outcome",
    "PassReport",
    "StripeMeterEvents",
    "WebhookEndpoint",
    "WebhookVerificationError",
    "Worker",
    "WorkerSettings",
    "alive_workers",
    "next_attempt",
    "run_worker",
    "sign",
    "sign_headers",
    "verify",
]
