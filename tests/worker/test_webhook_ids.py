"""Webhook ids are unique across deployments; the official `standardwebhooks` package verifies them."""

from __future__ import annotations

import time
from typing import Any

import httpx
from standardwebhooks import Webhook
from tests.builders import asset, counters, customer, gateway, plan, tier

from conftest import Clock
from metergate import Meter, parse_config
from metergate.storage import AsyncStorage
from metergate.worker import Worker

from .conftest import SECRET, Recorder, Server, run


def deployment(storage_url: str, prefix: str, server: Server) -> dict[str, Any]:
    """One deployment: its own key prefix (and so its own deployment id) on the shared storage."""
    return gateway(
        storage_url=storage_url,
        storage={"prefix": prefix, "partitions": 4, "timeout_ms": 2000},
        metrics=counters("calls"),
        plans={"p": plan(calls=asset(tier(0), period="month"))},
        customers={"acme": customer("p", credits=10)},
        webhooks=[{"url": server.url + "/hook", "secret": SECRET}],
        usage_report_interval="60s",
    )


def test_two_deployments_never_share_a_webhook_id(
    storage_url: str, clock: Clock, receiver: tuple[Recorder, Server]
) -> None:
    """The same customer's first top-up and usage in two deployments reach one receiver under four
    different ids; each delivery verifies with standardwebhooks; the deployment id is kept."""
    recorder, server = receiver
    clock.now = time.time()  # standardwebhooks checks the timestamp against the real clock
    window = int(clock.now) - int(clock.now) % 60
    ids: dict[str, str] = {}
    for prefix in ("east", "west"):
        config = parse_config(deployment(storage_url, prefix, server))
        with Meter(config, clock=clock) as meter:
            meter.topup("acme", "credits", 5)
            assert meter.admit("acme", {"calls": 1}).allowed
            ids[prefix] = meter.core.deployment
        with Meter(config, clock=clock) as again:  # a restart keeps the deployment's id
            again.balance("acme", "credits")
            assert again.core.deployment == ids[prefix]

        async def deliver(storage: AsyncStorage, config: Any = config) -> None:
            async with httpx.AsyncClient() as http:
                await Worker(config, storage, clock, http).run_once()  # the top-up
                clock.advance(70)
                await Worker(config, storage, clock, http).run_once()  # the usage report

        run(deliver, storage_url)
        clock.advance(-70)
    assert len(set(ids.values())) == 2 and all(len(d) == 26 for d in ids.values())
    verifier = Webhook(SECRET)
    bodies = [verifier.verify(r.body, r.headers) for r in recorder.requests]
    received = {
        (b["type"], r.headers["webhook-id"]) for b, r in zip(bodies, recorder.requests, strict=True)
    }
    assert received == {
        ("balance.topped_up", f"evt_{ids['east']}_acme_1"),
        ("balance.topped_up", f"evt_{ids['west']}_acme_1"),
        ("usage.reported", f"usage:{ids['east']}:acme:calls:{window}"),
        ("usage.reported", f"usage:{ids['west']}:acme:calls:{window}"),
    }
    assert len(recorder.ids()) == len(set(recorder.ids())) == 4
