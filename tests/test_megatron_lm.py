"""Megatron-LM's own training loop (``megatron.training``, in the megatron-core wheels 0.17.1, 0.18.2 and 0.19.2)
has the same save bug as the old Megatron-Bridge releases and no fix in any release: the same patches fix it.

Every test runs the loop's real ``save_checkpoint`` / ``load_checkpoint`` under Python 3.12 and torch 2.14.1, in
gloo jobs whose global args come from the loop's own ``parse_args`` / ``validate_args`` (see
jobs/megatron_lm_loop.py: faked are only the CUDA RNG calls and the CUDA tensor the loop all-reduces the iteration
in), and compares every RNG source of every rank, bit for bit.
"""

from __future__ import annotations

import re

import pytest
from conftest import EP2_DP4, assert_each_rank_resumes_its_own_state, rank_zero_logs, saved_by_coordinates

from tools.jobs import run_job
from tools.release_envs import MEGATRON_LM

RELEASES = {release.core: release for release in MEGATRON_LM}
NEWEST = RELEASES["0.19.2"]
EP2_DP2 = {**EP2_DP4, "world": 2}
PER_PP_TP = ["rng_state/shard_0.0_1.1"]


@pytest.mark.parametrize("core", list(RELEASES))
def test_unpatched_loop_with_ep_2_gives_3_of_4_ranks_another_ranks_state(jobs, core):
    """The bug, on the real loop: one (pp, tp) shard is written, and every rank resumes DP rank 0's state."""
    saved = jobs.save(RELEASES[core], f"mlm-{core}-unpatched", patched=False)
    assert saved[0]["stored_keys"] == PER_PP_TP
    loaded = jobs.load(RELEASES[core], f"mlm-{core}-unpatched", f"mlm-{core}-unpatched-load", patched=False)
    own = [rank["saved"] for rank in saved]
    assert [rank["error"] for rank in loaded] == [None] * 4
    assert [rank["loaded"] == own[rank["rank"]] for rank in loaded] == [True, False, False, False]
    assert all(rank["loaded"] == own[0] for rank in loaded)


@pytest.mark.parametrize("core", list(RELEASES))
def test_patched_loop_with_ep_2_resumes_every_rank_bit_exact(jobs, core):
    saved = jobs.save(RELEASES[core], f"mlm-{core}-ep2")
    assert (saved[0]["stored_keys"], saved[0]["stored_states"]) == (PER_PP_TP, [4])  # every DP rank's state
    loaded = jobs.load(RELEASES[core], f"mlm-{core}-ep2", f"mlm-{core}-ep2-load")
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert [rank["layout_reads"] for rank in loaded] == [1, 0, 0, 0]  # one read per load, for the whole job


def test_dp_shrink_from_4_to_2_gives_each_remaining_rank_its_own_state(jobs):
    saved = jobs.save(NEWEST, "mlm-0.19.2-ep2")
    loaded = jobs.load(NEWEST, "mlm-0.19.2-ep2", "mlm-0.19.2-ep2-shrunk-to-dp2", EP2_DP2)
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert "stores RNG state for DP size 4, this job runs DP size 2" in rank_zero_logs(loaded)


def test_dp_growth_from_2_to_4_keeps_fresh_rng_on_new_ranks_and_names_them(jobs):
    saved = jobs.save(NEWEST, "mlm-0.19.2-ep2-dp2", EP2_DP2)
    loaded = jobs.load(NEWEST, "mlm-0.19.2-ep2-dp2", "mlm-0.19.2-ep2-dp2-grown-to-dp4")
    assert_each_rank_resumes_its_own_state(saved, loaded, stored_dp_size=2)
    assert "DP ranks 2..3 keep fresh RNG state" in rank_zero_logs(loaded)
    for rank in loaded[2:]:
        assert any(
            f"WARNING: rank {rank['rank']} (pp 0, tp 0, dp {rank['coords']['dp']})" in line for line in rank["logs"]
        )


def test_ep_change_to_1_gives_each_rank_the_state_saved_at_its_coordinates(jobs):
    release = RELEASES["0.17.1"]
    saved = jobs.save(release, "mlm-0.17.1-ep2")
    loaded = jobs.load(release, "mlm-0.17.1-ep2", "mlm-0.17.1-ep2-ep1", {**EP2_DP4, "ep": 1})
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert "4 restored the state stored for their coordinates" in rank_zero_logs(loaded)


def test_pipeline_parallel_with_a_dp_shrink_gives_each_stage_its_own_state(jobs):
    release = RELEASES["0.18.2"]
    pp2 = {"world": 4, "tp": 1, "pp": 2, "ep": 2}
    saved = jobs.save(release, "mlm-0.18.2-pp2-ep2", pp2)
    assert saved[0]["stored_keys"] == [f"rng_state/shard_{pp}.0_2.1" for pp in range(2)]
    assert saved[0]["stored_states"] == [2, 2]
    loaded = jobs.load(release, "mlm-0.18.2-pp2-ep2", "mlm-0.18.2-pp2-dp1", {**pp2, "world": 2, "ep": 1})
    assert_each_rank_resumes_its_own_state(saved, loaded)


def test_unpatched_checkpoint_resumes_under_the_package_from_its_one_shared_state(jobs):
    saved = jobs.save(NEWEST, "mlm-0.19.2-unpatched", patched=False)
    loaded = jobs.load(NEWEST, "mlm-0.19.2-unpatched", "mlm-0.19.2-unpatched-then-patched")
    shared = next(rank["saved"] for rank in saved if rank["coords"]["dp"] == 0)
    assert all(rank["error"] is None and rank["loaded"] == shared for rank in loaded)
    assert "(the old bug)" in rank_zero_logs(loaded)


def test_patched_checkpoint_without_the_package_resumes_as_the_loops_own_and_no_load_rng_keeps_fresh_state(jobs):
    """The loop alone asks for its (pp, tp) shard, which a patched save writes: every rank resumes its first
    entry, DP rank 0's, as from the loop's own checkpoint (``test_no_lock_in``); --no-load-rng still skips it."""
    saved = jobs.save(NEWEST, "mlm-0.19.2-ep2")
    loaded = jobs.load(NEWEST, "mlm-0.19.2-ep2", "mlm-0.19.2-ep2-unpatched", patched=False)
    assert all(rank["error"] is None and rank["loaded"] == saved[0]["saved"] for rank in loaded)
    without_rng = jobs.load(
        NEWEST, "mlm-0.19.2-ep2", "mlm-0.19.2-ep2-unpatched-no-load-rng", patched=False, load_rng=False
    )
    assert all(rank["error"] is None and rank["loaded"] == rank["fresh"] for rank in without_rng)


def test_tensor_parallel_change_ignores_rng_state_as_upstream(jobs):
    release = RELEASES["0.17.1"]
    jobs.save(release, "mlm-0.17.1-ep2")
    loaded = jobs.load(release, "mlm-0.17.1-ep2", "mlm-0.17.1-ep2-tp2", {"world": 4, "tp": 2, "pp": 1, "ep": 1})
    assert all(rank["error"] is None and rank["loaded"] == rank["fresh"] for rank in loaded)
    assert [rank["layout_reads"] for rank in loaded] == [0] * 4  # the loop asks for no RNG state: nothing to read


@pytest.mark.parametrize("option", [{"load_rng": False}, {"finetune": True}], ids=["no-load-rng", "finetune"])
def test_no_load_rng_and_finetune_leave_rng_state_alone_as_upstream(jobs, option):
    release = RELEASES["0.18.2"]
    jobs.save(release, "mlm-0.18.2-ep2")
    name = f"mlm-0.18.2-ep2-{next(iter(option))}"
    loaded = jobs.load(release, "mlm-0.18.2-ep2", name, **option)
    assert all(rank["error"] is None and rank["loaded"] == rank["fresh"] for rank in loaded)
    assert "the loop restored no RNG state (load_rng off, finetune" in rank_zero_logs(loaded)  # the resume audit


RANDOM_INIT_DP2 = {"world": 2, "tp": 1, "pp": 1, "ep": 1, "data_parallel_random_init": True}


def test_data_parallel_random_init_dp_growth_crashes_the_job_upstream(jobs):
    """Measured: the restore indexes the gathered list by the DP rank, past its end on the new ranks, which
    raise IndexError (not the KeyError the loop turns into its "Unable to load rng state" exit); the others then
    lose them in the loop's next collective."""
    release = RELEASES["0.17.1"]
    jobs.save(release, "mlm-0.17.1-random-init", RANDOM_INIT_DP2, patched=False)
    spec = {**RANDOM_INIT_DP2, "world": 4, "action": "load", "patched": False}
    spec["checkpoint_dir"] = jobs.checkpoint_dir("mlm-0.17.1-random-init")
    loaded = run_job(release, spec, jobs.base, "mlm-0.17.1-random-init-dp4-unpatched")
    assert [rank.get("error") for rank in loaded[2:]] == ["IndexError: list index out of range"] * 2
    assert all(re.search("connection (reset|closed) by peer", rank["crash"], re.IGNORECASE) for rank in loaded[:2])


def test_data_parallel_random_init_dp_growth_keeps_fresh_rng_on_new_ranks_and_names_them(jobs):
    release = RELEASES["0.17.1"]
    saved = jobs.save(release, "mlm-0.17.1-random-init", RANDOM_INIT_DP2, patched=False)
    loaded = jobs.load(release, "mlm-0.17.1-random-init", "mlm-0.17.1-random-init-dp4", {**RANDOM_INIT_DP2, "world": 4})
    assert_each_rank_resumes_its_own_state(saved, loaded, stored_dp_size=2)
    assert (
        "stores RNG states gathered with data_parallel_random_init for DP size 2, this job runs DP size 4: "
        "DP ranks 2..3 keep fresh RNG state" in rank_zero_logs(loaded)
    )
    for rank in loaded[2:]:
        assert any(line.startswith(f"WARNING: rank {rank['rank']} (pp 0, tp 0, dp") for line in rank["logs"])


def test_key_prefix_of_0_19_is_followed_to_its_stored_layout(jobs):
    saved = jobs.save(NEWEST, "mlm-0.19.2-prefixed", key_prefix="language.")
    assert (saved[0]["stored_keys"], saved[0]["stored_states"]) == ([f"language.{key}" for key in PER_PP_TP], [4])
    loaded = jobs.load(NEWEST, "mlm-0.19.2-prefixed", "mlm-0.19.2-prefixed-dp2", EP2_DP2, key_prefix="language.")
    assert_each_rank_resumes_its_own_state(saved, loaded)


@pytest.mark.parametrize(
    ("tamper", "error"),
    [
        (
            "torch_rng_state",
            "RngCheckpointError: checkpoint {checkpoint}/iter_0000010: 'rng_state'[{dp}]['torch_rng_state'] is a "
            "torch.float32 tensor of shape (3,), expected torch.get_rng_state()'s ByteTensor",
        ),
        ("truncated_metadata", "CheckpointException"),
    ],
)
def test_bad_input_fails_every_rank_alike_and_restores_nothing(jobs, tamper, error):
    """Each rank names the entry it checked: its own, in the list of every DP rank's state."""
    name = f"mlm-0.19.2-tampered-{tamper}"
    jobs.save(NEWEST, name, tamper=tamper)
    loaded = jobs.load(NEWEST, name, f"{name}-load")
    for rank in loaded:
        assert rank["error"].startswith(error.format(checkpoint=jobs.checkpoint_dir(name), dp=rank["coords"]["dp"]))
    assert all(rank["loaded"] == rank["fresh"] for rank in loaded)


def test_saved_states_are_per_rank_and_differ_under_ep(jobs):
    """What makes the tests above able to fail: with EP 2 every rank's saved state is its own."""
    saved = saved_by_coordinates(jobs.save(NEWEST, "mlm-0.19.2-ep2"))
    assert len({str(state) for state in saved.values()}) == 4
