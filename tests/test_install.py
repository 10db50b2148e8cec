"""Installing the package leaves a training image as it is, under every Python the machine has.

Real installs: the package is built as a wheel and installed with pip into fresh virtual environments, next to
real Megatron-Bridge and megatron-core releases, installed with metadata or put on ``PYTHONPATH`` as sources.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, coordinates, saved_by_coordinates

from tools.jobs import run_job
from tools.release_envs import BASE, RELEASES, ensure, find_python, target_dir

PIP = ("-m", "pip", "--disable-pip-version-check")


# Every CPython from 3.10 up on this machine: pyenv's, or python3.X on PATH.
PYTHONS = {line: python for minor in range(10, 15) if (python := find_python(line := f"3.{minor}"))}


def _run(*command: object, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    process = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env={**environment, **(env or {})},
        cwd="/",  # not this checkout, which `python -c` would put first on sys.path
        timeout=600,
    )
    output = f"{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    assert not check or process.returncode == 0, f"{command} failed:\n{output}"
    return process


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy, so that setuptools' build/ and egg-info stay out of this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(REPO, out / "source", ignore=shutil.ignore_patterns(".*", "build", "*.egg-info"))
    _run(BASE / "bin" / "python", *PIP, "wheel", "-q", "--no-deps", "-w", out, source)
    return next(out.glob("bridge_rng_patch-*.whl"))


def _new_venv(path: Path, python: Path = Path(sys.executable), sees_base: bool = False) -> Path:
    """A new virtual environment; ``sees_base``: it also sees the test environment's packages (torch, ...),
    as a training image has them, through a path entry, so that its own site-packages stays empty."""
    _run(python, "-m", "venv", path)
    if sees_base:
        base_site = Path(sysconfig.get_path("purelib", vars={"base": str(BASE), "platbase": str(BASE)}))
        own_site = next(path.glob("lib/python3*/site-packages"))
        (own_site / "training_image.pth").write_text(f"{base_site}\n")
    return path / "bin" / "python"


def _would_install(python: Path, wheel: Path, *pip_args: object, pythonpath: list[Path] = ()) -> list[str]:
    """What ``pip install`` of the package would install, by name, from pip's own ``--report``."""
    env = {"PYTHONPATH": os.pathsep.join(map(str, pythonpath))} if pythonpath else None
    report = _run(python, *PIP, "install", "--dry-run", "--quiet", "--report", "-", *pip_args, wheel, env=env)
    return sorted(item["metadata"]["name"] for item in json.loads(report.stdout)["install"])


def test_wheel_metadata_requires_only_wrapt_and_packaging(wheel):
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(name for name in archive.namelist() if name.endswith("METADATA"))).decode()
    fields = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line and not line.startswith(" ")]
    required = sorted(value for key, value in fields if key == "Requires-Dist" and "extra ==" not in value)
    assert required == ["packaging", "wrapt>=1.14"]
    assert ("Version", "0.1.0") in [tuple(field) for field in fields]
    assert ("Requires-Python", ">=3.10") in [tuple(field) for field in fields]
    assert {value for key, value in fields if key == "Provides-Extra"} == {"instruments", "test"}
    assert any(key in ("License", "License-Expression") and "Apache-2.0" in value for key, value in fields)
    instruments = [value for key, value in fields if key == "Requires-Dist" and 'extra == "instruments"' in value]
    assert any(value.startswith("megatron-bridge") for value in instruments)


def test_install_into_an_image_pinned_to_an_old_release_adds_only_the_package(tmp_path, wheel):
    """Megatron-Bridge 0.1.0a0 with megatron-core 0.13.1, installed with metadata, and torch: nothing changes."""
    release = ensure(RELEASES["bridge-0.1.0a0"])
    python = _new_venv(tmp_path / "image", sees_base=True)
    pinned = [target_dir("bridge", release.bridge), target_dir("core", release.core)]
    assert _would_install(python, wheel, pythonpath=pinned) == ["bridge-rng-patch"]
    # The README's one line: every package already there is pinned to its installed version.
    frozen = tmp_path / "image-as-it-is.txt"
    env = {"PYTHONPATH": os.pathsep.join(map(str, pinned))}
    listed = _run(python, *PIP, "list", "--format=freeze", env=env).stdout.splitlines()
    frozen.write_text("\n".join(line for line in listed if not line.startswith("bridge-rng-patch==")))
    assert "megatron-core==0.13.1" in frozen.read_text()
    assert _would_install(python, wheel, "--constraint", frozen, pythonpath=pinned) == ["bridge-rng-patch"]


def test_install_into_an_environment_without_torch_adds_no_torch_and_no_megatron(tmp_path, wheel):
    python = _new_venv(tmp_path / "bare")
    assert _would_install(python, wheel) == ["bridge-rng-patch", "packaging", "wrapt"]


@pytest.fixture(scope="session")
def megatron_sources(tmp_path_factory) -> list[Path]:
    """Megatron-Bridge 0.2.0rc6 and megatron-core 0.15.3 as source trees, the way NeMo's launchers put them on
    PYTHONPATH: the code only, no distribution metadata."""
    release = ensure(RELEASES["bridge-0.2.0rc6"])
    opt = tmp_path_factory.mktemp("opt")
    trees = []
    checkouts = {
        "Megatron-Bridge": target_dir("bridge", release.bridge),
        "Megatron-LM": target_dir("core", release.core),
    }
    for name, target in checkouts.items():
        shutil.copytree(target / "megatron", opt / name / "megatron")
        trees.append(opt / name)
    return trees


@pytest.fixture(scope="session")
def image_with_sources_on_pythonpath(tmp_path_factory, wheel, megatron_sources):
    """An image with torch installed and Megatron on PYTHONPATH; the package installed for real from its wheel."""
    python = _new_venv(tmp_path_factory.mktemp("image") / "venv", sees_base=True)
    would_install = _would_install(python, wheel, pythonpath=megatron_sources)
    _run(python, *PIP, "install", "--quiet", wheel, env={"PYTHONPATH": os.pathsep.join(map(str, megatron_sources))})
    return SourcesOnPythonpath(python, megatron_sources), would_install


class SourcesOnPythonpath:
    """A release as ``tools.jobs.run_job`` runs it: an interpreter, and Megatron's sources on PYTHONPATH."""

    name = "image-with-sources-on-pythonpath"
    loop = "megatron-bridge"

    def __init__(self, python: Path, sources: list[Path]) -> None:
        self.python = python
        self.sources = sources

    def ensure(self) -> SourcesOnPythonpath:
        return self

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "PYTHONPATH": os.pathsep.join(map(str, self.sources))}


def test_install_with_megatron_only_on_pythonpath_adds_only_the_package(image_with_sources_on_pythonpath):
    _, would_install = image_with_sources_on_pythonpath
    assert would_install == ["bridge-rng-patch"]


def test_versions_come_from_the_code_where_there_is_no_metadata(image_with_sources_on_pythonpath):
    image, _ = image_with_sources_on_pythonpath
    code = (
        "import json, bridge_rng_patch, megatron.bridge.training.checkpointing\n"
        "import megatron.bridge.training.setup, megatron.bridge.training.train\n"  # as a training script does
        "status = bridge_rng_patch.status('Megatron-Bridge')\n"
        "print(json.dumps([bridge_rng_patch.__file__, status[0].versions, [s.state for s in status]]))"
    )
    process = _run(image.python, "-c", code, env=image.environment({"PYTHONWARNINGS": "ignore"}))
    package_file, versions, states = json.loads(process.stdout.splitlines()[-1])
    assert Path(package_file).is_relative_to(image.python.parent.parent)  # the installed wheel, not this checkout
    assert (versions["megatron-bridge"], versions["megatron-core"]) == ("0.2.0rc6", "0.15.3")
    assert states == ["applied", "applied", "applied", "not needed", "applied", "applied"]


def test_with_megatron_only_on_pythonpath_a_resume_gives_every_rank_its_own_state(
    image_with_sources_on_pythonpath, tmp_path
):
    image, _ = image_with_sources_on_pythonpath
    spec = {"world": 4, "tp": 1, "pp": 1, "ep": 2, "checkpoint_dir": str(tmp_path / "checkpoint")}
    saved = run_job(image, {**spec, "action": "save"}, tmp_path, "save")
    loaded = run_job(image, {**spec, "action": "load"}, tmp_path, "load")
    assert (saved[0]["stored_keys"], saved[0]["stored_states"]) == (["rng_state/shard_0.0_1.1"], [4])
    own = saved_by_coordinates(saved)
    assert all(rank["error"] is None and rank["loaded"] == own[coordinates(rank)] for rank in loaded)


@pytest.fixture(scope="session", params=sorted(PYTHONS), ids=lambda minor: f"python{minor}")
def python_without_torch(request, tmp_path_factory, wheel) -> Path:
    """A fresh environment of one Python version with nothing but the package, installed from its wheel."""
    python = _new_venv(tmp_path_factory.mktemp(f"py{request.param}") / "venv", PYTHONS[request.param])
    _run(python, *PIP, "install", "--quiet", wheel)
    return python


IMPORT_COST = """
import json, sys, time
start = time.perf_counter()
import bridge_rng_patch
seconds = time.perf_counter() - start
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "megatron", "numpy", "wrapt"})
print(json.dumps({"seconds": seconds, "heavy": heavy, "states": [s.state for s in bridge_rng_patch.status()]}))
"""


def test_import_without_torch_is_fast_and_loads_nothing_heavy(python_without_torch):
    runs = [json.loads(_run(python_without_torch, "-c", IMPORT_COST).stdout) for _ in range(5)]
    assert all(run["heavy"] == [] and run["states"] == ["pending"] * 24 for run in runs)
    assert min(run["seconds"] for run in runs) < 0.020


def test_cli_without_torch_says_bridge_cannot_be_imported_in_one_line(python_without_torch):
    process = _run(python_without_torch, "-m", "bridge_rng_patch", check=False)
    assert process.returncode == 2
    assert "Traceback" not in process.stdout + process.stderr
    assert process.stdout.splitlines() == [
        "bridge_rng_patch 0.1.0; found megatron-bridge not installed, megatron-core not installed, "
        f"torch not installed, wrapt {_wrapt_version(python_without_torch)}",
        "Megatron-Bridge: megatron.bridge is not installed here: nothing to patch",
        "Megatron-LM: megatron.training is not installed here: nothing to patch",
        "verl: verl is not installed here: nothing to patch",
        "ms-swift: swift is not installed here: nothing to patch",
    ]


def _wrapt_version(python: Path) -> str:
    return _run(python, "-c", "from importlib.metadata import version; print(version('wrapt'))").stdout.strip()


def test_installed_launcher_patches_every_python_it_starts(python_without_torch):
    """The console script from the wheel, with its bootstrap folder, under each Python."""
    launcher = python_without_torch.parent / "bridge-rng-patch"
    code = "import sys; print('bridge_rng_patch' in sys.modules)"
    process = _run(launcher, "run", "--", python_without_torch, "-c", code)
    assert process.stdout == "True\n"
    check = _run(launcher, "run", "--check", check=False)
    assert check.returncode == 2  # Bridge cannot be imported in this environment: nothing to patch
    assert check.stdout.splitlines()[0].startswith(
        f"a Python started by COMMAND ({python_without_torch}) imports bridge_rng_patch first, from "
    )
