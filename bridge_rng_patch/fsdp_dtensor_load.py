"""The stored-layout load of an fsdp_dtensor checkpoint: each rank restores the entry the checkpoint stores for it.

Megatron-FSDP's RNG state is a dict of lists, loaded with torch DCP, which reads what is asked and skips the rest.
The wrapper keeps the loop's ``(pp, tp)`` request as upstream makes it and adds the rank's own ``(pp, tp, dp)`` entry
to it (a strict load, which fails on what a checkpoint lacks, reads the own entry afterwards in one more DCP load),
and hands the restore the entry the checkpoint stores for the rank under the ``(pp, tp)`` key it looks up. After a
TP or PP change, where the loop does not leave RNG state alone itself, every rank keeps its fresh state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

from bridge_rng_patch import groups
from bridge_rng_patch.probe import InstalledStack
from bridge_rng_patch.restorable import (
    StoredLayoutLoad,
    report_model_parallel_change,
    report_per_rank_layout,
    report_shared_state,
    state_dict_of,
)
from bridge_rng_patch.resume_context import ResumeContext
from bridge_rng_patch.rng_layout import FRESH, RNG_STATE_KEY, RankCoordinates, fsdp_entry, fsdp_entry_coordinates
from bridge_rng_patch.storage import dcp_metadata_reader


class _Request(NamedTuple):
    """A rank's fsdp_dtensor RNG request as the loop built it: the shared ``(pp, tp)`` entry's key, whether the rank's
    own entry was asked for too (EP > 1), where the rank sits, and a copy of the request's live states."""

    shared: str
    own_requested: bool
    rank: RankCoordinates
    unloaded: list


class LayoutAwareFsdpLoad(StoredLayoutLoad):
    """The wrapper of a stack's fsdp_dtensor load (``TrainingLoop.fsdp_load``)."""

    def __init__(self, stack: InstalledStack, context: ResumeContext) -> None:
        super().__init__(stack, stack.loop.fsdp_load, context)
        self._keeps_fresh_after_model_parallel_change = not stack.fsdp_load_ignores_rng_after_model_parallel_change

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        call, _, request = self._bind(args, kwargs)
        entries = _fsdp_entries(request)
        if call.get("rank0") or entries is None:
            return wrapped(*args, **kwargs)
        named = str(call.get(self._load.checkpoint or "load_dir") or "")
        if self._left_alone(named, "its RNG entries are read as the release reads them"):
            return wrapped(*args, **kwargs)
        shared = next(entry for entry, coordinates in entries.items() if len(coordinates) == 2)
        rank = RankCoordinates(*entries[shared], groups.rank(call, groups.DP_CP))
        # DCP loads tensors in place, and the request holds the tracker's live states: the loads read into copies, so
        # that a rank the checkpoint holds no state for keeps them as they are.
        own_requested = any(len(coordinates) == 3 for coordinates in entries.values())
        asked = _Request(shared, own_requested, rank, copy.deepcopy(request[shared]))
        request.clear()
        # A load that may skip what the checkpoint lacks (the loops' default) reads the shared entry and the rank's own
        # with the rest. A strict one fails on any entry the checkpoint lacks (an upstream checkpoint's own entries, the
        # shared entry of a TP or PP rank it never had): it is asked for none, and the entry the rank restores is read
        # afterwards.
        strict = _loads_strictly(call)
        if not strict:
            own = fsdp_entry(rank.pp_rank, rank.tp_rank, rank.dp_rank)
            request[shared], request[own] = copy.deepcopy(asked.unloaded), copy.deepcopy(asked.unloaded)
        result = wrapped(*args, **kwargs)
        state_dict = state_dict_of(result, self._load)
        loaded = state_dict.get(RNG_STATE_KEY) if isinstance(state_dict, dict) else None
        # Bridge's and Megatron-LM's load reads every format and says which it read; the others read fsdp_dtensor only.
        checkpoint_type = getattr(result[3], "name", None) if self._load.returns_tuple else "FSDP_DTENSOR"
        if checkpoint_type == "FSDP_DTENSOR" and isinstance(loaded, dict):
            checkpoint_dir = named if self._load.checkpoint is not None else str(result[1])
            self._hand_over(loaded, asked, checkpoint_dir, strict, call)
        return result

    def _hand_over(self, loaded: dict, asked: _Request, checkpoint_dir: str, strict: bool, call: Mapping) -> None:
        """Leave under the shared key only what this rank restores: the entry stored for it, checked."""
        stored = self._stored_layouts(checkpoint_dir).get(RNG_STATE_KEY)
        if stored is None:  # no RNG state stored: the restore sets this rank's own live state, as upstream's load does
            loaded.setdefault(asked.shared, asked.unloaded)
            return
        rank, gathered = asked.rank, len(asked.unloaded) > 1
        stored_model_parallel = stored.global_shape[:2]
        running_model_parallel = (groups.size(call, groups.PP), groups.size(call, groups.TP))
        if self._keeps_fresh_after_model_parallel_change and stored_model_parallel != running_model_parallel:
            report_model_parallel_change(checkpoint_dir, stored_model_parallel, running_model_parallel)
            loaded.clear()
            loaded[asked.shared] = self._restorable([], stored, rank, FRESH, gathered, by_design=True)
            return
        if asked.own_requested and not stored.per_dp_rank:
            report_shared_state(stored)
        report_per_rank_layout(stored, asked.own_requested, groups.size(call, groups.DP_CP))
        offset = stored.stored_offset(rank.pp_rank, rank.tp_rank, rank.dp_rank)
        entry = None if offset is None else fsdp_entry(*offset)
        if strict:  # every rank takes part in the DCP load, one outside the stored layout asking for nothing
            states = _stored_fsdp_entry(checkpoint_dir, entry, asked.unloaded)
        else:
            states = loaded.get(entry, []) if entry is not None else []
        # A TP or PP change is the loop's own to handle here: the rule is asked at the stored (PP, TP).
        kind = stored.restores(rank, stored_model_parallel, len(states) if gathered else None, not asked.own_requested)
        own_index = 0 if stored.per_dp_rank else None
        loaded.clear()
        loaded[asked.shared] = self._restorable(states, stored, rank, kind, gathered, own_index=own_index)


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
