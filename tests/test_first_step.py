"""A resumed run starts its first training step where the uninterrupted run was.

Each job saves at step 10 with the loop's real ``save_checkpoint`` (what every rank holds then is what the
uninterrupted run holds at its next step: nothing runs between a save and the next step), then resumes with the real
``load_checkpoint``, runs what the release's set-up code runs after the load (the real data-iterator builder, and
on Bridge 0.5 and later a data-init callback that draws, fired through its real callback manager), and enters the
release's real ``train_step`` (see ``jobs/first_step.py``). Without the package the builders move torch's generator
by one DataLoader base-seed draw per iterator built; with it every rank starts its first step with the state it saved.
"""

from __future__ import annotations

import ast

import pytest
from conftest import EP2_DP4, assert_each_rank_resumes_its_own_state, rank_zero_logs

from bridge_rng_patch.loops import MS_SWIFT
from tools.jobs import lost_streams
from tools.release_envs import MS_SWIFT_RELEASES, RELEASES, stack_dir

EP2_DP2 = {**EP2_DP4, "world": 2}
OLD_BRIDGE, CALLBACK_BRIDGE = RELEASES["bridge-0.2.0rc6"], RELEASES["bridge-0.6.2"]
MEGATRON_LM = RELEASES["megatron-lm-0.19.2"]
# DataLoader base-seed draws each loop's builder makes, read from its code: Bridge builds train and test iterators
# at once (its valid iterator is cyclic: it draws at its first ``next()``), Megatron-LM train, valid and test.
BUILD_DRAWS = {OLD_BRIDGE.name: 2, CALLBACK_BRIDGE.name: 2, MEGATRON_LM.name: 3}
LOOPS = [OLD_BRIDGE, MEGATRON_LM]
# Switched off in each rank (undo puts back the exact originals), so that the jobs fork from one parent per loop.
NO_PACKAGE = {"rank_environment": {"BRIDGE_RNG_PATCH_DISABLE": "1"}}
FIRST_STEP_OK = "RNG first-step check, 4 ranks: 4 started the first step with the RNG state the restore left them"


def _resumed(jobs, env, name: str, layout: dict = EP2_DP4, **spec) -> list[dict]:
    checkpoint = f"first-step-{env.name}"
    jobs.save(env, checkpoint)
    return jobs.load(env, checkpoint, f"{checkpoint}-{name}", layout, first_step=True, **spec)


def _at_first_step(loaded: list[dict]) -> list[dict]:
    """The resumed ranks as their first step found them, in the shape the restore's assertions read."""
    return [{**rank, "loaded": rank["at_first_step"]} for rank in loaded]


@pytest.mark.parametrize("env", LOOPS, ids=lambda env: env.name)
def test_without_the_package_the_iterator_builders_move_the_torch_generator_one_draw_per_iterator(jobs, env):
    loaded = _resumed(jobs, env, "unpatched", **NO_PACKAGE)
    for rank in loaded:
        assert rank["error"] is None, rank["error"]
        assert rank["first_step"] != "ran"
        assert rank["torch_draws_past_restore"] == BUILD_DRAWS[env.name], f"rank {rank['rank']}"
        assert lost_streams(rank["loaded"], rank["at_first_step"]) == ["torch"], f"rank {rank['rank']}"


@pytest.mark.parametrize("layout", [EP2_DP4, EP2_DP2], ids=["same layout", "dp 4 to 2"])
@pytest.mark.parametrize("env", LOOPS, ids=lambda env: env.name)
def test_with_the_package_every_rank_starts_its_first_step_with_the_state_it_saved(jobs, env, layout):
    saved = jobs.save(env, f"first-step-{env.name}")
    loaded = _resumed(jobs, env, f"patched-{layout['world']}", layout)
    assert_each_rank_resumes_its_own_state(saved, _at_first_step(loaded))
    assert all(rank["torch_draws_past_restore"] == 0 for rank in loaded)
    logs = rank_zero_logs(loaded)
    world = layout["world"]
    assert (
        f"RNG first-step check, {world} ranks: {world} started the first step with the RNG state the restore left them"
        in logs
    )


def test_the_data_loaders_get_what_they_get_without_the_package(jobs):
    """The package keeps the training streams, not the data: the iterators draw from the restored state as they do
    without it (the same draws, from the same state), and only then is the state put back."""
    unpatched = _resumed(jobs, OLD_BRIDGE, "unpatched", **NO_PACKAGE)
    patched = _resumed(jobs, OLD_BRIDGE, "patched-4")
    for without, with_package in zip(unpatched, patched, strict=True):
        assert without["torch_draws_past_restore"] == BUILD_DRAWS[OLD_BRIDGE.name]
        assert with_package["torch_draws_past_restore"] == 0


def test_a_run_that_restored_no_rng_state_is_left_alone(jobs):
    loaded = _resumed(jobs, OLD_BRIDGE, "load-rng-off", load_rng=False)
    assert all(rank["torch_draws_past_restore"] == BUILD_DRAWS[OLD_BRIDGE.name] for rank in loaded)
    assert "RNG first-step check" not in rank_zero_logs(loaded)


def test_once_training_has_started_the_builders_draw_as_without_the_package(jobs):
    """A loop that builds iterators again mid-run draws there in the uninterrupted run too: only what runs between
    the restore and the first step keeps the restored state."""
    loaded = _resumed(jobs, MEGATRON_LM, "build-again", build_again=True)
    for rank in loaded:
        assert rank["torch_draws_past_restore"] == 0
        assert rank["torch_draws_of_a_later_build"] == BUILD_DRAWS[MEGATRON_LM.name], f"rank {rank['rank']}"


def test_a_data_init_callback_that_draws_moves_every_source_without_the_package(jobs):
    loaded = _resumed(jobs, CALLBACK_BRIDGE, "callback-unpatched", data_init_callback=True, **NO_PACKAGE)
    for rank in loaded:
        moved = lost_streams(rank["loaded"], rank["at_first_step"])
        assert {"python", "numpy", "torch", "cuda", "model-parallel-rng"} <= set(moved), f"rank {rank['rank']}"


@pytest.mark.parametrize("layout", [EP2_DP4, EP2_DP2], ids=["same layout", "dp 4 to 2"])
def test_with_the_package_a_data_init_callback_leaves_every_rank_its_saved_state(jobs, layout):
    saved = jobs.save(CALLBACK_BRIDGE, f"first-step-{CALLBACK_BRIDGE.name}")
    loaded = _resumed(jobs, CALLBACK_BRIDGE, f"callback-{layout['world']}", layout, data_init_callback=True)
    assert_each_rank_resumes_its_own_state(saved, _at_first_step(loaded))
    assert "started the first step with the RNG state the restore left them" in rank_zero_logs(loaded)


def test_the_first_step_check_names_the_torch_generator_when_a_data_loader_moved_it(jobs):
    """Broken on purpose: the package without its iterator closure. The check must see the builders' draws."""
    loaded = _resumed(jobs, MEGATRON_LM, "no-closure", rank_environment={"BRIDGE_RNG_PATCH_DISABLE": "keep_restored"})
    warning = next(line for line in loaded[0]["logs"] if "RNG first-step check" in line)
    assert warning.startswith("WARNING: RNG first-step check, 4 ranks: MOVED since the restore: torch moved on ranks")
    assert "a DataLoader iterated after the load" in warning
    assert all(rank["torch_draws_past_restore"] == BUILD_DRAWS[MEGATRON_LM.name] for rank in loaded)


def test_the_first_step_check_is_off_with_the_audit(jobs):
    loaded = _resumed(jobs, MEGATRON_LM, "audit-off", rank_environment={"BRIDGE_RNG_PATCH_AUDIT": "0"})
    assert "RNG first-step check" not in rank_zero_logs(loaded)
    assert all(rank["torch_draws_past_restore"] == 0 for rank in loaded)  # the closure does not depend on it


def test_a_loop_the_package_does_not_patch_calls_the_first_step_check_itself(jobs):
    loaded = _resumed(jobs, OLD_BRIDGE, "called", patched=False, audit_call=True)
    for rank in loaded:
        check = rank["first_step_check"]
        assert check["passed"] is False
        assert check["moved"] == {"torch": [0, 1, 2, 3]}
    assert "torch moved on ranks 0, 1, 2, 3" in loaded[0]["first_step_check"]["line"]


@pytest.mark.parametrize("env", LOOPS, ids=lambda env: env.name)
def test_with_the_stored_layout_load_off_the_first_step_holds_what_the_releases_own_restore_left(jobs, env):
    """The keep acts on what the resume watch notes, whoever restored: with ``layout_load`` switched off the release's
    own restore (DP rank 0's state for every rank, the old bug) is what each rank starts its first step with."""
    loaded = _resumed(jobs, env, "layout-load-off", rank_environment={"BRIDGE_RNG_PATCH_DISABLE": "layout_load"})
    for rank in loaded:
        assert rank["error"] is None, rank["error"]
        assert rank["torch_draws_past_restore"] == 0, f"rank {rank['rank']}"
        assert lost_streams(rank["loaded"], rank["at_first_step"]) == [], f"rank {rank['rank']}"
    assert FIRST_STEP_OK in rank_zero_logs(loaded)


def _defined_in(path, dotted: str) -> bool:
    """Whether the module file defines ``Class.method`` (read with ``ast``: ms-swift's trainers import Transformer
    Engine's PyTorch layers through mcore_bridge at import, which a CPU cannot)."""
    class_name, method = dotted.split(".")
    tree = ast.parse(path.read_text())
    classes = (node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    return any(isinstance(item, ast.FunctionDef) and item.name == method for node in classes for item in node.body)


@pytest.mark.parametrize("release", MS_SWIFT_RELEASES, ids=lambda release: release.name)
def test_every_ms_swift_release_defines_what_the_package_wraps_before_the_first_step(release):
    """ms-swift's trainer builds its iterators (and GRPO's and GKD's resampling iterator between two re-seeds) after
    the load: each function the package keeps the restored state over, and its train step, is in every release."""
    before = MS_SWIFT.before_first_step
    package_dir = stack_dir("ms-swift", release.stack[1])
    for target in (*before.keeps_restored, before.first_step):
        path = package_dir / (target.module.replace(".", "/") + ".py")
        assert _defined_in(path, target.path), f"{release.name}: {target.module}.{target.path}"
