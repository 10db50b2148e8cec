"""The stored-layout load of a torch_dist checkpoint: the RNG request asks for the shards the checkpoint stores.

A load without it asks for ``rng_state`` in the layout the running job would write, and the ShardedObject key embeds
the global shape: a checkpoint stored in another layout (a (pp, tp) one under EP > 1, a (pp, tp, dp) one after a DP
resize or under EP == 1) fails on every rank in torch's load planner. Here rank 0 reads the stored layout once per
load and every rank receives it, or the same error; each rank asks for its own stored shard, and for the shards of DP
ranks that no longer exist after a shrink (dist_checkpointing requires a load to cover every stored shard); the
states reach the loop's restore as a checked list. After a TP or PP change it asks for none, and every rank keeps its
fresh state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron.core.dist_checkpointing.mapping import ShardedObject

from bridge_rng_patch import groups
from bridge_rng_patch.probe import InstalledStack
from bridge_rng_patch.restorable import (
    RestorableRngStates,
    StoredLayoutLoad,
    report_dp_resize,
    report_model_parallel_change,
    report_per_rank_layout,
    report_shared_state,
    state_dict_of,
)
from bridge_rng_patch.resume_context import ResumeContext
from bridge_rng_patch.rng_layout import (
    FRESH,
    RNG_STATE_KEY,
    RankCoordinates,
    RngCheckpointError,
    StoredRngLayout,
)


class LayoutAwareDistLoad(StoredLayoutLoad):
    """The wrapper of a stack's torch_dist load (``TrainingLoop.dist_load``)."""

    def __init__(self, stack: InstalledStack, context: ResumeContext) -> None:
        super().__init__(stack, stack.loop.dist_load, context)

    def __call__(self, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        call, sharded_state_dict, request = self._bind(args, kwargs)
        if call.get("rank0") or not isinstance(request, ShardedObject):
            return wrapped(*args, **kwargs)
        checkpoint_dir = self._checkpoint_dir(call)
        if self._left_alone(checkpoint_dir, "its RNG request is left as the release made it"):
            return wrapped(*args, **kwargs)
        stored = self._stored_layouts(checkpoint_dir).get(request.key)
        if stored is None:
            raise RngCheckpointError(f"checkpoint {checkpoint_dir} stores no '{request.key}'; {self._nothing_restored}")
        model_parallel_changed = stored.global_shape[:2] != tuple(request.global_shape[:2])
        if model_parallel_changed:
            report_model_parallel_change(checkpoint_dir, stored.global_shape[:2], tuple(request.global_shape[:2]))
            requests = {}
        else:
            dp_cp_size = groups.size(call, groups.DP_CP)
            report_per_rank_layout(stored, groups.size(call, groups.EP) > 1, dp_cp_size)
            requests = stored.requests_for(RankCoordinates.of_request(request), dp_cp_size, request.data)
        del sharded_state_dict[RNG_STATE_KEY]
        sharded_state_dict.update(requests)
        result = wrapped(*args, **kwargs)
        state_dict = state_dict_of(result, self._load)
        own_states = state_dict.get(RNG_STATE_KEY, [])
        for key in requests:
            state_dict.pop(key, None)
        state_dict[RNG_STATE_KEY] = self._handed(own_states, stored, request, call, model_parallel_changed)
        return result

    def _handed(
        self, own_states: list, stored: StoredRngLayout, request: ShardedObject, call: Mapping, fresh_by_design: bool
    ) -> RestorableRngStates:
        """The checked list the restore picks this rank's entry from."""
        # The request is the release's own (the save-side wrapper fills the list at saves only): more than one state in
        # it means the run gathers them itself (data_parallel_random_init).
        rank, random_init = RankCoordinates.of_request(request), len(request.data) > 1
        if fresh_by_design:
            return self._restorable([], stored, rank, FRESH, random_init, by_design=True)
        # A (pp, tp) entry holds one state, or every DP rank's (gathered by the run, or by this package's save).
        listed = not stored.per_dp_rank and (len(own_states) > 1 or random_init)
        dp_cp_size = groups.size(call, groups.DP_CP)
        if listed and own_states:
            expected = len(request.data) if random_init else dp_cp_size
            if len(own_states) != expected:
                what = "RNG states gathered with data_parallel_random_init" if random_init else "RNG state"
                report_dp_resize(f"checkpoint {stored.checkpoint_dir}", what, len(own_states), expected)
        ep_size = groups.size(call, groups.EP)
        if not (listed or stored.per_dp_rank) and ep_size > 1:
            report_shared_state(stored)
        kind = stored.restores(rank, tuple(request.global_shape[:2]), len(own_states) if listed else None, ep_size <= 1)
        # The restore indexes the list by its DP rank with data_parallel_random_init, else takes entry 0: this rank's
        # entry is at its DP rank with context parallel where this package gathered the list, or the run over DP
        # with context parallel.
        with_context_parallel = len(request.data) == dp_cp_size != groups.size(call, groups.DP)
        own_index = rank.dp_rank if listed and (not random_init or with_context_parallel) else None
        return self._restorable(own_states, stored, rank, kind, random_init, own_index=own_index)

    def _checkpoint_dir(self, call: Mapping[str, Any]) -> str:
        """Where the release itself loads from: the argument that names it, where the declaration names one; else its
        override, else the iteration's directory (``get_checkpoint_name`` names a rank's file unless asked for
        ``return_base_dir``)."""
        if self._load.checkpoint is not None:
            return str(call[self._load.checkpoint])
        override = call.get("checkpoint_path_override")
        if override is not None:
            return str(override)
        base_dir = {"return_base_dir": True} if self._stack.names_base_dir else {}
        get_checkpoint_name = self._stack.module.get_checkpoint_name
        return str(get_checkpoint_name(call["load_dir"], call["iteration"], call["release"], **base_dir))
