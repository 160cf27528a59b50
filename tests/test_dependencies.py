"""Every third-party package the code imports is declared (pinned) in pyproject.toml.

A package that is only present because another dependency pulls it in (``transitions`` and ``websockets``
come with amqtt) vanishes or changes version when that dependency changes; an import of ours is declared by us.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("server", "broker_hooks", "bench", "scripts", "tests")
FIRST_PARTY = {*SCANNED}
# Import names of declared distributions that are not installed in every environment (the bench extra), so
# importlib.metadata cannot map them; every other name is mapped from the installed distributions.
NOT_ALWAYS_INSTALLED = {"matplotlib": "matplotlib"}


def third_party_imports(roots: tuple[str, ...] = SCANNED) -> dict[str, set[str]]:
    """Top-level third-party module names imported by absolute imports under ``roots`` -> files importing them."""
    found: dict[str, set[str]] = {}
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in FIRST_PARTY:
                        continue
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def declared_distributions() -> dict[str, str]:
    """Normalized distribution name -> its requirement line, over the dependencies and every extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    out: dict[str, str] = {}
    for line in lines:
        name = re.match(r"[A-Za-z0-9._-]+", line)
        assert name is not None, line
        out[normalize(name.group(0))] = line
    return out


def normalize(name: str) -> str:
    """PEP 503 normalized distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions_of(module: str) -> set[str]:
    """The normalized distributions that provide the top-level import name ``module``."""
    mapping = importlib.metadata.packages_distributions()
    names = mapping.get(module) or ([NOT_ALWAYS_INSTALLED[module]] if module in NOT_ALWAYS_INSTALLED else [])
    return {normalize(n) for n in names}


def test_every_imported_third_party_package_is_declared() -> None:
    declared = declared_distributions()
    undeclared = {}
    for module, files in third_party_imports().items():
        dists = distributions_of(module)
        # A namespace such as `google` is shared by several distributions: one declared provider is enough.
        if not dists & declared.keys():
            undeclared[module] = (sorted(dists), sorted(files)[:3])
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_declared_dependency_is_pinned_exactly() -> None:
    for name, line in declared_distributions().items():
        assert re.match(r"[A-Za-z0-9._-]+==[^,;\s]+(\s*;.*)?$", line), f"{name} is not pinned with ==: {line!r}"


def test_the_check_sees_an_undeclared_import() -> None:
    """The scan finds a direct import of a package that only arrives as someone else's dependency."""
    found = third_party_imports(("broker_hooks",))
    assert "transitions" in found, "the fork imports transitions: the scan must see it"
    declared = declared_distributions()
    assert distributions_of("transitions") & declared.keys()
    del declared["transitions"]
    assert not distributions_of("transitions") & declared.keys()
