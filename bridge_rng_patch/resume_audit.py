"""The resume audit: right after a resume restores RNG state, every rank fingerprints each source it holds, one
small collective brings the fingerprints together, and rank 0 says in one line how many ranks hold the state stored
for their coordinates, how many kept fresh state by design, and whether the streams Megatron seeds apart are still
apart.

A resume that gives ranks the wrong state fails silently: Megatron-LM #6858 found its own bug by hand on a 120B run
(the expert-parallel stream wrong on 252 of 256 ranks). The audit runs where every rank is already in step (after
the loop's restore function, which every rank enters and leaves together), gathers 8 bytes per source per rank, and
never fails a job: an error in it is logged once and swallowed. ``BRIDGE_RNG_PATCH_AUDIT=0`` switches it off. A loop
the package does not patch calls ``audit_restored_rng()`` after its own load, on every rank, for the same line.

Its second half runs at the first training step after the resume: each rank compares what it holds with what the
restore left it (what the loop did in between, building data iterators, firing callbacks, re-seeding, may have moved
it), in one more small collective, and rank 0 logs one line, a WARNING naming each source that moved. Every later
step finds nothing to compare and pays one attribute read. A loop not patched calls ``check_first_step(audit)``.

"Seeded apart" is Megatron's own seeding (``_set_random_seed``, ``model_parallel_cuda_manual_seed``): every source
gets ``seed + 100 * pp`` (``+ 10 * dp`` with ``data_parallel_random_init``), the model-parallel stream ``2718 + tp``
more, the expert-parallel stream ``1024 + 100 * ep + etp`` more. Ranks whose offsets differ must hold distinct
states; ranks whose offsets coincide (that seeding collides, e.g. PP rank 1 with EP rank 1) are not compared.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

from bridge_rng_patch import rng_sources
from bridge_rng_patch.decision import AUDIT_ENV, DISABLED, Decision, Plan, Wrapping, global_rank, report, switched_off
from bridge_rng_patch.loops import LAYOUT_LOAD, MEGATRON_SEEDING, LoadFunction, Seeding
from bridge_rng_patch.probe import InstalledStack
from bridge_rng_patch.resume_context import Handed, ResumeContext
from bridge_rng_patch.rng_layout import FRESH, OWN, RNG_STATE_KEY, SHARED

MODEL_PARALLEL_STREAM, EXPERT_PARALLEL_STREAM = "model-parallel-rng", "expert-parallel-rng"
# How many ranks a line names before it counts the rest.
_NAMED_RANKS = 8
# The remedy a line gives where the stack is not known (``audit_restored_rng()`` from a loop not patched).
ANY_LOOPS_SWITCH = "the loop's own switch that resumes without RNG state"


class RankAudit(NamedTuple):
    """One rank's contribution: where Megatron seeds it, what it was handed (None: not known) and whether it holds
    that, the fingerprint of what it holds, or why it could not be audited."""

    rank: int
    pp: int
    tp: int
    dp: int
    ep: int
    etp: int
    handed: str | None
    data_parallel_random_init: bool
    holds_what_it_was_handed: bool | None
    digests: dict[str, str]
    error: str | None = None


class Collapse(NamedTuple):
    """Ranks that hold one state of ``stream`` although Megatron seeds them apart, by seed offset."""

    stream: str
    ranks_by_seed: tuple[tuple[int, ...], ...]


@dataclass
class ResumeAudit:
    """What the audit found across the job, the same on every rank, and what this rank held when audited
    (``held_here``, what its first step is compared with)."""

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


def audit_restored_rng(
    data_parallel_random_init: bool = False, seeding: Seeding = MEGATRON_SEEDING, skip_rng_load: str = ANY_LOOPS_SWITCH
) -> ResumeAudit | None:
    """Audit the RNG state this rank holds right after its loop restored a checkpoint; call it on every rank.

    For loops the package does not patch: what each rank was handed is not known there, so the audit checks that
    the streams Megatron seeds apart are still apart (``data_parallel_random_init`` as the run was started with;
    ``seeding``, how far apart the loop's own seeding puts PP and DP ranks: Megatron's by default; ``skip_rng_load``,
    the loop's switch that resumes without RNG state, which a WARNING names as the remedy).
    Rank 0 logs one line, a WARNING where a stream collapsed; every rank gets the same result, or None where the
    audit is switched off or could not run (said once in the log).
    """
    if switched_off(AUDIT_ENV):
        return None
    return _audit(_this_rank(None, data_parallel_random_init), seeding, skip_rng_load)


def _audit(own: RankAudit, seeding: Seeding, skip_rng_load: str, where: str = "") -> ResumeAudit | None:
    try:
        result = judge([RankAudit(*entry) for entry in _from_every_rank(own)], seeding, where, skip_rng_load)
        result.held_here = own.digests
    except Exception as error:
        _warn_once(f"RNG resume audit could not run on rank {own.rank} ({error!r}); the resume itself is unaffected")
        return None
    report(result.line, logging.INFO if result.passed else logging.WARNING)
    return result


def _from_every_rank(own: Any) -> list[Any]:
    """Every rank's ``own``, by rank, in one small collective (this rank's alone outside a distributed job)."""
    import torch.distributed as distributed

    if not distributed.is_initialized():
        return [own]
    everyone: list[Any] = [None] * distributed.get_world_size()
    distributed.all_gather_object(everyone, own)
    return everyone


def _this_rank(handed: Handed | None, data_parallel_random_init: bool) -> RankAudit:
    """This rank's contribution; a failure to read it becomes part of the report, never an exception, so that the
    rank still joins the collective."""
    rank = global_rank()
    try:
        from megatron.core import parallel_state as mpu

        coordinates = (
            mpu.get_pipeline_model_parallel_rank(),
            mpu.get_tensor_model_parallel_rank(),
            mpu.get_data_parallel_rank(),
            mpu.get_expert_model_parallel_rank(),
            _expert_tensor_parallel_rank(mpu),
        )
        holds = _live_fingerprint()
        if handed is None:
            return RankAudit(rank, *coordinates, None, data_parallel_random_init, None, holds)
        expected = rng_sources.fingerprint(handed.entry)
        matches = all(holds.get(name) == digest for name, digest in expected.items())
        return RankAudit(rank, *coordinates, handed.kind, data_parallel_random_init, matches, holds)
    except Exception as error:
        return RankAudit(rank, 0, 0, 0, 0, 0, None, False, None, {}, f"{type(error).__name__}: {error}")


def _expert_tensor_parallel_rank(mpu: ModuleType) -> int:
    get_rank = getattr(mpu, "get_expert_tensor_parallel_rank", None)
    return 0 if get_rank is None else get_rank()


def _live_fingerprint() -> dict[str, str]:
    return rng_sources.fingerprint(rng_sources.live_rng_state())


_warned = False


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        report(message, logging.WARNING, every_rank=True)


def seed_offset(stream: str, rank: RankAudit, data_parallel_random_init: bool, seeding: Seeding) -> int:
    """Where the stack's seeding puts ``stream`` of ``rank``, relative to the run's seed."""
    offset = seeding.pipeline * rank.pp + (seeding.data_parallel * rank.dp if data_parallel_random_init else 0)
    if stream == MODEL_PARALLEL_STREAM:
        return offset + 2718 + rank.tp
    if stream == EXPERT_PARALLEL_STREAM:
        return offset + 1024 + 100 * rank.ep + rank.etp
    return offset


def collapsed_streams(ranks: Sequence[RankAudit], seeding: Seeding) -> list[Collapse]:
    """Every stream some ranks hold in one state although Megatron seeds them apart."""
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
    """The audit's verdict and its line, from every rank's contribution."""
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
    head = f"RNG resume audit{f' of {where}' if where else ''}, {result.ranks} rank{'s' * (result.ranks != 1)}: "
    if not result.by_kind:
        parts = ["what each rank was handed is not known (bridge_rng_patch did not hand it), streams compared only"]
    else:
        counts = [f"{len(result.by_kind[kind])} {text}" for kind, text in _KINDS.items() if kind in result.by_kind]
        parts = [", ".join(counts)]
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
        parts.append("the streams Megatron seeds apart are apart")
        return head + "; ".join(parts)
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
    apart = [rank for group in others for rank in group]
    return f"{collapse.stream} of {_ranks(apart)} is that of {_ranks(list(first))}"


def _ranks(ranks: Sequence[int]) -> str:
    """ "rank 3", "ranks 1, 3", or the first few and how many more."""
    shown = ", ".join(map(str, ranks[:_NAMED_RANKS]))
    more = f" and {len(ranks) - _NAMED_RANKS} more" if len(ranks) > _NAMED_RANKS else ""
    return f"rank{'s' * (len(ranks) > 1)} {shown}{more}"


class AuditAfterRestore:
    """The resume function's wrapper: after a resume that asked for RNG state, audit it; after one that asked for
    none, say so; after no load at all (a fresh start), say nothing.

    Whether a load asked for RNG state is decided by the loop's configuration and the checkpoint alone (load_rng,
    finetune, a TP or PP change), so every rank reaches the same decision and the collective is joined by all.
    """

    def __init__(self, seeding: Seeding, skip_rng_load: str, context: ResumeContext) -> None:
        self._seeding = seeding
        self._skip_rng_load = skip_rng_load
        self._context = context

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if switched_off(AUDIT_ENV):
            return wrapped(*args, **kwargs)
        context = self._context
        context.begin()
        result = wrapped(*args, **kwargs)
        where = f"checkpoint {context.checkpoint_dir}" if context.checkpoint_dir else "the resume"
        if context.rng_requested:
            handed = context.handed
            own = _this_rank(handed, handed is not None and handed.data_parallel_random_init)
            _audit(own, self._seeding, self._skip_rng_load, where)
            context.note_restored(own.digests)
        elif context.loads:
            report(
                f"RNG resume audit of {where}: the loop restored no RNG state (load_rng off, finetune, a TP or PP "
                "change, or a release checkpoint); nothing to audit"
            )
        return result


class FirstStep(NamedTuple):
    """What the first-step check found across the job, the same on every rank: the sources that moved since the
    restore, with the ranks they moved on, and the ranks that could not be checked."""

    ranks: int
    moved: dict[tuple[str, ...], list[int]]
    unchecked: list[int]
    line: str

    @property
    def passed(self) -> bool:
        return not (self.moved or self.unchecked)


def check_first_step(audit: ResumeAudit | None) -> FirstStep | None:
    """At the first training step after a resume, on every rank: compare what this rank holds with what it held when
    ``audit_restored_rng()`` returned ``audit``. Rank 0 logs one line, a WARNING naming each source that moved;
    None where the audit was switched off or this check could not run (said once in the log)."""
    if audit is None or switched_off(AUDIT_ENV):
        return None
    return _check_first_step(audit.held_here)


def _check_first_step(held_after_restore: dict[str, str]) -> FirstStep | None:
    rank = global_rank()
    try:
        holds = _live_fingerprint() if held_after_restore else {}
        moved = tuple(sorted(name for name, digest in held_after_restore.items() if holds.get(name) != digest))
    except Exception:
        holds, moved = {}, ()
    try:
        result = judge_first_step(_from_every_rank((rank, moved, bool(holds))))
    except Exception as error:
        _warn_once(f"RNG first-step check could not run on rank {rank} ({error!r}); training is unaffected")
        return None
    report(result.line, logging.INFO if result.passed else logging.WARNING)
    return result


_TORCH_ALONE = (
    "torch's CPU generator alone: a DataLoader iterated after the load (without a generator of its own) drew its "
    "base seed from it"
)
_EVERY_SOURCE = "every source: a re-seed, or a callback that draws, after the load"
_SOME_SOURCES = "drawn from between the restore and the first step"


def judge_first_step(ranks: Sequence[tuple[int, tuple[str, ...], bool]]) -> FirstStep:
    """The first-step check's verdict and its line, from every rank's (rank, sources moved, whether it was checked)."""
    moved: dict[tuple[str, ...], list[int]] = {}
    unchecked = [rank for rank, _, checked in ranks if not checked]
    for rank, sources, checked in ranks:
        if checked and sources:
            moved.setdefault(tuple(sources), []).append(rank)
    head = f"RNG first-step check, {len(ranks)} rank{'s' * (len(ranks) != 1)}: "
    parts = []
    if unchecked:
        parts.append(f"{_ranks(unchecked)} could not be checked (no RNG state read after the restore)")
    if not moved:
        checked = len(ranks) - len(unchecked)
        parts.insert(0, f"{checked} started the first step with the RNG state the restore left them, every source")
        return FirstStep(len(ranks), moved, unchecked, head + "; ".join(parts))
    for sources, holders in moved.items():
        parts.append(f"{', '.join(sources)} moved on {_ranks(holders)} ({_likely_cause(sources)})")
    parts.append(
        "the run does not continue where the uninterrupted run would have (see bridge_rng_patch's README, "
        "'Where bit-exact holds')"
    )
    return FirstStep(len(ranks), moved, unchecked, head + "MOVED since the restore: " + "; ".join(parts))


def _likely_cause(sources: tuple[str, ...]) -> str:
    if sources == ("torch",):
        return _TORCH_ALONE
    if {"python", "numpy", "torch"} <= set(sources):
        return _EVERY_SOURCE
    return _SOME_SOURCES


class CheckingFirstStep:
    """The training step's wrapper: the first call after a resume that restored RNG state checks the state first;
    every other call goes straight through."""

    def __init__(self, context: ResumeContext) -> None:
        self._context = context

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if self._context.held_after_restore is not None:
            held = self._context.take_restored()
            if not switched_off(AUDIT_ENV):
                _check_first_step(held or {})
        return wrapped(*args, **kwargs)


class NotingLoads:
    """The wrapper of a stack's checkpoint load (``TrainingLoop.dist_load``, ``fsdp_load``): notes each load in the
    resume's context, and whether it asks for RNG state, for the resume function's wrapper to decide on."""

    def __init__(self, load: LoadFunction, stack: InstalledStack, context: ResumeContext) -> None:
        self._load = load
        self._context = context
        self._signature = inspect.signature(stack.function(load.path))

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        call = self._signature.bind(*args, **kwargs).arguments
        sharded_state_dict = call.get(self._load.request)
        if call.get("rank0") or not isinstance(sharded_state_dict, dict):
            return wrapped(*args, **kwargs)
        # Asked before the load, from the request the loop built (Bridge keeps the key, set to None, when it asks for
        # no RNG state): the stored-layout load inside this wrapper rewrites it per rank (a rank the checkpoint holds
        # no state for asks for none), and the decision must be the same on every rank.
        rng_requested = sharded_state_dict.get(RNG_STATE_KEY) is not None
        result = wrapped(*args, **kwargs)
        if self._load.checkpoint is not None:
            checkpoint_dir = call.get(self._load.checkpoint)
        else:
            checkpoint_dir = result[1] if isinstance(result, tuple) and len(result) > 1 and result[1] else None
        self._context.note_load(rng_requested, None if checkpoint_dir is None else str(checkpoint_dir))
        return result


def plan(stack: InstalledStack, context: ResumeContext) -> Plan:
    loop = stack.loop
    lacks = stack.lacks(loop.resume_function, loop.dist_load.path)
    if lacks:
        return Plan.refuse(lacks)
    unbound = next(filter(None, (stack.unbound(load, (load.request,)) for load in stack.loads)), None)
    if unbound:
        return Plan.refuse(unbound)
    if switched_off(AUDIT_ENV):
        return Plan(Decision(DISABLED, f"{AUDIT_ENV} is set to switch it off"))
    decision = Decision.apply(
        f"after {loop.resume_function} resumes RNG state, one small collective compares each rank's streams with "
        "what it was handed and with the other ranks'; rank 0 logs one line"
    )
    # A load's note must see the request the loop built, before the stored-layout load rewrites it.
    outside = frozenset({LAYOUT_LOAD})
    notes = (Wrapping(load.path, NotingLoads(load, stack, context), outside) for load in stack.loads)
    audit = AuditAfterRestore(loop.seeding, loop.skip_rng_load, context)
    first_step = loop.before_first_step.first_step
    checks = []
    if first_step is not None:
        checks.append(Wrapping(first_step.path, CheckingFirstStep(context), module=first_step.module))
    return Plan(decision, (*notes, Wrapping(loop.resume_function, audit), *checks))
