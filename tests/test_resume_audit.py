"""The resume audit's verdict from every rank's contribution: what Megatron seeds apart must be apart, and each rank
must hold what it was handed. The jobs that run it on the real loops are in test_resume.py, test_megatron_lm.py and
test_fsdp_dtensor.py; here its judgement is specified on contributions written out by hand, and the first-step
check's (on the real loops: test_first_step.py)."""

from __future__ import annotations

import dataclasses

from bridge_rng_patch.resume_audit import RankAtFirstStep, RankAudit, judge, judge_first_step

EXPERT, MODEL = "expert-parallel-rng", "model-parallel-rng"


def _rank(rank: int, pp: int = 0, tp: int = 0, dp: int = 0, ep: int = 0, **digests: str) -> RankAudit:
    streams = {"python": f"python-of-rank-{rank}", EXPERT: f"expert-of-rank-{rank}"}
    streams.update({name.replace("_", "-"): digest for name, digest in digests.items()})
    return RankAudit(rank, pp, tp, dp, ep, handed="own", holds_what_it_was_handed=True, digests=streams)


def test_ranks_of_different_ep_ranks_with_one_expert_state_are_named_as_collapsed():
    ranks = [_rank(rank, dp=rank, ep=rank % 2, expert_parallel_rng="one") for rank in range(4)]
    (collapse,) = judge(ranks).collapsed
    assert collapse == (EXPERT, ((0, 2), (1, 3)))


def test_ranks_that_megatrons_own_seeding_puts_on_one_seed_are_not_compared():
    """PP rank 1 of EP rank 0 and PP rank 0 of EP rank 1 get the same expert seed (100 * pp + 100 * ep)."""
    ranks = [_rank(0, pp=1, ep=0, expert_parallel_rng="same"), _rank(1, pp=0, ep=1, expert_parallel_rng="same")]
    assert judge(ranks).collapsed == []


def test_model_parallel_streams_must_differ_by_tp_rank():
    ranks = [_rank(rank, tp=rank, model_parallel_rng="one") for rank in range(2)]
    assert [collapse.stream for collapse in judge(ranks).collapsed] == [MODEL]


def test_with_data_parallel_random_init_every_stream_must_differ_by_dp_rank():
    alike = [_rank(rank, dp=rank, python="one") for rank in range(2)]
    assert judge(alike).collapsed == []  # without it the DP ranks are seeded alike
    random_init = [dataclasses.replace(rank, data_parallel_random_init=True) for rank in alike]
    assert [collapse.stream for collapse in judge(random_init).collapsed] == ["python"]


def test_a_rank_that_holds_another_state_than_it_was_handed_is_named():
    ranks = [_rank(0), dataclasses.replace(_rank(1, dp=1), holds_what_it_was_handed=False)]
    result = judge(ranks)
    assert (result.passed, result.not_as_handed) == (False, [1])
    assert "rank 1 holds another state than the one restored to it" in result.line


def test_a_line_names_eight_ranks_and_counts_the_rest():
    ranks = [_rank(rank, dp=rank, ep=rank % 2, expert_parallel_rng="one") for rank in range(256)]
    line = judge(ranks).line
    assert "expert-parallel-rng of ranks 1, 3, 5, 7, 9, 11, 13, 15 and 120 more is that of ranks 0, 2, 4" in line
    assert len(line) < 1000


def test_a_first_step_where_nothing_moved_passes_in_one_line():
    check = judge_first_step([RankAtFirstStep(rank) for rank in range(4)])
    assert check.passed
    assert check.line == (
        "RNG first-step check, 4 ranks: 4 started the first step with the RNG state the restore left them, every source"
    )


def test_torch_alone_moved_is_put_down_to_a_data_loaders_base_seed():
    check = judge_first_step([RankAtFirstStep(rank, ("torch",)) for rank in range(4)])
    assert not check.passed
    assert check.moved == {("torch",): [0, 1, 2, 3]}
    assert "MOVED since the restore: torch moved on ranks 0, 1, 2, 3 (torch's CPU generator alone: a DataLoader" in (
        check.line
    )


def test_every_source_moved_is_put_down_to_a_re_seed_or_a_callback():
    moved = ("cuda", "numpy", "python", "torch", EXPERT)
    check = judge_first_step([RankAtFirstStep(0, moved), RankAtFirstStep(1)])
    assert check.moved == {moved: [0]}
    assert "moved on rank 0 (every source: a re-seed, or a callback that draws, after the load)" in check.line


def test_a_rank_with_nothing_read_after_its_restore_is_named_as_not_checked():
    check = judge_first_step([RankAtFirstStep(0), RankAtFirstStep(1, checked=False)])
    assert not check.passed
    assert check.unchecked == [1]
    assert "rank 1 could not be checked" in check.line
