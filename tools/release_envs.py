"""The real Megatron-Bridge releases the tests, demo and benchmark run on, installed from the package registry.

One virtual environment (``.venvs/base``) holds torch 2.13.0 (CPU) and what Bridge's checkpointing module
needs at import time; this package comes from the checkout, on ``PYTHONPATH``. Each megatron-core line and
each Megatron-Bridge release is installed on its own with ``pip install --no-deps --target``
(``.venvs/core-*``, ``.venvs/bridge-*``), and a release runs as the base interpreter with its Bridge and its
megatron-core on ``PYTHONPATH``. ``megatron`` is a namespace package, so the two merge; each target keeps its
distribution metadata. Swapping a small pure-Python Bridge wheel costs seconds, where an environment per
release costs minutes and gigabytes.

Run it directly to build them all: ``python3 tools/release_envs.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENVS_DIR = REPO / ".venvs"
CONSTRAINTS = REPO / "constraints.txt"
# A stand-in for Transformer Engine (CUDA only), which Megatron-Bridge 0.3.x imports unconditionally.
TE_STANDIN = REPO / "tests" / "gpu_standins"

# What Megatron-Bridge's checkpointing module needs at import time; the releases' GPU-only requirements are
# left out. triton and nvidia-modelopt are what megatron-core 0.16 imports on that path.
BASE_REQUIREMENTS = (
    "torch==2.13.0",
    "numpy<2",
    "packaging",
    "wrapt",
    "pytest",
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
BASE = ENVS_DIR / "base"
BASE_PYTHON = BASE / "bin" / "python"


@dataclass(frozen=True)
class Release:
    """A real Megatron-Bridge release paired with a megatron-core it imports with."""

    bridge: str
    core: str
    has_upstream_fix: bool

    @property
    def name(self) -> str:
        paired_as_built = DEFAULT_CORE[self.bridge] == self.core
        return f"bridge-{self.bridge}" if paired_as_built else f"bridge-{self.bridge}-core-{self.core}"

    @property
    def python(self) -> Path:
        return BASE_PYTHON

    @property
    def pythonpath(self) -> list[Path]:
        paths = [target_dir("bridge", self.bridge), target_dir("core", self.core)]
        # The fixed releases (0.3.x) are the ones that import Transformer Engine at module level.
        return [*paths, TE_STANDIN] if self.has_upstream_fix else paths

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with this checkout and this release on ``PYTHONPATH``.

        The package comes from this checkout, not an install, so that the base environment holds what a
        training image holds and the install tests can add the package to it as a user would.
        """
        environment = dict(os.environ if base is None else base)
        environment["PYTHONPATH"] = os.pathsep.join(str(path) for path in (REPO, *self.pythonpath))
        return environment


def target_dir(kind: str, version: str) -> Path:
    return ENVS_DIR / f"{kind}-{version}"


# Every Megatron-Bridge release on the registry up to 0.3.1, with the megatron-core it was built for.
DEFAULT_CORE = {
    "0.1.0a0": "0.13.1",
    **{f"0.1.0rc{n}": "0.14.0" for n in range(5)},
    **{f"0.2.0rc{n}": "0.14.0" for n in range(3)},
    **{f"0.2.0rc{n}": "0.15.3" for n in range(3, 7)},
    "0.3.0": "0.16.1",
    "0.3.1": "0.16.1",
}
MATRIX = tuple(
    Release(bridge, core, has_upstream_fix=bridge in ("0.3.0", "0.3.1")) for bridge, core in DEFAULT_CORE.items()
)
# An old release with a megatron-core newer than it was built for, which brings its own graph-safe helpers.
OLD_ON_NEWER_CORE = Release("0.2.0rc6", "0.16.1", has_upstream_fix=False)
RELEASES = {release.name: release for release in (*MATRIX, OLD_ON_NEWER_CORE)}
# One old release of each signature family (get_rng_state; _load_global_dist_base_checkpoint), and the old
# release on the newer megatron-core: the resume tests run on each.
SIGNATURE_FAMILIES = {
    "(dp_random_init); cfg": "bridge-0.1.0a0",
    "(dp_random_init); ckpt_cfg": "bridge-0.2.0rc2",
    "(dp_random_init, ckpt_format)": "bridge-0.2.0rc6",
    "newer core": OLD_ON_NEWER_CORE.name,
}
# The test runner's own interpreter runs with this one: an old release, the package's main target.
RUNNER = RELEASES["bridge-0.2.0rc6"]


def _pip(*args: str, python: Path = BASE_PYTHON) -> None:
    command = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    subprocess.run(command, check=True)


def _is_current(directory: Path, spec: list[str]) -> bool:
    marker = directory / ".bridge-rng-patch-env"
    return marker.exists() and marker.read_text() == _digest(spec)


def _mark(directory: Path, spec: list[str]) -> None:
    (directory / ".bridge-rng-patch-env").write_text(_digest(spec))


def _digest(spec: list[str]) -> str:
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def ensure_base() -> None:
    spec = [*BASE_REQUIREMENTS, CONSTRAINTS.read_text(), "bridge_rng_patch not installed"]
    if _is_current(BASE, spec):
        return
    print(f"building {BASE}: torch 2.13.0 (CPU) and what Bridge's checkpointing imports", flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(BASE)
    _pip("-c", str(CONSTRAINTS), *BASE_REQUIREMENTS)
    _mark(BASE, spec)


def ensure_target(kind: str, version: str) -> None:
    """``megatron-core`` or ``megatron-bridge`` at ``version`` alone in a folder of its own, with its metadata."""
    directory = target_dir(kind, version)
    spec = [kind, version]
    if _is_current(directory, spec):
        return
    print(f"installing megatron-{kind} {version} into {directory}", flush=True)
    _pip("--no-deps", "--upgrade", "--target", str(directory), f"megatron-{kind}=={version}")
    _mark(directory, spec)


def ensure(release: Release) -> Release:
    ensure_base()
    ensure_target("core", release.core)
    ensure_target("bridge", release.bridge)
    return release


def ensure_all() -> None:
    for release in RELEASES.values():
        ensure(release)


if __name__ == "__main__":
    names = sys.argv[1:] or list(RELEASES)
    for name in names:
        ensure(RELEASES[name])
    print(os.linesep.join(names))
