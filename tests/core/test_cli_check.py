"""Tests for `metergate check`, through click's runner and as a real `python -m metergate`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from metergate.cli import main
from metergate.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "gateway.yaml"
BROKEN = ROOT / "tests" / "configs" / "broken.yaml"
BAD = sorted((ROOT / "tests" / "configs" / "bad").iterdir())
TOKEN = "t0k3n-for-tests-0123456789"
VALID = "valid (5 metrics, 2 plans, 2 customers, 3 routes)"
BROKEN_REPORT = f"""\
{BROKEN}: invalid (4 errors)
  storage.timeout_ms: must be an integer, not 1.5
  plans.pro.assets.tokens.tiers[1].from: must be an integer, not 5000000.5
  routes[0].meter[0].cost: must be an integer or a mapping, not 'lots'
  ratelimit: unknown key 'ratelimit'
"""


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A click runner, with the admin token the example reads from the environment."""
    monkeypatch.setenv("METERGATE_ADMIN_TOKEN", TOKEN)
    return CliRunner()


def run_module(*args: str, token: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m metergate ARGS` in a child process and capture its output."""
    env = {k: v for k, v in os.environ.items() if k != "METERGATE_ADMIN_TOKEN"}
    if token:
        env["METERGATE_ADMIN_TOKEN"] = TOKEN
    return subprocess.run(
        [sys.executable, "-m", "metergate", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_check_accepts_the_example(runner: CliRunner) -> None:
    """A valid file prints one summary line on stdout and exits 0."""
    result = runner.invoke(main, ["check", str(EXAMPLE)])
    assert result.exit_code == 0
    assert result.stdout == f"{EXAMPLE}: {VALID}\n"
    assert result.stderr == ""


def test_check_counts_in_the_singular(tmp_path: Path) -> None:
    """The summary says `1 metric`, not `1 metrics`."""
    path = tmp_path / "one.yaml"
    path.write_text(
        "metrics: {calls: {type: Gauge}}\n"
        "plans: {basic: {assets: {calls: {tiers: [{from: 0, level: Normal, policy: Deny}]}}}}\n"
        "customers: {acme: {entitlement: {plan: basic}}}\n"
        "routes: [{path: /}]\n",
        encoding="utf-8",
    )
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.stdout == f"{path}: valid (1 metric, 1 plan, 1 customer, 1 route)\n"


def test_check_lists_every_error_of_a_broken_file(runner: CliRunner) -> None:
    """A broken file prints a header naming it and every `path: message` on stderr, exit 1."""
    result = runner.invoke(main, ["check", str(BROKEN)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == BROKEN_REPORT


@pytest.mark.parametrize("path", BAD, ids=[p.name for p in BAD])
def test_check_reports_each_bad_file_without_a_traceback(runner: CliRunner, path: Path) -> None:
    """Every bad rule file exits 1 with the loader's errors, one indented line each."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    result = runner.invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr == str(info.value) + "\n"
    assert result.stderr.startswith(f"{path}: invalid (")
    assert "Traceback" not in result.output


def test_check_reports_a_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    """A file that does not exist is a config error (exit 1), not a usage error or a crash."""
    missing = tmp_path / "nope.yaml"
    result = runner.invoke(main, ["check", str(missing)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"{missing}: invalid (1 error)\n  cannot read the file: No such file or directory\n"
    )


def test_check_names_a_missing_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking the example without its variable set names the variable and exits 1."""
    monkeypatch.delenv("METERGATE_ADMIN_TOKEN", raising=False)
    result = CliRunner().invoke(main, ["check", str(EXAMPLE)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"{EXAMPLE}: invalid (1 error)\n"
        "  admin.token: environment variable METERGATE_ADMIN_TOKEN is not set\n"
    )


def test_version_is_printed() -> None:
    """`--version` prints the program name and the installed version."""
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("metergate, version ")


def test_module_check_accepts_the_example() -> None:
    """`python -m metergate check` on the example exits 0 with the summary."""
    proc = run_module("check", str(EXAMPLE))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{EXAMPLE}: {VALID}\n", "")


def test_module_check_lists_every_error_of_a_broken_file() -> None:
    """`python -m metergate check` on a broken file exits 1 and prints every path on stderr."""
    proc = run_module("check", str(BROKEN))
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", BROKEN_REPORT)


def test_module_check_without_the_env_var_exits_1_without_a_traceback() -> None:
    """A real process reports the missing variable in one line and no traceback."""
    proc = run_module("check", str(EXAMPLE), token=False)
    assert proc.returncode == 1
    assert "METERGATE_ADMIN_TOKEN is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
