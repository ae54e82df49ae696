"""The `metergate` command line: one click group, one subcommand per job."""

from __future__ import annotations

from pathlib import Path

import click

from metergate.config import ConfigError, load_config

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
