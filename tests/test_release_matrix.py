"""Every Megatron-Bridge release people pin, each with a megatron-core it imports with, from the registry.

The decisions are what a user's ``import bridge_rng_patch`` makes on each real release; the README's release
table is checked against them. A save then resume runs on one release of each signature family.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, coordinates, run_python, saved_by_coordinates

from tools.release_envs import (
    BASE_PYTHON,
    MATRIX,
    OLD_ON_NEWER_CORE,
    RELEASES,
    SIGNATURE_FAMILIES,
    TE_STANDIN,
    ensure,
    ensure_target,
    target_dir,
)
from tools.wheel_source import DECIDE_FROM_SOURCE, PYTHON_312_RELEASES, unpacked_wheel

TARGETS = ("get_rng_state", "_load_checkpoint_from_path", "_load_global_dist_base_checkpoint")
# Bridge first, so that the originals are seen before the package patches them at its import.
DECIDE = f"""
import json
import megatron.bridge.training.checkpointing as checkpointing
originals = {{name: getattr(checkpointing, name) for name in {TARGETS}}}
import bridge_rng_patch
print(json.dumps({{
    "states": {{s.name: s.state for s in bridge_rng_patch.status()}},
    "reasons": {{s.name: s.reason for s in bridge_rng_patch.status()}},
    "bridge_version": bridge_rng_patch.status()[0].versions["megatron-bridge"],
    "core_version": bridge_rng_patch.status()[0].versions["megatron-core"],
    "originals": [getattr(checkpointing, name) is original for name, original in originals.items()],
}}))
"""


def _decide(release) -> dict:
    process = run_python(release, DECIDE)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.splitlines()[-1])


@pytest.fixture(scope="session")
def matrix_decisions() -> dict[str, dict]:
    """What the package decides on each release, two releases at a time (each import takes seconds)."""
    for release in MATRIX:
        ensure(release)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((release.bridge for release in MATRIX), pool.map(_decide, MATRIX), strict=True))


def _decide_from_wheel_source(version: str) -> dict:
    """Beside the newest megatron-core installed here, for its ``tensor_parallel``; nothing else of it is used."""
    ensure_target("core", "0.16.1")
    pythonpath = [unpacked_wheel(version), target_dir("core", "0.16.1"), TE_STANDIN]
    process = subprocess.run(
        [str(BASE_PYTHON), "-c", DECIDE_FROM_SOURCE],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "PYTHONWARNINGS": "ignore"},
        cwd=REPO,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.splitlines()[-1])


@pytest.fixture(scope="session")
def python_312_decisions() -> dict[str, dict]:
    return {version: _decide_from_wheel_source(version) for version in PYTHON_312_RELEASES}


OLD = [release for release in MATRIX if not release.has_upstream_fix]
FIXED = [release for release in MATRIX if release.has_upstream_fix]


@pytest.mark.parametrize("release", OLD, ids=lambda release: release.name)
def test_old_release_gets_both_patches(matrix_decisions, release):
    decision = matrix_decisions[release.bridge]
    assert decision["states"] == {"save_sharding": "applied", "load_restore": "applied"}
    assert decision["originals"] == [False, False, False]
    assert (decision["bridge_version"], decision["core_version"]) == (release.bridge, release.core)


@pytest.mark.parametrize("release", FIXED, ids=lambda release: release.name)
def test_fixed_release_is_not_needed_and_left_as_it_is(matrix_decisions, release):
    decision = matrix_decisions[release.bridge]
    assert decision["states"] == {"save_sharding": "not needed", "load_restore": "not needed"}
    assert decision["originals"] == [True, True, True]


def test_old_release_on_a_newer_megatron_core_uses_its_own_graph_safe_helpers():
    decision = _decide(ensure(OLD_ON_NEWER_CORE))
    assert decision["states"] == {"save_sharding": "applied", "load_restore": "applied"}
    assert decision["reasons"]["load_restore"].endswith("using megatron-core's helpers")
    assert (decision["bridge_version"], decision["core_version"]) == ("0.2.0rc6", "0.16.1")


@pytest.mark.parametrize("version", PYTHON_312_RELEASES)
def test_python_312_fixed_release_is_not_needed_judged_from_its_wheels_source(python_312_decisions, version):
    decision = python_312_decisions[version]
    assert decision["states"] == {"save_sharding": "not needed", "load_restore": "not needed"}
    assert decision["untouched"]
    assert decision["bridge_version"] == version


@pytest.mark.parametrize("family", list(SIGNATURE_FAMILIES))
def test_each_signature_family_resumes_every_rank_bit_exact(jobs, family):
    release = RELEASES[SIGNATURE_FAMILIES[family]]
    layout = {"world": 4, "tp": 1, "pp": 1, "ep": 2}
    name = f"family-{release.name}"
    saved = jobs.run(release, name, action="save", checkpoint_dir=jobs.checkpoint_dir(name), **layout)
    assert saved[0]["stored_keys"] == [f"rng_state/shard_0.0.{dp}_1.1.4" for dp in range(4)]
    loaded = jobs.run(release, f"{name}-load", action="load", checkpoint_dir=jobs.checkpoint_dir(name), **layout)
    own = saved_by_coordinates(saved)
    for rank in loaded:
        assert rank["error"] is None
        assert rank["fresh"] != own[coordinates(rank)]
        assert rank["loaded"] == own[coordinates(rank)], f"rank {rank['rank']} did not get its own state back"


def _readme_release_rows() -> dict[str, tuple[str, str, str]]:
    """The README's release table: release -> (megatron-core, save_sharding, load_restore)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("<!-- release table -->") : text.index("<!-- end of release table -->")]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"\d+\.\d+\.\d+\S*", cells[0]):
            rows[cells[0]] = (cells[1], cells[2], cells[3])
    return rows


def test_readme_release_table_matches_what_the_package_decides(matrix_decisions, python_312_decisions):
    expected = {
        release.bridge: (
            release.core,
            matrix_decisions[release.bridge]["states"]["save_sharding"],
            matrix_decisions[release.bridge]["states"]["load_restore"],
        )
        for release in MATRIX
    }
    for version, decision in python_312_decisions.items():
        states = decision["states"]
        expected[version] = ("from the wheel's source", states["save_sharding"], states["load_restore"])
    assert _readme_release_rows() == expected
