"""Every Megatron-Bridge release people pin, each with a megatron-core it imports with, and every megatron-core
release that ships Megatron-LM's own loop, from the registry.

The decisions are what a user's ``import bridge_rng_patch`` makes on each real release, imported for real
(Bridge 0.4.0 and later, and megatron-core 0.17 and later, under Python 3.12); the release tables
(docs/releases.md, and the README's summary) are checked against them. A save then resume runs on one release of
each signature family.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO, assert_each_rank_resumes_its_own_state, run_python
from packaging.version import Version

from bridge_rng_patch.loops import BRIDGE
from bridge_rng_patch.loops import MEGATRON_LM as MEGATRON_LM_LOOP
from tools.release_envs import (
    MATRIX,
    MEGATRON_LM,
    OLD_ON_NEWER_CORE,
    OLD_ON_PYTHON_312,
    RELEASES,
    SIGNATURE_FAMILIES,
    Release,
    ensure,
)

# Every release of one megatron-core decided in one interpreter, each Bridge release's modules imported afresh (its
# package dropped from sys.modules, its folder first on the path) while megatron-core and what both import stay: an
# import of megatron-core costs most of a fresh interpreter's seconds. The package is off while a release's module is
# imported, so that its originals are seen before the package patches it, as where the loop's module comes first.
DECIDE_EACH = """
import importlib, json, sys
import bridge_rng_patch
from bridge_rng_patch.probe import installed_versions
bridge_rng_patch.undo()
decided = {{}}
for version, path in {releases!r}:
    for name in [name for name in sys.modules if name.split(".")[:2] == ["megatron", "bridge"]]:
        del sys.modules[name]
    sys.path.insert(0, path)
    checkpointing = importlib.import_module("{module}")
    targets = ("get_rng_state", "{restore_function}", "_load_global_dist_base_checkpoint")
    originals = {{name: getattr(checkpointing, name) for name in targets}}
    bridge_rng_patch.apply()
    elsewhere = {{}}
    for module_name, path_there in {elsewhere}:
        try:
            function = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        for part in path_there.split("."):
            function = getattr(function, part)
        elsewhere[f"{{module_name}}.{{path_there}}"] = wrappers(function)
    statuses, versions = bridge_rng_patch.status("{name}"), installed_versions()
    decided[version] = {{
        "states": {{s.name: s.state for s in statuses}},
        "reasons": {{s.name: s.reason for s in statuses}},
        "bridge_version": versions["megatron-bridge"],
        "core_version": versions["megatron-core"],
        "untouched": [getattr(checkpointing, name) is original for name, original in originals.items()],
        "restore_wrappers": wrappers(getattr(checkpointing, "{restore_function}")),
        "elsewhere": elsewhere,
    }}
    bridge_rng_patch.undo()
    sys.path.remove(path)
print(json.dumps(decided))
"""
# The wrappers around a function, outermost first (wrapt keeps each wrapper as ``_self_wrapper``).
WRAPPERS = """
def wrappers(function):
    found = []
    while hasattr(function, "_self_wrapper"):
        wrapper = function._self_wrapper
        found.append(getattr(wrapper, "__name__", type(wrapper).__name__))
        function = function.__wrapped__
    return found
"""
# The three fixes, the release tables' columns; the resume audit applies on every loop and release.
FIXES = ("save_sharding", "tracker_restore", "layout_load")
ALL_APPLIED = {
    "save_sharding": "applied",
    "tracker_restore": "applied",
    "layout_load": "applied",
    "data_init_callbacks": "not needed",
    "keep_restored": "applied",
    "resume_audit": "applied",
}
# Bridge 0.5.0 and later fire on_data_init_start after the load, without keeping the RNG state over it.
WITH_DATA_INIT_CALLBACKS = Version("0.5.0")
# Between the restore and the first step: what each function of the set-up and the step carries, outermost first.
BRIDGE_ELSEWHERE = {
    "megatron.bridge.training.setup.setup_data_iterators": ["KeepingRestored"],
    "megatron.bridge.training.train.train_step": ["at_first_step", "MarkingFirstStep"],
}
CALLBACKS_FIRE = "megatron.bridge.training.callbacks.CallbackManager.fire"
MEGATRON_LM_ELSEWHERE = {
    "megatron.training.training.build_train_valid_test_data_iterators": ["KeepingRestored"],
    "megatron.training.training.train_step": ["at_first_step", "MarkingFirstStep"],
}
# The fixed releases write every DP rank's torch_dist RNG state, but fsdp_dtensor's one per (pp, tp) still.
FIXED_DECISIONS = {**ALL_APPLIED, "tracker_restore": "not needed"}
# Outermost first: the resume watch (what the save, the keep and the audit act on), the audit, the graph-safe restore.
AUDITED_AND_CONVERTING = ["noting_resume", "after_resume", "ConvertingTrackerWhileLoading"]


def _decide_each(group: list[Release]) -> dict[str, dict]:
    """What the package decides on each release of a group that shares one megatron-core, by release."""
    loop = BRIDGE if group[0].bridge is not None else MEGATRON_LM_LOOP
    elsewhere = [(target.module, target.path) for target in _targets_elsewhere(loop)]
    releases = [(release.name, str(release.pythonpath[0])) for release in group]
    code = WRAPPERS + DECIDE_EACH.format(**loop._asdict(), elsewhere=elsewhere, releases=releases)
    process = run_python(group[0], code, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.splitlines()[-1])


def _targets_elsewhere(loop) -> list:
    before = loop.before_first_step
    targets = (*before.keeps_restored, before.first_step, before.data_init_callbacks)
    return [target for target in targets if target is not None]


def _decide(release: Release) -> dict:
    return _decide_each([release])[release.name]


def _decisions(releases: tuple[Release, ...], version_of: Callable[[Release], str]) -> dict[str, dict]:
    """What the package decides on each release, by its version: the releases of one megatron-core in one interpreter,
    two interpreters at a time."""
    for release in releases:
        ensure(release)
    groups: dict[tuple[str, str], list[Release]] = {}
    for release in releases:
        groups.setdefault((release.core, release.python_line), []).append(release)
    with ThreadPoolExecutor(max_workers=2) as pool:
        decided = {
            name: decision for each in pool.map(_decide_each, groups.values()) for name, decision in each.items()
        }
    return {version_of(release): decided[release.name] for release in releases}


@pytest.fixture(scope="session")
def matrix_decisions() -> dict[str, dict]:
    return _decisions(MATRIX, lambda release: release.bridge)


OLD = [release for release in MATRIX if not release.has_upstream_fix]
FIXED = [release for release in MATRIX if release.has_upstream_fix]


@pytest.mark.parametrize("release", OLD, ids=lambda release: release.name)
def test_old_release_gets_all_three_patches(matrix_decisions, release):
    decision = matrix_decisions[release.bridge]
    assert decision["states"] == ALL_APPLIED
    assert decision["untouched"] == [False, False, False]
    assert decision["restore_wrappers"] == AUDITED_AND_CONVERTING
    assert decision["elsewhere"] == BRIDGE_ELSEWHERE
    assert (decision["bridge_version"], decision["core_version"]) == (release.bridge, release.core)


@pytest.mark.parametrize("release", FIXED, ids=lambda release: release.name)
def test_fixed_release_gets_the_stored_layout_load_and_fsdp_dtensor_entries_per_rank(matrix_decisions, release):
    decision = matrix_decisions[release.bridge]
    with_callbacks = Version(release.bridge) >= WITH_DATA_INIT_CALLBACKS
    assert decision["states"] == {
        **FIXED_DECISIONS,
        "data_init_callbacks": "applied" if with_callbacks else "not needed",
    }
    assert decision["untouched"] == [False, False, False]
    assert decision["restore_wrappers"] == ["noting_resume", "after_resume"]  # the restore converts already
    # Releases before 0.5.0 may have the callback manager, but fire no on_data_init_start: it is wrapped from 0.5.0.
    fire = decision["elsewhere"].pop(CALLBACKS_FIRE, [])
    assert decision["elsewhere"] == BRIDGE_ELSEWHERE
    assert fire == (["keeping_rng_over_data_init"] if with_callbacks else [])
    assert (decision["bridge_version"], decision["core_version"]) == (release.bridge, release.core)
    # Bridge #5100 (0.6.0): the fsdp_dtensor load asks for no RNG state after a TP or PP change.
    fsdp_policy = "already ignores" if release.bridge.startswith("0.6.") else "restores"
    assert decision["reasons"]["layout_load"].endswith(
        f"asks for RNG state in the running job's layout only; its fsdp_dtensor load {fsdp_policy} RNG state after "
        "a TP or PP change"
    )
    assert decision["reasons"]["save_sharding"].endswith(
        "writes every DP rank's RNG state for torch_dist, but one rank's per (pp, tp) for fsdp_dtensor"
    )


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
    assert (saved[0]["stored_keys"], saved[0]["stored_states"]) == (["rng_state/shard_0.0_1.1"], [4])
    loaded = jobs.run(release, f"{name}-load", action="load", checkpoint_dir=jobs.checkpoint_dir(name), **layout)
    assert_each_rank_resumes_its_own_state(saved, loaded)


def _readme_release_rows(table_name: str = "release table") -> dict[str, tuple[str, ...]]:
    """A release table of docs/releases.md: release -> (megatron-core, Python, and the three fixes' decisions)."""
    text = (REPO / "docs" / "releases.md").read_text()
    table = text[text.index(f"<!-- {table_name} -->") : text.index(f"<!-- end of {table_name} -->")]
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
            *(matrix_decisions[release.bridge]["states"][fix] for fix in FIXES),
        )
        for release in MATRIX
    }
    assert _readme_release_rows() == expected


@pytest.fixture(scope="session")
def megatron_lm_decisions() -> dict[str, dict]:
    """What the package decides on Megatron-LM's loop in each megatron-core release that ships it."""
    return _decisions(MEGATRON_LM, lambda release: release.core)


MEGATRON_LM_DECISIONS = FIXED_DECISIONS


@pytest.mark.parametrize("release", MEGATRON_LM, ids=lambda release: release.name)
def test_megatron_lm_loop_gets_the_save_sharding_and_the_stored_layout_load(megatron_lm_decisions, release):
    """Its restore converts tracker states already (megatron-core 0.16 and later); nothing else is fixed."""
    decision = megatron_lm_decisions[release.core]
    assert decision["states"] == MEGATRON_LM_DECISIONS
    assert decision["restore_wrappers"] == ["noting_resume", "after_resume"]
    assert decision["elsewhere"] == MEGATRON_LM_ELSEWHERE
    assert (decision["bridge_version"], decision["core_version"]) == ("not installed", release.core)
    assert decision["reasons"]["save_sharding"].startswith("get_rng_state(ckpt_format, tp_group, pp_group")
    assert decision["reasons"]["layout_load"].endswith(
        "its fsdp_dtensor load restores RNG state after a TP or PP change"
    )


def test_readme_megatron_lm_table_matches_what_the_package_decides(megatron_lm_decisions):
    expected = {
        release.core: (
            "(its own)",
            release.python_line,
            *(megatron_lm_decisions[release.core]["states"][fix] for fix in FIXES),
        )
        for release in MEGATRON_LM
    }
    assert _readme_release_rows("megatron-lm release table") == expected


def _readme_coverage_summary() -> list[tuple[str, ...]]:
    """The README's first table: (who trains with it, release range, save_sharding, tracker_restore, layout_load)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("<!-- coverage summary -->") : text.index("<!-- end of coverage summary -->")]
    rows = [tuple(cell.strip() for cell in line.strip().strip("|").split("|")) for line in table.splitlines()[1:]]
    return [row for row in rows if len(row) == 5 and " to " in row[1]]


def test_readme_coverage_summary_matches_every_release_it_spans(matrix_decisions, megatron_lm_decisions):
    """Each row's range holds releases whose decisions are all the row's, and the rows cover every release."""
    covered = []
    for loop, span, *states in _readme_coverage_summary():
        if loop not in ("Megatron-Bridge", "Megatron-LM's loop"):
            continue  # verl's and ms-swift's rows: tests/test_stacks.py
        first, last = (Version(end.removeprefix("megatron-core ")) for end in span.split(" to "))
        decisions = megatron_lm_decisions if loop == "Megatron-LM's loop" else matrix_decisions
        spanned = [release for release in decisions if first <= Version(release) <= last]
        assert spanned, f"no tested release in {span}"
        assert all([decisions[release]["states"][fix] for fix in FIXES] == states for release in spanned), span
        covered += [(loop, release) for release in spanned]
    expected = [("Megatron-Bridge", release.bridge) for release in MATRIX]
    expected += [("Megatron-LM's loop", release.core) for release in MEGATRON_LM]
    assert sorted(covered) == sorted(expected)
