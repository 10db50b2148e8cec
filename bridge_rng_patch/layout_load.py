"""Stored-layout load: the RNG load request follows the layout the checkpoint stores, and the entry a rank
restores is checked before any RNG source is set.

Every Megatron-Bridge release up to 0.6.2, Megatron-LM's loop up to 0.19.2, verl and ms-swift ask for
``rng_state`` in the layout the running job would write, and the ShardedObject key embeds the global shape: a
checkpoint stored in another layout (an old release's (pp, tp) under EP > 1, a (pp, tp, dp) one after a DP resize or
under EP == 1) fails on every rank in torch's load planner. Bridge main aligns the request with the stored layout
(Sep 2026); here the wrapper of each stack's torch_dist load (``TrainingLoop.dist_load``) does:

- rank 0 reads the stored layout once per load and every rank receives it, or the same error;
- each rank asks for its own stored shard, and for the shards of DP ranks that no longer exist after a shrink;
- the loaded states reach the loop's restore as a list that checks the entry it picks before the first RNG
  source is set, gives a rank without a stored state its own current (fresh) state, and, where the states
  were gathered over DP with context parallel, picks the rank's own entry (Bridge 0.3.0 and later index by the
  DP rank without context parallel).

fsdp_dtensor checkpoints are loaded by the loop's ``_load_base_checkpoint`` with torch DCP, which reads what is
asked and skips the rest: the base-load wrapper keeps the loop's ``(pp, tp)`` request as upstream makes it and
adds the rank's own ``(pp, tp, dp)`` entry to it (a strict load, which fails on what a checkpoint lacks, reads the
own entry afterwards in one more DCP load), and hands the entry the checkpoint stores for the rank to the restore
under the ``(pp, tp)`` key it looks up.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import operator
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject

from bridge_rng_patch import groups, probe, rng_sources, targets
from bridge_rng_patch.decision import Decision, report
from bridge_rng_patch.loops import LAYOUT_LOAD, LoadFunction, TrainingLoop
from bridge_rng_patch.rng_layout import (
    NOTHING_RESTORED,
    RNG_STATE_KEY,
    RankCoordinates,
    RngCheckpointError,
    StoredRngLayout,
    fsdp_entry,
    fsdp_entry_coordinates,
    read_stored_layouts,
)
from bridge_rng_patch.storage import MSC_SCHEME, dcp_metadata_reader, scheme_of, unknown_scheme

# What a load whose declaration names no checkpoint argument binds by name to find the checkpoint: Bridge's and
# Megatron-LM's ``_load_global_dist_base_checkpoint`` (its config parameter is ``cfg`` in Bridge 0.1.0a0, ``ckpt_cfg``
# in later ones, ``args`` in Megatron-LM; where a release has them, it also binds ``checkpoint_path_override`` (Bridge
# 0.4+), ``pg_collection`` (Bridge 0.3+) and ``dp_cp_group`` (Megatron-LM 0.19)), and their ``_load_base_checkpoint``.
_CHECKPOINT_NAMED_BY = ("load_dir", "rank0", "iteration", "release")
_BASE_CHECKPOINT_NAMED_BY = ("load_dir", "rank0")


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

    The restore (Bridge's and Megatron-LM's alike) indexes this list (``[dp_rank]`` or ``[0]``) and then sets
    python, numpy, torch, CUDA and tracker state one after another; checking the picked entry first makes that
    restore all or nothing. A rank the checkpoint holds no state for gets its own current state, so it keeps its
    fresh RNG, and says so unless that is ``by_design`` (said once for the whole job). ``own_index``, where given,
    is the entry this rank saved, whatever index the restore asks for. What the restore is handed is noted for the
    resume audit: ``kind`` says whose state the stored entries are (``rng_sources.OWN`` or ``SHARED``).
    """

    def __init__(
        self,
        states: list,
        checkpoint_dir: str,
        rank: RankCoordinates,
        own_index: int | None,
        kind: str,
        data_parallel_random_init: bool,
        by_design: bool = False,
        optional: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(states)
        self.checkpoint_dir = checkpoint_dir
        self.rank = rank
        self.own_index = own_index
        self.kind = kind
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
            where = f"checkpoint {self.checkpoint_dir}: '{RNG_STATE_KEY}'[{index}]"
            raise RngCheckpointError(f"{where}{problem}; {NOTHING_RESTORED}")
        rng_sources.note_handed(self.kind, entry, self.data_parallel_random_init)
        return entry

    def _fresh_state(self) -> dict[str, Any]:
        if not self.by_design:
            report(
                f"rank {_global_rank()} (pp {self.rank.pp_rank}, tp {self.rank.tp_rank}, dp {self.rank.dp_rank}): "
                f"checkpoint {self.checkpoint_dir} holds no RNG state for it; it keeps its fresh RNG state",
                logging.WARNING,
                every_rank=True,
            )
        fresh = rng_sources.current_rng_state()
        rng_sources.note_handed(rng_sources.FRESH, fresh, self.data_parallel_random_init)
        return fresh


def _global_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _report_layout(stored: StoredRngLayout, requested: ShardedObject, dp_size: int) -> None:
    """One line on rank 0 whenever the stored layout differs from what the running job asked for."""
    running_per_dp_rank = len(requested.global_shape) == 3
    where = f"checkpoint {stored.checkpoint_dir}"
    if running_per_dp_rank and not stored.per_dp_rank:
        report(
            f"{where} stores RNG state {stored.describe()}: it was written without EP-aware sharding and carries "
            "one shared state per (pp, tp), the state of one DP rank (the old bug); every DP rank resumes from "
            "that state, and the next checkpoint stores each rank's own"
        )
    elif stored.per_dp_rank and not running_per_dp_rank:
        report(
            f"{where} stores RNG state {stored.describe()} while this job shards it by (pp, tp) (EP == 1): each "
            "rank restores the state saved at its own (pp, tp, dp) coordinates"
        )
    if stored.per_dp_rank and stored.global_shape[2] != dp_size:
        _report_dp_resize(where, "RNG state", stored.global_shape[2], dp_size)


def _report_dp_resize(where: str, what: str, stored_dp: int, dp_size: int) -> None:
    if dp_size > stored_dp:
        consequence = f"DP ranks {stored_dp}..{dp_size - 1} keep fresh RNG state"
    else:
        consequence = f"the states stored for DP ranks {dp_size}..{stored_dp - 1} go unused"
    report(f"{where} stores {what} for DP size {stored_dp}, this job runs DP size {dp_size}: {consequence}")


def _stored_layouts_read_once_per_job(checkpoint_dir: str) -> dict[str, StoredRngLayout]:
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


def _storage_not_judged(checkpoint_dir: str) -> str | None:
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


class LayoutAwareDistLoad:
    """The wrapper of a stack's torch_dist load (``TrainingLoop.dist_load``): ask for the RNG shards the checkpoint
    stores; after a TP or PP change, for none (the stacks that compare TP and PP themselves never ask then)."""

    def __init__(self, loop: TrainingLoop, checkpointing: ModuleType) -> None:
        self._loop = loop
        self._load = loop.dist_load
        self._checkpointing = checkpointing
        self._signature = inspect.signature(targets.lookup(checkpointing, loop.dist_load.path))

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        call = self._signature.bind(*args, **kwargs).arguments
        sharded_state_dict = call.get(self._load.request)
        request = sharded_state_dict.get(RNG_STATE_KEY) if isinstance(sharded_state_dict, dict) else None
        if call.get("rank0") or not isinstance(request, ShardedObject):
            return wrapped(*args, **kwargs)
        checkpoint_dir = self._checkpoint_dir(call)
        unjudged = _storage_not_judged(checkpoint_dir)
        if unjudged is not None:  # the same on every rank: it depends on the path and the process's set-up only
            report(f"checkpoint {checkpoint_dir}: {unjudged}; its RNG request is left as the release made it")
            return wrapped(*args, **kwargs)
        stored = _stored_layouts_read_once_per_job(checkpoint_dir).get(request.key)
        if stored is None:
            raise RngCheckpointError(f"checkpoint {checkpoint_dir} stores no '{request.key}'; {NOTHING_RESTORED}")
        rank = RankCoordinates.of_request(request)
        gathered = len(request.data)
        if stored.global_shape[:2] != tuple(request.global_shape[:2]):
            _report_model_parallel_change(checkpoint_dir, stored.global_shape[:2], tuple(request.global_shape[:2]))
            del sharded_state_dict[RNG_STATE_KEY]
            result = wrapped(*args, **kwargs)
            _state_dict(result, self._load)[RNG_STATE_KEY] = self._restorable([], checkpoint_dir, rank, None, gathered)
            return result
        dp_cp_size, dp_size = groups.size(call, groups.DP_CP), groups.size(call, groups.DP)
        _report_layout(stored, request, dp_cp_size)
        requests = stored.requests_for(rank, dp_cp_size, request.data)
        del sharded_state_dict[RNG_STATE_KEY]
        sharded_state_dict.update(requests)
        result = wrapped(*args, **kwargs)
        state_dict = _state_dict(result, self._load)
        own_states = state_dict.get(RNG_STATE_KEY, [])
        for key in requests:
            state_dict.pop(key, None)
        # With data_parallel_random_init this rank's request holds its DP group's gathered states; Bridge 0.3.0 and
        # later gather over DP with context parallel, where the rank's own entry is at its DP-with-CP rank.
        gathered_with_context_parallel = gathered == dp_cp_size != dp_size
        own_index = rank.dp_rank if gathered_with_context_parallel else None
        # Whose state the stored entries are: each rank's own, unless the job runs EP > 1 (it asks for a per-rank
        # layout) on a checkpoint that keeps one state per (pp, tp) (the old bug) and gathered none over DP.
        shared = len(request.global_shape) == 3 and not stored.per_dp_rank and gathered == 1
        kind = rng_sources.SHARED if shared else rng_sources.OWN
        state_dict[RNG_STATE_KEY] = self._restorable(own_states, checkpoint_dir, rank, own_index, gathered, kind)
        if gathered > 1 and not stored.per_dp_rank and own_states and len(own_states) != gathered:
            where = f"checkpoint {checkpoint_dir}"
            _report_dp_resize(where, "RNG states gathered with data_parallel_random_init", len(own_states), gathered)
        return result

    def _restorable(
        self,
        states: list,
        checkpoint_dir: str,
        rank: RankCoordinates,
        own_index: int | None,
        gathered: int,
        kind: str | None = None,
    ) -> RestorableRngStates:
        """The list the restore picks from; without a ``kind``, none of it stored: fresh state by design."""
        by_design = kind is None
        kind = rng_sources.FRESH if kind is None else kind
        optional = self._loop.optional_sources
        return RestorableRngStates(states, checkpoint_dir, rank, own_index, kind, gathered > 1, by_design, optional)

    def _checkpoint_dir(self, call: Mapping[str, Any]) -> str:
        """Where the release itself loads from: the argument that names it, where the declaration names one; else its
        override (Bridge 0.4 and later), else the iteration's directory (Megatron-LM's ``get_checkpoint_name``
        names a rank's file unless asked for ``return_base_dir``)."""
        if self._load.checkpoint is not None:
            return str(call[self._load.checkpoint])
        override = call.get("checkpoint_path_override")
        if override is not None:
            return str(override)
        get_checkpoint_name = self._checkpointing.get_checkpoint_name
        base_dir = {"return_base_dir": True} if self._names_base_dir else {}
        return str(get_checkpoint_name(call["load_dir"], call["iteration"], call["release"], **base_dir))

    @functools.cached_property
    def _names_base_dir(self) -> bool:
        return not probe.missing_parameters(self._checkpointing.get_checkpoint_name, ("return_base_dir",))


def _state_dict(result: Any, load: LoadFunction) -> Any:
    """The loaded state dict in what a load returned."""
    return result[0] if load.returns_tuple else result


class LayoutAwareFsdpLoad:
    """The wrapper of a stack's fsdp_dtensor load (``TrainingLoop.fsdp_load``): each rank restores the entry the
    checkpoint stores for it, its own ``(pp, tp, dp)`` one where there is one; after a TP or PP change, where
    ``keeps_fresh_after_model_parallel_change`` (the loop lacks Bridge #5100), none: every rank keeps its fresh RNG
    state."""

    def __init__(self, loop: TrainingLoop, checkpointing: ModuleType, keeps_fresh_after_model_parallel_change: bool):
        self._loop = loop
        self._load = loop.fsdp_load
        self._signature = inspect.signature(targets.lookup(checkpointing, loop.fsdp_load.path))
        self._keeps_fresh_after_model_parallel_change = keeps_fresh_after_model_parallel_change

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        call = self._signature.bind(*args, **kwargs).arguments
        load = self._load
        sharded_state_dict = call.get(load.request)
        request = sharded_state_dict.get(RNG_STATE_KEY) if isinstance(sharded_state_dict, dict) else None
        entries = _fsdp_entries(request)
        if call.get("rank0") or entries is None:
            return wrapped(*args, **kwargs)
        named = str(call.get(load.checkpoint or "load_dir") or "")
        unjudged = _storage_not_judged(named)
        if unjudged is not None:  # the same on every rank: it depends on the path and the process's set-up only
            report(f"checkpoint {named}: {unjudged}; its RNG entries are read as the release reads them")
            return wrapped(*args, **kwargs)
        shared = next(entry for entry, coordinates in entries.items() if len(coordinates) == 2)
        own_requested = any(len(coordinates) == 3 for coordinates in entries.values())
        rank = RankCoordinates(*entries[shared], groups.rank(call, groups.DP_CP))
        own = fsdp_entry(rank.pp_rank, rank.tp_rank, rank.dp_rank)
        # DCP loads tensors in place, and the request holds the tracker's live states: the loads read into copies, so
        # that a rank the checkpoint holds no state for keeps them as they are.
        unloaded = copy.deepcopy(request[shared])
        request.clear()
        # A load that may skip what the checkpoint lacks (the loops' default) reads the shared entry and the rank's own
        # with the rest. A strict one fails on any entry the checkpoint lacks (an upstream checkpoint's own entries, the
        # shared entry of a TP or PP rank it never had): it is asked for none, and the entry the rank restores is read
        # afterwards.
        strict = _loads_strictly(call)
        if not strict:
            request[shared], request[own] = copy.deepcopy(unloaded), copy.deepcopy(unloaded)
        result = wrapped(*args, **kwargs)
        state_dict = _state_dict(result, load)
        loaded = state_dict.get(RNG_STATE_KEY) if isinstance(state_dict, dict) else None
        # Bridge's and Megatron-LM's load reads every format and says which it read; the others read fsdp_dtensor only.
        checkpoint_type = getattr(result[3], "name", None) if load.returns_tuple else "FSDP_DTENSOR"
        if checkpoint_type != "FSDP_DTENSOR" or not isinstance(loaded, dict):
            return result
        checkpoint_dir = named if load.checkpoint is not None else str(result[1])
        stored = _stored_layouts_read_once_per_job(checkpoint_dir).get(RNG_STATE_KEY)
        if stored is None:  # no RNG state stored: the restore sets this rank's own live state, as upstream's load does
            loaded.setdefault(shared, unloaded)
            return result
        stored_model_parallel = stored.global_shape[:2]
        running_model_parallel = (groups.size(call, groups.PP), groups.size(call, groups.TP))
        if self._keeps_fresh_after_model_parallel_change and stored_model_parallel != running_model_parallel:
            _report_model_parallel_change(checkpoint_dir, stored_model_parallel, running_model_parallel)
            states, own_index, by_design = [], None, True
        else:
            _report_fsdp_layout(stored, own_requested, groups.size(call, groups.DP_CP))
            offset = stored.stored_offset(rank.pp_rank, rank.tp_rank, rank.dp_rank)
            entry = None if offset is None else fsdp_entry(*offset)
            if strict:  # every rank takes part in the DCP load, one outside the stored layout asking for nothing
                states = _stored_fsdp_entry(checkpoint_dir, entry, unloaded)
            else:
                states = loaded.get(entry, []) if entry is not None else []
            own_index, by_design = (0 if stored.per_dp_rank else None), False
        gathered = len(unloaded) > 1
        # Whose state the stored entries are: each rank's own, unless the job runs EP > 1 (it asked for its own entry)
        # on a checkpoint of one dict per (pp, tp), mixed by DCP from several ranks' leaves.
        kind = rng_sources.SHARED if own_requested and not stored.per_dp_rank and not gathered else rng_sources.OWN
        kind = rng_sources.FRESH if by_design else kind
        optional = self._loop.optional_sources
        loaded.clear()
        loaded[shared] = RestorableRngStates(
            states, checkpoint_dir, rank, own_index, kind, gathered, by_design, optional
        )
        return result


def _fsdp_entries(request: Any) -> dict[str, tuple[int, ...]] | None:
    """The entries of an fsdp_dtensor RNG request by key, with their coordinates; None for any other request."""
    if not isinstance(request, dict) or not request:
        return None
    entries = {entry: fsdp_entry_coordinates(entry) for entry in request}
    if any(coordinates is None for coordinates in entries.values()):
        return None
    return entries if any(len(coordinates) == 2 for coordinates in entries.values()) else None


def _loads_strictly(call: Mapping[str, Any]) -> bool:
    """Whether the loop's fsdp_dtensor load fails on what the checkpoint lacks (``strict_fsdp_dtensor_load`` in
    Bridge's checkpoint config or Megatron-LM's args); so taken where the config is not found."""
    config = call.get("ckpt_cfg", call.get("args"))
    return config is None or bool(getattr(config, "strict_fsdp_dtensor_load", False))


def _stored_fsdp_entry(checkpoint_dir: str, entry: str | None, unloaded: list) -> list:
    """The states the checkpoint stores under ``entry`` (None where it holds none for this rank), read with torch DCP
    after a strict load: a collective, which every rank joins."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    request = {} if entry is None else {RNG_STATE_KEY: {entry: unloaded}}
    load(
        request, storage_reader=dcp_metadata_reader(checkpoint_dir), planner=DefaultLoadPlanner(allow_partial_load=True)
    )
    return [] if entry is None else unloaded


def _report_model_parallel_change(checkpoint_dir: str, stored: tuple[int, ...], running: tuple[int, int]) -> None:
    """Upstream's own line for a TP or PP change (Megatron-LM's torch_dist load, Bridge #5100), with (TP, PP) in its
    order and what follows for the job."""
    (stored_pp, stored_tp), (running_pp, running_tp) = stored, running
    report(
        f"checkpoint {checkpoint_dir}: (TP, PP) mismatch after resume (({running_tp}, {running_pp}) vs "
        f"({stored_tp}, {stored_pp}) from checkpoint): RNG state will be ignored; every rank keeps its fresh RNG "
        "state, the model and optimizer load as before"
    )


def _report_fsdp_layout(stored: StoredRngLayout, own_requested: bool, dp_size: int) -> None:
    where = f"checkpoint {stored.checkpoint_dir}"
    if own_requested and not stored.per_dp_rank:
        report(
            f"{where} stores RNG state {stored.describe()}: it was written without per-rank entries and carries one "
            "shared state per (pp, tp), whose leaves torch DCP took from one rank or another (the old bug); every "
            "DP rank resumes from that state, and the next checkpoint stores each rank's own"
        )
    if stored.per_dp_rank and stored.global_shape[2] != dp_size:
        _report_dp_resize(where, "RNG state", stored.global_shape[2], dp_size)


class LayoutLoadPatch:
    def targets(self, loop: TrainingLoop, checkpointing: ModuleType) -> tuple[str, ...]:
        fsdp_dtensor = _loads_fsdp_dtensor(loop, checkpointing)
        return (loop.dist_load.path, loop.fsdp_load.path) if fsdp_dtensor else (loop.dist_load.path,)

    def decide(self, loop: TrainingLoop, checkpointing: ModuleType) -> Decision:
        load = loop.dist_load
        named_by = () if load.checkpoint is not None else ("get_checkpoint_name",)
        missing = [name for name in (load.path, *named_by) if not targets.exists(checkpointing, name)]
        if missing:
            return Decision.refuse(f"{checkpointing.__name__} lacks {', '.join(missing)}")
        # Is the fix already there? Asked first, from the code: no release number says so.
        load_functions = [targets.lookup(checkpointing, path) for path in (loop.resume_function, load.path)]
        follows = probe.load_follows_stored_rng_layout(checkpointing, load_functions)
        if follows:
            return Decision.not_needed("upstream's load already asks for the RNG layout the checkpoint stores")
        dist_load = targets.lookup(checkpointing, load.path)
        shown = f"{load.path}{probe.describe_signature(dist_load)}"
        unbound = probe.missing_parameters(dist_load, _bound_by(load, _CHECKPOINT_NAMED_BY))
        if unbound:
            return Decision.refuse(f"unknown signature {shown}: no {', '.join(unbound)}")
        if follows is None:
            return probe.decide_by_release(loop, LAYOUT_LOAD, "the load's source")
        reason = f"{shown} asks for RNG state in the running job's layout only"
        if _loads_fsdp_dtensor(loop, checkpointing):
            if _ignores_rng_after_model_parallel_change(loop, checkpointing):
                reason += "; its fsdp_dtensor load already ignores RNG state after a TP or PP change"
            else:
                reason += "; its fsdp_dtensor load restores RNG state after a TP or PP change"
        return Decision.apply(reason)

    def instrument(self, loop: TrainingLoop, checkpointing: ModuleType) -> None:
        targets.wrap(checkpointing, loop.dist_load.path, LayoutAwareDistLoad(loop, checkpointing))
        if _loads_fsdp_dtensor(loop, checkpointing):
            keeps_fresh = not _ignores_rng_after_model_parallel_change(loop, checkpointing)
            targets.wrap(checkpointing, loop.fsdp_load.path, LayoutAwareFsdpLoad(loop, checkpointing, keeps_fresh))


def _bound_by(load: LoadFunction, checkpoint_named_by: tuple[str, ...]) -> tuple[str, ...]:
    """What a load must bind by name: its request, and its checkpoint argument, or what names the checkpoint."""
    return (load.request, load.checkpoint) if load.checkpoint is not None else (load.request, *checkpoint_named_by)


def _ignores_rng_after_model_parallel_change(loop: TrainingLoop, checkpointing: ModuleType) -> bool:
    """Whether the loop's fsdp_dtensor load already leaves RNG state alone after a TP or PP change (Bridge #5100, in
    0.6.0); where its source cannot be read, taken as not, so that the package's own check applies: after such a
    change no stored state belongs to any running rank."""
    restore = targets.lookup(checkpointing, loop.resume_function)
    return bool(probe.fsdp_load_ignores_rng_after_model_parallel_change(restore))


def _loads_fsdp_dtensor(loop: TrainingLoop, checkpointing: ModuleType) -> bool:
    """Whether the loop writes fsdp_dtensor RNG entries by (pp, tp) and loads them through a load this package can
    bind."""
    load = loop.fsdp_load
    if (
        load is None
        or not targets.exists(checkpointing, load.path)
        or not targets.exists(checkpointing, loop.get_rng_state)
    ):
        return False
    if not probe.keys_fsdp_rng_by_pp_tp(targets.lookup(checkpointing, loop.get_rng_state), checkpointing):
        return False
    return not probe.missing_parameters(
        targets.lookup(checkpointing, load.path), _bound_by(load, _BASE_CHECKPOINT_NAMED_BY)
    )


PATCH = LayoutLoadPatch()
