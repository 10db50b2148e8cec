"""Resuming across layouts, resizes and versions, on the real releases: no rank's RNG state is lost.

Each test is one row of the README's resume table. Jobs run the real ``save_checkpoint`` / ``load_checkpoint``
in 2 to 8 gloo processes (see jobs/rng_job.py); with EP > 1 every rank's streams differ, so a rank that got
another rank's state shows up as a fingerprint mismatch.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import EP2_DP4, assert_each_rank_resumes_its_own_state, coordinates, rank_zero_logs, saved_by_coordinates

from bridge_rng_patch.rng_layout import RngCheckpointError, read_stored_layouts
from tools.jobs import lost_streams
from tools.release_envs import RELEASES, SIGNATURE_FAMILIES

OLD = RELEASES["bridge-0.2.0rc6"]
FIXED = RELEASES["bridge-0.3.1"]


# What a user's run sees: seeded as the loop seeds, then training steps that draw alike on every rank
# (jobs/rng_job.py, ``_training_steps``), not the tests' per-rank draws that make every mix-up show.
AS_A_RUN_DOES = {"seeding": "megatron"}


@pytest.mark.parametrize("env", [OLD, RELEASES["megatron-lm-0.19.2"]], ids=lambda env: env.name)
def test_a_run_seeded_as_megatron_seeds_loses_only_the_expert_stream_of_ranks_off_dp_rank_0s_ep_rank(jobs, env):
    """The old (pp, tp) save keeps DP rank 0's state; the other DP ranks of its (pp, tp) hold the same state in every
    source but the expert-parallel tracker, seeded per EP rank."""
    saved = saved_by_coordinates(jobs.save(env, f"as-a-run-{env.name}", patched=False, **AS_A_RUN_DOES))
    loaded = _unpatched_run_resumed(jobs, env)
    for rank in loaded:
        assert rank["error"] is None
        expected = [] if rank["coords"]["ep"] == 0 else ["expert-parallel-rng"]
        assert lost_streams(saved[coordinates(rank)], rank["loaded"]) == expected, f"rank {rank['rank']}"


def _unpatched_run_resumed(jobs, env) -> list[dict]:
    """The unpatched resume of a run seeded as Megatron seeds, its loop calling the resume audit after the load as a
    loop the package does not patch would."""
    jobs.save(env, f"as-a-run-{env.name}", patched=False, **AS_A_RUN_DOES)
    name = f"as-a-run-{env.name}-load"
    return jobs.load(env, f"as-a-run-{env.name}", name, patched=False, audit_call=True, **AS_A_RUN_DOES)


def test_a_run_seeded_as_megatron_seeds_resumes_every_stream_with_the_package(jobs):
    saved = jobs.save(OLD, "as-a-run-patched", **AS_A_RUN_DOES)
    loaded = jobs.load(OLD, "as-a-run-patched", "as-a-run-patched-load", **AS_A_RUN_DOES)
    assert_each_rank_resumes_its_own_state(saved, loaded)


def test_a_run_with_data_parallel_random_init_loses_nothing_unpatched_on_the_same_layout(jobs):
    """Every source is seeded per DP rank, and the old save gathers every DP rank's state into its (pp, tp) shard."""
    spec = {"patched": False, "data_parallel_random_init": True, **AS_A_RUN_DOES}
    saved = jobs.save(OLD, "as-a-run-random-init", **spec)
    loaded = jobs.load(OLD, "as-a-run-random-init", "as-a-run-random-init-load", **spec)
    assert_each_rank_resumes_its_own_state(saved, loaded)


def test_unpatched_checkpoint_loads_under_the_patch_from_its_one_shared_state(jobs):
    saved = jobs.save(OLD, "unpatched-ep2", patched=False)
    loaded = jobs.load(OLD, "unpatched-ep2", "unpatched-ep2-then-patched")
    shared = next(rank["saved"] for rank in saved if rank["coords"]["dp"] == 0)
    assert all(rank["error"] is None and rank["loaded"] == shared for rank in loaded)
    assert "carries one shared state per (pp, tp)" in rank_zero_logs(loaded)
    assert "(the old bug)" in rank_zero_logs(loaded)


def test_patched_checkpoint_resumes_every_rank_bit_exact(jobs):
    saved = jobs.save(OLD, "patched-ep2")
    assert_each_rank_resumes_its_own_state(saved, jobs.load(OLD, "patched-ep2", "patched-ep2-load"))


def test_patched_checkpoint_loads_with_ep_now_1_and_each_rank_takes_its_own_coordinates_state(jobs):
    saved = jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(OLD, "patched-ep2", "patched-ep2-load-ep1", layout={**EP2_DP4, "ep": 1})
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert rank_zero_logs(loaded).endswith(
        "4 restored the state stored for their coordinates; the streams Megatron seeds apart are apart"
    )


@pytest.mark.parametrize("old", list(SIGNATURE_FAMILIES.values()))
def test_fixed_upstream_checkpoint_loads_on_patched_old_release_bit_exact(jobs, old):
    saved = jobs.save(FIXED, "fixed-ep2")
    assert_each_rank_resumes_its_own_state(saved, jobs.load(RELEASES[old], "fixed-ep2", f"fixed-ep2-load-{old}"))


def test_dp_shrink_from_4_to_2_gives_each_remaining_rank_its_own_state(jobs):
    saved = jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(OLD, "patched-ep2", "patched-ep2-load-dp2", layout={**EP2_DP4, "world": 2})
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert "stores RNG state for DP size 4, this job runs DP size 2" in rank_zero_logs(loaded)


def test_dp_growth_from_4_to_8_keeps_fresh_rng_on_new_ranks_and_names_them(jobs):
    saved = saved_by_coordinates(jobs.save(OLD, "patched-ep2"))
    loaded = jobs.load(OLD, "patched-ep2", "patched-ep2-load-dp8", layout={**EP2_DP4, "world": 8})
    for rank in loaded:
        assert rank["error"] is None
        dp = rank["coords"]["dp"]
        if dp < 4:
            assert rank["loaded"] == saved[coordinates(rank)]
            assert not any(line.startswith("WARNING") for line in rank["logs"])
        else:
            assert rank["loaded"] == rank["fresh"]
            assert any(
                line.startswith(f"WARNING: rank {rank['rank']} (pp 0, tp 0, dp {dp}): checkpoint ")
                and line.endswith("holds no RNG state for it; it keeps its fresh RNG state")
                for line in rank["logs"]
            )
    assert "DP ranks 4..7 keep fresh RNG state" in rank_zero_logs(loaded)


def test_unpatched_old_release_resumes_a_patched_checkpoint_as_its_own_and_load_rng_false_keeps_fresh_state(jobs):
    """Its own (pp, tp) shard is there: every rank resumes DP rank 0's state, as from its own checkpoint."""
    saved = jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(OLD, "patched-ep2", "patched-ep2-load-unpatched", patched=False)
    assert all(rank["error"] is None and rank["loaded"] == saved[0]["saved"] for rank in loaded)
    without_rng = jobs.load(OLD, "patched-ep2", "patched-ep2-load-unpatched-no-rng", patched=False, load_rng=False)
    assert all(rank["error"] is None and rank["loaded"] == rank["fresh"] for rank in without_rng)


@pytest.mark.parametrize("option", [{"load_rng": False}, {"finetune": True}], ids=["load_rng=False", "finetune"])
def test_load_rng_false_and_finetune_leave_rng_state_alone_as_upstream(jobs, option):
    jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(OLD, "patched-ep2", f"patched-ep2-load-{next(iter(option))}", **option)
    assert all(rank["error"] is None and rank["loaded"] == rank["fresh"] for rank in loaded)


def test_data_parallel_random_init_round_trip_is_bit_exact(jobs):
    saved = jobs.save(OLD, "patched-ep2-dp-random-init", data_parallel_random_init=True)
    assert all(rank["sharded_object"]["states"] == 4 for rank in saved)  # the DP all-gather is kept
    loaded = jobs.load(
        OLD, "patched-ep2-dp-random-init", "patched-ep2-dp-random-init-load", data_parallel_random_init=True
    )
    assert_each_rank_resumes_its_own_state(saved, loaded)


def test_tensor_states_restore_into_a_graph_safe_tracker_as_generators(jobs):
    saved = saved_by_coordinates(jobs.save(OLD, "patched-ep2"))
    loaded = jobs.load(OLD, "patched-ep2", "patched-ep2-load-graph-safe", graph_safe_tracker=True)
    for rank in loaded:
        assert rank["error"] is None
        expected = {name: ["Generator", digest] for name, (_, digest) in saved[coordinates(rank)]["tracker"].items()}
        assert rank["loaded"]["tracker"] == expected


def test_unpatched_release_hands_a_graph_safe_tracker_byte_tensors(jobs):
    """The second bug, on the real release: the tracker ends up holding the wrong form of state."""
    jobs.save(OLD, "unpatched-ep2", patched=False)
    loaded = jobs.load(OLD, "unpatched-ep2", "unpatched-ep2-load-graph-safe", patched=False, graph_safe_tracker=True)
    assert all(kind == "Tensor" for rank in loaded for kind, _ in rank["loaded"]["tracker"].values())


def test_generator_states_from_a_graph_safe_tracker_restore_into_a_plain_tracker_as_tensors(jobs):
    saved = saved_by_coordinates(jobs.save(OLD, "patched-ep2-graph-safe", graph_safe_tracker=True))
    assert all(kind == "Generator" for rank in saved.values() for kind, _ in rank["tracker"].values())
    loaded = jobs.load(OLD, "patched-ep2-graph-safe", "patched-ep2-graph-safe-load-plain")
    for rank in loaded:
        assert rank["error"] is None
        expected = {name: ["Tensor", digest] for name, (_, digest) in saved[coordinates(rank)]["tracker"].items()}
        assert rank["loaded"]["tracker"] == expected


def test_one_rank_reads_the_stored_layout_and_the_others_receive_it(jobs):
    """One read of the checkpoint's metadata per load for the whole job, not one per rank."""
    jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(OLD, "patched-ep2", "patched-ep2-load")
    assert [rank["layout_reads"] for rank in loaded] == [1, 0, 0, 0]


def test_unreadable_metadata_fails_every_rank_with_the_same_error_and_none_waits(jobs):
    jobs.save(OLD, "truncated-metadata", tamper="truncated_metadata")
    loaded = jobs.load(OLD, "truncated-metadata", "truncated-metadata-load")
    errors = {rank["error"] for rank in loaded}
    assert len(errors) == 1
    assert re.fullmatch(
        f"RngCheckpointError: checkpoint {re.escape(jobs.checkpoint_dir('truncated-metadata'))}/iter_0000010: "
        r"\.metadata is truncated or corrupt \(\d+ bytes, not a whole pickle\), so nothing of this checkpoint can "
        r"be loaded; resume from another checkpoint",
        errors.pop(),
    )
    assert all(rank["loaded"] == rank["fresh"] for rank in loaded)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("torch_rng_state", "'rng_state'[{dp}]['torch_rng_state'] is a torch.float32 tensor of shape (3,), expected"),
        ("empty_tracker", "'rng_state'[{dp}]['rng_tracker_states'] is a dict, expected a non-empty dict"),
        ("unknown_layout", "the metadata of 'rng_state' fits no known RNG layout (shard shapes [(4,)]"),
    ],
)
def test_bad_rng_state_fails_naming_checkpoint_and_key_and_restores_nothing(jobs, tamper, message):
    name = f"tampered-{tamper}"
    jobs.save(OLD, name, tamper=tamper)
    loaded = jobs.load(OLD, name, f"{name}-load")
    for rank in loaded:
        assert rank["error"].startswith(f"RngCheckpointError: checkpoint {jobs.checkpoint_dir(name)}/iter_0000010")
        assert message.format(dp=rank["coords"]["dp"]) in rank["error"]  # the entry it checked: its own
        assert "resume with checkpoint.load_rng=False" in rank["error"]  # Bridge's own switch
        assert rank["loaded"] == rank["fresh"]


@pytest.mark.parametrize("release", ["bridge-0.2.0rc6", "bridge-0.3.1"])
def test_data_parallel_random_init_dp_growth_keeps_fresh_rng_past_the_gathered_list_and_names_them(jobs, release):
    """A (pp, tp) checkpoint written with data_parallel_random_init holds one list of every DP rank's state;
    after a DP growth, DP ranks past its end have no state in it."""
    layout = {"world": 4, "tp": 1, "pp": 1, "ep": 1, "data_parallel_random_init": True}
    name = f"{release}-ep1-random-init"
    saved = saved_by_coordinates(jobs.save(RELEASES[release], name, layout))
    loaded = jobs.load(RELEASES[release], name, f"{name}-dp8", {**layout, "world": 8})
    for rank in loaded:
        assert rank["error"] is None
        dp = rank["coords"]["dp"]
        if dp < 4:
            assert rank["loaded"] == saved[coordinates(rank)]
        else:
            assert rank["loaded"] == rank["fresh"], f"rank {rank['rank']} did not keep its fresh state"
            assert any(line.startswith(f"WARNING: rank {rank['rank']} (pp 0, tp 0, dp {dp})") for line in rank["logs"])
    assert (
        "stores RNG states gathered with data_parallel_random_init for DP size 4, this job runs DP size 8: "
        "DP ranks 4..7 keep fresh RNG state" in rank_zero_logs(loaded)
    )


def test_every_cut_of_a_real_metadata_file_is_told_from_the_whole_one(jobs, tmp_path):
    """A cut pickle may end with a "." of its own (0.6.2's, cut in half, did); the layout read refuses every
    cut without unpickling, and reads the whole file."""
    jobs.save(OLD, "patched-ep2")
    data = (Path(jobs.checkpoint_dir("patched-ep2")) / "iter_0000010" / ".metadata").read_bytes()
    for length in [*range(0, len(data), 7), len(data) // 2, len(data) - 1]:
        (tmp_path / ".metadata").write_bytes(data[:length])
        with pytest.raises(RngCheckpointError, match=r"\.metadata is truncated or corrupt"):
            read_stored_layouts(str(tmp_path))
    (tmp_path / ".metadata").write_bytes(data)
    assert read_stored_layouts(str(tmp_path))["rng_state"].global_shape == (1, 1)


# The resume audit (resume_audit.py): one line on rank 0 after each resume, read here from the jobs above.
AUDIT = "RNG resume audit of checkpoint "
APART = "the streams Megatron seeds apart are apart"


def _audit_line(loaded: list[dict]) -> str:
    (line,) = [line for line in loaded[0]["logs"] if "RNG resume audit" in line]
    return line


@pytest.mark.parametrize("env", [OLD, RELEASES["megatron-lm-0.19.2"]], ids=lambda env: env.name)
def test_the_audit_an_unpatched_loop_calls_names_the_collapsed_expert_stream_on_the_ranks_that_lost_it(jobs, env):
    """EP ranks 1 (ranks 1 and 3) resumed DP rank 0's expert stream, which Megatron seeds per EP rank."""
    loaded = _unpatched_run_resumed(jobs, env)
    for rank in loaded:
        assert rank["audit"]["passed"] is False
        assert rank["audit"]["collapsed"] == {"expert-parallel-rng": [[0, 2], [1, 3]]}
    line = _audit_line(loaded)
    assert line.startswith("WARNING: RNG resume audit, 4 ranks: what each rank was handed is not known")
    assert "expert-parallel-rng of ranks 1, 3 is that of ranks 0, 2" in line
    # A loop the package does not patch is not known: the remedy is its own switch, unnamed.
    assert "resume with the loop's own switch that resumes without RNG state to seed them apart again" in line


def test_the_audit_of_a_patched_resume_passes_every_rank_holding_its_own_state(jobs):
    jobs.save(OLD, "as-a-run-patched", **AS_A_RUN_DOES)
    loaded = jobs.load(OLD, "as-a-run-patched", "as-a-run-patched-load", **AS_A_RUN_DOES)
    line = _audit_line(loaded)
    assert line.startswith(f"INFO: {AUDIT}")
    assert line.endswith(f"4 ranks: 4 restored the state stored for their coordinates; {APART}")


def test_the_audit_of_an_old_checkpoint_resumed_with_the_package_names_what_it_lost(jobs):
    """The checkpoint kept one state per (pp, tp), DP rank 0's: every rank resumes it, and the expert stream stays
    collapsed. DP rank 0 wrote it, so it holds its own; the other three hold its state."""
    jobs.save(OLD, "unpatched-ep2", patched=False)
    line = _audit_line(jobs.load(OLD, "unpatched-ep2", "unpatched-ep2-then-patched"))
    assert line.startswith(f"WARNING: {AUDIT}")
    assert (
        "4 ranks: 1 restored the state stored for their coordinates, 3 resumed the one state stored for their (pp, tp) "
        "(the checkpoint holds no per-rank state)" in line
    )
    assert "expert-parallel-rng of ranks 1, 3 is that of ranks 0, 2" in line
    assert "every checkpoint it saves stores them as they are, collapsed: resume with checkpoint.load_rng=False" in line
    # The INFO line before it agrees: later checkpoints store each rank's state as it then is.
    logs = rank_zero_logs(jobs.load(OLD, "unpatched-ep2", "unpatched-ep2-then-patched"))
    assert "from here on each rank's checkpoints store the state it then holds" in logs


def test_the_audit_counts_new_dp_ranks_as_fresh_by_design(jobs):
    jobs.save(OLD, "patched-ep2")
    line = _audit_line(jobs.load(OLD, "patched-ep2", "patched-ep2-load-dp8", layout={**EP2_DP4, "world": 8}))
    assert line.endswith(
        "8 ranks: 4 restored the state stored for their coordinates, 4 kept fresh state by design (a new DP rank, or "
        f"a TP or PP change); {APART}"
    )


def test_the_audit_of_a_data_parallel_random_init_resume_expects_every_stream_apart_per_dp_rank(jobs):
    jobs.save(OLD, "patched-ep2-dp-random-init", data_parallel_random_init=True)
    name = "patched-ep2-dp-random-init-load"
    loaded = jobs.load(OLD, "patched-ep2-dp-random-init", name, data_parallel_random_init=True)
    assert _audit_line(loaded).endswith(f"4 restored the state stored for their coordinates; {APART}")


@pytest.mark.parametrize("option", [{"load_rng": False}, {"finetune": True}], ids=["load_rng=False", "finetune"])
def test_a_resume_that_restores_no_rng_state_audits_nothing_and_says_so(jobs, option):
    jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(OLD, "patched-ep2", f"patched-ep2-load-{next(iter(option))}", **option)
    assert _audit_line(loaded).endswith(
        "the loop restored no RNG state (load_rng off, finetune, a TP or PP change, "
        "or a release checkpoint); nothing to audit"
    )


def test_a_rank_that_fails_inside_the_audit_is_named_and_the_job_goes_on(jobs):
    """Rank 1 cannot read a source: it still joins the collective with its error, and nothing waits for it."""
    saved = jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(OLD, "patched-ep2", "patched-ep2-load-audit-fails", audit_fails_on=1)
    assert_each_rank_resumes_its_own_state(saved, loaded)
    line = _audit_line(loaded)
    assert line.startswith(f"WARNING: {AUDIT}")
    failure = "rank 1 could not be audited (rank 1: RuntimeError: a source that cannot be read)"
    assert f"3 restored the state stored for their coordinates; {failure}" in line


def test_the_audit_is_switched_off_by_its_variable(jobs):
    jobs.save(OLD, "patched-ep2")
    loaded = jobs.load(
        OLD, "patched-ep2", "patched-ep2-load-no-audit", rank_environment={"BRIDGE_RNG_PATCH_AUDIT": "0"}
    )
    assert not any("RNG resume audit" in line for rank in loaded for line in rank["logs"])
