"""Build one virtual environment per real Megatron-Bridge release that the tests, demo and benchmark use.

Each environment holds the release and the megatron-core it was built for, installed from the package
registry without their GPU-only dependencies, plus torch 2.13.0 (CPU) and this package, editable.
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

# What Megatron-Bridge's checkpointing module needs at import time; their GPU-only requirements are left out.
COMMON_REQUIREMENTS = (
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
)


@dataclass(frozen=True)
class ReleaseEnv:
    """A real Megatron-Bridge release and the megatron-core it was built for."""

    bridge: str
    core: str
    has_upstream_fix: bool
    extra_requirements: tuple[str, ...] = ()
    needs_te_standin: bool = False

    @property
    def name(self) -> str:
        return f"bridge-{self.bridge}"

    @property
    def path(self) -> Path:
        return ENVS_DIR / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def spec_hash(self) -> str:
        spec = [self.bridge, self.core, *COMMON_REQUIREMENTS, *self.extra_requirements, CONSTRAINTS.read_text()]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


RELEASES = {
    env.name: env
    for env in (
        ReleaseEnv(bridge="0.1.0rc4", core="0.14.0", has_upstream_fix=False),
        # Also the test runner's environment, hence ruff.
        ReleaseEnv(bridge="0.2.0rc6", core="0.15.3", has_upstream_fix=False, extra_requirements=("ruff",)),
        ReleaseEnv(
            bridge="0.3.1",
            core="0.16.1",
            has_upstream_fix=True,
            extra_requirements=("triton", "nvidia-modelopt"),
            needs_te_standin=True,
        ),
    )
}
OLD_RELEASES = tuple(env for env in RELEASES.values() if not env.has_upstream_fix)
FIXED_RELEASES = tuple(env for env in RELEASES.values() if env.has_upstream_fix)
# The environment the test runner itself uses: an old release, the package's main target.
RUNNER = RELEASES["bridge-0.2.0rc6"]


def _pip(env: ReleaseEnv, *args: str) -> None:
    command = [str(env.python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    subprocess.run(command, check=True)


def ensure(env: ReleaseEnv) -> ReleaseEnv:
    """Create ``env`` unless an environment built from the same spec is already there."""
    marker = env.path / ".bridge-rng-patch-env"
    if marker.exists() and marker.read_text() == env.spec_hash():
        return env
    print(f"building {env.path} (megatron-bridge {env.bridge}, megatron-core {env.core})", flush=True)
    venv.EnvBuilder(clear=True, with_pip=True).create(env.path)
    constraints = ("-c", str(CONSTRAINTS))
    _pip(env, *constraints, *COMMON_REQUIREMENTS, *env.extra_requirements)
    # The releases' GPU-only requirements (transformer-engine, nvidia-resiliency-ext, ...) cannot install here.
    _pip(env, "--no-deps", f"megatron-core=={env.core}", f"megatron-bridge=={env.bridge}")
    _pip(env, *constraints, "--no-deps", "-e", str(REPO))
    if env.needs_te_standin:
        site_packages = next((env.path / "lib").glob("python3*/site-packages"))
        (site_packages / "bridge_rng_patch_gpu_standins.pth").write_text(f"{TE_STANDIN}\n")
    marker.write_text(env.spec_hash())
    return env


def ensure_all() -> None:
    for env in RELEASES.values():
        ensure(env)


if __name__ == "__main__":
    names = sys.argv[1:] or list(RELEASES)
    for name in names:
        ensure(RELEASES[name])
    print(os.linesep.join(str(RELEASES[name].python) for name in names))
