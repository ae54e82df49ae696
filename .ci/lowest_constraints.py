#!/usr/bin/env python3
"""Print a pip constraints file pinning every dependency of pyproject.toml to its lower bound.

`name[extra]>=X,<Y ; marker` becomes `name==X ; marker`: constraints take no extras, and keep the
marker so that a platform-only dependency stays platform-only. The runtime dependencies are always
included; `--extra NAME` adds an optional-dependency group (repeatable). CI pins the runtime
dependencies only, what a user's installer may pick: the test tools' own lowest releases do not
install together with today's releases of their dependencies, which is their business, not ours.
A requirement without a lower bound (`name`, `name<2`) is left out: the installer's newest allowed
version is all there is to test. A name pinned by two groups at different lower bounds gets the
higher one, which is what an installer honouring both declarations would pick at the least.

`--check` compares the pins with what is installed in the running environment instead, and fails
naming every dependency that is not at its lower bound (a bound raised by another dependency's
requirement, say, so that the run would not test the declared one).

Standard library only, so that it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

# name, optional [extras], version specifiers, optional `; marker` (PEP 508, without URLs).
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[(?P<extras>[^\]]*)\])?"
    r"\s*(?P<specs>[^;]*?)\s*(?:;\s*(?P<marker>.+?))?\s*$"
)
_LOWER = re.compile(r"^(?:>=|==|~=)\s*(?P<version>[^\s,*]+)$")


def canonical(name: str) -> str:
    """PEP 503 normalized name: `Types_PyYAML` and `types-pyyaml` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _key(version: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key good enough to compare two release versions (`6.100` > `6.99`)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"[.+-]", version)
    )


def lower_bound(requirement: str) -> tuple[str, str, str | None] | None:
    """(name, lowest version, marker) of one requirement, or None when it has no lower bound."""
    match = _REQUIREMENT.match(requirement)
    if match is None:
        raise ValueError(f"cannot parse the requirement {requirement!r}")
    lowest = None
    for spec in filter(None, (s.strip() for s in match["specs"].split(","))):
        found = _LOWER.match(spec)
        if found is not None and (lowest is None or _key(found["version"]) > _key(lowest)):
            lowest = found["version"]
    if lowest is None:
        return None
    return match["name"], lowest, match["marker"]


def constraints(pyproject: Path, extras: list[str]) -> list[str]:
    """The constraint lines for the runtime dependencies and the named extras."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    groups = project.get("optional-dependencies", {})
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in groups:
            raise SystemExit(f"{pyproject}: no optional-dependencies group {extra!r}")
        requirements += groups[extra]
    pins: dict[tuple[str, str | None], tuple[str, str]] = {}
    for requirement in requirements:
        found = lower_bound(requirement)
        if found is None:
            continue
        name, version, marker = found
        key = (canonical(name), marker)
        if key not in pins or _key(version) > _key(pins[key][1]):
            pins[key] = (name, version)
    lines = []
    for (_, marker), (name, version) in sorted(pins.items()):
        lines.append(f"{name}=={version}" + (f" ; {marker}" if marker else ""))
    return lines


def _release(version: str) -> tuple[int | str, ...]:
    """`0.40` and `0.40.0` are one release: compare without trailing zero components."""
    parts: list[int | str] = [int(p) if p.isdigit() else p for p in re.split(r"[.]", version)]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def check(lines: list[str]) -> list[str]:
    """The pins (without a marker) that the running environment does not satisfy exactly."""
    problems = []
    for line in lines:
        if " ; " in line:
            continue  # platform-dependent: not worth evaluating markers by hand
        name, _, wanted = line.partition("==")
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed (wanted {wanted})")
            continue
        if _release(found) != _release(wanted):
            problems.append(f"{name}: {found} installed, the lower bound is {wanted}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[], help="an extra to include")
    parser.add_argument("--check", action="store_true", help="compare with what is installed")
    args = parser.parse_args(argv)
    lines = constraints(args.pyproject, args.extra)
    if args.check:
        problems = check(lines)
        for problem in problems:
            print(f"not at its lower bound: {problem}", file=sys.stderr)
        if not problems:
            print(f"all {len(lines)} pinned dependencies are at their lower bounds")
        return 1 if problems else 0
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
