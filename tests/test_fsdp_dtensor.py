"""Megatron-FSDP's ``fsdp_dtensor`` format: RNG state that torch DCP keeps one leaf at a time.

Every release of both loops saves ``{"(pp, tp)": [own state]}``, and torch DCP keeps one writer per leaf of it, so
with EP > 1 every rank of a (pp, tp) resumes on one restored dict whose leaves come from different ranks. The jobs
run each loop's real ``save_checkpoint`` / ``load_checkpoint`` with ``ckpt_format`` fsdp_dtensor, which reach its
real ``get_rng_state``, its fsdp_dtensor save (``dcp.save``) and load (``dcp.load``) and its RNG restore. The model
is the jobs' small module of plain tensors, not a Megatron-FSDP one: that needs CUDA (streams, a "cuda" device
mesh, buffers on the device), and the fsdp_dtensor preprocessing touches DTensors only. On a GPU,
``tools/gpu_check.py`` saves and resumes a real Megatron-FSDP model. Megatron-LM's loop is given
``--use-megatron-fsdp``, which its ``validate_args`` requires for the format.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_each_rank_resumes_its_own_state, coordinates, rank_zero_logs, saved_by_coordinates

from bridge_rng_patch import inspection
from bridge_rng_patch.rng_layout import read_stored_layouts
from tools.jobs import rng_streams
from tools.release_envs import RELEASES

OLD, FIXED, MEGATRON_LM = RELEASES["bridge-0.2.0rc6"], RELEASES["bridge-0.3.1"], RELEASES["megatron-lm-0.19.2"]
FSDP = {"ckpt_format": "fsdp_dtensor"}
EP2_DP4 = {"world": 4, "tp": 1, "pp": 1, "ep": 2}
SOURCES = ("python", "numpy", "torch", "cuda", "expert-parallel-rng")


def _whose(saved: list[dict], fingerprint: dict) -> dict[str, list[int]]:
    """For each RNG source a rank restored, the DP ranks that saved that state."""
    by_coordinates = saved_by_coordinates(saved)
    restored = rng_streams(fingerprint)
    return {
        source: sorted(dp for (_, _, dp), own in by_coordinates.items() if rng_streams(own)[source] == restored[source])
        for source in SOURCES
    }


@pytest.mark.parametrize("env", [OLD, MEGATRON_LM], ids=lambda env: env.name)
def test_upstream_resume_gives_every_rank_one_dict_mixed_from_several_ranks(jobs, env):
    """The bug, measured on the real loops: one restored dict for all four ranks, its sources saved by more than
    one rank, so that every rank loses some of its own streams."""
    saved = jobs.save(env, f"fsdp-{env.name}-unpatched", patched=False, **FSDP)
    loaded = jobs.load(env, f"fsdp-{env.name}-unpatched", f"fsdp-{env.name}-unpatched-load", patched=False, **FSDP)
    assert all(rank["error"] is None for rank in loaded)
    assert all(rank["loaded"] == loaded[0]["loaded"] for rank in loaded)  # one dict for every rank
    whose = _whose(saved, loaded[0]["loaded"])
    assert all(whose[source] for source in SOURCES)  # every leaf is some rank's saved state...
    assert len({tuple(dp) for source, dp in whose.items() if source != "expert-parallel-rng"}) > 1  # ...not one's
    own = saved_by_coordinates(saved)
    assert all(rank["loaded"] != own[coordinates(rank)] for rank in loaded)


@pytest.mark.parametrize("env", [OLD, FIXED, MEGATRON_LM], ids=lambda env: env.name)
def test_patched_save_keeps_each_ranks_own_entry_and_resumes_every_rank_bit_exact(jobs, env):
    saved = jobs.save(env, f"fsdp-{env.name}", **FSDP)
    assert saved[0]["sharded_object"]["keys"] == ["(0, 0)", "(0, 0, 0)"]  # the shared entry stays
    loaded = jobs.load(env, f"fsdp-{env.name}", f"fsdp-{env.name}-load", **FSDP)
    assert_each_rank_resumes_its_own_state(saved, loaded)


def test_upstream_checkpoint_resumes_under_the_package_as_upstream_does_and_says_so(jobs):
    jobs.save(OLD, f"fsdp-{OLD.name}-unpatched", patched=False, **FSDP)
    upstream = jobs.load(OLD, f"fsdp-{OLD.name}-unpatched", f"fsdp-{OLD.name}-unpatched-load", patched=False, **FSDP)
    loaded = jobs.load(OLD, f"fsdp-{OLD.name}-unpatched", f"fsdp-{OLD.name}-unpatched-then-patched", **FSDP)
    assert [rank["loaded"] for rank in loaded] == [rank["loaded"] for rank in upstream]
    assert "carries one shared state per (pp, tp), whose leaves torch DCP took from" in rank_zero_logs(loaded)


def test_patched_checkpoint_resumed_without_the_package_resumes_as_an_upstream_one(jobs):
    """The shared entry is still written, so a release without the package loads it as it loads its own."""
    jobs.save(OLD, f"fsdp-{OLD.name}", **FSDP)
    loaded = jobs.load(OLD, f"fsdp-{OLD.name}", f"fsdp-{OLD.name}-load-unpatched", patched=False, **FSDP)
    assert all(rank["error"] is None and rank["loaded"] == loaded[0]["loaded"] for rank in loaded)
    assert loaded[0]["loaded"] != loaded[0]["fresh"]


def test_dp_shrink_from_4_to_2_gives_each_remaining_rank_its_own_state(jobs):
    saved = jobs.save(OLD, f"fsdp-{OLD.name}", **FSDP)
    loaded = jobs.load(OLD, f"fsdp-{OLD.name}", "fsdp-dp2", {**EP2_DP4, "world": 2}, **FSDP)
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert "stores RNG state for DP size 4, this job runs DP size 2" in rank_zero_logs(loaded)


def test_dp_growth_from_4_to_8_keeps_fresh_rng_on_new_ranks_and_names_them(jobs):
    saved = jobs.save(OLD, f"fsdp-{OLD.name}", **FSDP)
    loaded = jobs.load(OLD, f"fsdp-{OLD.name}", "fsdp-dp8", {**EP2_DP4, "world": 8}, **FSDP)
    assert_each_rank_resumes_its_own_state(saved, loaded, stored_dp_size=4)
    assert "DP ranks 4..7 keep fresh RNG state" in rank_zero_logs(loaded)
    for rank in loaded[4:]:
        assert any(line.endswith("holds no RNG state for it; it keeps its fresh RNG state") for line in rank["logs"])


@pytest.mark.parametrize("world", [4, 8], ids=["same DP size", "DP grown to 8"])
def test_a_strict_load_is_not_asked_for_the_own_entry_and_reads_it_afterwards(jobs, world):
    """``strict_fsdp_dtensor_load`` fails on any key the checkpoint lacks, so the loop's load asks for the shared
    entry only, and each rank reads its own in a DCP load of its own, which every rank joins (a rank outside the
    stored layout asking for nothing)."""
    saved = jobs.save(OLD, f"fsdp-{OLD.name}", **FSDP)
    layout = {**EP2_DP4, "world": world}
    loaded = jobs.load(OLD, f"fsdp-{OLD.name}", f"fsdp-strict-{world}", layout, strict_fsdp_dtensor_load=True, **FSDP)
    assert_each_rank_resumes_its_own_state(saved, loaded, stored_dp_size=4)


def test_stored_entries_are_read_from_the_dcp_metadata(jobs):
    jobs.save(OLD, f"fsdp-{OLD.name}", **FSDP)
    jobs.save(OLD, f"fsdp-{OLD.name}-unpatched", patched=False, **FSDP)
    patched, upstream = (
        read_stored_layouts(str(Path(jobs.checkpoint_dir(name)) / "iter_0000010"))["rng_state"]
        for name in (f"fsdp-{OLD.name}", f"fsdp-{OLD.name}-unpatched")
    )
    assert (patched.global_shape, sorted(patched.offsets)) == ((1, 1, 4), [(0, 0, dp) for dp in range(4)])
    assert (upstream.global_shape, sorted(upstream.offsets)) == ((1, 1), [(0, 0)])


def test_inspect_gives_fsdp_dtensor_checkpoints_the_same_verdicts(jobs):
    jobs.save(OLD, f"fsdp-{OLD.name}", **FSDP)
    jobs.save(OLD, f"fsdp-{OLD.name}-unpatched", patched=False, **FSDP)
    patched, upstream = (
        inspection.inspect_iteration(Path(jobs.checkpoint_dir(name)) / "iter_0000010")
        for name in (f"fsdp-{OLD.name}", f"fsdp-{OLD.name}-unpatched")
    )
    assert (patched.verdict, patched.run.dp) == (inspection.COMPLETE, 4)
    assert patched.summary == "every DP rank's RNG state is stored (4 entries, one per (pp, tp, dp))"
    assert upstream.verdict == inspection.INCOMPLETE
    assert upstream.summary.startswith("written with EP 2 and one RNG state per (pp, tp) (the old bug): 3 of 4")
