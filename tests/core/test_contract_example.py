"""The contract's example configuration loads as it is, and `metergate check` accepts it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from metergate import load_config
from metergate.cli import main

EXAMPLE = Path(__file__).parent.parent / "configs" / "contract_example.yaml"


def test_the_contract_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every section of the contract's example is accepted: allowances, idempotency, refund_on,
    body costs with a reserve read from the request, proxy deadlines, webhooks."""
    monkeypatch.setenv("METERGATE_ADMIN_TOKEN", "dev-token-0123456789")
    config = load_config(EXAMPLE)
    assert config.allowances.enabled is True
    assert config.allowances.flush_ms == 250
    assert config.allowances.ttl == 2000
    assert config.idempotency.max_response_bytes == 1048576
    chat = config.routes[0]
    assert chat.path == "/v1/chat/completions"
    tokens = chat.meter[1].cost
    assert not isinstance(tokens, int)
    assert tokens.response_json == "/usage/total_tokens"


def test_check_accepts_the_contract_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """`metergate check` validates the contract's example without an error."""
    monkeypatch.setenv("METERGATE_ADMIN_TOKEN", "dev-token-0123456789")
    result = CliRunner().invoke(main, ["check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
