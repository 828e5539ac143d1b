"""The lock files of requirements/ agree with pyproject.toml, and installs use them.

``make lock`` writes them (uv pip compile --generate-hashes); these checks need no network:
every requirement is pinned at a version its specifier allows, every pin carries SHA-256
hashes, the runtime lock (the image) holds only what the service needs, the GPU lock has
onnxruntime-gpu instead of onnxruntime, and the Makefile and the Dockerfile install the locks
with ``--require-hashes``.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements"
RUNTIME_LOCK = REQUIREMENTS / "runtime.lock"
DEV_LOCK = REQUIREMENTS / "dev.lock"
GPU_IN = REQUIREMENTS / "gpu.in"
GPU_LOCK = REQUIREMENTS / "gpu.lock"
DEV_EXTRAS = ("test", "build", "bench")

_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


@dataclass
class Pin:
    requirement: Requirement
    version: str
    hashes: list[str] = field(default_factory=list)
    via: set[str] = field(default_factory=set)


def parse_lock(path: Path) -> dict[NormalizedName, Pin]:
    """The pins of a pip requirements file written with hashes and ``# via`` annotations."""
    pins: dict[NormalizedName, Pin] = {}
    current: Pin | None = None
    logical = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            text = stripped[1:].strip()
            if current is not None and text:
                # "# via a" or "# via" followed by "#   a" lines, under the pin they annotate.
                current.via.add(text[len("via"):].strip() if text.startswith("via") else text)
                current.via.discard("")
            continue
        logical += " " + stripped.removesuffix("\\")
        if stripped.endswith("\\") or not logical.strip():
            continue
        tokens, logical = logical.split(), ""
        assert not tokens[0].startswith("-"), f"{path.name}: an option in the lock: {tokens}"
        requirement = Requirement(tokens[0])
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{path.name}: {tokens[0]} is not pinned"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{path.name}: {name} pinned twice"
        current = pins[name] = Pin(requirement, specifier.version)
        for token in tokens[1:]:
            assert _HASH.fullmatch(token), f"{path.name}: {name}: unexpected {token!r}"
            current.hashes.append(token)
    assert pins, f"{path.name} pins nothing"
    return pins


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def runtime_requirements() -> list[Requirement]:
    return [Requirement(text) for text in project()["dependencies"]]


def dev_requirements() -> list[Requirement]:
    extras = project()["optional-dependencies"]
    return runtime_requirements() + [Requirement(text) for extra in DEV_EXTRAS
                                     for text in extras[extra]]


def gpu_requirements() -> list[Requirement]:
    return [Requirement(line) for line in GPU_IN.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


LOCKS = {
    "runtime": (RUNTIME_LOCK, runtime_requirements),
    "dev": (DEV_LOCK, dev_requirements),
    "gpu": (GPU_LOCK, gpu_requirements),
}


@pytest.fixture(scope="module", params=sorted(LOCKS))
def lock(request: pytest.FixtureRequest) -> tuple[str, dict[NormalizedName, Pin],
                                                  list[Requirement]]:
    path, requirements = LOCKS[request.param]
    return request.param, parse_lock(path), requirements()


def test_every_requirement_is_pinned_at_an_allowed_version(lock) -> None:
    name, pins, requirements = lock
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement} is not in the {name} lock: run `make lock`"
        assert SpecifierSet(str(requirement.specifier)).contains(pin.version, prereleases=True), \
            f"{name} lock: {requirement.name}=={pin.version} does not satisfy {requirement}: " \
            "run `make lock`"


def test_every_pin_has_hashes(lock) -> None:
    name, pins, _requirements = lock
    for package, pin in pins.items():
        assert pin.hashes, f"{name} lock: {package} has no --hash=sha256:"


def test_every_pin_is_needed(lock) -> None:
    """Each pin is a requirement, or (by its ``# via`` annotation) a dependency of one."""
    name, pins, requirements = lock
    needed = {canonicalize_name(requirement.name) for requirement in requirements}
    changed = True
    while changed:
        changed = False
        for package, pin in pins.items():
            parents = {canonicalize_name(parent) for parent in pin.via
                       if re.fullmatch(r"[A-Za-z0-9._-]+", parent)}
            if package not in needed and parents & needed:
                needed.add(package)
                changed = True
    assert set(pins) <= needed, f"{name} lock: not needed: {sorted(set(pins) - needed)}"


def test_dependencies_of_installed_pins_are_pinned(lock) -> None:
    """What each pinned package requires (extras included) is pinned too.

    Read from the installed distributions' metadata, for those installed at their pinned
    version (the virtualenv comes from the dev lock)."""
    name, pins, requirements = lock
    wanted: dict[NormalizedName, set[str]] = {package: set() for package in pins}
    for requirement in requirements:
        wanted.setdefault(canonicalize_name(requirement.name), set()).update(requirement.extras)
    checked = 0
    for package, extras in wanted.items():
        try:
            distribution = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            continue
        if package not in pins or distribution.version != pins[package].version:
            continue
        checked += 1
        for text in distribution.requires or []:
            dependency = Requirement(text)
            if dependency.marker is not None and not any(
                    dependency.marker.evaluate({"extra": extra}) for extra in extras | {""}):
                continue
            assert canonicalize_name(dependency.name) in pins, \
                f"{name} lock: {package} requires {dependency}, which is not pinned"
    if name != "gpu":
        assert checked, "no pinned package is installed at its pinned version"


def test_runtime_lock_has_no_development_packages() -> None:
    runtime = parse_lock(RUNTIME_LOCK)
    dev = parse_lock(DEV_LOCK)
    runtime_names = {canonicalize_name(r.name) for r in runtime_requirements()}
    development = {canonicalize_name(r.name) for r in dev_requirements()} - runtime_names
    assert {"pytest", "ruff", "mypy", "playwright"} <= development
    assert not development & set(runtime), sorted(development & set(runtime))
    assert set(runtime) < set(dev)


def test_locks_agree_on_shared_versions() -> None:
    """The dev and GPU locks are compiled against the runtime lock: the same versions."""
    runtime = parse_lock(RUNTIME_LOCK)
    for path in (DEV_LOCK, GPU_LOCK):
        pins = parse_lock(path)
        differ = {package: (runtime[package].version, pins[package].version)
                  for package in set(runtime) & set(pins)
                  if runtime[package].version != pins[package].version}
        assert not differ, f"{path.name} differs from runtime.lock: {differ}"


def test_gpu_lock_has_onnxruntime_gpu_only() -> None:
    gpu = parse_lock(GPU_LOCK)
    assert "onnxruntime-gpu" in gpu
    assert "onnxruntime" not in gpu
    assert "onnxruntime" in parse_lock(RUNTIME_LOCK)
    assert "onnxruntime-gpu" not in parse_lock(DEV_LOCK)


def test_gpu_in_is_the_runtime_requirements_with_onnxruntime_gpu() -> None:
    spec = importlib.util.spec_from_file_location("gpu_in", REQUIREMENTS / "gpu_in.py")
    assert spec and spec.loader
    gpu_in = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_in)
    assert [str(r) for r in gpu_requirements()] == \
        [str(Requirement(text)) for text in gpu_in.gpu_requirements()], "run `make lock`"
    expected = []
    for requirement in runtime_requirements():
        if canonicalize_name(requirement.name) == "onnxruntime":
            requirement.name = "onnxruntime-gpu"
        expected.append(str(requirement))
    assert [str(r) for r in gpu_requirements()] == expected


def _makefile_variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_]+)\s*:?=\s*(.*)$", text, re.MULTILINE))


def test_makefile_installs_the_dev_lock_with_hashes() -> None:
    text = (ROOT / "Makefile").read_text()
    variables = _makefile_variables(text)

    def expand(value: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda m: expand(variables[m.group(1)])
                      if m.group(1) in variables else m.group(0), value)

    # The virtualenv's recipe: its stamp changes with the lock, which it installs with hashes,
    # then the project itself without dependencies.
    rule = re.search(r"^\$\(STAMP\):(?P<prerequisites>.*)\n(?P<recipe>(\t.*\n)+)", text,
                     re.MULTILINE)
    assert rule, "no $(STAMP) rule in the Makefile"
    assert "requirements/dev.lock" in expand(rule["prerequisites"]).split()
    assert "requirements/dev.lock" in expand(variables["STAMP"])
    installs = [expand(line) for line in rule["recipe"].splitlines() if "pip install" in line]
    assert any(re.search(r"pip install .*--require-hashes -r requirements/dev\.lock(\s|$)", line)
               for line in installs), installs
    assert any(re.search(r"pip install .*--no-deps -e \.(\s|$)", line) for line in installs)
    for line in installs:
        # Only pip itself is installed without hashes; everything else from the lock.
        assert "--require-hashes" in line or "--no-deps" in line \
            or re.search(r"--upgrade pip$", line), line
    # make lock writes every lock file.
    lock = re.search(r"^lock:.*\n(?P<recipe>(\t.*\n)+)", text, re.MULTILINE)
    assert lock, "no lock target in the Makefile"
    recipe = expand(lock["recipe"])
    for path in (RUNTIME_LOCK, DEV_LOCK, GPU_IN, GPU_LOCK):
        assert str(path.relative_to(ROOT)) in recipe, path


def test_dockerfile_installs_the_runtime_lock_with_hashes() -> None:
    lines = [line.strip() for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    copied = [line for line in instructions if line.startswith("COPY ")]
    assert any("requirements/runtime.lock" in line for line in copied), copied
    installs = [line for line in instructions if "pip install" in line]
    assert any(re.search(r"pip install .*--require-hashes -r \S*requirements/runtime\.lock",
                         line) for line in installs), installs
    assert any(re.search(r"pip install .*--no-deps \.(\s|$)", line) for line in installs)
    for line in installs:
        assert "--require-hashes" in line or "--no-deps" in line, line
        assert not re.search(r"\s-e\s", line), line
