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


def _private(name: str) -> bool:
    """Whether a dotted name has a private (underscore, not dunder) part."""
    return any(
        part.startswith("_") and not (part.startswith("__") and part.endswith("__"))
        for part in name.split(".")
    )


def test_no_module_uses_another_packages_private_names() -> None:
    """No module of metergate imports a private module or name of another package, reaches one as
    an attribute of an imported package, or fetches one with getattr: their internals are not an
    API, and change under a new release."""
    offenders = []
    for path in sorted(Path(metergate.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(CORE.parent)
        external: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "metergate":
                        continue
                    external.add((alias.asname or alias.name).split(".")[0])
                    if _private(alias.name):
                        offenders.append(f"{where}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in ("metergate", "__future__"):
                    continue
                for alias in node.names:
                    external.add(alias.asname or alias.name)
                    if _private(f"{node.module}.{alias.name}"):
                        offenders.append(f"{where}: from {node.module} import {alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in external
                and _private(node.attr)
            ):
                offenders.append(f"{where}: {node.value.id}.{node.attr}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
            ):
                offenders.append(f"{where}: {node.func.id}(..., {node.args[1].value!r})")
    assert offenders == []


def test_admin_app_is_a_public_name() -> None:
    """`metergate.admin_app`, which the README and the SPEC document, is exported."""
    from metergate.admin import admin_app

    assert "admin_app" in metergate.__all__
    assert metergate.admin_app is admin_app
