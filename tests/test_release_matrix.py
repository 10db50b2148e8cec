"""Every Megatron-Bridge release people pin, each with a megatron-core it imports with, from the registry.

The decisions are what a user's ``import bridge_rng_patch`` makes on each real release, imported for real
(0.4.0 and later under Python 3.12); the README's release table is checked against them. A save then resume
runs on one release of each signature family.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, assert_each_rank_resumes_its_own_state, run_python

from tools.release_envs import MATRIX, OLD_ON_NEWER_CORE, OLD_ON_PYTHON_312, RELEASES, SIGNATURE_FAMILIES, ensure

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
    "untouched": [getattr(checkpointing, name) is original for name, original in originals.items()],
}}))
"""
ALL_APPLIED = {"save_sharding": "applied", "tracker_restore": "applied", "layout_load": "applied"}
ONLY_LAYOUT_LOAD = {"save_sharding": "not needed", "tracker_restore": "not needed", "layout_load": "applied"}


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


OLD = [release for release in MATRIX if not release.has_upstream_fix]
FIXED = [release for release in MATRIX if release.has_upstream_fix]


@pytest.mark.parametrize("release", OLD, ids=lambda release: release.name)
def test_old_release_gets_all_three_patches(matrix_decisions, release):
    decision = matrix_decisions[release.bridge]
    assert decision["states"] == ALL_APPLIED
    assert decision["untouched"] == [False, False, False]
    assert (decision["bridge_version"], decision["core_version"]) == (release.bridge, release.core)


@pytest.mark.parametrize("release", FIXED, ids=lambda release: release.name)
def test_fixed_release_gets_only_the_stored_layout_load(matrix_decisions, release):
    decision = matrix_decisions[release.bridge]
    assert decision["states"] == ONLY_LAYOUT_LOAD
    assert decision["untouched"] == [True, True, False]
    assert (decision["bridge_version"], decision["core_version"]) == (release.bridge, release.core)
    assert decision["reasons"]["layout_load"].endswith("asks for RNG state in the running job's layout only")


def test_old_release_on_a_newer_megatron_core_uses_its_own_graph_safe_helpers():
    decision = _decide(ensure(OLD_ON_NEWER_CORE))
    assert decision["states"] == ALL_APPLIED
    assert decision["reasons"]["tracker_restore"].endswith("using megatron-core's helpers")
    assert (decision["bridge_version"], decision["core_version"]) == ("0.2.0rc6", "0.16.1")


def test_old_release_under_python_312_gets_all_three_patches():
    decision = _decide(ensure(OLD_ON_PYTHON_312))
    assert decision["states"] == ALL_APPLIED
    assert (decision["bridge_version"], decision["core_version"]) == ("0.2.0rc6", "0.15.3")


@pytest.mark.parametrize("family", list(SIGNATURE_FAMILIES))
def test_each_signature_family_resumes_every_rank_bit_exact(jobs, family):
    release = RELEASES[SIGNATURE_FAMILIES[family]]
    layout = {"world": 4, "tp": 1, "pp": 1, "ep": 2}
    name = f"family-{release.name}"
    saved = jobs.run(release, name, action="save", checkpoint_dir=jobs.checkpoint_dir(name), **layout)
    assert saved[0]["stored_keys"] == [f"rng_state/shard_0.0.{dp}_1.1.4" for dp in range(4)]
    loaded = jobs.run(release, f"{name}-load", action="load", checkpoint_dir=jobs.checkpoint_dir(name), **layout)
    assert_each_rank_resumes_its_own_state(saved, loaded)


def _readme_release_rows() -> dict[str, tuple[str, ...]]:
    """The README's release table: release -> (megatron-core, Python, save_sharding, tracker_restore, layout_load)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("<!-- release table -->") : text.index("<!-- end of release table -->")]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"\d+\.\d+\.\d+\S*", cells[0]):
            rows[cells[0]] = tuple(cells[1:])
    return rows


def test_readme_release_table_matches_what_the_package_decides(matrix_decisions):
    expected = {
        release.bridge: (
            release.core,
            release.python_line,
            *(matrix_decisions[release.bridge]["states"][patch] for patch in ALL_APPLIED),
        )
        for release in MATRIX
    }
    assert _readme_release_rows() == expected
