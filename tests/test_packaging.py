"""The environment files agree with pyproject.toml: the lock pins every package exactly and holds every declared
dependency; requirements/oldest.txt pins exactly the declared lower bounds (what `make test-oldest` tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), (
                f"{path.name}: not an exact pin: {line!r}"
            )
            name, version = line.split("==")
            out[_name(name)] = version
    return out


def _declared() -> dict[str, str]:
    """Every requirement of the project and its extras (self-references dropped): name -> specifier text."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += [r for r in extra if _name(r) != "adapterkit"]
    return {_name(r): r for r in reqs}


def test_lock_pins_every_declared_dependency_exactly():
    # the serve-ray extra's packages are pinned over the lock in requirements/ray.txt (`make test-ray`)
    lock = _pins(ROOT / "requirements" / "lock.txt") | _pins(ROOT / "requirements" / "ray.txt")
    missing = sorted(set(_declared()) - set(lock))
    assert not missing, f"requirements/lock.txt lacks {missing}: run `make lock`"
    assert lock["torch"] == "2.13.0", "the lock must keep torch at the local CPU wheel (constraints.txt)"


def test_oldest_pins_equal_the_declared_lower_bounds():
    declared = _declared()
    for name, version in _pins(ROOT / "requirements" / "oldest.txt").items():
        spec = declared[name]
        bound = re.search(r">=\s*([0-9][A-Za-z0-9.]*)", spec)
        assert bound and Version(bound.group(1)) == Version(version), (
            f"pyproject.toml declares {spec!r}, oldest.txt pins {version}"
        )
