"""What the package declares is what CI tests: the lowest versions, and the sdist."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's own dependency there
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

ROOT = Path(__file__).resolve().parent.parent


def lower_bounds() -> dict[str, Version]:
    """Every requirement's ``>=`` bound in pyproject.toml, the highest where a name recurs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    bounds: dict[str, Version] = {}
    for text in requirements:
        requirement = Requirement(text)
        for specifier in requirement.specifier:
            if specifier.operator == ">=":
                name = canonicalize_name(requirement.name)
                bounds[name] = max(bounds.get(name, Version("0")), Version(specifier.version))
    return bounds


def pins() -> dict[str, Version]:
    lines = (ROOT / ".ci" / "lowest.txt").read_text(encoding="utf-8").splitlines()
    found = (re.fullmatch(r"([\w.-]+)==([\w.]+)", line.strip()) for line in lines)
    return {canonicalize_name(m[1]): Version(m[2]) for m in found if m}


def test_the_lowest_versions_ci_installs_are_the_lower_bounds_pyproject_declares() -> None:
    bounds, pinned = lower_bounds(), pins()
    assert {"sqlalchemy", "redis", "sqlglot", "valkey", "pyramid"} <= pinned.keys()
    differ = {
        name: (str(bounds.get(name)), str(version))
        for name, version in pinned.items()
        if name != "psycopg-binary" and bounds.get(name) != version
    }
    assert not differ, f"pyproject.toml's bound, .ci/lowest.txt's pin: {differ}"


def test_the_sdist_carries_what_its_tests_need() -> None:
    """``make test`` runs from an unpacked sdist (CI builds one and runs part of it):
    MANIFEST.in must take the test support, the docs the tests read, and the examples."""
    manifest = (ROOT / "MANIFEST.in").read_text(encoding="utf-8")
    for needed in ("recursive-include tests", "recursive-include docs", "examples"):
        assert needed in manifest
