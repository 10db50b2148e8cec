"""verl and ms-swift checkpoint Megatron models with code of their own, and keep the old RNG bugs there: the same
patches, declared per stack in ``loops.py``, fix them.

Each test runs the stack's own save and load (verl's ``MegatronCheckpointManager``, ms-swift's
``save_mcore_checkpoint`` / ``load_mcore_checkpoint``; see jobs/stack_loops.py for what is faked, all of it for the
lack of a GPU) in 4-rank gloo jobs with EP 2, on the oldest and newest release of each on the registry, and compares
every RNG source of every rank, bit for bit. The decisions are read on every release.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import (
    EP2_DP4,
    REPO,
    assert_each_rank_resumes_its_own_state,
    assert_every_rank_keeps_its_fresh_state,
    coordinates,
    rank_zero_logs,
    run_python,
    saved_by_coordinates,
)
from packaging.version import Version

from tools.jobs import run_job
from tools.release_envs import MS_SWIFT_RELEASES, RELEASES, VERL_RELEASES, stack_dir

VERL_OLDEST, VERL_NEWEST = RELEASES["verl-0.4.1"], RELEASES["verl-0.9.1"]
# ms-swift before 4.5.3 answers torch's save-plan check as the torch it was built for, which the tests' torch rejects:
# the jobs give it the answer 4.5.3 gives (jobs/stack_loops.py; measured as released below).
SWIFT_OLDEST, SWIFT_NEWEST = RELEASES["ms-swift-4.0.0"], RELEASES["ms-swift-4.6.0"]
ROUND_TRIPS = [VERL_OLDEST, VERL_NEWEST, SWIFT_OLDEST, SWIFT_NEWEST]
NEWEST = [VERL_NEWEST, SWIFT_NEWEST]
EP2_DP2 = {**EP2_DP4, "world": 2}
FSDP = {"ckpt_format": "fsdp_dtensor"}
ALL_APPLIED = {
    "save_sharding": "applied",
    "tracker_restore": "applied",
    "layout_load": "applied",
    "data_init_callbacks": "not needed",  # Megatron-Bridge's alone
    "keep_restored": "applied",
    "resume_audit": "applied",
}
# verl's trainer loads in its driver's workers and builds its data loader in the driver: nothing of the workers' set-up
# is known to draw between the restore and the first update (the README's "Where bit-exact holds": not measured).
VERL_DECISIONS = {**ALL_APPLIED, "keep_restored": "not needed"}
# ms-swift's trainers, where the keep and the first-step check go, import Transformer Engine's layers (CUDA only): with
# its checkpointing module alone imported, both patches wait for them (their functions: test_first_step.py).
MS_SWIFT_DECISIONS = {**ALL_APPLIED, "keep_restored": "pending", "resume_audit": "pending"}

# Every release of one stack on one megatron-core, decided in one interpreter: each release's own modules are imported
# afresh (its package's modules dropped from sys.modules first), and the package decides on them as at a user's
# import; what they import besides (torch, megatron-core, transformers, ray) is imported once. A release's import
# takes a fraction of a second then, where a fresh interpreter takes 10 to 20.
DECIDE_EACH = """
import json, sys
sys.path.insert(0, {jobs!r})
import stack_loops
import bridge_rng_patch
decided = {{}}
for version, path in {releases!r}:
    for name in [name for name in sys.modules if name.partition(".")[0] == {package!r}]:
        del sys.modules[name]
    sys.path.insert(0, path)
    module = stack_loops.import_checkpointing({loop!r})
    bridge_rng_patch.apply()
    statuses = bridge_rng_patch.status({name!r})
    decided[version] = {{
        "states": {{status.name: status.state for status in statuses}},
        "reasons": {{status.name: status.reason for status in statuses}},
        "from": module.__file__,
    }}
    bridge_rng_patch.undo()
    sys.path.remove(path)
print(json.dumps(decided))
"""


def _decisions(releases: tuple, loop: str, name: str, package: str) -> dict[str, dict]:
    decided = {}
    for core in sorted({release.core for release in releases}):
        group = [release for release in releases if release.core == core]
        versions = [(release.stack[1], str(stack_dir(*release.stack))) for release in group]
        code = DECIDE_EACH.format(
            jobs=str(REPO / "tests" / "jobs"), releases=versions, package=package, loop=loop, name=name
        )
        process = run_python(group[0], code, timeout=900)
        assert process.returncode == 0, process.stderr[-3000:]
        decided.update(json.loads(process.stdout.splitlines()[-1]))
    return decided


@pytest.fixture(scope="module")
def verl_decisions() -> dict[str, dict]:
    return _decisions(VERL_RELEASES, "verl", "verl", "verl")


@pytest.fixture(scope="module")
def ms_swift_decisions() -> dict[str, dict]:
    return _decisions(MS_SWIFT_RELEASES, "ms-swift", "ms-swift", "swift")


@pytest.mark.parametrize("release", VERL_RELEASES, ids=lambda release: release.name)
def test_every_verl_release_gets_every_patch(verl_decisions, release):
    decision = verl_decisions[release.stack[1]]
    assert str(stack_dir(*release.stack)) in decision["from"]
    assert decision["states"] == VERL_DECISIONS
    assert decision["reasons"]["save_sharding"].startswith(
        "MegatronCheckpointManager.get_rng_state(use_dist_ckpt, data_parallel_random_init) with mpu globals shards by "
        "(pp, tp) only"
    )
    assert decision["reasons"]["layout_load"].startswith("load_dist_checkpointing(sharded_state_dict, ckpt_dir) asks")


@pytest.mark.parametrize("release", MS_SWIFT_RELEASES, ids=lambda release: release.name)
def test_every_ms_swift_4_release_gets_every_patch(ms_swift_decisions, release):
    """From 4.5.3 its get_rng_state takes the format and its fsdp_dtensor module keys the RNG state by (pp, tp)."""
    decision = ms_swift_decisions[release.stack[1]]
    assert str(stack_dir(*release.stack)) in decision["from"]
    assert decision["states"] == MS_SWIFT_DECISIONS
    assert decision["reasons"]["keep_restored"].startswith("waiting for swift.megatron.trainers.base, ")
    with_fsdp = Version(release.stack[1]) >= Version("4.5.3")
    signature = "_get_rng_state(fsdp_dtensor, data_parallel_random_init)" if with_fsdp else "_get_rng_state()"
    formats = "torch_dist and fsdp_dtensor" if with_fsdp else "torch_dist"
    assert decision["reasons"]["save_sharding"] == f"{signature} with mpu globals shards by (pp, tp) only ({formats})"


def _readme_stack_rows(table: str) -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    rows = text[text.index(f"<!-- {table} -->") : text.index(f"<!-- end of {table} -->")]
    return [cells for cells in _cells(rows) if re.match(r"\d", cells[0])]


@pytest.mark.parametrize(
    ("table", "releases", "fixture"),
    [("verl table", VERL_RELEASES, "verl_decisions"), ("ms-swift table", MS_SWIFT_RELEASES, "ms_swift_decisions")],
    ids=["verl", "ms-swift"],
)
def test_readme_stack_tables_match_what_the_package_decides(request, table, releases, fixture):
    """Each row: a range of releases, the megatron-core they were decided on, and the three fixes' decisions."""
    decided = request.getfixturevalue(fixture)
    covered = []
    for span, core, python, *states in _readme_stack_rows(table):
        first, last = (Version(end) for end in span.split(" to "))
        spanned = [
            release for release in releases if first <= Version(release.stack[1]) <= last and release.core == core
        ]
        assert spanned, f"no release decided in {span} on megatron-core {core}"
        assert all(release.python_line == python for release in spanned)
        fixes = ("save_sharding", "tracker_restore", "layout_load")
        assert all([decided[release.stack[1]]["states"][fix] for fix in fixes] == states for release in spanned)
        covered += spanned
    assert sorted(release.name for release in covered) == sorted(release.name for release in releases)


def _name(env, what: str) -> str:
    return f"{env.name}-{what}"


@pytest.mark.parametrize("env", ROUND_TRIPS, ids=lambda env: env.name)
def test_unpatched_stack_with_ep_2_gives_every_rank_dp_rank_0s_state_and_the_audit_names_the_lost_stream(jobs, env):
    """The bug, through the stack's own save and load: one (pp, tp) shard is written, and every rank resumes DP rank
    0's state; the two lines an unpatched loop adds after its load name the expert stream of EP rank 1."""
    saved = jobs.save(env, _name(env, "unpatched"), patched=False)
    assert (saved[0]["stored_keys"], saved[0]["stored_states"]) == (["rng_state/shard_0.0_1.1"], [1])
    loaded = jobs.load(env, _name(env, "unpatched"), _name(env, "unpatched-load"), patched=False, audit_call=True)
    own = [rank["saved"] for rank in saved]
    assert [rank["error"] for rank in loaded] == [None] * 4
    assert [rank["loaded"] == own[rank["rank"]] for rank in loaded] == [True, False, False, False]
    assert all(rank["loaded"] == own[0] for rank in loaded)
    assert loaded[0]["audit"]["collapsed"] == {"expert-parallel-rng": [[0, 2], [1, 3]]}


@pytest.mark.parametrize("env", ROUND_TRIPS, ids=lambda env: env.name)
def test_patched_stack_with_ep_2_resumes_every_rank_bit_exact(jobs, env):
    saved = jobs.save(env, _name(env, "patched"))
    # The stack's own (pp, tp) shard, its list holding every DP rank's state.
    assert (saved[0]["stored_keys"], saved[0]["stored_states"]) == (["rng_state/shard_0.0_1.1"], [4])
    loaded = jobs.load(env, _name(env, "patched"), _name(env, "patched-load"))
    assert_each_rank_resumes_its_own_state(saved, loaded)
    assert rank_zero_logs(loaded).endswith(
        "4 restored the state stored for their coordinates; the streams Megatron seeds apart are apart"
    )


@pytest.mark.parametrize("env", NEWEST, ids=lambda env: env.name)
def test_an_upstream_checkpoint_resumes_as_before_with_the_old_bug_named(jobs, env):
    saved = jobs.save(env, _name(env, "unpatched"), patched=False)
    loaded = jobs.load(env, _name(env, "unpatched"), _name(env, "unpatched-then-patched"))
    assert all(rank["error"] is None and rank["loaded"] == saved[0]["saved"] for rank in loaded)
    assert "carries one shared state per (pp, tp), the state of one DP rank (the old bug)" in rank_zero_logs(loaded)


@pytest.mark.parametrize("env", NEWEST, ids=lambda env: env.name)
def test_dp_shrink_from_4_to_2_gives_each_remaining_rank_its_own_state(jobs, env):
    saved = jobs.save(env, _name(env, "patched"))
    loaded = jobs.load(env, _name(env, "patched"), _name(env, "patched-dp2"), EP2_DP2)
    assert_each_rank_resumes_its_own_state(saved, loaded)


@pytest.mark.parametrize("env", NEWEST, ids=lambda env: env.name)
def test_dp_growth_from_2_to_4_keeps_fresh_rng_on_new_ranks_and_names_them(jobs, env):
    saved = jobs.save(env, _name(env, "patched-saved-dp2"), EP2_DP2)
    loaded = jobs.load(env, _name(env, "patched-saved-dp2"), _name(env, "patched-saved-dp2-dp4"))
    assert_each_rank_resumes_its_own_state(saved, loaded, stored_dp_size=2)
    assert "DP ranks 2..3 keep fresh RNG state" in rank_zero_logs(loaded)


@pytest.mark.parametrize("env", NEWEST, ids=lambda env: env.name)
def test_ep_changed_to_1_into_a_graph_safe_tracker_restores_each_ranks_coordinates_as_graph_safe_states(jobs, env):
    """Both in one resume: EP 1 reads each rank's (pp, tp, dp) entry, and the tracker (``use_cudagraphable_rng``)
    is handed Generators, where the stacks hand it the saved tensors as they are."""
    saved = saved_by_coordinates(jobs.save(env, _name(env, "patched")))
    layout = {**EP2_DP4, "ep": 1}
    loaded = jobs.load(
        env, _name(env, "patched"), _name(env, "patched-ep1-graph-safe"), layout, graph_safe_tracker=True
    )
    for rank in loaded:
        assert rank["error"] is None
        restored = {name: digest for name, (_, digest) in rank["loaded"]["tracker"].items()}
        assert restored == {name: digest for name, (_, digest) in saved[coordinates(rank)]["tracker"].items()}
        assert {form for form, _ in rank["loaded"]["tracker"].values()} == {"Generator"}


def test_verl_after_a_tp_change_keeps_fresh_rng_on_every_rank_and_says_so(jobs):
    """verl loads the running job's (pp, tp) shard whatever the checkpoint stores; measured upstream: the new TP
    layout's shard is missing, the load fails with a CheckpointException on the ranks of one DP group, and the others
    wait for them until the job dies (``test_upstream_verl_after_a_tp_change_dies``)."""
    jobs.save(VERL_NEWEST, _name(VERL_NEWEST, "patched"))
    layout = {**EP2_DP4, "tp": 2}
    loaded = jobs.load(VERL_NEWEST, _name(VERL_NEWEST, "patched"), _name(VERL_NEWEST, "patched-tp2"), layout)
    assert_every_rank_keeps_its_fresh_state(loaded)
    assert "(TP, PP) mismatch after resume ((2, 1) vs (1, 1) from checkpoint): RNG state will be ignored" in (
        rank_zero_logs(loaded)
    )


def test_upstream_verl_after_a_tp_change_dies(jobs):
    jobs.save(VERL_NEWEST, _name(VERL_NEWEST, "unpatched"), patched=False)
    spec = {**EP2_DP4, "tp": 2, "action": "load", "patched": False, "collective_timeout": 20}
    spec["checkpoint_dir"] = jobs.checkpoint_dir(_name(VERL_NEWEST, "unpatched"))
    loaded = run_job(VERL_NEWEST, spec, jobs.base, _name(VERL_NEWEST, "unpatched-tp2"))
    assert not any(rank.get("error") is None and "crash" not in rank for rank in loaded)
    assert any("CheckpointException" in (rank.get("error") or "") for rank in loaded)


def test_ms_swift_fsdp_dtensor_resumes_every_rank_bit_exact_where_upstream_mixes_ranks(jobs):
    env = SWIFT_NEWEST
    saved = jobs.save(env, _name(env, "fsdp"), **FSDP)
    assert saved[0]["sharded_object"]["keys"] == ["(0, 0)", "(0, 0, 0)"]
    assert_each_rank_resumes_its_own_state(saved, jobs.load(env, _name(env, "fsdp"), _name(env, "fsdp-load"), **FSDP))
    upstream_saved = jobs.save(env, _name(env, "fsdp-unpatched"), patched=False, **FSDP)
    upstream = jobs.load(env, _name(env, "fsdp-unpatched"), _name(env, "fsdp-unpatched-load"), patched=False, **FSDP)
    assert all(rank["loaded"] == upstream[0]["loaded"] for rank in upstream)  # one dict for every rank
    own = saved_by_coordinates(upstream_saved)
    assert all(rank["loaded"] != own[coordinates(rank)] for rank in upstream[1:])


def test_readme_coverage_summary_rows_of_the_stacks_span_every_release_decided(verl_decisions, ms_swift_decisions):
    text = (REPO / "README.md").read_text()
    table = text[text.index("<!-- coverage summary -->") : text.index("<!-- end of coverage summary -->")]
    rows = {cells[0]: cells[1:] for cells in _cells(table) if cells[0] in ("verl", "ms-swift")}
    fixes = ("save_sharding", "tracker_restore", "layout_load")
    for stack, decided in (("verl", verl_decisions), ("ms-swift", ms_swift_decisions)):
        span, *states = rows[stack]
        assert span == f"{min(decided, key=Version)} to {max(decided, key=Version)}"
        assert all([decision["states"][fix] for fix in fixes] == states for decision in decided.values())


def _cells(table: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in row.strip().strip("|").split("|")]
        for row in table.splitlines()
        if row.startswith("|")
    ]


def _inspect(checkpoint: str) -> tuple[int, dict]:
    process = subprocess.run(
        [sys.executable, "-m", "bridge_rng_patch", "inspect", checkpoint, "--json", "--resume-with", "dp=2"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert "Traceback" not in process.stderr, process.stderr
    (report,) = json.loads(process.stdout)
    return process.returncode, report


@pytest.mark.parametrize("env", [VERL_OLDEST, VERL_NEWEST, SWIFT_NEWEST], ids=lambda env: env.name)
def test_inspect_reads_the_stacks_checkpoints_and_gives_the_same_verdicts(jobs, env):
    """verl's save is a ``global_step_*`` directory, its RNG state in its own dist-checkpoint (``extra/dist_ckpt``
    from 0.8) and its run's sizes in ``transformer_config.json``; ms-swift's is Megatron-LM's layout with its args."""
    jobs.save(env, _name(env, "unpatched"), patched=False)
    jobs.save(env, _name(env, "patched"))
    loop = "verl" if env.loop == "verl" else "ms-swift"
    code, upstream = _inspect(jobs.checkpoint_dir(_name(env, "unpatched")))
    assert (code, upstream["verdict"], upstream["run"]["loop"], upstream["run"]["ep"]) == (1, "incomplete", loop, 2)
    assert upstream["run"]["dp"] == 4
    assert "3 of 4 ranks' RNG states were never written" in upstream["summary"]
    code, patched = _inspect(jobs.checkpoint_dir(_name(env, "patched")))
    assert (code, patched["verdict"]) == (0, "complete")
    assert [rank["gets"] for rank in patched["resume"]] == ["own state"] * 2


# A verl trainer is a Ray actor: a process of Ray's, not of the command that starts the job. The driver starts a local
# Ray cluster, as verl's ``main_ppo`` does, and asks a task what its process had imported before its own code ran.
RAY_DRIVER = """
import json, sys
import ray

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)


@ray.remote
def decide():
    imported_at_start = "bridge_rng_patch" in sys.modules
    import bridge_rng_patch
    import verl.utils.checkpoint.megatron_checkpoint_manager  # noqa: F401

    return imported_at_start, {status.name: status.state for status in bridge_rng_patch.status("verl")}


print(json.dumps(ray.get(decide.remote())))
ray.shutdown()
"""


def test_verl_ray_workers_of_a_job_started_through_the_launcher_import_the_package_first(tmp_path):
    """The README's advice for verl: ``bridge-rng-patch run -- python3 -m verl.trainer.main_ppo ...``; the Ray
    cluster the job starts hands the environment on to its workers, and each imports the package at start-up."""
    driver = tmp_path / "driver.py"
    driver.write_text(RAY_DRIVER)
    python = str(VERL_NEWEST.python)
    environment = VERL_NEWEST.environment({**os.environ, "PYTHONWARNINGS": "ignore", "RAY_AUTH_MODE": "disabled"})
    process = subprocess.run(
        [python, "-m", "bridge_rng_patch", "run", "--", python, str(driver)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    imported_at_start, states = json.loads(process.stdout.splitlines()[-1])
    assert imported_at_start
    assert states == VERL_DECISIONS


def test_ms_swift_before_4_5_3_as_released_cannot_save_under_the_tests_torch(jobs):
    """Why its jobs answer the save-plan check as 4.5.3 does (measured, without the package): the older releases'
    save dies in torch 2.13's planner, where their replacement of ``_validate_global_plan`` answers True instead of
    a list of errors."""
    env = SWIFT_OLDEST
    spec = {**EP2_DP4, "action": "save", "patched": False, "planner_check_as_released": True}
    spec["checkpoint_dir"] = jobs.checkpoint_dir(_name(env, "save-as-released"))
    saved = run_job(env, spec, jobs.base, _name(env, "save-as-released"))
    assert "TypeError: can only join an iterable" in saved[0]["crash"]
