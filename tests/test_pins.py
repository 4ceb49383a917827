"""constraints.txt pins every dependency pyproject.toml declares, so CI installs a tested set."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_declared_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for extra in ("cpu", "dev", "serve"):  # what CI installs; gpu/tensorrt need a GPU machine
        declared |= {_name(r) for r in project["optional-dependencies"][extra]}
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    assert "torch" not in pins, "torch is pinned by scripts/setup.sh and never replaced"
    unpinned = sorted(declared - {"torch"} - {n for n, v in pins.items() if v})
    assert not unpinned, f"add these to constraints.txt (scripts/update-constraints.sh): {unpinned}"


def test_the_floors_file_pins_exactly_the_declared_floors():
    """constraints-floors.txt is what proves pyproject.toml's floors: the two must name the same versions."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in (ROOT / "constraints-floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            floors[_name(name)] = Version(version.strip())
    extras = project["optional-dependencies"]
    for text in [*project["dependencies"], *extras["cpu"], *extras["tensorrt"]]:
        requirement = Requirement(text)
        if requirement.name in ("torch", "tensorrt"):
            continue  # torch is installed separately, its floor read from its API (README); TensorRT is faked
        # (polygraphy is real: the TensorRT fakes build through it)
        lower = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        assert lower and floors.get(_name(requirement.name)) == lower[0], (text, floors.get(_name(requirement.name)))


def test_the_gpu_wheel_list_pins_what_constraints_pins():
    """scripts/gpu-wheels.txt (wheels for an air-gapped GPU image) moves with constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    for line in (ROOT / "scripts" / "gpu-wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert pins.get(_name(name)) == version.strip(), line


def test_the_gpu_wheel_list_names_what_its_wheels_need():
    """The list is installed with --no-deps on Python 3.12: whatever a listed package needs there is
    listed too or comes with a package the image has (as its header names them; their needs read from
    this environment's metadata). importlib_metadata needs lazy-importer below Python 3.15."""
    import importlib.metadata

    from packaging.requirements import Requirement

    text = (ROOT / "scripts" / "gpu-wheels.txt").read_text()
    listed = {_name(line) for line in text.splitlines() if line.strip() and not line.startswith("#")}
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    image = re.search(r"image \(([^)]*)\)", header)
    assert image, "the header names what the image has"
    python_312 = {"python_version": "3.12", "python_full_version": "3.12.3", "extra": ""}

    def needs(name: str) -> set[str]:
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # not installed here: its needs unknown
            return set()
        return {_name(str(r)) for r in map(Requirement, requirements)
                if r.marker is None or r.marker.evaluate(python_312)}

    has = set()
    todo = [_name(n) for n in image.group(1).replace(",", " ").split()] + ["ml-dtypes", "onnxruntime-gpu"]
    while todo:
        name = todo.pop()
        if name not in has:
            has.add(name)
            todo.extend(needs(name))
    for name in sorted(listed):
        assert needs(name) <= listed | has, f"{name} needs {sorted(needs(name) - listed - has)}, not in scripts/gpu-wheels.txt"
