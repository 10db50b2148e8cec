"""The real Megatron-Bridge releases, and megatron-core releases with Megatron-LM's own loop, that the tests, demo
and benchmarks run on, installed from the package registry.

Two base virtual environments hold torch and what Bridge's checkpointing module needs at import time:
``.venvs/base`` (Python 3.11, torch 2.13.0 CPU, for 0.1.0a0 to 0.3.1 and megatron-core up to 0.16) and
``.venvs/base-py312`` (Python 3.12, torch 2.14.1, a CUDA build that runs on CPU, for Bridge 0.4.0 and later
with megatron-core 0.17 to 0.19, and for an old release as NeMo's Python 3.12 images run it). This package
comes from the checkout, on ``PYTHONPATH``. Each megatron-core line and each Megatron-Bridge release is
installed on its own with ``pip install --no-deps --target``, and a release runs as a base interpreter with
its Bridge and its megatron-core on ``PYTHONPATH``. ``megatron`` is a namespace package, so the two merge; each
target keeps its distribution metadata. Bridge wheels are pure Python, so one target serves both Pythons;
megatron-core has a compiled helper, so it has a target per Python. Swapping a small Bridge wheel costs
seconds, where an environment per release costs minutes and gigabytes.

Run it directly to build them all: ``python3 tools/release_envs.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENVS_DIR = REPO / ".venvs"
# One file for every environment: its markers pin torch 2.13.0 (the local CPU wheel) under Python 3.11 and
# 2.14.1 under 3.12, so that no resolver swaps torch for another multi-GB build.
CONSTRAINTS = REPO / "constraints.txt"
# A stand-in for Transformer Engine (CUDA only), which the fixed releases (0.3.0 and later) import at module level.
TE_STANDIN = REPO / "tests" / "gpu_standins"

# What Megatron-Bridge's checkpointing module needs at import time; the releases' GPU-only requirements are
# left out. triton and nvidia-modelopt are what megatron-core 0.16 and later import on that path;
# megatron-energon what Bridge 0.4 and later do.
BASE_REQUIREMENTS = (
    "numpy<2",
    "packaging",
    "wrapt",
    "pytest",
    "pytest-xdist",
    "psutil",
    "rich",
    "transformers",
    "omegaconf",
    "einops",
    "datasets",
    "six",
    "tensorboard",
    "pyyaml",
    "triton",
    "nvidia-modelopt",
    "ruff",
)
# The local CPU wheel; every other torch the environments take is a CUDA build of several GB.
CPU_TORCH = "torch==2.13.0"
PYTHON_LINES = {
    "3.11": (CPU_TORCH,),
    "3.12": ("torch==2.14.1", "pyarrow", "megatron-energon"),
}
# megatron-core before 0.13 writes checkpoints with torch's private _write_item as torch 2.6 has it (later torch
# adds a parameter): a Megatron-LM tree that old runs in a Python 3.11 environment of its own with torch 2.6.0 (the
# registry's CUDA build, run on CPU), built only when the tests are pointed at such a tree.
OLD_TREE_TORCH = "2.6.0"
# Free disk a base environment needs while pip installs it, in GB: what it holds once built (2.7 GB with the
# CPU torch, 6.2 GB with a CUDA build) and room for pip to unpack the largest wheels beside it.
BASE_DISK_NEEDED_GB = {"cpu": 4, "cuda": 10}


def base_dir(python_line: str, torch: str | None = None) -> Path:
    name = "base" if python_line == "3.11" else f"base-py{python_line.replace('.', '')}"
    return ENVS_DIR / (f"{name}-torch{torch}" if torch else name)


def base_python(python_line: str, torch: str | None = None) -> Path:
    return base_dir(python_line, torch) / "bin" / "python"


BASE = base_dir("3.11")


def find_python(python_line: str) -> Path | None:
    """A CPython of ``python_line`` (e.g. "3.12") on this machine: pyenv's, or python3.X on PATH."""
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{python_line}.*/bin/python3"), reverse=True):
        if re.fullmatch(rf"{re.escape(python_line)}\.\d+", candidate.parent.parent.name):
            return candidate
    on_path = shutil.which(f"python{python_line}")
    return Path(on_path) if on_path else None


# The Multi-Storage Client, a test dependency only: installed with what it requires into a folder of its own,
# on PYTHONPATH only for the object-storage tests, since megatron-core reads every checkpoint through it
# (MultiStorageClientFeature) wherever it can import it.
MSC_REQUIREMENT = "multi-storage-client==1.3.1"


@dataclass(frozen=True)
class Stack:
    """A stack built on megatron-core with checkpoint code of its own (verl, ms-swift), installed as the tests need it:
    its wheel alone (``--no-deps``), beside what importing its checkpointing module takes (``imports``, into one
    folder per Python line that its releases share), never its GPU-only or serving requirements.

    verl's manager imports ray (through ``verl.protocol``) and its data and model helpers; ms-swift's loop imports
    ModelScope's hub, peft and, from 4.1, mcore_bridge, which needs Transformer Engine at import
    (``tests/jobs/stack_imports.py`` stands in for it in the tests). Pinned, so that a later release on the registry
    cannot change what the tests import.
    """

    distribution: str
    loop: str
    python_line: str
    imports: tuple[str, ...]
    # What releases before ``earlier_from`` import in place of the environment's own (transformers 4 for verl before
    # 0.9, whose newer releases require transformers 5, and which the Python 3.12 environment has).
    earlier_imports: tuple[str, ...] = ()
    earlier_from: str = "0"

    @property
    def imports_dir(self) -> Path:
        return ENVS_DIR / f"py{self.python_line}" / f"{self.distribution}-imports"

    @property
    def earlier_imports_dir(self) -> Path:
        return ENVS_DIR / f"py{self.python_line}" / f"{self.distribution}-imports-before-{self.earlier_from}"

    def imports_dirs(self, version: str) -> list[Path]:
        earlier = _release_tuple(version) < _release_tuple(self.earlier_from) and self.earlier_imports
        return [self.earlier_imports_dir, self.imports_dir] if earlier else [self.imports_dir]


def _release_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


VERL = Stack(
    "verl",
    "verl",
    "3.12",
    (
        "ray==2.60.0",
        "msgpack==1.2.4",
        "tensordict==0.10.0",
        "pyvers==0.2.3",
        "cloudpickle==3.1.3",
        "peft==0.21.2",
        "accelerate==1.16.0",
        "codetiming==1.4.0",
        "orjson==3.13.0",
        "setuptools==80.10.2",  # pkg_resources, which verl before 0.5 imports
    ),
    earlier_imports=("transformers==4.57.6", "huggingface-hub==0.36.2"),
    earlier_from="0.9",
)
MS_SWIFT = Stack(
    "ms-swift",
    "ms-swift",
    "3.11",
    (
        "modelscope==1.40.2",
        "modelscope-hub==0.5.1",
        "cryptography==50.0.2",
        "cffi==2.1.1",
        "pycparser==3.12",
        "peft==0.21.2",
        "accelerate==1.16.0",
        "json-repair==0.64.6",
        "mcore-bridge==1.6.5",
    ),
)
STACKS = {stack.distribution: stack for stack in (VERL, MS_SWIFT)}


@dataclass(frozen=True)
class Release:
    """A real Megatron-Bridge release paired with a megatron-core it imports with, under one Python line, or
    (``bridge`` None) a megatron-core release alone, whose ``megatron.training`` is Megatron-LM's own loop;
    ``with_msc``: with the Multi-Storage Client importable, as images that keep checkpoints on object storage;
    ``source``: a Megatron-LM source tree, whose own ``megatron.core`` (release ``core``) and ``megatron.training``
    are imported from it instead of a wheel; ``torch``: a torch release other than the Python line's own;
    ``stack``: a verl or ms-swift release (distribution, version) running on the megatron-core release ``core``."""

    bridge: str | None
    core: str
    python_line: str
    with_msc: bool = False
    source: Path | None = None
    torch: str | None = None
    stack: tuple[str, str] | None = None

    @property
    def has_upstream_fix(self) -> bool:
        """Whether it is a Bridge release with PR #2092 (0.3.0 and later); only those import Transformer Engine
        at module level."""
        return self.bridge is not None and not self.bridge.startswith(("0.1.", "0.2."))

    @property
    def loop(self) -> str:
        """The rank job's name for the training loop it runs."""
        if self.stack is not None:
            return STACKS[self.stack[0]].loop
        return "megatron-bridge" if self.bridge is not None else "megatron-lm"

    @property
    def name(self) -> str:
        if self.stack is not None:
            distribution, version = self.stack
            return f"{distribution}-{version}"
        if self.source is not None:
            return f"megatron-lm-source-{self.core}"
        if self.bridge is None:
            return f"megatron-lm-{self.core}"
        name = f"bridge-{self.bridge}"
        if DEFAULT_CORE.get(self.bridge) != self.core:
            name += f"-core-{self.core}"
        if self.python_line != default_python_line(self.bridge):
            name += f"-py{self.python_line.replace('.', '')}"
        return f"{name}-msc" if self.with_msc else name

    @property
    def python(self) -> Path:
        return base_python(self.python_line, self.torch)

    @property
    def pythonpath(self) -> list[Path]:
        paths = [self.source if self.source is not None else core_dir(self.core, self.python_line)]
        if self.bridge is not None:
            paths.insert(0, target_dir("bridge", self.bridge))
        if self.stack is not None:
            distribution, version = self.stack
            paths[:0] = [stack_dir(distribution, version), *STACKS[distribution].imports_dirs(version)]
        if self.with_msc:
            paths.append(msc_dir(self.python_line))
        return [*paths, TE_STANDIN] if self.has_upstream_fix else paths

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with this checkout and this release on ``PYTHONPATH``.

        The package comes from this checkout, not an install, so that the base environment holds what a
        training image holds and the install tests can add the package to it as a user would. Under the CUDA
        build of torch, megatron-core 0.15 compiles an extension at import, which fails without an arch list.
        Bridge 0.5 and later add the short hash of the git checkout they sit in to their version, which here
        would be this repository's: ``NO_VCS_VERSION`` is their switch for that.
        """
        environment = dict(os.environ if base is None else base)
        environment["PYTHONPATH"] = os.pathsep.join(str(path) for path in (REPO, *self.pythonpath))
        environment["NO_VCS_VERSION"] = "1"
        if self.python_line != "3.11" or self.torch:
            environment.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        return environment


def target_dir(kind: str, version: str) -> Path:
    return ENVS_DIR / f"{kind}-{version}"


def core_dir(version: str, python_line: str) -> Path:
    """megatron-core has a compiled helper per Python: one target per Python line."""
    return target_dir("core", version) if python_line == "3.11" else ENVS_DIR / f"py{python_line}" / f"core-{version}"


def stack_dir(distribution: str, version: str) -> Path:
    """A verl or ms-swift wheel, pure Python: one target serves every Python line."""
    return target_dir(distribution, version)


def msc_dir(python_line: str) -> Path:
    return ENVS_DIR / f"py{python_line}" / MSC_REQUIREMENT.replace("==", "-")


def default_python_line(bridge: str) -> str:
    return "3.12" if bridge in PYTHON_312_RELEASES else "3.11"


# Every Megatron-Bridge release on the registry, with the megatron-core it was built for.
DEFAULT_CORE = {
    "0.1.0a0": "0.13.1",
    **{f"0.1.0rc{n}": "0.14.0" for n in range(5)},
    **{f"0.2.0rc{n}": "0.14.0" for n in range(3)},
    **{f"0.2.0rc{n}": "0.15.3" for n in range(3, 7)},
    "0.3.0": "0.16.1",
    "0.3.1": "0.16.1",
    **{f"0.4.{n}": "0.17.1" for n in range(3)},
    **{f"0.5.{n}": "0.18.2" for n in range(2)},
    "0.6.0": "0.19.2",
    "0.6.2": "0.19.2",
}
# Bridge 0.4.0 and later, and megatron-core 0.17 and later, require Python 3.12.
PYTHON_312_RELEASES = tuple(bridge for bridge in DEFAULT_CORE if not bridge.startswith(("0.1.", "0.2.", "0.3.")))
MATRIX = tuple(Release(bridge, core, default_python_line(bridge)) for bridge, core in DEFAULT_CORE.items())
# An old release with a megatron-core newer than it was built for, which brings its own graph-safe helpers.
OLD_ON_NEWER_CORE = Release("0.2.0rc6", "0.16.1", "3.11")
# An old release under Python 3.12 and torch 2.14.1, as NeMo's 25.xx images run it.
OLD_ON_PYTHON_312 = Release("0.2.0rc6", "0.15.3", "3.12")
# An old and a fixed release with the Multi-Storage Client, for checkpoints on object storage (msc://).
OLD_WITH_MSC = Release("0.2.0rc6", "0.15.3", "3.11", with_msc=True)
FIXED_WITH_MSC = Release("0.3.1", "0.16.1", "3.11", with_msc=True)
# Megatron-LM's own loop: every megatron-core line that ships megatron.training (0.17 and later, Python 3.12).
MEGATRON_LM = tuple(Release(None, core, "3.12") for core in ("0.17.1", "0.18.2", "0.19.2"))
# Every verl release from 0.4.1 and every ms-swift 4.x on the registry, each on a megatron-core it runs with: verl
# (Python 3.12, as its newer releases require) on 0.15.3 with transformers 4 before 0.9, on 0.19.2 with the
# environment's transformers 5 from 0.9 (which asks for 5.5.3 or later); ms-swift on 0.16.1 (4.0 handles
# megatron-core 0.13 to 0.16, 4.6 requires 0.16 or later).
VERL_RELEASES = tuple(
    Release(None, "0.15.3" if _release_tuple(version) < (0, 9) else "0.19.2", "3.12", stack=("verl", version))
    for version in ("0.4.1", "0.5.0", "0.6.0", "0.6.1", "0.7.0", "0.7.1", "0.8.0", "0.9.0", "0.9.1")
)
MS_SWIFT_RELEASES = tuple(
    Release(None, "0.16.1", "3.11", stack=("ms-swift", version))
    for version in (
        *(f"4.0.{n}" for n in range(5)),
        *(f"4.1.{n}" for n in range(4)),
        *(f"4.2.{n}" for n in range(4)),
        *(f"4.3.{n}" for n in range(3)),
        *(f"4.4.{n}" for n in range(3)),
        *(f"4.5.{n}" for n in range(4)),
        "4.6.0",
    )
)
RELEASES = {
    release.name: release
    for release in (
        *MATRIX,
        OLD_ON_NEWER_CORE,
        OLD_ON_PYTHON_312,
        OLD_WITH_MSC,
        FIXED_WITH_MSC,
        *MEGATRON_LM,
        *VERL_RELEASES,
        *MS_SWIFT_RELEASES,
    )
}
# A Megatron-LM source tree to test the package against (a checkout of an upstream tag, or a fork): its root, the
# folder that holds megatron/. Trees are never installed or committed here; the tests only point at one.
MEGATRON_LM_SOURCE_VARIABLE = "MEGATRON_LM_SOURCE"
_CORE_VERSION_PART = re.compile(r"^(MAJOR|MINOR|PATCH) = (\d+)$", re.MULTILINE)


def megatron_lm_source(root: str | None = None) -> Release | None:
    """The Megatron-LM tree at ``root`` (default: ``$MEGATRON_LM_SOURCE``) as a release, in the base environment
    its megatron-core fits (Python 3.12 from 0.17, as the wheels; torch 2.6 before 0.13); None when no tree is
    named. The version is read from the tree's own ``megatron/core/package_info.py`` as text."""
    root = root or os.environ.get(MEGATRON_LM_SOURCE_VARIABLE)
    if not root:
        return None
    source = Path(root).resolve()
    package_info = source / "megatron" / "core" / "package_info.py"
    if not (source / "megatron" / "training" / "checkpointing.py").is_file() or not package_info.is_file():
        raise RuntimeError(f"{source}: not a Megatron-LM source tree (no megatron/training/checkpointing.py)")
    parts = dict(_CORE_VERSION_PART.findall(package_info.read_text()))
    core = ".".join(parts[part] for part in ("MAJOR", "MINOR", "PATCH"))
    line = (int(parts["MAJOR"]), int(parts["MINOR"]))
    python_line = "3.12" if line >= (0, 17) else "3.11"
    return Release(None, core, python_line, source=source, torch=OLD_TREE_TORCH if line < (0, 13) else None)


# One old release of each signature family (get_rng_state; _load_global_dist_base_checkpoint), the old release
# on the newer megatron-core and under Python 3.12: the resume tests run on each.
SIGNATURE_FAMILIES = {
    "(dp_random_init); cfg": "bridge-0.1.0a0",
    "(dp_random_init); ckpt_cfg": "bridge-0.2.0rc2",
    "(dp_random_init, ckpt_format)": "bridge-0.2.0rc6",
    "newer core": OLD_ON_NEWER_CORE.name,
    "python 3.12": OLD_ON_PYTHON_312.name,
}
# One fixed release of each family: the resume tests of the stored-layout load run on each.
FIXED_FAMILIES = {"0.3.x": "bridge-0.3.1", "0.4.x": "bridge-0.4.2", "0.5.x/0.6.x": "bridge-0.6.2"}
# The test runner's own interpreter runs with this one: an old release, the package's main target.
RUNNER = RELEASES["bridge-0.2.0rc6"]


def _pip(*args: str, python: Path) -> None:
    command = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    subprocess.run(command, check=True)


def _check_disk(directory: Path, needed_gb: int) -> None:
    """Fail before pip starts, naming the space, rather than with pip's ENOSPC halfway through a torch install."""
    directory.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(directory).free / 2**30
    if free_gb < needed_gb:
        raise SystemExit(
            f"{directory}: {free_gb:.1f} GB free, and building this environment needs about {needed_gb} GB; "
            "free some disk (old clones' .venvs folders are the usual culprits) and run again"
        )


def _is_current(directory: Path, spec: list[str]) -> bool:
    marker = directory / ".bridge-rng-patch-env"
    return marker.exists() and marker.read_text() == _digest(spec)


def _mark(directory: Path, spec: list[str]) -> None:
    (directory / ".bridge-rng-patch-env").write_text(_digest(spec))


def _digest(spec: list[str]) -> str:
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def ensure_base(python_line: str = "3.11", torch: str | None = None) -> None:
    """The base environment of a Python line, with its own torch or, where ``torch`` is given, that release (the
    constraints' torch pins then left out)."""
    torch_pin, *line_requirements = PYTHON_LINES[python_line]
    requirements = [f"torch=={torch}" if torch else torch_pin, *line_requirements, *BASE_REQUIREMENTS]
    constraints = CONSTRAINTS.read_text()
    if torch:
        constraints = "".join(line for line in constraints.splitlines(keepends=True) if not line.startswith("torch"))
    directory = base_dir(python_line, torch)
    spec = [*requirements, constraints, "bridge_rng_patch not installed"]
    if _is_current(directory, spec):
        return
    interpreter = find_python(python_line)
    if interpreter is None:
        raise RuntimeError(f"no Python {python_line} on this machine (pyenv's, or python{python_line} on PATH)")
    print(f"building {directory}: Python {python_line}, {requirements[0]} and what Bridge imports", flush=True)
    shutil.rmtree(directory, ignore_errors=True)
    _check_disk(ENVS_DIR, BASE_DISK_NEEDED_GB["cpu" if requirements[0] == CPU_TORCH else "cuda"])
    subprocess.run([str(interpreter), "-m", "venv", str(directory)], check=True)
    constraints_file = directory / "constraints.txt"
    constraints_file.write_text(constraints)
    _pip("-c", str(constraints_file), *requirements, python=base_python(python_line, torch))
    _mark(directory, spec)


def ensure_target(kind: str, version: str, python_line: str = "3.11") -> None:
    """``megatron-core`` or ``megatron-bridge`` at ``version`` alone in a folder of its own, with its metadata."""
    directory = core_dir(version, python_line) if kind == "core" else target_dir(kind, version)
    spec = [kind, version]
    if _is_current(directory, spec):
        return
    print(f"installing megatron-{kind} {version} into {directory}", flush=True)
    package = f"megatron-{kind}=={version}"
    _pip("--no-deps", "--upgrade", "--target", str(directory), package, python=base_python(python_line))
    _mark(directory, spec)


def ensure_msc(python_line: str) -> None:
    directory = msc_dir(python_line)
    if _is_current(directory, [MSC_REQUIREMENT]):
        return
    print(f"installing {MSC_REQUIREMENT} and what it requires into {directory}", flush=True)
    _pip(
        "-c",
        str(CONSTRAINTS),
        "--upgrade",
        "--target",
        str(directory),
        MSC_REQUIREMENT,
        python=base_python(python_line),
    )
    _mark(directory, [MSC_REQUIREMENT])


def ensure(release: Release) -> Release:
    ensure_base(release.python_line, release.torch)
    if release.source is None:
        ensure_target("core", release.core, release.python_line)
    if release.bridge is not None:
        ensure_target("bridge", release.bridge, release.python_line)
    if release.with_msc:
        ensure_msc(release.python_line)
    if release.stack is not None:
        ensure_stack(*release.stack)
    return release


def ensure_stack(distribution: str, version: str) -> None:
    """A verl or ms-swift release alone in a folder of its own, and what importing its checkpointing module takes."""
    stack = STACKS[distribution]
    python = base_python(stack.python_line)
    for directory, imports in ((stack.imports_dir, stack.imports), (stack.earlier_imports_dir, stack.earlier_imports)):
        if directory in stack.imports_dirs(version) and not _is_current(directory, list(imports)):
            print(f"installing what {distribution}'s checkpointing imports into {directory}", flush=True)
            shutil.rmtree(directory, ignore_errors=True)
            _pip("--no-deps", "--target", str(directory), *imports, python=python)
            _mark(directory, list(imports))
    directory = stack_dir(distribution, version)
    if not _is_current(directory, [distribution, version]):
        print(f"installing {distribution} {version} into {directory}", flush=True)
        _pip("--no-deps", "--upgrade", "--target", str(directory), f"{distribution}=={version}", python=python)
        _mark(directory, [distribution, version])


def ensure_all() -> None:
    for release in RELEASES.values():
        ensure(release)


if __name__ == "__main__":
    names = sys.argv[1:] or list(RELEASES)
    for name in names:
        ensure(RELEASES[name])
    print(os.linesep.join(names))
