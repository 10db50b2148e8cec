"""Asynchronous saves (Bridge's ``CheckpointConfig.async_save``, Megatron-LM's ``--async-save``) and their resumes.

The package changes nothing on this path: ``get_rng_state`` runs in the trainer when the save starts, and the RNG
state is pickled there before any worker writes; the metadata its load reads is written at finalize, before the
tracker file a resume picks its iteration from. These jobs show it on the real loops: megatron-core's real
asynchronous save (``AsyncCallsQueue``, a worker process that writes the shards, the finalize functions), every RNG
source of every rank asserted after the resume. The worker is the temporary one forked for each save, not the
persistent one Bridge requires and Megatron-LM's ``validate_args`` asks for: that one is started with spawn, so on
the CPU it inherits none of the CUDA stand-ins and dies, and the trainer waits for it for ever (rng_job.py,
``_asynchronously``). Both write the same files from the same pickled state; ``tools/gpu_check.py`` saves with the
persistent worker on a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import EP2_DP4, assert_each_rank_resumes_its_own_state, rank_zero_logs

from tools.release_envs import RELEASES

OLD, FIXED, MEGATRON_LM = RELEASES["bridge-0.2.0rc6"], RELEASES["bridge-0.3.1"], RELEASES["megatron-lm-0.19.2"]
# A save scheduled asynchronously, finalized by every rank (blocking), then a resume in the same process.
SAVED_THEN_RESUMED = {"async_save": True, "then": "load"}


@pytest.mark.parametrize("env", [OLD, FIXED, MEGATRON_LM], ids=lambda env: env.name)
def test_asynchronous_save_resumed_in_the_same_process_gives_every_rank_its_own_state(jobs, env):
    ranks = jobs.save(env, f"async-{env.name}", **SAVED_THEN_RESUMED)
    assert all(rank["finished_before_finalize"] == [] for rank in ranks)  # the save was asynchronous
    assert_each_rank_resumes_its_own_state(ranks, ranks)


@pytest.mark.parametrize("env", [OLD, MEGATRON_LM], ids=lambda env: env.name)
def test_asynchronous_save_resumed_from_a_fresh_process_gives_every_rank_its_own_state(jobs, env):
    saved = jobs.save(env, f"async-{env.name}", **SAVED_THEN_RESUMED)
    assert_each_rank_resumes_its_own_state(saved, jobs.load(env, f"async-{env.name}", f"async-{env.name}-load"))


@pytest.mark.parametrize("env", [OLD, MEGATRON_LM], ids=lambda env: env.name)
def test_unpatched_asynchronous_save_loses_the_same_states_as_a_synchronous_one(jobs, env):
    """Without the package, every rank resumes DP rank 0's state, as after a synchronous save."""
    ranks = jobs.save(env, f"async-{env.name}-unpatched", patched=False, **SAVED_THEN_RESUMED)
    assert all(rank["error"] is None and rank["finished_before_finalize"] == [] for rank in ranks)
    assert [rank["loaded"] == rank["saved"] for rank in ranks] == [True, False, False, False]
    assert all(rank["loaded"] == ranks[0]["saved"] for rank in ranks)


def test_asynchronous_save_resumed_on_another_dp_size_gives_each_remaining_rank_its_own_state(jobs):
    """On a fixed release, where the same resume without the package crashes on every rank."""
    saved = jobs.save(FIXED, f"async-{FIXED.name}", **SAVED_THEN_RESUMED)
    loaded = jobs.load(FIXED, f"async-{FIXED.name}", f"async-{FIXED.name}-dp2", {**EP2_DP4, "world": 2})
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert "stores RNG state for DP size 4, this job runs DP size 2" in rank_zero_logs(loaded)


def test_a_job_killed_before_its_asynchronous_save_is_finalized_resumes_from_the_last_complete_one(jobs):
    """The ranks (and the save's worker) die after the save at iteration 20 was scheduled: its shards may be on disk,
    its metadata and the tracker file are not. The resume takes iteration 10, every rank its own state, and the
    package reads that checkpoint's layout only."""
    saved = jobs.save(OLD, f"async-{OLD.name}", **SAVED_THEN_RESUMED)
    checkpoint = Path(jobs.checkpoint_dir("async-killed"))
    shutil.copytree(jobs.checkpoint_dir(f"async-{OLD.name}"), checkpoint)
    died = jobs.save(OLD, "async-killed", async_save=True, then="die", iteration=20)
    assert all(rank["finished_before_finalize"] == [] for rank in died)
    assert not (checkpoint / "iter_0000020" / ".metadata").exists()
    assert (checkpoint / "latest_checkpointed_iteration.txt").read_text() == "10"
    loaded = jobs.load(OLD, "async-killed", "async-killed-resumed")
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert [rank["layout_reads_from"] for rank in loaded] == [[f"{checkpoint}/iter_0000010"], [], [], []]
