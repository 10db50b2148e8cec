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
from conftest import (
    assert_each_rank_resumes_its_own_state,
    assert_every_rank_keeps_its_fresh_state,
    coordinates,
    rank_zero_logs,
    saved_by_coordinates,
)

from bridge_rng_patch import inspection
from bridge_rng_patch.rng_layout import read_stored_layouts
from tools.jobs import rng_streams, run_job, waited_for_another_rank
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


# A TP or PP change on resume. Megatron seeds the model-parallel stream per TP rank and every source per PP stage,
# so after such a change no stored state belongs to any running rank: upstream's own policy (Megatron-LM's torch_dist
# load, Bridge #5100 in 0.6.0) is that every rank keeps its fresh state, and the package carries it to the
# fsdp_dtensor load of every loop that lacks it.
MODEL_PARALLEL_LAYOUTS = {"tp1": EP2_DP4, "tp2": {**EP2_DP4, "tp": 2}, "pp2": {**EP2_DP4, "pp": 2}}
MODEL_PARALLEL_CHANGES = {
    "TP 1 to 2": ("tp1", "tp2"),
    "TP 2 to 1": ("tp2", "tp1"),
    "PP 1 to 2": ("tp1", "pp2"),
    "PP 2 to 1": ("pp2", "tp1"),
}
FIXED_BY_UPSTREAM = RELEASES["bridge-0.6.2"]


def _saved_in(jobs, env, layout: str, **spec) -> tuple[str, list[dict]]:
    """The fsdp_dtensor checkpoint ``env`` saved with EP 2 in ``layout``, by name, and the save's reports."""
    name = f"fsdp-{env.name}" + ("" if layout == "tp1" else f"-{layout}") + ("-unpatched" if spec else "")
    return name, jobs.save(env, name, MODEL_PARALLEL_LAYOUTS[layout], **FSDP, **spec)


def _mismatch_line(stored: str, running: str) -> str:
    (stored_tp, stored_pp), (running_tp, running_pp) = (
        (MODEL_PARALLEL_LAYOUTS[layout]["tp"], MODEL_PARALLEL_LAYOUTS[layout]["pp"]) for layout in (stored, running)
    )
    return (
        f"(TP, PP) mismatch after resume (({running_tp}, {running_pp}) vs ({stored_tp}, {stored_pp}) from checkpoint): "
        "RNG state will be ignored; every rank keeps its fresh RNG state"
    )


@pytest.mark.parametrize("change", MODEL_PARALLEL_CHANGES, ids=str)
@pytest.mark.parametrize("env", [OLD, MEGATRON_LM], ids=lambda env: env.name)
def test_after_a_tp_or_pp_change_every_rank_keeps_fresh_rng_and_the_model_loads(jobs, env, change):
    stored, running = MODEL_PARALLEL_CHANGES[change]
    checkpoint, saved = _saved_in(jobs, env, stored)
    loaded = jobs.load(env, checkpoint, f"{checkpoint}-resumed-{running}", MODEL_PARALLEL_LAYOUTS[running], **FSDP)
    assert_every_rank_keeps_its_fresh_state(loaded)
    assert _mismatch_line(stored, running) in rank_zero_logs(loaded)
    assert "4 ranks: 4 kept fresh state by design (a new DP rank, or a TP or PP change)" in rank_zero_logs(loaded)
    assert all(len(rank["logs"]) == 0 for rank in loaded[1:])  # one line for the job, no rank warns alone
    weights_of_stage = {rank["coords"]["pp"]: rank["weights"] for rank in saved}
    restored_stages = [rank for rank in loaded if rank["coords"]["pp"] in weights_of_stage]
    assert restored_stages and all(
        rank["weights"] == weights_of_stage[rank["coords"]["pp"]] for rank in restored_stages
    )


def test_after_a_tp_change_a_strict_load_is_asked_for_no_rng_entry_and_keeps_fresh_rng(jobs):
    """A strict load fails on any key the checkpoint lacks, and the new TP rank's shared entry is one: upstream dies
    (measured: ``Missing key in checkpoint state_dict: rng_state.(0, 1).0.random_rng_state`` on every rank)."""
    checkpoint, saved = _saved_in(jobs, OLD, "tp1")
    layout = MODEL_PARALLEL_LAYOUTS["tp2"]
    name = f"{checkpoint}-resumed-tp2-strict"
    loaded = jobs.load(OLD, checkpoint, name, layout, strict_fsdp_dtensor_load=True, **FSDP)
    assert_every_rank_keeps_its_fresh_state(loaded)
    assert all(rank["weights"] == saved[0]["weights"] for rank in loaded)
    assert _mismatch_line("tp1", "tp2") in rank_zero_logs(loaded)


def test_upstream_after_a_tp_change_the_new_tp_ranks_die_in_the_old_release(jobs):
    """Measured on Bridge 0.2.0rc6: the new TP rank's ``(0, 1)`` entry is not in the checkpoint, DCP leaves its
    numpy state empty, and the restore dies in ``np.random.set_state`` (Bridge #5100); the others lose those ranks
    at the next collective."""
    checkpoint, _ = _saved_in(jobs, OLD, "tp1", patched=False)
    spec = {**MODEL_PARALLEL_LAYOUTS["tp2"], **FSDP, "action": "load", "patched": False}
    loaded = run_job(OLD, {**spec, "checkpoint_dir": jobs.checkpoint_dir(checkpoint)}, jobs.base, f"{checkpoint}-tp2")
    failed_in_the_restore = [rank for rank in loaded if "crash" not in rank]
    error = "TypeError: 'NoneType' object is not subscriptable"
    assert [(rank["coords"]["tp"], rank["error"]) for rank in failed_in_the_restore] == [(1, error)] * 2
    crashes_of_the_others = [rank.get("crash", "no crash") for rank in loaded[::2]]
    assert all(waited_for_another_rank(crash) for crash in crashes_of_the_others), crashes_of_the_others


def test_upstream_megatron_lm_after_a_tp_change_gives_every_rank_one_mixed_dict_across_tp_ranks(jobs):
    """Measured on Megatron-LM 0.19.2, whose fsdp_dtensor load compares no TP or PP: it loads, and both TP ranks
    take the model-parallel stream stored for TP rank 0."""
    checkpoint, saved = _saved_in(jobs, MEGATRON_LM, "tp1", patched=False)
    loaded = jobs.load(
        MEGATRON_LM, checkpoint, f"{checkpoint}-resumed-tp2", MODEL_PARALLEL_LAYOUTS["tp2"], patched=False, **FSDP
    )
    assert all(rank["error"] is None and rank["loaded"] == loaded[0]["loaded"] for rank in loaded)
    stored_model_parallel = {rng_streams(rank["saved"])["model-parallel-rng"] for rank in saved}
    assert rng_streams(loaded[0]["loaded"])["model-parallel-rng"] in stored_model_parallel


def test_a_release_with_upstreams_policy_keeps_it_and_the_package_steps_aside(jobs):
    """Bridge 0.6.0 and later ask for no RNG state after a TP or PP change (#5100): every rank fresh, and the
    package's wrapper sees no RNG request, so it says nothing."""
    checkpoint, _ = _saved_in(jobs, FIXED_BY_UPSTREAM, "tp1")
    loaded = jobs.load(
        FIXED_BY_UPSTREAM, checkpoint, f"{checkpoint}-resumed-tp2", MODEL_PARALLEL_LAYOUTS["tp2"], **FSDP
    )
    assert_every_rank_keeps_its_fresh_state(loaded)
    assert "mismatch" not in rank_zero_logs(loaded)
