"""The example receiver (examples/webhook_receiver.py) against the real worker."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from conftest import Clock
from metergate.storage import AsyncStorage
from metergate.worker import Worker, sign_headers

from .conftest import SECRET, gateway, run, serving
from .test_delivery import emit

EXAMPLE = Path(__file__).parents[2] / "examples" / "webhook_receiver.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("webhook_receiver", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_receiver_verifies_and_handles_each_event_once(storage_url: str) -> None:
    """The example accepts the worker's deliveries, handles a repeat once, refuses a forgery."""
    handled: list[tuple[str, dict[str, Any]]] = []
    app = load_example().create_app([SECRET], lambda wid, event: handled.append((wid, event)))
    clock = Clock(time.time())  # the example checks timestamps against the real time
    with serving(app) as server:
        url = server.url + "/billing"
        config = gateway(storage_url, [{"url": url, "secret": SECRET, "events": ["balance.*"]}])

        async def scenario(storage: AsyncStorage) -> None:
            event_id = await emit(storage, "acme", "balance.low", {"amount": 3}, 0)
            async with httpx.AsyncClient() as http:
                assert (await Worker(config, storage, clock, http).run_once()).delivered == 1
                body = b'{"type":"balance.low","timestamp":"x","data":{}}'
                headers = sign_headers(event_id, int(time.time()), body, SECRET)
                again = await http.post(url, content=body, headers=headers)
                assert again.status_code == 204
                forged = await http.post(url, content=body + b" ", headers=headers)
                assert forged.status_code == 400
            assert [wid for wid, _ in handled] == [event_id]
            assert handled[0][1]["data"]["amount"] == 3

        run(scenario, storage_url)
