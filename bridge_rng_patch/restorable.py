"""What the stored-layout load of either format hands a loop's restore: the layouts read once per job, the rank as
the restore rule sees it, the states as a list checked when the restore picks one (so that a restore, which sets one
source after another, is all or nothing), and the lines that say what a resume does.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bridge_rng_patch import groups
from bridge_rng_patch.decision import global_rank, report
from bridge_rng_patch.loops import LoadFunction
from bridge_rng_patch.resume import Handed, LoadCall, ResumeWatch
from bridge_rng_patch.rng_layout import (
    FRESH,
    RNG_STATE_KEY,
    Restore,
    ResumingRank,
    RngCheckpointError,
    StoredRngLayout,
    UnknownRngLayout,
    nothing_restored,
    read_stored_layouts,
)
from bridge_rng_patch.rng_sources import live_rng_state
from bridge_rng_patch.storage import MSC_SCHEME, scheme_of, unknown_scheme

if TYPE_CHECKING:
    from bridge_rng_patch.probe import InstalledStack


def _is_byte_tensor(value: Any, size: int | None = None) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.dtype is torch.uint8
        and value.dim() == 1
        and (value.numel() > 0 if size is None else value.numel() == size)
    )


@functools.cache
def _cpu_rng_state_size() -> int:
    return torch.get_rng_state().numel()


# What the loops' restore sets, in its order, with what each must be.
_EXPECTED = {
    "random_rng_state": "a random.getstate() tuple",
    "np_rng_state": "a numpy.random.get_state() tuple",
    "torch_rng_state": "torch.get_rng_state()'s ByteTensor",
    "cuda_rng_state": "a CUDA RNG ByteTensor",
    "rng_tracker_states": "a non-empty dict of CUDA RNG states (ByteTensor or Generator)",
}
_entry_values = operator.itemgetter(*_EXPECTED)  # in that order; a KeyError names the first key missing
_LEFT_OUT = object()  # an optional source the entry does not hold


def rng_entry_problem(entry: Any, optional: frozenset[str] = frozenset()) -> str | None:
    """What keeps ``entry`` from being restored whole; None when nothing does (runs at every restore: no loop)."""
    if not isinstance(entry, Mapping):
        return f" is a {type(entry).__name__}, expected a dict of RNG states"
    try:
        python_state, numpy_state, cpu_state, cuda_state, tracker_states = _entry_values(
            {**dict.fromkeys(optional, _LEFT_OUT), **entry} if optional else entry
        )
    except KeyError as missing:
        return f" has no {missing}"
    valid = (
        isinstance(python_state, tuple) and len(python_state) == 3 and isinstance(python_state[1], tuple),
        isinstance(numpy_state, tuple) and len(numpy_state) == 5 and numpy_state[0] == "MT19937",
        _is_byte_tensor(cpu_state, _cpu_rng_state_size()),
        cuda_state is _LEFT_OUT or _is_byte_tensor(cuda_state),
        isinstance(tracker_states, Mapping)
        and len(tracker_states) > 0
        and all(_is_byte_tensor(state) or isinstance(state, torch.Generator) for state in tracker_states.values()),
    )
    if all(valid):
        return None
    key = next(key for key, key_valid in zip(_EXPECTED, valid, strict=True) if not key_valid)
    value = entry[key]
    shown = f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else None
    return f"['{key}'] is {shown or f'a {type(value).__name__}'}, expected {_EXPECTED[key]}"


class RestorableRngStates(list):
    """A rank's loaded states: the restore gets the rule's entry, checked first, or keeps its current state."""

    def __init__(
        self, states: list, load: StoredLayoutLoad, where: str, rank: ResumingRank, restore: Restore, by_design: bool
    ) -> None:
        super().__init__(states)
        self.load = load
        self.where = where
        self.rank = rank
        self.restore = restore
        self.by_design = by_design

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int):
            return list.__getitem__(self, index)
        index = index if self.restore.index is None else self.restore.index
        try:
            entry = list.__getitem__(self, index)
        except IndexError:
            if not self.by_design:
                report(
                    f"rank {global_rank()} (pp {self.rank.pp_rank}, tp {self.rank.tp_rank}, dp {self.rank.dp_rank}): "
                    f"{self.where} holds no RNG state for it; it keeps its fresh RNG state",
                    logging.WARNING,
                    every_rank=True,
                )
            return self._handed(FRESH, live_rng_state())
        problem = rng_entry_problem(entry, self.load.stack.loop.optional_sources)
        if problem is not None:
            raise RngCheckpointError(f"{self.where}: '{RNG_STATE_KEY}'[{index}]{problem}; {self.load.remedy}")
        return self._handed(self.restore.kind, entry)

    def _handed(self, kind: str, entry: Mapping[str, Any]) -> Mapping[str, Any]:
        self.load.watch.note_handed(Handed(kind, entry, self.rank.gathers))
        return entry


class StoredLayoutLoad:
    """What the wrappers of a stack's loads share: the load, the watch, the stored layouts, the checked list."""

    def __init__(self, stack: InstalledStack, load: LoadFunction, watch: ResumeWatch) -> None:
        self.stack = stack
        self.load = load
        self.watch = watch
        self.remedy = nothing_restored(stack.loop.skip_rng_load)

    def bind(self, args: tuple, kwargs: dict) -> LoadCall | None:
        return LoadCall.bind(self.stack, self.load, args, kwargs)

    def stored_layouts(self, checkpoint_dir: str) -> dict[str, StoredRngLayout]:
        try:
            return stored_layouts_read_once_per_job(checkpoint_dir)
        except UnknownRngLayout as error:
            raise RngCheckpointError(f"{error}; {self.remedy}") from None

    def left_alone(self, checkpoint_dir: str, as_released: str) -> bool:
        unjudged = storage_not_judged(checkpoint_dir)
        if unjudged is not None:
            report(f"checkpoint {checkpoint_dir}: {unjudged}; {as_released}")
        return unjudged is not None

    def restorable(
        self, states: list, stored: StoredRngLayout, rank: ResumingRank, restore: Restore, by_design: bool = False
    ) -> list:
        return RestorableRngStates(states, self, f"checkpoint {stored.checkpoint_dir}", rank, restore, by_design)


def resuming_rank(
    call: LoadCall, coordinates: tuple[int, int, int], model_parallel: tuple[int, int], states_asked: int
) -> ResumingRank:
    """The rank as the rule sees it, from the call's groups: more than one state asked is the run's own gather."""
    dp_cp_size, dp_size = (groups.size(call.arguments, groups.DP_CP), groups.size(call.arguments, groups.DP))
    return ResumingRank(
        *coordinates,
        model_parallel=model_parallel,
        gathers=states_asked > 1,
        indexes_as_gathered=not states_asked == dp_cp_size != dp_size,
        ranks_alike=groups.size(call.arguments, groups.EP) <= 1,
    )


def stored_layouts_read_once_per_job(checkpoint_dir: str) -> dict[str, StoredRngLayout]:
    """Rank 0 reads the layouts and every rank receives them, or the same error: no rank left waiting."""
    distributed = torch.distributed
    if not distributed.is_initialized() or distributed.get_world_size() == 1:
        return read_stored_layouts(checkpoint_dir)
    outcome: list[Any] = [None]
    if distributed.get_rank() == 0:
        try:
            outcome[0] = read_stored_layouts(checkpoint_dir)
        except RngCheckpointError as error:
            outcome[0] = error
        except Exception as error:
            outcome[0] = RngCheckpointError(f"checkpoint {checkpoint_dir}: its RNG layout cannot be read: {error!r}")
    distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], RngCheckpointError):
        raise outcome[0]
    return outcome[0]


def storage_not_judged(checkpoint_dir: str) -> str | None:
    """Why the package cannot read the layout where the release does, so must leave the load alone."""
    unknown = unknown_scheme(checkpoint_dir)
    if unknown is not None:
        return unknown
    if scheme_of(checkpoint_dir) == MSC_SCHEME and not _reads_through_multi_storage_client():
        return "an msc:// path, and megatron-core's MultiStorageClientFeature is not enabled here"
    return None


def _reads_through_multi_storage_client() -> bool:
    try:  # megatron-core before 0.13 has no msc_utils and reads no checkpoint through it
        from megatron.core.msc_utils import MultiStorageClientFeature
    except ImportError:
        return False
    return MultiStorageClientFeature.is_enabled()


def report_dp_resize(where: str, what: str, stored_dp: int, dp_size: int) -> None:
    if dp_size > stored_dp:
        consequence = f"DP ranks {stored_dp}..{dp_size - 1} keep fresh RNG state"
    else:
        consequence = f"the states stored for DP ranks {dp_size}..{stored_dp - 1} go unused"
    report(f"{where} stores {what} for DP size {stored_dp}, this job runs DP size {dp_size}: {consequence}")


def report_shared_state(stored: StoredRngLayout) -> None:
    """One line on rank 0 where a job with EP > 1 resumes a checkpoint that holds one state per (pp, tp)."""
    if stored.fsdp_dtensor:
        written = "per-rank entries and carries one shared state per (pp, tp), whose leaves torch DCP took from one "
        written += "rank or another"
    else:
        written = "every DP rank's state and carries one shared state per (pp, tp), the state of one DP rank"
    report(
        f"checkpoint {stored.checkpoint_dir} stores RNG state {stored.describe()}: it was written without {written} "
        "(the old bug); every DP rank resumes from that state, and from here on each rank's checkpoints store the "
        "state it then holds"
    )


def report_per_rank_layout(stored: StoredRngLayout, expert_parallel: bool, dp_size: int) -> None:
    """A line where a checkpoint of per-rank state is resumed with EP 1, and one where its DP size was another."""
    if not stored.per_dp_rank:
        return
    where = f"checkpoint {stored.checkpoint_dir}"
    if not expert_parallel and not stored.fsdp_dtensor:
        report(
            f"{where} stores RNG state {stored.describe()} while this job shards it by (pp, tp) (EP == 1): each "
            "rank restores the state saved at its own (pp, tp, dp) coordinates"
        )
    if stored.global_shape[2] != dp_size:
        report_dp_resize(where, "RNG state", stored.global_shape[2], dp_size)


def report_model_parallel_change(checkpoint_dir: str, stored: tuple[int, ...], running: tuple[int, int]) -> None:
    """Upstream's own line for a TP or PP change (Megatron-LM, Bridge #5100), and what follows for the job."""
    (stored_pp, stored_tp), (running_pp, running_tp) = stored, running
    report(
        f"checkpoint {checkpoint_dir}: (TP, PP) mismatch after resume (({running_tp}, {running_pp}) vs "
        f"({stored_tp}, {stored_pp}) from checkpoint): RNG state will be ignored; every rank keeps its fresh RNG "
        "state, the model and optimizer load as before"
    )
