"""Save side on a real old release: under EP > 1 the patched get_rng_state keeps the release's own (pp, tp) object,
its list holding every DP rank's state, so that a release without the package reads it as its own.

Layouts across TP, PP, EP and DP on 0.2.0rc6; every signature family resumes bit-exact in test_release_matrix.
"""

from __future__ import annotations

import pytest

from tools.release_envs import RELEASES

RUNNER = RELEASES["bridge-0.2.0rc6"]

# (world, tp, pp, ep): DP = world / (tp * pp)
LAYOUTS = [(4, 1, 1, 2), (8, 2, 1, 2), (8, 1, 2, 2), (4, 2, 1, 1)]


def _layout_id(layout: tuple[int, int, int, int]) -> str:
    world, tp, pp, ep = layout
    return f"world{world}-tp{tp}-pp{pp}-ep{ep}"


@pytest.fixture(scope="module", params=LAYOUTS, ids=_layout_id)
def saved(request, jobs):
    world, tp, pp, ep = request.param
    name = f"save-{RUNNER.name}-{_layout_id(request.param)}"
    layout = {"world": world, "tp": tp, "pp": pp, "ep": ep}
    results = jobs.run(RUNNER, name, action="save", checkpoint_dir=jobs.checkpoint_dir(name), **layout)
    return layout, results


def test_rng_sharded_object_is_the_releases_own_listing_every_dp_ranks_state_with_ep(saved):
    layout, results = saved
    dp_size = layout["world"] // (layout["tp"] * layout["pp"])
    for result in results:
        pp, tp, dp = result["coords"]["pp"], result["coords"]["tp"], result["coords"]["dp"]
        expected = {"global_shape": [layout["pp"], layout["tp"]], "global_offset": [pp, tp], "replica_id": dp}
        states = dp_size if layout["ep"] > 1 else 1
        assert result["sharded_object"] == {"key": "rng_state", "states": states, **expected}


def test_checkpoint_stores_one_rng_shard_per_pp_tp_listing_every_dp_rank_with_ep(saved):
    layout, results = saved
    dp_size = layout["world"] // (layout["tp"] * layout["pp"])
    shape = [layout["pp"], layout["tp"]]
    expected = sorted(
        f"rng_state/shard_{'.'.join(map(str, offset))}_{'.'.join(map(str, shape))}" for offset in _offsets(shape)
    )
    states = [dp_size if layout["ep"] > 1 else 1] * len(expected)
    assert all((result["stored_keys"], result["stored_states"]) == (expected, states) for result in results)


def _offsets(shape: list[int]) -> list[tuple[int, ...]]:
    offsets = [()]
    for size in shape:
        offsets = [(*offset, index) for offset in offsets for index in range(size)]
    return offsets


def test_every_rank_resumes_its_own_rng_state_bit_exact(saved, jobs):
    layout, save_results = saved
    name = f"load-{RUNNER.name}-{_layout_id(tuple(layout.values()))}"
    checkpoint_dir = jobs.checkpoint_dir(name.replace("load-", "save-", 1))
    load_results = jobs.run(RUNNER, name, action="load", checkpoint_dir=checkpoint_dir, **layout)
    for saved_rank, loaded_rank in zip(save_results, load_results, strict=True):
        assert loaded_rank["error"] is None
        assert loaded_rank["fresh"] != saved_rank["saved"]
        assert loaded_rank["loaded"] == saved_rank["saved"]


def test_unpatched_old_release_writes_one_dp_ranks_state_and_loses_the_others(jobs):
    """The bug itself, on the real release: proves the round-trip check above can fail."""
    env = RUNNER
    layout = {"world": 4, "tp": 1, "pp": 1, "ep": 2}
    checkpoint_dir = jobs.checkpoint_dir("unpatched-ep2")
    save = jobs.run(env, "unpatched-ep2", action="save", checkpoint_dir=checkpoint_dir, patched=False, **layout)
    load = jobs.run(env, "unpatched-ep2-load", action="load", checkpoint_dir=checkpoint_dir, patched=False, **layout)
    assert save[0]["stored_keys"] == ["rng_state/shard_0.0_1.1"]
    dp0_state = save[0]["saved"]
    for saved_rank, loaded_rank in zip(save, load, strict=True):
        assert loaded_rank["loaded"] == dp0_state
        if saved_rank["coords"]["dp"] != 0:
            assert loaded_rank["loaded"] != saved_rank["saved"]
    # Ranks on the other EP rank resume on EP rank 0's expert stream.
    assert load[1]["coords"]["ep"] == 1
    assert load[1]["loaded"]["tracker"]["expert-parallel-rng"] != save[1]["saved"]["tracker"]["expert-parallel-rng"]


def test_patched_get_rng_state_handles_mpu_and_pg_collection_signatures(jobs):
    """The later-main signature (pg_collection) has no release; see rng_job._requests_for_each_signature."""
    results = jobs.run(
        RUNNER,
        "signatures",
        action="signatures",
        checkpoint_dir=jobs.checkpoint_dir("signatures"),
        world=4,
        tp=1,
        pp=1,
        ep=2,
    )
    for result in results:
        dp = result["coords"]["dp"]
        per_pp_tp = {"key": "rng_state", "global_shape": [1, 1], "global_offset": [0, 0], "replica_id": dp}
        assert result["by_signature"] == {
            "mpu globals": {**per_pp_tp, "states": 4},
            "pg_collection positional": {**per_pp_tp, "states": 4},
            "pg_collection keyword": {**per_pp_tp, "states": 4},
            "pg_collection without ep": {**per_pp_tp, "states": 1},
        }
