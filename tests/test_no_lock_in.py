"""No lock-in: a checkpoint saved with the package resumes without it as the release's own checkpoint does.

Each stack's real save, with the package, then its real load without it: every rank gets what the same load gives
from the checkpoint the release writes itself (the state of DP rank 0 of its (pp, tp)), at the same layout and after
a DP change, and the model loads; with the package every rank gets its own state (``test_stacks``, ``test_resume``,
``test_megatron_lm`` and ``test_fsdp_dtensor`` check that on the same releases). The checkpoints earlier saves with
the package wrote, in Bridge 0.3.0's (pp, tp, dp) layout, still resume with it.
"""

from __future__ import annotations

import pytest
from conftest import EP2_DP4, assert_each_rank_resumes_its_own_state, rank_zero_logs

from bridge_rng_patch import inspect_checkpoint
from tools.release_envs import RELEASES

EP2_DP2 = {**EP2_DP4, "world": 2}
FSDP = {"ckpt_format": "fsdp_dtensor"}
OLD_BRIDGE, FIXED_BRIDGE = RELEASES["bridge-0.2.0rc6"], RELEASES["bridge-0.3.1"]
MEGATRON_LM = RELEASES["megatron-lm-0.19.2"]
TORCH_DIST = [
    OLD_BRIDGE,
    MEGATRON_LM,
    RELEASES["verl-0.4.1"],
    RELEASES["verl-0.9.1"],
    RELEASES["ms-swift-4.0.0"],
    RELEASES["ms-swift-4.6.0"],
]
FORMATS = [(env, {}) for env in TORCH_DIST] + [(env, FSDP) for env in (OLD_BRIDGE, MEGATRON_LM)]


def _id(case: tuple) -> str:
    env, spec = case
    return f"{env.name}-{spec.get('ckpt_format', 'torch_dist')}"


def _resumed_without_the_package(jobs, env, spec: dict, layout: dict, saved_with_package: bool) -> list[dict]:
    writer = "package" if saved_with_package else "upstream"
    checkpoint = f"lock-in-{_id((env, spec))}-{writer}"
    jobs.save(env, checkpoint, patched=saved_with_package, **spec)
    return jobs.load(env, checkpoint, f"{checkpoint}-load-{layout['world']}", layout, patched=False, **spec)


@pytest.mark.parametrize("case", FORMATS, ids=_id)
@pytest.mark.parametrize("layout", [EP2_DP4, EP2_DP2], ids=["same layout", "dp 4 to 2"])
def test_a_checkpoint_saved_with_the_package_resumes_without_it_as_the_releases_own_does(jobs, case, layout):
    env, spec = case
    upstream = _resumed_without_the_package(jobs, env, spec, layout, saved_with_package=False)
    without = _resumed_without_the_package(jobs, env, spec, layout, saved_with_package=True)
    assert [rank["error"] for rank in without] == [None] * layout["world"]
    assert [rank["loaded"] for rank in without] == [rank["loaded"] for rank in upstream]
    assert [rank["weights"] for rank in without] == [rank["weights"] for rank in upstream]
    assert all(rank["loaded"] != rank["fresh"] for rank in without)  # a state was restored, the one upstream gives


@pytest.mark.parametrize("env", [OLD_BRIDGE, MEGATRON_LM], ids=lambda env: env.name)
def test_a_checkpoint_in_the_layout_earlier_saves_with_the_package_wrote_resumes_with_it(jobs, env):
    """Sharded by (pp, tp, dp), as Bridge 0.3.0 and later write it: each rank restores its own state, with EP 2 or
    EP 1, and a release without the package asks for a shard it does not hold (as before)."""
    name = f"lock-in-{env.name}-per-dp-rank"
    saved = jobs.save(env, name, patched=False, tamper="per_dp_rank_layout")
    assert saved[0]["stored_keys"] == [f"rng_state/shard_0.0.{dp}_1.1.4" for dp in range(4)]
    assert_each_rank_resumes_its_own_state(saved, jobs.load(env, name, f"{name}-load"))
    ep1 = jobs.load(env, name, f"{name}-load-ep1", {**EP2_DP4, "ep": 1})
    assert_each_rank_resumes_its_own_state(saved, ep1)
    assert "each rank restores the state saved at its own (pp, tp, dp) coordinates" in rank_zero_logs(ep1)


def test_bridge_0_3_without_the_package_fails_on_an_old_releases_checkpoint_with_or_without_the_package(jobs):
    """The one resume the per-(pp, tp) save no longer serves: a checkpoint of Bridge 0.2.0rc6 at EP 2, resumed on
    Bridge 0.3.1 without the package. 0.3.0 to 0.6.2 fail on every checkpoint of the (pp, tp) layout at EP > 1,
    the release's own included (docs/resumes.md); with the package on 0.3.1 every rank gets its own state."""
    saved = jobs.save(OLD_BRIDGE, "lock-in-bridge-0.2-package")
    jobs.save(OLD_BRIDGE, "lock-in-bridge-0.2-upstream", patched=False)
    for checkpoint in ("lock-in-bridge-0.2-package", "lock-in-bridge-0.2-upstream"):
        loaded = jobs.load(FIXED_BRIDGE, checkpoint, f"{checkpoint}-on-0.3.1", patched=False)
        assert all("rng_state/shard_0.0.0_1.1.4" in (rank["error"] or "") for rank in loaded), loaded[0]["error"]
    with_package = jobs.load(FIXED_BRIDGE, "lock-in-bridge-0.2-package", "lock-in-bridge-0.2-package-on-0.3.1-p")
    assert_each_rank_resumes_its_own_state(saved, with_package)


def test_inspect_says_whether_a_checkpoint_resumes_without_the_package_and_with_which_switch_where_not(jobs):
    verl = RELEASES["verl-0.4.1"]
    name = f"lock-in-{_id((verl, {}))}-package"
    jobs.save(verl, name)
    (report,) = inspect_checkpoint(jobs.checkpoint_dir(name))
    assert (report.verdict, report.rng_layout["states_per_shard"], report.run.dp) == ("complete", 4, 4)
    assert report.without_package == (
        "yes on every verl release on the registry: every rank resumes the state of DP rank 0 of its (pp, tp), as "
        "from the release's own checkpoint"
    )
    earlier = {}
    for env in (OLD_BRIDGE, MEGATRON_LM):
        name = f"lock-in-{env.name}-per-dp-rank"
        jobs.save(env, name, patched=False, tamper="per_dp_rank_layout")
        (earlier[env.name],) = inspect_checkpoint(jobs.checkpoint_dir(name))
    assert earlier[OLD_BRIDGE.name].without_package == (
        "on Megatron-Bridge 0.3.0 and later at EP > 1 and this DP size; not on Megatron-Bridge before 0.3.0, which "
        "asks for a (pp, tp) shard it does not hold: resume with checkpoint.load_rng=False, or with the package"
    )
    assert earlier[MEGATRON_LM.name].without_package == (
        "no: every Megatron-LM release on the registry asks for a (pp, tp) shard, which it does not hold: resume "
        "with --no-load-rng, or with the package"
    )
