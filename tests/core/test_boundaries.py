"""The core stays sans-I/O: it imports no network, storage or server library."""

import ast
from pathlib import Path

import metergate

CORE = Path(metergate.__file__).parent / "core"
FORBIDDEN = {
    "redis",
    "fakeredis",
    "asyncio",
    "socket",
    "starlette",
    "httpx",
    "uvicorn",
    "time",
    "hiredis",
}


def test_core_imports_nothing_that_does_io() -> None:
    """No module of metergate.core imports a network, storage, event-loop or clock library."""
    offenders = []
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_public_names_are_sorted_and_importable() -> None:
    """metergate.__all__ is sorted and every name in it exists."""
    assert list(metergate.__all__) == sorted(metergate.__all__)
    for name in metergate.__all__:
        assert hasattr(metergate, name), name


def test_admin_app_is_a_public_name() -> None:
    """`metergate.admin_app`, which the README and the SPEC document, is exported."""
    from metergate.admin import admin_app

    assert "admin_app" in metergate.__all__
    assert metergate.admin_app is admin_app
