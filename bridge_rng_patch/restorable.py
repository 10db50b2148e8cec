"""What the stored-layout load hands a loop's restore, in either format: the stored layouts read once per job, the
states a rank restores as a checked list, and the lines that say what a resume does.

The restore (every stack's alike) indexes the list it is handed (``[dp_rank]`` or ``[0]``) and then sets python,
numpy, torch, the device generator and the tracker's states one after another; checking the entry it picks first
makes that restore all or nothing.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bridge_rng_patch.decision import global_rank, report
from bridge_rng_patch.loops import LoadFunction
from bridge_rng_patch.resume_context import ResumeContext
from bridge_rng_patch.rng_layout import (
    FRESH,
    RNG_STATE_KEY,
    RankCoordinates,
    RngCheckpointError,
    StoredRngLayout,
    UnknownRngLayout,
    nothing_restored,
    read_stored_layouts,
)
from bridge_rng_patch.rng_sources import current_rng_state
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
    """What keeps ``entry`` from being restored whole, said after the entry's name; None when nothing does. A key in
    ``optional`` may be left out (the stack's restore sets that source only where it is there).

    Runs at every restore, so it is one function with no loop over keys, and a message is only built for an
    entry that fails.
    """
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
    return f"['{key}'] is {_describe(entry[key])}, expected {_EXPECTED[key]}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


class RestorableRngStates(list):
    """A rank's loaded RNG states, checked when the loop's restore picks one.

    A rank the checkpoint holds no state for gets its own current state, so it keeps its fresh RNG, and says so
    unless that is ``by_design`` (said once for the whole job). An entry that cannot be restored fails the load with
    the stack's own ``remedy``. ``own_index``, where given, is the entry this rank
    saved, whatever index the restore asks for. What the restore is handed (``kind``: whose state the stored entry
    is, ``rng_layout.OWN`` or ``SHARED``) is noted in the resume's ``context`` for the audit.
    """

    def __init__(
        self,
        states: list,
        where: str,
        rank: RankCoordinates,
        kind: str,
        context: ResumeContext,
        remedy: str,
        *,
        own_index: int | None = None,
        data_parallel_random_init: bool = False,
        by_design: bool = False,
        optional: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(states)
        self.where = where
        self.rank = rank
        self.kind = kind
        self.context = context
        self.remedy = remedy
        self.own_index = own_index
        self.data_parallel_random_init = data_parallel_random_init
        self.by_design = by_design
        self.optional = optional

    def __getitem__(self, index: Any) -> Any:
        if not isinstance(index, int):
            return list.__getitem__(self, index)
        if self.own_index is not None:
            index = self.own_index
        try:
            entry = list.__getitem__(self, index)
        except IndexError:
            return self._fresh_state()
        problem = rng_entry_problem(entry, self.optional)
        if problem is not None:
            raise RngCheckpointError(f"{self.where}: '{RNG_STATE_KEY}'[{index}]{problem}; {self.remedy}")
        self.context.note_handed(self.kind, entry, self.data_parallel_random_init)
        return entry

    def _fresh_state(self) -> dict[str, Any]:
        if not self.by_design:
            report(
                f"rank {global_rank()} (pp {self.rank.pp_rank}, tp {self.rank.tp_rank}, dp {self.rank.dp_rank}): "
                f"{self.where} holds no RNG state for it; it keeps its fresh RNG state",
                logging.WARNING,
                every_rank=True,
            )
        fresh = current_rng_state()
        self.context.note_handed(FRESH, fresh, self.data_parallel_random_init)
        return fresh


class StoredLayoutLoad:
    """What the wrappers of a stack's loads share, in either format: the load they wrap, known by what its call binds;
    the RNG request in it; storage the package cannot judge, left alone; and the checked list the restore gets."""

    def __init__(self, stack: InstalledStack, load: LoadFunction, context: ResumeContext) -> None:
        self._stack = stack
        self._load = load
        self._context = context
        self._signature = inspect.signature(stack.function(load.path))
        self._nothing_restored = nothing_restored(stack.loop.skip_rng_load)

    def _stored_layouts(self, checkpoint_dir: str) -> dict[str, StoredRngLayout]:
        """The RNG layouts ``checkpoint_dir`` stores, read once per job; where they fit none known, the error says how
        this stack resumes without them."""
        try:
            return stored_layouts_read_once_per_job(checkpoint_dir)
        except UnknownRngLayout as error:
            raise RngCheckpointError(f"{error}; {self._nothing_restored}") from None

    def _bind(self, args: tuple, kwargs: dict) -> tuple[dict[str, Any], Any, Any]:
        """What the call binds by name, its state-dict request, and the RNG request in it (None where there is none)."""
        call = self._signature.bind(*args, **kwargs).arguments
        sharded_state_dict = call.get(self._load.request)
        request = sharded_state_dict.get(RNG_STATE_KEY) if isinstance(sharded_state_dict, dict) else None
        return call, sharded_state_dict, request

    def _left_alone(self, checkpoint_dir: str, as_released: str) -> bool:
        """Whether the checkpoint is where the package cannot judge how the release reads it (the same on every rank:
        it depends on the path and the process's set-up only), said in one line."""
        unjudged = storage_not_judged(checkpoint_dir)
        if unjudged is not None:
            report(f"checkpoint {checkpoint_dir}: {unjudged}; {as_released}")
        return unjudged is not None

    def _restorable(
        self, states: list, stored: StoredRngLayout, rank: RankCoordinates, kind: str, gathered: bool, **more: Any
    ) -> RestorableRngStates:
        where, optional = f"checkpoint {stored.checkpoint_dir}", self._stack.loop.optional_sources
        return RestorableRngStates(
            states,
            where,
            rank,
            kind,
            self._context,
            self._nothing_restored,
            data_parallel_random_init=gathered,
            optional=optional,
            **more,
        )


def report_dp_resize(where: str, what: str, stored_dp: int, dp_size: int) -> None:
    if dp_size > stored_dp:
        consequence = f"DP ranks {stored_dp}..{dp_size - 1} keep fresh RNG state"
    else:
        consequence = f"the states stored for DP ranks {dp_size}..{stored_dp - 1} go unused"
    report(f"{where} stores {what} for DP size {stored_dp}, this job runs DP size {dp_size}: {consequence}")


def stored_layouts_read_once_per_job(checkpoint_dir: str) -> dict[str, StoredRngLayout]:
    """Rank 0 reads the stored layouts and every rank receives them, or the same error.

    One read per checkpoint load, not one per rank of the same file on shared storage; every rank leaves the
    broadcast, whatever rank 0 met, so none is left waiting in a collective.
    """
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
    """Why the stored layout cannot be read where the release reads this checkpoint, or None when it can.

    A scheme the package does not know, or an ``msc://`` path where megatron-core does not read through the
    Multi-Storage Client: the package cannot tell how the release reads those, so it must not fail the load.
    """
    unknown = unknown_scheme(checkpoint_dir)
    if unknown is not None:
        return unknown
    if scheme_of(checkpoint_dir) == MSC_SCHEME and not _reads_through_multi_storage_client():
        return "an msc:// path, and megatron-core's MultiStorageClientFeature is not enabled here"
    return None


def _reads_through_multi_storage_client() -> bool:
    """Whether megatron-core reads checkpoints through the Multi-Storage Client; megatron-core before 0.13 has no
    ``msc_utils`` and reads none so."""
    try:
        from megatron.core.msc_utils import MultiStorageClientFeature
    except ImportError:
        return False
    return MultiStorageClientFeature.is_enabled()


def state_dict_of(result: Any, load: LoadFunction) -> Any:
    """The loaded state dict in what a load returned."""
    return result[0] if load.returns_tuple else result


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
    """One line on rank 0 where a checkpoint of per-rank state is resumed with EP 1 (not ``expert_parallel``), and
    one where it was written for another DP size."""
    where = f"checkpoint {stored.checkpoint_dir}"
    if not stored.per_dp_rank:
        return
    if not expert_parallel and not stored.fsdp_dtensor:
        report(
            f"{where} stores RNG state {stored.describe()} while this job shards it by (pp, tp) (EP == 1): each "
            "rank restores the state saved at its own (pp, tp, dp) coordinates"
        )
    if stored.global_shape[2] != dp_size:
        report_dp_resize(where, "RNG state", stored.global_shape[2], dp_size)


def report_model_parallel_change(checkpoint_dir: str, stored: tuple[int, ...], running: tuple[int, int]) -> None:
    """Upstream's own line for a TP or PP change (Megatron-LM's torch_dist load, Bridge #5100), with (TP, PP) in its
    order and what follows for the job."""
    (stored_pp, stored_tp), (running_pp, running_tp) = stored, running
    report(
        f"checkpoint {checkpoint_dir}: (TP, PP) mismatch after resume (({running_tp}, {running_pp}) vs "
        f"({stored_tp}, {stored_pp}) from checkpoint): RNG state will be ignored; every rank keeps its fresh RNG "
        "state, the model and optimizer load as before"
    )
