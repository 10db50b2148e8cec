"""The resume audit: after a resume, every rank fingerprints each RNG source and rank 0 says in one line whether each
holds what it was handed and whether the streams Megatron seeds apart are apart; at the first step, whether any moved.
A wrong resume fails silently (Megatron-LM #6858 found its own by hand); the audit never fails a job."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bridge_rng_patch import rng_sources
from bridge_rng_patch.decision import AUDIT_ENV, DISABLED, Decision, Plan, Wrapping, global_rank, report, switched_off
from bridge_rng_patch.loops import MEGATRON_SEEDING, Seeding
from bridge_rng_patch.probe import InstalledStack
from bridge_rng_patch.resume import Handed, ResumeWatch
from bridge_rng_patch.rng_layout import FRESH, OWN, SHARED

MODEL_PARALLEL_STREAM, EXPERT_PARALLEL_STREAM = "model-parallel-rng", "expert-parallel-rng"
_NAMED_RANKS = 8  # how many ranks a line names before it counts the rest
# The remedy a line gives where the stack is not known (``audit_restored_rng()`` from a loop not patched).
ANY_LOOPS_SWITCH = "the loop's own switch that resumes without RNG state"


@dataclass(frozen=True)
class RankAudit:
    """One rank's contribution: where it is seeded, what it was handed and whether it holds that, its fingerprint."""

    rank: int
    pp: int = 0
    tp: int = 0
    dp: int = 0
    ep: int = 0
    etp: int = 0
    handed: str | None = None
    data_parallel_random_init: bool = False
    holds_what_it_was_handed: bool | None = None
    digests: dict[str, str] = field(default_factory=dict)
    error: str | None = None


class Collapse(NamedTuple):
    """Ranks that hold one state of ``stream`` although Megatron seeds them apart, by seed offset."""

    stream: str
    ranks_by_seed: tuple[tuple[int, ...], ...]


@dataclass
class ResumeAudit:
    """What the audit found across the job, and what this rank held (``held_here``, for its first step)."""

    ranks: int
    by_kind: dict[str, list[int]] = field(default_factory=dict)
    not_as_handed: list[int] = field(default_factory=list)
    unaudited: dict[int, str] = field(default_factory=dict)
    collapsed: list[Collapse] = field(default_factory=list)
    line: str = ""
    held_here: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not (self.collapsed or self.not_as_handed or self.unaudited)


@dataclass(frozen=True)
class RankAtFirstStep:
    """One rank at its first training step: the sources that moved since its restore, or that it could not check."""

    rank: int
    moved: tuple[str, ...] = ()
    checked: bool = True


class FirstStep(NamedTuple):
    """What the first-step check found across the job: the sources that moved, by ranks, and those not checked."""

    ranks: int
    moved: dict[tuple[str, ...], list[int]]
    unchecked: list[int]
    line: str

    @property
    def passed(self) -> bool:
        return not (self.moved or self.unchecked)


def audit_restored_rng(
    data_parallel_random_init: bool = False, seeding: Seeding = MEGATRON_SEEDING, skip_rng_load: str = ANY_LOOPS_SWITCH
) -> ResumeAudit | None:
    """Audit this rank's RNG state right after a loop the package does not patch restored it; on every rank."""
    if switched_off(AUDIT_ENV):
        return None
    return _audit(_this_rank(None, data_parallel_random_init), seeding, skip_rng_load)


def check_first_step(audit: ResumeAudit | None) -> FirstStep | None:
    """At the first training step after a resume, on every rank: what moved since ``audit_restored_rng()``."""
    if audit is None or switched_off(AUDIT_ENV):
        return None
    return _check_first_step(audit.held_here)


def _in_one_line(own: Any, judge: Callable[[list], Any], what: str, unaffected: str) -> Any:
    """Every rank's ``own``, gathered and judged alike; rank 0 logs the line; a failure is logged once."""
    try:
        verdict = judge(_from_every_rank(own))
    except Exception as error:
        _warn_once(f"{what} could not run on rank {global_rank()} ({error!r}); {unaffected}")
        return None
    report(verdict.line, logging.INFO if verdict.passed else logging.WARNING)
    return verdict


def _from_every_rank(own: Any) -> list[Any]:
    """Every rank's ``own``, by rank (this rank's alone outside a distributed job)."""
    import torch.distributed as distributed

    if not distributed.is_initialized():
        return [own]
    everyone: list[Any] = [None] * distributed.get_world_size()
    distributed.all_gather_object(everyone, own)
    return everyone


def _audit(own: RankAudit, seeding: Seeding, skip_rng_load: str, where: str = "") -> ResumeAudit | None:
    result = _in_one_line(
        own,
        lambda ranks: judge(ranks, seeding, where, skip_rng_load),
        "RNG resume audit",
        "the resume itself is unaffected",
    )
    if result is not None:
        result.held_here = own.digests
    return result


def _check_first_step(held_after_restore: dict[str, str]) -> FirstStep | None:
    try:
        holds = _live_fingerprint() if held_after_restore else {}
        moved = tuple(sorted(name for name, digest in held_after_restore.items() if holds.get(name) != digest))
    except Exception:
        holds, moved = {}, ()
    own = RankAtFirstStep(global_rank(), moved, bool(holds))
    return _in_one_line(own, judge_first_step, "RNG first-step check", "training is unaffected")


def _this_rank(handed: Handed | None, data_parallel_random_init: bool) -> RankAudit:
    """This rank's contribution; a failure becomes part of it, so that the rank still joins the collective."""
    rank = global_rank()
    try:
        from megatron.core import parallel_state as mpu

        expert_tensor_rank = getattr(mpu, "get_expert_tensor_parallel_rank", lambda: 0)()
        pp, tp = mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank()
        dp, ep = mpu.get_data_parallel_rank(), mpu.get_expert_model_parallel_rank()
        holds = _live_fingerprint()
        coordinates = {"pp": pp, "tp": tp, "dp": dp, "ep": ep, "etp": expert_tensor_rank, "digests": holds}
        audit = RankAudit(rank, data_parallel_random_init=data_parallel_random_init, **coordinates)
        if handed is None:
            return audit
        expected = rng_sources.fingerprint(handed.entry)
        matches = all(holds.get(name) == digest for name, digest in expected.items())
        return dataclasses.replace(audit, handed=handed.kind, holds_what_it_was_handed=matches)
    except Exception as error:
        return RankAudit(rank, error=f"{type(error).__name__}: {error}")


def _live_fingerprint() -> dict[str, str]:
    return rng_sources.fingerprint(rng_sources.live_rng_state())


_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        report(message, logging.WARNING, every_rank=True)


def seed_offset(stream: str, rank: RankAudit, data_parallel_random_init: bool, seeding: Seeding) -> int:
    """Where the seeding puts ``stream`` of ``rank`` (megatron-core's tracker adds its own offsets)."""
    offset = seeding.pipeline * rank.pp + (seeding.data_parallel * rank.dp if data_parallel_random_init else 0)
    if stream == MODEL_PARALLEL_STREAM:
        return offset + 2718 + rank.tp
    if stream == EXPERT_PARALLEL_STREAM:
        return offset + 1024 + 100 * rank.ep + rank.etp
    return offset


def collapsed_streams(ranks: Sequence[RankAudit], seeding: Seeding) -> list[Collapse]:
    """Every stream some ranks hold in one state although seeded apart (ranks seeded alike are not compared)."""
    random_init = any(rank.data_parallel_random_init for rank in ranks)  # the run's, known to every rank handed state
    holders: dict[tuple[str, str], dict[int, list[int]]] = {}
    for rank in ranks:
        for stream, digest in rank.digests.items():
            offset = seed_offset(stream, rank, random_init, seeding)
            holders.setdefault((stream, digest), {}).setdefault(offset, []).append(rank.rank)
    return [
        Collapse(stream, tuple(tuple(group) for _, group in sorted(by_seed.items(), key=lambda item: item[1][0])))
        for (stream, _), by_seed in sorted(holders.items())
        if len(by_seed) > 1
    ]


def judge(
    ranks: Sequence[RankAudit],
    seeding: Seeding = MEGATRON_SEEDING,
    where: str = "",
    skip_rng_load: str = ANY_LOOPS_SWITCH,
) -> ResumeAudit:
    audited = [rank for rank in ranks if rank.error is None]
    result = ResumeAudit(len(ranks))
    result.unaudited = {rank.rank: rank.error for rank in ranks if rank.error is not None}
    for rank in audited:
        if rank.handed is not None:
            result.by_kind.setdefault(rank.handed, []).append(rank.rank)
    result.not_as_handed = [rank.rank for rank in audited if rank.holds_what_it_was_handed is False]
    result.collapsed = collapsed_streams(audited, seeding)
    result.line = _line(result, where, skip_rng_load)
    return result


_KINDS = {
    OWN: "restored the state stored for their coordinates",
    SHARED: "resumed the one state stored for their (pp, tp) (the checkpoint holds no per-rank state)",
    FRESH: "kept fresh state by design (a new DP rank, or a TP or PP change)",
}


def _line(result: ResumeAudit, where: str, skip_rng_load: str) -> str:
    head = f"RNG resume audit{f' of {where}' if where else ''}, {_count(result.ranks)}: "
    if not result.by_kind:
        parts = ["what each rank was handed is not known (bridge_rng_patch did not hand it), streams compared only"]
    else:
        parts = [
            ", ".join(f"{len(result.by_kind[kind])} {text}" for kind, text in _KINDS.items() if kind in result.by_kind)
        ]
    if result.not_as_handed:
        one = len(result.not_as_handed) == 1
        parts.append(
            f"{_ranks(result.not_as_handed)} hold{'s' * one} another state than the one restored to "
            f"{'it' if one else 'them'}"
        )
    if result.unaudited:
        rank, why = next(iter(result.unaudited.items()))
        parts.append(f"{_ranks(list(result.unaudited))} could not be audited (rank {rank}: {why})")
    if not result.collapsed:
        return head + "; ".join([*parts, "the streams Megatron seeds apart are apart"])
    streams = "; ".join(_describe(collapse) for collapse in result.collapsed[:3])
    more = f" (and {len(result.collapsed) - 3} more streams)" if len(result.collapsed) > 3 else ""
    parts.append(
        f"COLLAPSED, streams Megatron seeds apart hold one state: {streams}{more}. They stay so for the rest of the "
        "run, and every checkpoint it saves stores them as they are, collapsed: resume with "
        f"{skip_rng_load} to seed them apart again (and save with bridge_rng_patch, which keeps each rank's own state)"
    )
    return head + "; ".join(parts)


def _describe(collapse: Collapse) -> str:
    first, *others = collapse.ranks_by_seed
    return f"{collapse.stream} of {_ranks([rank for group in others for rank in group])} is that of {_ranks(first)}"


def _count(ranks: int) -> str:
    return f"{ranks} rank{'s' * (ranks != 1)}"


def _ranks(ranks: Sequence[int]) -> str:
    shown = ", ".join(map(str, ranks[:_NAMED_RANKS]))
    more = f" and {len(ranks) - _NAMED_RANKS} more" if len(ranks) > _NAMED_RANKS else ""
    return f"rank{'s' * (len(ranks) > 1)} {shown}{more}"


def _likely_cause(moved: tuple[str, ...]) -> str:
    if moved == ("torch",):
        return (
            "torch's CPU generator alone: a DataLoader iterated after the load (without a generator of its own) drew "
            "its base seed from it"
        )
    if {"python", "numpy", "torch"} <= set(moved):
        return "every source: a re-seed, or a callback that draws, after the load"
    return "drawn from between the restore and the first step"


def judge_first_step(ranks: Sequence[RankAtFirstStep]) -> FirstStep:
    moved: dict[tuple[str, ...], list[int]] = {}
    unchecked = [rank.rank for rank in ranks if not rank.checked]
    for rank in ranks:
        if rank.checked and rank.moved:
            moved.setdefault(rank.moved, []).append(rank.rank)
    head = f"RNG first-step check, {_count(len(ranks))}: "
    parts = [f"{_ranks(unchecked)} could not be checked (no RNG state read after the restore)"] if unchecked else []
    if not moved:
        held = f"{len(ranks) - len(unchecked)} started the first step with the RNG state the restore left them"
        return FirstStep(len(ranks), moved, unchecked, head + "; ".join([f"{held}, every source", *parts]))
    for sources, holders in moved.items():
        parts.append(f"{', '.join(sources)} moved on {_ranks(holders)} ({_likely_cause(sources)})")
    parts.append(
        "the run does not continue where the uninterrupted run would have (see bridge_rng_patch's README, "
        "'Where bit-exact holds')"
    )
    return FirstStep(len(ranks), moved, unchecked, head + "MOVED since the restore: " + "; ".join(parts))


class ResumeAuditing:
    """The audit's two wrappers, sharing what this rank held after the restore until its first step."""

    def __init__(self, seeding: Seeding, skip_rng_load: str, watch: ResumeWatch) -> None:
        self._seeding = seeding
        self._skip_rng_load = skip_rng_load
        self._watch = watch
        self._held_after_restore: dict[str, str] | None = None

    def after_resume(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        result = wrapped(*args, **kwargs)
        watch = self._watch
        if switched_off(AUDIT_ENV) or watch.resumes_running > 1:
            return result
        where = f"checkpoint {watch.checkpoint_dir}" if watch.checkpoint_dir else "the resume"
        if watch.rng_requested:
            handed = watch.handed
            own = _this_rank(handed, handed is not None and handed.data_parallel_random_init)
            _audit(own, self._seeding, self._skip_rng_load, where)
            self._held_after_restore = own.digests  # set on every rank, so that every rank joins the first-step check
        elif watch.loads:
            report(
                f"RNG resume audit of {where}: the loop restored no RNG state (load_rng off, finetune, a TP or PP "
                "change, or a release checkpoint); nothing to audit"
            )
        return result

    def at_first_step(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        """The first step after a resume that restored RNG state checks it first; every other goes straight through."""
        if self._held_after_restore is not None:
            held, self._held_after_restore = self._held_after_restore, None
            if not switched_off(AUDIT_ENV):
                _check_first_step(held)
        return wrapped(*args, **kwargs)


def plan(stack: InstalledStack, watch: ResumeWatch) -> Plan:
    if switched_off(AUDIT_ENV):
        return Plan(Decision(DISABLED, f"{AUDIT_ENV} is set to switch it off"))
    loop = stack.loop
    decision = Decision.apply(
        f"after {loop.resume_function} resumes RNG state, one small collective compares each rank's streams with "
        "what it was handed and with the other ranks'; rank 0 logs one line"
    )
    auditing = ResumeAuditing(loop.seeding, loop.skip_rng_load, watch)
    wrappings = [Wrapping(loop.resume_function, auditing.after_resume)]
    first_step = loop.before_first_step.first_step
    if first_step is not None:
        wrappings.append(Wrapping(first_step.path, auditing.at_first_step, module=first_step.module))
    return Plan(decision, tuple(wrappings), watched=True)
