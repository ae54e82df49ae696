"""`metergate serve` and `metergate demo` as real processes, the way users start them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.adapters.harness import serve_asgi
from tests.gateway.test_proxy import KEY, UPSTREAM, gateway_config

from conftest import serve_process

TOKEN = "serve-admin-token-0123"


@pytest.fixture
def served(tmp_path: Path, storage_url: str) -> Iterator[tuple[str, str]]:
    """`metergate serve` in a subprocess in front of a real upstream; yields proxy and admin URLs."""
    with serve_asgi(UPSTREAM) as upstream:
        config = gateway_config(upstream)
        config["storage"] = {"url": storage_url, "timeout_ms": 2000}
        config["admin"] = {"token": "${SERVE_TOKEN}"}
        path = tmp_path / "gateway.json"
        path.write_text(json.dumps(config))
        with serve_process(path, env={"SERVE_TOKEN": TOKEN}) as served:
            yield served.proxy, served.admin


def raw_request(url: str, data: bytes) -> bytes:
    """Send raw bytes to a server and return everything it answers."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def test_serve_meters_through_the_proxy_and_answers_the_admin_api(served: tuple[str, str]) -> None:
    """A request through `metergate serve` is metered; the admin API on its port sees the usage."""
    proxy, admin = served
    r = httpx.get(f"{proxy}/v1/things", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert r.headers["ratelimit"].startswith('"calls";r=99;t=')
    usage = httpx.get(f"{admin}/v1/customers/c/usage", headers={"Authorization": f"Bearer {TOKEN}"})
    assert usage.json()["metrics"]["calls"]["value"] == 1
    assert httpx.get(f"{admin}/healthz").status_code == 200


def test_serve_refuses_a_smuggling_prone_request(served: tuple[str, str]) -> None:
    """Content-Length together with Transfer-Encoding never reaches the upstream."""
    proxy, _ = served
    answer = raw_request(
        proxy,
        b"POST /v1/things HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"0\r\n\r\nGET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"/v1/smuggled" not in answer


def test_serve_replaces_a_forged_forwarded_for(served: tuple[str, str]) -> None:
    """An X-Forwarded-For from an untrusted peer is replaced by the peer's address."""
    proxy, _ = served
    r = httpx.get(
        f"{proxy}/v1/things",
        headers={"Authorization": f"Bearer {KEY}", "X-Forwarded-For": "198.51.100.7"},
    )
    seen = dict(r.json()["headers"])
    assert seen["x-forwarded-for"] == "127.0.0.1"


def test_check_and_serve_report_a_bad_config_in_one_line(tmp_path: Path) -> None:
    """`metergate serve` with a broken config prints the path of the error, no traceback."""
    path = tmp_path / "broken.yaml"
    path.write_text("metrics: {calls: {type: Counter}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "metergate", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "metrics.calls.type" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_runs_to_completion_with_webhooks() -> None:
    """`metergate demo` runs by itself, walks every refusal, delivers webhooks and exits 0; piped,
    its table has every step from the first, each step answered the status it shows, and a streamed
    completion's tokens are charged at the tier's price."""
    proc = subprocess.run(
        [sys.executable, "-m", "metergate", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for expected in (
        "rate-limited",
        "quota-exceeded",
        "asset-suspended",
        "insufficient-credits",
        "usage.reported",
        "signed webhooks delivered",
        "curl",
    ):
        assert expected in proc.stdout, expected
    assert "Traceback" not in proc.stderr
    rows = [line.split("│")[1:9] for line in proc.stdout.splitlines() if line.startswith("│ ")]
    table = [tuple(cell.strip() for cell in row) for row in rows]
    steps = [row[:4] for row in table]
    assert steps[0] == ("call 1: Normal tier, 1 credit each", "200", "", "Normal")
    assert f"All {len(steps)} steps answered as intended." in proc.stdout, proc.stdout
    shown = {what: (status, problem, level) for what, status, problem, level in steps}
    assert shown["chat, JSON: usage.total_tokens of the body"] == ("200", "", "Normal")
    assert shown["chat, JSON: inside the grace tier, admitted"] == ("200", "", "OverUsage")
    assert shown["call 15: past the Deny limit"] == ("429", "quota-exceeded", "OverUsage")
    assert shown["completion with no credit left"][:2] == ("402", "insufficient-credits")
    # The first chat streams: its tokens, read by the demo's client from the stream's last usage
    # event, are what the gateway charged, at the Normal tier's 1 credit per 100 tokens (no
    # tokens before it, so nothing is rounded).
    streamed = [row for row in table if row[0] == "chat, streamed: usage from its last event"]
    _, status, _, level, _, _, tokens, charged = streamed[0]
    assert (status, level) == ("200", "Normal")
    assert int(tokens) > 0
    assert int(charged) * 100 == int(tokens) * 1
    # Every chat's JSON or streamed usage was charged: no step shows tokens with nothing drawn.
    chats = [row for row in table if row[6]]
    assert len(chats) == 8
    assert all(int(row[7]) > 0 for row in chats)


def test_events_and_redeliver_commands(tmp_path: Path) -> None:
    """`metergate events` lists the outbox; `metergate redeliver` re-queues an event by id."""
    from click.testing import CliRunner

    from metergate import Meter
    from metergate.cli import main

    config = gateway_config("http://127.0.0.1:9")
    config["storage"] = {"url": f"memory://cli-{tmp_path.name}"}
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(config))
    with Meter(str(path)) as meter:
        meter.topup("c", "credits", 5)
        event_id = f"evt_{meter.core.deployment}_c_1"
    runner = CliRunner()
    listed = runner.invoke(main, ["events", "--config", str(path)])
    assert listed.exit_code == 0
    assert f"queued {event_id}  balance.topped_up" in listed.output
    again = runner.invoke(main, ["redeliver", "--config", str(path), event_id])
    assert (again.exit_code, again.output) == (0, f"metergate: {event_id} queued for delivery\n")
    missing = runner.invoke(main, ["redeliver", "--config", str(path), "evt_c_99"])
    assert missing.exit_code == 1
