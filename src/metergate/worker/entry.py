"""The worker as `metergate serve` and `metergate worker` start it: `run_worker(meter, stop)`."""

from __future__ import annotations

import asyncio
import logging

import httpx

from metergate.config import GatewayConfig
from metergate.meter import AsyncMeter
from metergate.storage import open_async
from metergate.worker.destinations import Destination
from metergate.worker.loop import Worker, WorkerSettings
from metergate.worker.stripe import StripeMeter, StripeMeterEvents
from metergate.worker.sweep import sweep_loop

__all__ = ["WORKER_TIMEOUT_MS", "run_worker", "stripe_destinations"]

log = logging.getLogger("metergate.worker")

WORKER_TIMEOUT_MS = 5_000
"""The worker's storage budget per call: its scripts do more than one admission's work, and no
request waits on them, so the hot path's tight `storage.timeout_ms` would only cause retries."""


def stripe_destinations(config: GatewayConfig) -> list[Destination]:
    """Return the Stripe adapter when the config has a `stripe` section, else nothing."""
    stripe = config.stripe
    if stripe is None:
        return []
    meters = {
        metric: meter
        if isinstance(meter, str)
        else StripeMeter(meter.event_name, meter.customer_key, meter.value_key)
        for metric, meter in stripe.meters.items()
    }
    return [
        StripeMeterEvents(
            stripe.api_key,
            stripe.customers,
            meters,
            stripe.base_url,
            value_field=stripe.value,
            stripe_version=stripe.api_version,
        )
    ]


async def run_worker(
    meter: AsyncMeter, stop: asyncio.Event, *, settings: WorkerSettings | None = None
) -> None:
    """Run the worker on the meter's config and clock until `stop` is set."""
    config = meter.config
    budget = max(config.storage.timeout_ms, WORKER_TIMEOUT_MS)
    storage = open_async(config.storage.model_copy(update={"timeout_ms": budget}))
    try:
        async with httpx.AsyncClient() as http:
            worker = Worker(
                config,
                storage,
                meter.core.clock,
                http,
                extra_destinations=stripe_destinations(config),
                settings=settings,
            )
            log.info(
                "worker %s delivering to %d destination(s)",
                worker.consumer,
                len(worker.destinations),
            )
            sweeper = asyncio.ensure_future(sweep_loop(meter, stop))
            try:
                await worker.run(stop)
            finally:
                stop.set()
                await sweeper
    finally:
        await storage.aclose()
        # AsyncStorage.aclose leaves a connection pool it was given open; closing twice is harmless.
        pool = getattr(storage.client, "connection_pool", None)
        if pool is not None:
            await pool.disconnect()
