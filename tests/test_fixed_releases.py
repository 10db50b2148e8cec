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
from conftest import coordinates, saved_by_coordinates

from tools.release_envs import FIXED_FAMILIES, RELEASES

OLD = RELEASES["bridge-0.2.0rc6"]
EP2_DP4 = {"world": 4, "tp": 1, "pp": 1, "ep": 2}
EP2_DP2 = {**EP2_DP4, "world": 2}
FIXED = list(FIXED_FAMILIES.values())


def _save(jobs, env, name, layout=EP2_DP4, **spec):
    return jobs.run(env, name, action="save", checkpoint_dir=jobs.checkpoint_dir(name), **layout, **spec)


def _load(jobs, env, checkpoint, name, layout=EP2_DP4, **spec):
    return jobs.run(env, name, action="load", checkpoint_dir=jobs.checkpoint_dir(checkpoint), **layout, **spec)


def _assert_own_state_or_fresh_beyond(saved, loaded, stored_dp_size):
    """Each rank has its own saved state back, bit-exact; one whose DP rank the checkpoint never held stays fresh."""
    own = saved_by_coordinates(saved)
    for rank in loaded:
        assert rank["error"] is None, f"rank {rank['rank']}: {rank['error']}"
        if rank["coords"]["dp"] < stored_dp_size:
            assert rank["fresh"] != own[coordinates(rank)]
            assert rank["loaded"] == own[coordinates(rank)], f"rank {rank['rank']} did not get its own state back"
        else:
            assert rank["loaded"] == rank["fresh"], f"rank {rank['rank']} did not keep its fresh state"


def _rank_zero_logs(results):
    return "\n".join(results[0]["logs"])


@pytest.mark.parametrize("fixed", FIXED)
def test_fixed_release_without_the_package_crashes_on_a_dp_shrink(jobs, fixed):
    """What every test below fixes, on the real release: the load planner misses the running layout's key."""
    _save(jobs, RELEASES[fixed], f"{fixed}-ep2")
    failed = _load(jobs, RELEASES[fixed], f"{fixed}-ep2", f"{fixed}-ep2-unpatched-dp2", EP2_DP2, patched=False)
    for rank in failed:
        assert re.search(r"Missing key in checkpoint state_dict: rng_state/shard_0\.0\.[01]_1\.1\.2", rank["error"])
        assert rank["loaded"] == rank["fresh"]


@pytest.mark.parametrize("fixed", FIXED)
def test_unpatched_old_releases_checkpoint_resumes_from_its_one_shared_state(jobs, fixed):
    saved = _save(jobs, OLD, "unpatched-ep2", patched=False)
    loaded = _load(jobs, RELEASES[fixed], "unpatched-ep2", f"unpatched-ep2-load-on-{fixed}")
    shared = next(rank["saved"] for rank in saved if rank["coords"]["dp"] == 0)
    assert all(rank["error"] is None and rank["loaded"] == shared for rank in loaded)
    assert "(the old bug)" in _rank_zero_logs(loaded)


@pytest.mark.parametrize("fixed", FIXED)
def test_patched_old_releases_checkpoint_resumes_every_rank_bit_exact(jobs, fixed):
    saved = _save(jobs, OLD, "patched-ep2")
    _assert_own_state_or_fresh_beyond(saved, _load(jobs, RELEASES[fixed], "patched-ep2", f"patched-ep2-on-{fixed}"), 4)


@pytest.mark.parametrize("fixed", FIXED)
def test_dp_shrink_from_4_to_2_gives_each_remaining_rank_its_own_state(jobs, fixed):
    saved = _save(jobs, RELEASES[fixed], f"{fixed}-ep2")
    loaded = _load(jobs, RELEASES[fixed], f"{fixed}-ep2", f"{fixed}-ep2-shrunk-to-dp2", EP2_DP2)
    _assert_own_state_or_fresh_beyond(saved, loaded, 4)
    assert "stores RNG state for DP size 4, this job runs DP size 2" in _rank_zero_logs(loaded)


@pytest.mark.parametrize("fixed", FIXED)
def test_dp_growth_from_2_to_4_keeps_fresh_rng_on_new_ranks_and_names_them(jobs, fixed):
    saved = _save(jobs, RELEASES[fixed], f"{fixed}-ep2-dp2", EP2_DP2)
    loaded = _load(jobs, RELEASES[fixed], f"{fixed}-ep2-dp2", f"{fixed}-ep2-dp2-grown-to-dp4")
    _assert_own_state_or_fresh_beyond(saved, loaded, 2)
    assert "DP ranks 2..3 keep fresh RNG state" in _rank_zero_logs(loaded)
    for rank in loaded[2:]:
        assert any(
            f"WARNING: rank {rank['rank']} (pp 0, tp 0, dp {rank['coords']['dp']})" in line for line in rank["logs"]
        )


@pytest.mark.parametrize("fixed", FIXED)
def test_ep_change_to_1_gives_each_rank_the_state_saved_at_its_coordinates(jobs, fixed):
    saved = _save(jobs, RELEASES[fixed], f"{fixed}-ep2")
    loaded = _load(jobs, RELEASES[fixed], f"{fixed}-ep2", f"{fixed}-ep2-ep1", {**EP2_DP4, "ep": 1})
    _assert_own_state_or_fresh_beyond(saved, loaded, 4)
    assert "each rank restores the state saved at its own (pp, tp, dp) coordinates" in _rank_zero_logs(loaded)


CP2_DP2_RANDOM_INIT = {"world": 4, "tp": 1, "pp": 1, "ep": 1, "cp": 2, "data_parallel_random_init": True}


def test_context_parallel_with_data_parallel_random_init_loses_state_upstream_and_not_with_the_package(jobs):
    """0.3.0 and later gather the states over DP with context parallel and index the list by the DP rank
    without it: with CP 2, DP rank 1 (ranks 2 and 3) restores DP rank 0's state."""
    fixed = RELEASES["bridge-0.3.1"]
    saved = _save(jobs, fixed, "cp2-random-init", CP2_DP2_RANDOM_INIT)
    assert all(rank["sharded_object"]["states"] == 4 for rank in saved)  # gathered over DP x CP
    unpatched = _load(jobs, fixed, "cp2-random-init", "cp2-random-init-unpatched", CP2_DP2_RANDOM_INIT, patched=False)
    own = {rank["rank"]: rank["saved"] for rank in saved}
    assert [rank["loaded"] == own[rank["rank"]] for rank in unpatched] == [True, True, False, False]
    assert all(rank["loaded"] == own[0] for rank in unpatched)
    loaded = _load(jobs, fixed, "cp2-random-init", "cp2-random-init-load", CP2_DP2_RANDOM_INIT)
    _assert_own_state_or_fresh_beyond(saved, loaded, 4)


def test_mimo_modules_rng_key_follows_its_stored_layout(jobs):
    """MegatronMIMO (0.5 and later) keys each module's RNG state ``rng_state.{module_name}``."""
    fixed = RELEASES["bridge-0.6.2"]
    saved = _save(jobs, fixed, "mimo-ep2", module_name="language")
    assert saved[0]["stored_keys"] == [f"rng_state.language/shard_0.0.{dp}_1.1.4" for dp in range(4)]
    loaded = _load(jobs, fixed, "mimo-ep2", "mimo-ep2-dp2", EP2_DP2, module_name="language")
    _assert_own_state_or_fresh_beyond(saved, loaded, 4)
