"""Stored-layout load: the RNG load asks for what the checkpoint stores for each rank, and the entry a rank restores is
checked before any source is set (upstream Bridge main, Sep 2026; in no release). A request in the running layout
misses a checkpoint stored in another; after a TP or PP change every rank keeps its fresh state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from megatron.core.dist_checkpointing.mapping import ShardedObject

from bridge_rng_patch import groups
from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.loops import LAYOUT_LOAD
from bridge_rng_patch.probe import InstalledStack, describe_signature
from bridge_rng_patch.restorable import (
    StoredLayoutLoad,
    report_dp_resize,
    report_model_parallel_change,
    report_per_rank_layout,
    report_shared_state,
    resuming_rank,
)
from bridge_rng_patch.resume import ResumeWatch
from bridge_rng_patch.rng_layout import (
    FRESH,
    RNG_STATE_KEY,
    Restore,
    RngCheckpointError,
    coordinates_of,
    fsdp_entry,
    fsdp_entry_coordinates,
)
from bridge_rng_patch.storage import dcp_metadata_reader


class LayoutAwareDistLoad(StoredLayoutLoad):
    """The wrapper of a stack's torch_dist load (``TrainingLoop.dist_load``)."""

    def __init__(self, stack: InstalledStack, watch: ResumeWatch) -> None:
        super().__init__(stack, stack.loop.dist_load, watch)

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        call = self.bind(args, kwargs)
        request = None if call is None else call.rng_request
        if not isinstance(request, ShardedObject):
            return wrapped(*args, **kwargs)
        checkpoint_dir = call.checkpoint_dir()
        if self.left_alone(checkpoint_dir, "its RNG request is left as the release made it"):
            return wrapped(*args, **kwargs)
        stored = self.stored_layouts(checkpoint_dir).get(request.key)
        if stored is None:
            raise RngCheckpointError(f"checkpoint {checkpoint_dir} stores no '{request.key}'; {self.remedy}")
        # The request is the release's own (the save wrapper fills the list at saves only): more than one state in it
        # means the run gathers them itself (data_parallel_random_init).
        rank = resuming_rank(call, coordinates_of(request), tuple(request.global_shape[:2]), len(request.data))
        dp_cp_size = groups.size(call.arguments, groups.DP_CP)
        changed = stored.global_shape[:2] != rank.model_parallel
        if changed:
            report_model_parallel_change(checkpoint_dir, stored.global_shape[:2], rank.model_parallel)
        else:
            report_per_rank_layout(stored, not rank.ranks_alike, dp_cp_size)
        requests = {} if changed else stored.requests_for(rank, dp_cp_size, request.data)
        del call.request[RNG_STATE_KEY]
        call.request.update(requests)
        result = wrapped(*args, **kwargs)
        state_dict = call.state_dict(result)
        states = state_dict.get(RNG_STATE_KEY, [])
        for key in requests:
            state_dict.pop(key, None)
        if changed:
            state_dict[RNG_STATE_KEY] = self.restorable([], stored, rank, Restore(FRESH), by_design=True)
            return result
        listed = not stored.per_dp_rank and (len(states) > 1 or rank.gathers)
        expected = len(request.data) if rank.gathers else dp_cp_size
        if listed and states and len(states) != expected:
            what = "RNG states gathered with data_parallel_random_init" if rank.gathers else "RNG state"
            report_dp_resize(f"checkpoint {stored.checkpoint_dir}", what, len(states), expected)
        if not (listed or stored.per_dp_rank or rank.ranks_alike):
            report_shared_state(stored)
        state_dict[RNG_STATE_KEY] = self.restorable(states, stored, rank, stored.restore(rank, len(states)))
        return result


class LayoutAwareFsdpLoad(StoredLayoutLoad):
    """The wrapper of a stack's fsdp_dtensor load (``TrainingLoop.fsdp_load``)."""

    def __init__(self, stack: InstalledStack, watch: ResumeWatch) -> None:
        super().__init__(stack, stack.loop.fsdp_load, watch)

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        call = self.bind(args, kwargs)
        entries = None if call is None else _fsdp_entries(call.rng_request)
        if entries is None:
            return wrapped(*args, **kwargs)
        named = str(call.arguments.get(self.load.checkpoint or "load_dir") or "")
        if self.left_alone(named, "its RNG entries are read as the release reads them"):
            return wrapped(*args, **kwargs)
        request = call.rng_request
        shared = next(entry for entry, coordinates in entries.items() if len(coordinates) == 2)
        own = fsdp_entry(*entries[shared], groups.rank(call.arguments, groups.DP_CP))
        # DCP loads tensors in place, and the request holds the tracker's live states: the loads read into copies, so
        # that a rank the checkpoint holds no state for keeps them as they are.
        unloaded = copy.deepcopy(request[shared])
        request.clear()
        # A load that may skip what the checkpoint lacks (the loops' default) reads the shared entry and the own one
        # with the rest; a strict one fails on any entry the checkpoint lacks, so it is asked for none.
        strict = _loads_strictly(call.arguments)
        if not strict:
            request[shared], request[own] = copy.deepcopy(unloaded), copy.deepcopy(unloaded)
        result = wrapped(*args, **kwargs)
        state_dict = call.state_dict(result)
        loaded = state_dict.get(RNG_STATE_KEY) if isinstance(state_dict, dict) else None
        # Bridge's and Megatron-LM's load reads every format and says which it read; the others read fsdp_dtensor only.
        checkpoint_type = getattr(result[3], "name", None) if self.load.returns_tuple else "FSDP_DTENSOR"
        if checkpoint_type == "FSDP_DTENSOR" and isinstance(loaded, dict):
            checkpoint_dir = call.checkpoint_dir(result)
            self._hand_over(loaded, call, (shared, own), unloaded, checkpoint_dir, strict)
        return result

    def _hand_over(
        self, loaded: dict, call: Any, keys: tuple[str, str], unloaded: list, where: str, strict: bool
    ) -> None:
        """Leave under the shared key only what this rank restores: the entry stored for it, checked."""
        (shared, own), checkpoint_dir = keys, where
        stored = self.stored_layouts(checkpoint_dir).get(RNG_STATE_KEY)
        if stored is None:  # no RNG state stored: the restore sets this rank's own live state, as upstream's load does
            loaded.setdefault(shared, unloaded)
            return
        running = (groups.size(call.arguments, groups.PP), groups.size(call.arguments, groups.TP))
        # Where the loop leaves RNG state alone after a TP or PP change itself, the rule is asked at the stored sizes.
        keeps_fresh_itself = self.stack.fsdp_load_keeps_fresh_state_after_model_parallel_change
        model_parallel = stored.global_shape[:2] if keeps_fresh_itself else running
        rank = resuming_rank(call, fsdp_entry_coordinates(own), model_parallel, len(unloaded))
        rank = rank._replace(indexes_as_gathered=True)  # the restore indexes the list by its DP rank, as gathered
        if model_parallel != stored.global_shape[:2]:
            report_model_parallel_change(checkpoint_dir, stored.global_shape[:2], running)
            loaded.clear()
            loaded[shared] = self.restorable([], stored, rank, Restore(FRESH), by_design=True)
            return
        if not (rank.gathers or stored.per_dp_rank or rank.ranks_alike):
            report_shared_state(stored)
        report_per_rank_layout(stored, not rank.ranks_alike, groups.size(call.arguments, groups.DP_CP))
        offset = stored.stored_offset(rank)
        entry = None if offset is None else fsdp_entry(*offset)
        if strict:  # every rank takes part in the DCP load, one outside the stored layout asking for nothing
            states = _stored_fsdp_entry(checkpoint_dir, entry, unloaded)
        else:
            states = loaded.get(entry, []) if entry is not None else []
        loaded.clear()
        loaded[shared] = self.restorable(states, stored, rank, stored.restore(rank, len(states)))


def _fsdp_entries(request: Any) -> dict[str, tuple[int, ...]] | None:
    """The entries of an fsdp_dtensor RNG request by key, with their coordinates; None for any other request."""
    if not isinstance(request, dict) or not request:
        return None
    entries = {entry: fsdp_entry_coordinates(entry) for entry in request}
    if any(coordinates is None for coordinates in entries.values()):
        return None
    return entries if any(len(coordinates) == 2 for coordinates in entries.values()) else None


def _loads_strictly(arguments: Mapping[str, Any]) -> bool:
    """Whether the fsdp_dtensor load fails on what the checkpoint lacks; so taken where the config is not found."""
    config = arguments.get("ckpt_cfg", arguments.get("args"))
    return config is None or bool(getattr(config, "strict_fsdp_dtensor_load", False))


def _stored_fsdp_entry(checkpoint_dir: str, entry: str | None, unloaded: list) -> list:
    """The states stored under ``entry``, read with torch DCP after a strict load: a collective every rank joins."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    request = {} if entry is None else {RNG_STATE_KEY: {entry: unloaded}}
    load(
        request, storage_reader=dcp_metadata_reader(checkpoint_dir), planner=DefaultLoadPlanner(allow_partial_load=True)
    )
    return [] if entry is None else unloaded


def plan(stack: InstalledStack, watch: ResumeWatch) -> Plan:
    load = stack.loop.dist_load
    lacks = stack.lacks(load.path, *(() if load.checkpoint is not None else ("get_checkpoint_name",)))
    if lacks:
        return Plan.refuse(lacks)
    # Is the fix already there? Asked first, from the code: no release number says so.
    follows = stack.load_follows_stored_rng_layout
    if follows:
        return Plan.not_needed("upstream's load already asks for the RNG layout the checkpoint stores")
    unbound = stack.unbound(load, (load.request, *load.named_by))
    if unbound:
        return Plan.refuse(unbound)
    if follows is None:
        decision = stack.decide_by_release(LAYOUT_LOAD, "the load's source")
    else:
        reason = f"{load.path}{describe_signature(stack.function(load.path))} asks for RNG state in the running job's "
        reason += "layout only"
        if stack.loads_fsdp_dtensor and stack.fsdp_load_keeps_fresh_state_after_model_parallel_change:
            reason += "; its fsdp_dtensor load already ignores RNG state after a TP or PP change"
        elif stack.loads_fsdp_dtensor:
            reason += "; its fsdp_dtensor load restores RNG state after a TP or PP change"
        decision = Decision.apply(reason)
    wrappings = [Wrapping(load.path, LayoutAwareDistLoad(stack, watch))]
    if stack.loads_fsdp_dtensor:
        wrappings.append(Wrapping(stack.loop.fsdp_load.path, LayoutAwareFsdpLoad(stack, watch)))
    return Plan(decision, tuple(wrappings))
