"""Resuming on the fixed releases (0.3.0 to 0.6.2), where only the stored-layout load applies.

Each of those releases asks for ``rng_state`` in the running job's layout and crashes on every rank when the
checkpoint stores another (an old release's, a DP resize, an EP change). Every test runs the real
``save_checkpoint`` / ``load_checkpoint`` on one release of each fixed family (0.3.x with megatron-core 0.16;
0.4.x with 0.17 and 0.6.x with 0.19, under Python 3.12 and torch 2.14.1) and compares every RNG source of
every rank, bit for bit.
"""

from __future__ import annotations

import re

import pytest
from conftest import EP2_DP4, assert_each_rank_resumes_its_own_state, rank_zero_logs

from tools.release_envs import FIXED_FAMILIES, RELEASES

OLD = RELEASES["bridge-0.2.0rc6"]
EP2_DP2 = {**EP2_DP4, "world": 2}
FIXED = list(FIXED_FAMILIES.values())


@pytest.mark.parametrize("fixed", FIXED)
def test_fixed_release_without_the_package_crashes_on_a_dp_shrink(jobs, fixed):
    """What every test below fixes, on the real release: the load planner misses the running layout's key."""
    jobs.save(RELEASES[fixed], f"{fixed}-ep2")
    failed = jobs.load(RELEASES[fixed], f"{fixed}-ep2", f"{fixed}-ep2-unpatched-dp2", EP2_DP2, patched=False)
    for rank in failed:
        assert re.search(r"Missing key in checkpoint state_dict: rng_state/shard_0\.0\.[01]_1\.1\.2", rank["error"])
        assert rank["loaded"] == rank["fresh"]


@pytest.mark.parametrize("fixed", FIXED)
def test_unpatched_old_releases_checkpoint_resumes_from_its_one_shared_state(jobs, fixed):
    saved = jobs.save(OLD, "unpatched-ep2", patched=False)
    loaded = jobs.load(RELEASES[fixed], "unpatched-ep2", f"unpatched-ep2-load-on-{fixed}")
    shared = next(rank["saved"] for rank in saved if rank["coords"]["dp"] == 0)
    assert all(rank["error"] is None and rank["loaded"] == shared for rank in loaded)
    assert "(the old bug)" in rank_zero_logs(loaded)


@pytest.mark.parametrize("fixed", FIXED)
def test_patched_old_releases_checkpoint_resumes_every_rank_bit_exact(jobs, fixed):
    saved = jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(RELEASES[fixed], "patched-ep2", f"patched-ep2-on-{fixed}")
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert [rank["layout_reads"] for rank in loaded] == [1, 0, 0, 0]  # one read per load, for the whole job


@pytest.mark.parametrize("fixed", FIXED)
def test_dp_shrink_from_4_to_2_gives_each_remaining_rank_its_own_state(jobs, fixed):
    saved = jobs.save(RELEASES[fixed], f"{fixed}-ep2")
    loaded = jobs.load(RELEASES[fixed], f"{fixed}-ep2", f"{fixed}-ep2-shrunk-to-dp2", EP2_DP2)
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert "stores RNG state for DP size 4, this job runs DP size 2" in rank_zero_logs(loaded)


@pytest.mark.parametrize("fixed", FIXED)
def test_dp_growth_from_2_to_4_keeps_fresh_rng_on_new_ranks_and_names_them(jobs, fixed):
    saved = jobs.save(RELEASES[fixed], f"{fixed}-ep2-dp2", EP2_DP2)
    loaded = jobs.load(RELEASES[fixed], f"{fixed}-ep2-dp2", f"{fixed}-ep2-dp2-grown-to-dp4")
    assert_each_rank_resumes_its_own_state(saved, loaded, stored_dp_size=2)
    assert "DP ranks 2..3 keep fresh RNG state" in rank_zero_logs(loaded)
    for rank in loaded[2:]:
        assert any(
            f"WARNING: rank {rank['rank']} (pp 0, tp 0, dp {rank['coords']['dp']})" in line for line in rank["logs"]
        )


@pytest.mark.parametrize("fixed", FIXED)
def test_ep_change_to_1_gives_each_rank_the_state_saved_at_its_coordinates(jobs, fixed):
    saved = jobs.save(RELEASES[fixed], f"{fixed}-ep2")
    loaded = jobs.load(RELEASES[fixed], f"{fixed}-ep2", f"{fixed}-ep2-ep1", {**EP2_DP4, "ep": 1})
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert "each rank restores the state saved at its own (pp, tp, dp) coordinates" in rank_zero_logs(loaded)


CP2_DP2_RANDOM_INIT = {"world": 4, "tp": 1, "pp": 1, "ep": 1, "cp": 2, "data_parallel_random_init": True}


def test_context_parallel_with_data_parallel_random_init_loses_state_upstream_and_not_with_the_package(jobs):
    """0.3.0 and later gather the states over DP with context parallel and index the list by the DP rank
    without it: with CP 2, DP rank 1 (ranks 2 and 3) restores DP rank 0's state."""
    fixed = RELEASES["bridge-0.3.1"]
    saved = jobs.save(fixed, "cp2-random-init", CP2_DP2_RANDOM_INIT)
    assert all(rank["sharded_object"]["states"] == 4 for rank in saved)  # gathered over DP x CP
    unpatched = jobs.load(fixed, "cp2-random-init", "cp2-random-init-unpatched", CP2_DP2_RANDOM_INIT, patched=False)
    own = {rank["rank"]: rank["saved"] for rank in saved}
    assert [rank["loaded"] == own[rank["rank"]] for rank in unpatched] == [True, True, False, False]
    assert all(rank["loaded"] == own[0] for rank in unpatched)
    loaded = jobs.load(fixed, "cp2-random-init", "cp2-random-init-load", CP2_DP2_RANDOM_INIT)
    assert_each_rank_resumes_its_own_state(saved, loaded)


def test_mimo_modules_rng_key_follows_its_stored_layout(jobs):
    """MegatronMIMO (0.5 and later) keys each module's RNG state ``rng_state.{module_name}``."""
    fixed = RELEASES["bridge-0.6.2"]
    saved = jobs.save(fixed, "mimo-ep2", module_name="language")
    assert saved[0]["stored_keys"] == [f"rng_state.language/shard_0.0.{dp}_1.1.4" for dp in range(4)]
    loaded = jobs.load(fixed, "mimo-ep2", "mimo-ep2-dp2", EP2_DP2, module_name="language")
    assert_each_rank_resumes_its_own_state(saved, loaded)


def test_resume_from_an_iteration_directory_reads_the_layout_there(jobs):
    """0.4 and later load straight from ``.../iter_N`` when ``checkpoint.load`` names it, passing the directory
    to the dist load as ``checkpoint_path_override``."""
    fixed = RELEASES["bridge-0.6.2"]
    saved = jobs.save(fixed, "bridge-0.6.2-ep2")
    iteration_dir = f"{jobs.checkpoint_dir('bridge-0.6.2-ep2')}/iter_0000010"
    loaded = jobs.run(fixed, "iteration-dir-dp2", action="load", checkpoint_dir=iteration_dir, **EP2_DP2)
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert f"checkpoint {iteration_dir} stores RNG state for DP size 4" in rank_zero_logs(loaded)


@pytest.mark.parametrize(
    ("tamper", "error", "detail"),
    [
        # megatron-core 0.19 reads the common state through torch's DCP reader before the sharded load: torch's
        # own error, the same on every rank, before the package reads anything.
        (
            "truncated_metadata",
            "CheckpointException: CheckpointException ranks:dict_keys([0])",
            "pickle data was truncated",
        ),
        (
            "torch_rng_state",
            "RngCheckpointError: checkpoint {checkpoint}/iter_0000010: 'rng_state'[0]['torch_rng_state'] "
            "is a torch.float32 tensor of shape (3,), expected torch.get_rng_state()'s ByteTensor",
            "resume with checkpoint.load_rng=False",
        ),
    ],
)
def test_bad_input_fails_every_rank_alike_and_restores_nothing_on_the_newest_release(jobs, tamper, error, detail):
    fixed = RELEASES["bridge-0.6.2"]
    name = f"bridge-0.6.2-tampered-{tamper}"
    jobs.save(fixed, name, tamper=tamper)
    loaded = jobs.load(fixed, name, f"{name}-load")
    (only_error,) = {rank["error"] for rank in loaded}
    assert only_error.startswith(error.format(checkpoint=jobs.checkpoint_dir(name)))
    assert detail in only_error
    assert all(rank["loaded"] == rank["fresh"] for rank in loaded)
