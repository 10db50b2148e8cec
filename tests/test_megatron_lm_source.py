"""Megatron-LM's loop from a source tree: a clone at an upstream tag (core_v0.11 to 0.16, where ``megatron.training``
came only from a clone) or a fork, with the tree's own ``megatron.core``.

Set ``MEGATRON_LM_SOURCE`` to the tree's root (the folder that holds ``megatron/``); the tests then run the tree's
real ``save_checkpoint`` / ``load_checkpoint`` in gloo jobs (jobs/megatron_lm_loop.py), in the environment its
megatron-core fits, and compare every RNG source of every rank, bit for bit. Without it they are skipped.
Trees up to core_v0.15 write the (pp, tp) layout (the bug); core_v0.16 writes (pp, tp, dp) itself and restores
graph-safe trackers itself, and the wheels from 0.17 ask for (pp, tp) again.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import (
    EP2_DP4,
    REPO,
    assert_each_rank_resumes_its_own_state,
    coordinates,
    rank_zero_logs,
    run_python,
    saved_by_coordinates,
)
from packaging.version import Version

from tools.release_envs import MEGATRON_LM_SOURCE_VARIABLE, RELEASES, megatron_lm_source

TREE = megatron_lm_source()
if TREE is None:
    pytest.skip(
        f"set {MEGATRON_LM_SOURCE_VARIABLE}=/path/to/Megatron-LM (a clone at a core_v0.11 to 0.16 tag, or a fork) "
        "to test the package on a Megatron-LM source tree",
        allow_module_level=True,
    )

# Upstream trees up to core_v0.15 lack the EP-aware save (#2658) and the graph-safe restore (#2641); 0.16 has both.
UPSTREAM_HAS_BOTH_FIXES = Version(TREE.core) >= Version("0.16.0")
EP2_DP2 = {**EP2_DP4, "world": 2}
PER_PP_TP = ["rng_state/shard_0.0_1.1"]
PER_DP_RANK = [f"rng_state/shard_0.0.{dp}_1.1.4" for dp in range(4)]
WHEELS = [RELEASES["megatron-lm-0.17.1"], RELEASES["megatron-lm-0.18.2"], RELEASES["megatron-lm-0.19.2"]]
STATUS = "import json, bridge_rng_patch, megatron.training.checkpointing\n" + (
    "print(json.dumps({s.name: [s.state, s.reason] for s in bridge_rng_patch.status('Megatron-LM')}))"
)


def _tree(name: str) -> str:
    return f"source-{TREE.core}-{name}"


@pytest.fixture(scope="module")
def decisions() -> dict[str, str]:
    """What each patch decides on the tree, from one import of its checkpointing module."""
    process = run_python(TREE, STATUS)
    return {name: state for name, (state, _) in json.loads(process.stdout.splitlines()[-1]).items()}


def test_each_patch_decides_from_the_trees_code(decisions):
    """On an upstream tag, what it lacks is applied and what it has is not needed (the save sharding is applied to
    every tag: core_v0.16 keeps fsdp_dtensor's RNG state per (pp, tp)); a fork that backported a fix differs here
    by design."""
    upstream_fix = "not needed" if UPSTREAM_HAS_BOTH_FIXES else "applied"
    assert decisions == {
        "save_sharding": "applied",
        "tracker_restore": upstream_fix,
        "layout_load": "applied",
        "data_init_callbacks": "not needed",
        # Their wrappers wait for megatron.training.training, which the tree's status import leaves out.
        "keep_restored": "pending",
        "resume_audit": "pending",
    }


def _readme_source_rows() -> list[list[str]]:
    text = (REPO / "docs" / "releases.md").read_text()
    start, end = "<!-- megatron-lm source table -->", "<!-- end of megatron-lm source table -->"
    table = text[text.index(start) : text.index(end)]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table.splitlines()]
    return [row for row in rows if len(row) == 6 and row[0].startswith("core_v")]


def test_the_readmes_source_table_row_for_the_tree_is_what_the_package_decides(decisions):
    """The row whose range of tags holds the tree's version: its Python and the three decisions."""
    for row in _readme_source_rows():
        first, last = (Version(tag.removeprefix("core_v")) for tag in row[0].split(" to "))
        if first <= Version(TREE.core) <= last:
            python = f"{TREE.python_line}, torch {TREE.torch}" if TREE.torch else TREE.python_line
            fixes = [decisions[fix] for fix in ("save_sharding", "tracker_restore", "layout_load")]
            assert row[1:5] == [python, *fixes], row
            return
    pytest.skip(f"docs/releases.md's source table has no row for megatron-core {TREE.core}")


def test_unpatched_tree_with_ep_2_resumes_as_its_save_layout_says(jobs):
    """Up to core_v0.15 the bug: one (pp, tp) shard, every rank on DP rank 0's state; core_v0.16 keeps each rank's."""
    saved = jobs.save(TREE, _tree("unpatched"), patched=False)
    loaded = jobs.load(TREE, _tree("unpatched"), _tree("unpatched-load"), patched=False)
    if UPSTREAM_HAS_BOTH_FIXES:
        assert saved[0]["stored_keys"] == PER_DP_RANK
        assert_each_rank_resumes_its_own_state(saved, loaded)
    else:
        assert saved[0]["stored_keys"] == PER_PP_TP
        own = [rank["saved"] for rank in saved]
        assert [rank["error"] for rank in loaded] == [None] * 4
        assert [rank["loaded"] == own[rank["rank"]] for rank in loaded] == [True, False, False, False]


def test_patched_tree_with_ep_2_resumes_every_rank_bit_exact(jobs):
    saved = jobs.save(TREE, _tree("ep2"))
    # core_v0.16 shards by (pp, tp, dp) itself; before it, the package fills the tree's own (pp, tp) shard.
    expected = (PER_DP_RANK, [1] * 4) if UPSTREAM_HAS_BOTH_FIXES else (PER_PP_TP, [4])
    assert (saved[0]["stored_keys"], saved[0]["stored_states"]) == expected
    loaded = jobs.load(TREE, _tree("ep2"), _tree("ep2-load"))
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert [rank["layout_reads"] for rank in loaded] == [1, 0, 0, 0]


def test_dp_shrink_from_4_to_2_gives_each_remaining_rank_its_own_state(jobs):
    saved = jobs.save(TREE, _tree("ep2"))
    loaded = jobs.load(TREE, _tree("ep2"), _tree("ep2-shrunk-to-dp2"), EP2_DP2)
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert "stores RNG state for DP size 4, this job runs DP size 2" in rank_zero_logs(loaded)


def test_unpatched_dp_shrink_crashes_where_the_tree_writes_every_dp_rank(jobs):
    """Measured upstream: a (pp, tp, dp) checkpoint (core_v0.16's own) fails on every rank with another DP size, as
    Bridge 0.3.0 to 0.6.2 do; a (pp, tp) one loads, every rank on DP rank 0's state."""
    saved = jobs.save(TREE, _tree("unpatched"), patched=False)
    loaded = jobs.load(TREE, _tree("unpatched"), _tree("unpatched-dp2"), EP2_DP2, patched=False)
    if UPSTREAM_HAS_BOTH_FIXES:
        assert all("Missing key in checkpoint state_dict: rng_state/shard_0.0." in rank["error"] for rank in loaded)
    else:
        dp_rank_0 = saved_by_coordinates(saved)[(0, 0, 0)]
        assert all(rank["error"] is None and rank["loaded"] == dp_rank_0 for rank in loaded)


def test_dp_growth_from_2_to_4_keeps_fresh_rng_on_new_ranks_and_names_them(jobs):
    saved = jobs.save(TREE, _tree("ep2-on-dp2"), EP2_DP2)
    loaded = jobs.load(TREE, _tree("ep2-on-dp2"), _tree("ep2-on-dp2-grown-to-dp4"))
    assert_each_rank_resumes_its_own_state(saved, loaded, stored_dp_size=2)
    assert "DP ranks 2..3 keep fresh RNG state" in rank_zero_logs(loaded)


def test_ep_change_from_2_to_1_gives_each_rank_its_own_coordinates_state(jobs):
    saved = jobs.save(TREE, _tree("ep2"))
    loaded = jobs.load(TREE, _tree("ep2"), _tree("ep2-ep1"), {**EP2_DP4, "ep": 1})
    assert_each_rank_resumes_its_own_state(saved, loaded)


@pytest.mark.parametrize("wheel", WHEELS, ids=lambda wheel: wheel.name)
def test_the_trees_checkpoint_resumes_under_a_megatron_core_wheel_with_the_package(jobs, wheel):
    """After an upgrade from a tree to the wheels (0.17 and later ask for (pp, tp) again): every rank its own."""
    saved = jobs.save(TREE, _tree("ep2"))
    assert_each_rank_resumes_its_own_state(saved, jobs.load(wheel, _tree("ep2"), _tree(f"ep2-{wheel.name}")))


def test_the_trees_checkpoint_fails_under_a_wheel_without_the_package(jobs):
    """Measured: the wheel asks for the (pp, tp) shard, which a (pp, tp, dp) checkpoint never wrote."""
    jobs.save(TREE, _tree("ep2"))
    loaded = jobs.load(WHEELS[-1], _tree("ep2"), _tree(f"ep2-{WHEELS[-1].name}-unpatched"), patched=False)
    assert all("Missing key in checkpoint state_dict: rng_state/shard_0.0_1.1" in rank["error"] for rank in loaded)


def test_tensor_states_restore_into_a_graph_safe_tracker_as_generators(jobs):
    """The tree's restore converts (core_v0.16) or the package does (before): every rank its own, as Generators."""
    saved = saved_by_coordinates(jobs.save(TREE, _tree("ep2")))
    loaded = jobs.load(TREE, _tree("ep2"), _tree("ep2-graph-safe"), graph_safe_tracker=True)
    for rank in loaded:
        assert rank["error"] is None
        expected = {name: ["Generator", digest] for name, (_, digest) in saved[coordinates(rank)]["tracker"].items()}
        assert rank["loaded"]["tracker"] == expected


def test_unpatched_tree_hands_a_graph_safe_tracker_what_its_restore_gives(jobs):
    """Before core_v0.16 the restore sets tracker states unconverted: a graph-safe tracker holds byte tensors."""
    jobs.save(TREE, _tree("unpatched"), patched=False)
    loaded = jobs.load(TREE, _tree("unpatched"), _tree("unpatched-graph-safe"), patched=False, graph_safe_tracker=True)
    assert [rank["error"] for rank in loaded] == [None] * 4
    kinds = {kind for rank in loaded for kind, _ in rank["loaded"]["tracker"].values()}
    assert kinds == ({"Generator"} if UPSTREAM_HAS_BOTH_FIXES else {"Tensor"})


@pytest.mark.parametrize(("patched", "verdict"), [(False, None), (True, "complete")], ids=["unpatched", "patched"])
def test_inspect_reads_the_trees_checkpoint_and_its_args(jobs, patched, verdict):
    name = _tree("unpatched" if not patched else "ep2")
    jobs.save(TREE, name, patched=patched)
    process = subprocess.run(
        [str(TREE.python), "-m", "bridge_rng_patch", "inspect", jobs.checkpoint_dir(name), "--json"],
        capture_output=True,
        text=True,
        env=TREE.environment(),
        cwd=REPO,
        timeout=120,
    )
    (report,) = json.loads(process.stdout)
    assert (report["run"]["loop"], report["run"]["ep"], report["run"]["dp"]) == ("Megatron-LM", 2, 4)
    expected = verdict or ("complete" if UPSTREAM_HAS_BOTH_FIXES else "incomplete")
    assert report["verdict"] == expected, report["summary"]
