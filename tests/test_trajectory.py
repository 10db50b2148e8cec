"""A resumed run trains as the uninterrupted one: every rank's loss at every step, and its final weights, bit for bit.

Each stack trains a tiny real megatron-core mixture-of-experts model (``jobs/trajectory.py``: megatron-core's own
GPTModel, DDP and optimizer) on 2 gloo ranks at EP 2 for 6 steps, saving after step 3 through its real save (model,
optimizer and RNG state); new processes resume from that checkpoint through its real load and what its set-up runs
after the load (Megatron-Bridge's and Megatron-LM's data-iterator builders, then their real training step), and train
steps 4 to 6. Losses are compared as floats' hex. The router's forced load balancing draws its logits from the
expert-parallel tracker (megatron-core 0.16 and later; on 0.15 from a generator no release checkpoints, so Bridge
0.2.0rc6 runs here on megatron-core 0.16.1, which it imports with).

On the CPU the device generator is torch's own (what the model draws "on the device" must read the states a checkpoint
restores), so the data-iterator builders' DataLoader base-seed draws move dropout too: without the package every rank
of the loops that build iterators parts at the first step after the resume. On a GPU those draws move the data order
of a shuffled loader instead, and the ranks that lose the expert stream (EP rank 1) part first, as verl and ms-swift,
which build no iterators here, show.
"""

from __future__ import annotations

import pytest

from tools.release_envs import OLD_ON_NEWER_CORE, RELEASES

MEGATRON_LM = RELEASES["megatron-lm-0.19.2"]
STACKS = [MEGATRON_LM, RELEASES["bridge-0.6.2"], OLD_ON_NEWER_CORE, RELEASES["verl-0.9.1"], RELEASES["ms-swift-4.6.0"]]
SAVE_AFTER, STEPS = 3, 6
TRAJECTORY = {"world": 2, "tp": 1, "pp": 1, "ep": 2, "action": "train", "steps": STEPS, "iteration": SAVE_AFTER}
# Without the package: each rank switches it off first (undo puts back the exact originals, tests/test_patcher.py), so
# that a stack's runs with and without it fork from one parent that imported the stack once.
NO_PACKAGE = {"rank_environment": {"BRIDGE_RNG_PATCH_DISABLE": "1"}}
# Where each rank (by rank) first parts from the uninterrupted run without the package: every rank at the first step
# where a loop's set-up drew after the load; else EP rank 1, which resumed EP rank 0's expert stream, first, and EP
# rank 0 a step later (the experts' outputs reach it through the next step's gradients).
AFTER_THE_SET_UP = {0: SAVE_AFTER + 1, 1: SAVE_AFTER + 1}
AFTER_THE_EXPERT_STREAM = {0: SAVE_AFTER + 2, 1: SAVE_AFTER + 1}
UNPATCHED_PARTING = {
    MEGATRON_LM.name: AFTER_THE_SET_UP,
    "bridge-0.6.2": AFTER_THE_SET_UP,
    OLD_ON_NEWER_CORE.name: AFTER_THE_SET_UP,
    "verl-0.9.1": AFTER_THE_EXPERT_STREAM,
    "ms-swift-4.6.0": AFTER_THE_EXPERT_STREAM,
}


def _trained(jobs, env, name: str, **spec) -> list[dict]:
    """The run that is never interrupted, saving after step 3 into the checkpoint ``name``."""
    first_step = env.loop in ("megatron-bridge", "megatron-lm")  # one parent per set-up: the resume's too
    checkpoint = jobs.checkpoint_dir(f"trajectory-{env.name}-{name}")
    return jobs.run(
        env, f"trajectory-{env.name}-{name}", checkpoint_dir=checkpoint, first_step=first_step, **TRAJECTORY, **spec
    )


def _resumed(jobs, env, checkpoint: str, name: str, **spec) -> list[dict]:
    """The run resumed from the checkpoint ``checkpoint`` in new processes, trained to the end."""
    first_step = env.loop in ("megatron-bridge", "megatron-lm")
    return jobs.run(
        env,
        f"trajectory-{env.name}-{name}",
        checkpoint_dir=jobs.checkpoint_dir(f"trajectory-{env.name}-{checkpoint}"),
        resume=True,
        first_step=first_step,
        **TRAJECTORY,
        **spec,
    )


def parting(uninterrupted: list[dict], resumed: list[dict]) -> dict[int, int]:
    """Each rank whose resumed losses or final weights differ from the uninterrupted run's, with the first step whose
    loss differs (the last step's where only the weights do)."""
    parted = {}
    for run, resume in zip(uninterrupted, resumed, strict=True):
        steps = sorted(resume["losses"], key=int)
        assert steps == [str(step) for step in range(SAVE_AFTER + 1, STEPS + 1)]
        first = next((int(step) for step in steps if resume["losses"][step] != run["losses"][step]), None)
        if first is None and resume["weights"] != run["weights"]:
            first = STEPS
        if first is not None:
            parted[run["rank"]] = first
    return parted


@pytest.fixture(scope="module", params=STACKS, ids=lambda env: env.name)
def env(request):
    """A stack: module-scoped, so that its tests run one after another, from the parent that imported it."""
    return request.param


def test_with_the_package_a_resumed_run_trains_as_the_uninterrupted_one_bit_for_bit(jobs, env):
    uninterrupted = _trained(jobs, env, "patched")
    resumed = _resumed(jobs, env, "patched", "patched-resumed")
    assert parting(uninterrupted, resumed) == {}
    for run, resume in zip(uninterrupted, resumed, strict=True):
        assert resume["weights"] == run["weights"], f"rank {run['rank']}"


def test_without_the_package_the_resumed_run_parts_from_the_uninterrupted_one(jobs, env):
    uninterrupted = _trained(jobs, env, "unpatched", **NO_PACKAGE)
    # The package changes nothing in a run that is not resumed: the same losses and weights, with or without it.
    patched = _trained(jobs, env, "patched")
    assert [(rank["losses"], rank["weights"]) for rank in uninterrupted] == [
        (rank["losses"], rank["weights"]) for rank in patched
    ]
    parted = parting(uninterrupted, _resumed(jobs, env, "unpatched", "unpatched-resumed", **NO_PACKAGE))
    assert parted == UNPATCHED_PARTING[env.name], f"ranks parting (rank: first step): {parted}"


def test_a_resume_whose_restore_skips_the_expert_tracker_parts_on_every_rank(jobs):
    """Broken on purpose: the restore sets every source but the expert-parallel tracker, which keeps what the run's
    start-up seeded. The router's logits then differ at the first step after the resume, on every rank."""
    uninterrupted = _trained(jobs, MEGATRON_LM, "patched")
    resumed = _resumed(jobs, MEGATRON_LM, "patched", "expert-tracker-not-restored", sabotage="expert_tracker_restore")
    assert parting(uninterrupted, resumed) == AFTER_THE_SET_UP
