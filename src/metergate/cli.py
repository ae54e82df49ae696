"""The `metergate` command line: one click group, one subcommand per job."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import click

from metergate.config import ConfigError, GatewayConfig, load_config
from metergate.core.errors import NotFound, StorageUnavailable

__all__ = ["main"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@click.group()
@click.version_option(package_name="metergate", prog_name="metergate")
def main() -> None:
    """Meter API usage, enforce quotas and draw down prepaid credits."""


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
def check(file: Path) -> None:
    """Validate a config file (YAML, JSON or TOML).

    Prints a one-line summary and exits 0, or lists every problem as `path: message` on stderr
    and exits 1.
    """
    try:
        config = load_config(file)
    except ConfigError as exc:
        # The error's text is the report: a header naming the file, then `  path: message` lines.
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None
    counts = ", ".join(
        [
            _count(len(config.metrics), "metric"),
            _count(len(config.plans), "plan"),
            _count(len(config.customers), "customer"),
            _count(len(config.routes), "route"),
        ]
    )
    click.echo(f"{file}: valid ({counts})")


def _load_or_exit(path: Path) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(1) from None


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, help="Port of the metered proxy.")
@click.option("--admin-port", default=8081, show_default=True, help="Port of the admin API.")
@click.option("--no-worker", is_flag=True, help="Do not run the background worker here.")
def serve(config_path: Path, host: str, port: int, admin_port: int, no_worker: bool) -> None:
    """Run the reverse proxy, the admin API and the background worker."""
    from metergate.serve import serve as run_serve

    config = _load_or_exit(config_path)
    for p in (port, admin_port):
        if not _port_free(host, p):
            click.echo(f"metergate: cannot listen on {host}:{p}: the port is in use", err=True)
            raise SystemExit(1)
    background = None if no_worker else _worker_runner(config)

    def ready() -> None:
        click.echo(f"metergate: proxy on http://{host}:{port} -> {config.proxy.upstream}")
        click.echo(f"metergate: admin API on http://{host}:{admin_port} (OpenAPI: /openapi.json)")
        if config.admin.token is None:
            click.echo("metergate: admin.token is not set: the admin API refuses every call")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            run_serve(
                config,
                host=host,
                port=port,
                admin_port=admin_port,
                background=background,
                ready=ready,
            )
        )


def _worker_runner(config: GatewayConfig) -> Any:
    from metergate.worker import run_worker

    return run_worker


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
def worker(config_path: Path) -> None:
    """Run the background worker alone: webhooks, usage reports, period closes, hold expiry."""
    from metergate.meter import AsyncMeter
    from metergate.worker import run_worker

    config = _load_or_exit(config_path)

    async def run() -> None:
        meter = AsyncMeter(config)
        stop = asyncio.Event()
        click.echo(f"metergate: worker delivering to {len(config.webhooks)} webhook endpoint(s)")
        try:
            await run_worker(meter, stop)
        finally:
            await meter.aclose()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@main.command()
@click.option("--keep-running", is_flag=True, help="Leave the gateway up afterwards, for curl.")
def demo(keep_running: bool) -> None:
    """Start a sample upstream and the gateway on the embedded backend; walk a customer through."""
    from metergate.demo import run_demo

    try:
        raise SystemExit(asyncio.run(run_demo(keep_running=keep_running)))
    except KeyboardInterrupt:
        pass


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.option("--limit", default=20, show_default=True, help="How many events to list.")
def events(config_path: Path, limit: int) -> None:
    """List the newest outbox events and dead letters, one line each."""
    from metergate.core import directory
    from metergate.meter import Meter

    with Meter(_load_or_exit(config_path)) as meter:
        try:
            rows = meter.run(directory.events(meter.core, limit))
        except StorageUnavailable as exc:
            click.echo(f"metergate: storage is unavailable: {exc}", err=True)
            raise SystemExit(1) from None
    for row in rows:
        where = f" -> {row['destination']}: {row['reason']}" if row["status"] == "dead" else ""
        click.echo(f"{row['status']:6} {row['id']}  {row['type']}{where}")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(path_type=Path))
@click.argument("event_id")
def redeliver(config_path: Path, event_id: str) -> None:
    """Queue an event for delivery again (a dead letter only to the endpoint that gave up)."""
    from metergate.core import directory
    from metergate.meter import Meter

    with Meter(_load_or_exit(config_path)) as meter:
        try:
            meter.run(directory.redeliver(meter.core, event_id))
        except (NotFound, StorageUnavailable) as exc:
            click.echo(f"metergate: {exc}", err=True)
            raise SystemExit(1) from None
    click.echo(f"metergate: {event_id} queued for delivery")
