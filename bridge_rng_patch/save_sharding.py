"""Save side: with EP > 1, ``get_rng_state`` shards the RNG state by (pp, tp, dp) so every DP rank's is written.

Old releases shard it by (pp, tp) with the DP rank as ``replica_id``, so only one DP rank's state is saved
while ranks in different expert-parallel groups hold different expert RNG streams. The wrapper keeps
everything the original does (what it collects, the DP all-gather, fsdp_dtensor) and only re-shards the
ShardedObject it returns, exactly as Megatron-Bridge 0.3.0 does.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import wrapt
from megatron.core import parallel_state

from bridge_rng_patch import probe
from bridge_rng_patch.decision import Decision
from bridge_rng_patch.rng_layout import reshard_per_dp_rank

TARGET = "get_rng_state"


def ep_aware_rng_state(signature: probe.RngStateSignature) -> Callable[..., Any]:
    """The ``get_rng_state`` wrapper for a release's signature (mpu globals, or a ``pg_collection`` argument).

    A plain function and cheap checks: it runs at every checkpoint save, next to the release's own code.
    """
    position = signature.pg_collection_position

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        rng_state = wrapped(*args, **kwargs)
        if isinstance(rng_state, dict):  # fsdp_dtensor keeps its (pp, tp) dict, as upstream
            return rng_state
        pg_collection = args[position] if position is not None and len(args) > position else kwargs.get("pg_collection")
        if _expert_parallel_size(pg_collection) <= 1:
            return rng_state
        return reshard_per_dp_rank(rng_state, _data_parallel_size(pg_collection))

    return wrapper


def _expert_parallel_size(pg_collection: Any) -> int:
    if pg_collection is None:
        return parallel_state.get_expert_model_parallel_world_size()
    expert_group = getattr(pg_collection, "ep", None)
    return 1 if expert_group is None else expert_group.size()


def _data_parallel_size(pg_collection: Any) -> int:
    """DP size with context parallel, as the release's own replica ids count it."""
    if pg_collection is None:
        return parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    return pg_collection.dp_cp.size()


def _by_version(release_has_fix: bool | None) -> Decision:
    return Decision.by_version(f"the source of {TARGET}", release_has_fix, str(probe.FIRST_FIXED_BRIDGE))


class SaveShardingPatch:
    targets = (TARGET,)

    def decide(self, checkpointing: ModuleType) -> Decision:
        get_rng_state = getattr(checkpointing, TARGET, None)
        if get_rng_state is None:
            return Decision.refuse(f"{checkpointing.__name__} has no {TARGET}")
        # Is the fix already there? Asked first: fixed releases change the signature too (module_name, ...).
        shards_by_ep = probe.shards_rng_state_by_ep(get_rng_state)
        if shards_by_ep:
            shown = probe.describe_signature(get_rng_state)
            return Decision.not_needed(f"upstream {TARGET}{shown} already shards RNG state by EP")
        release_has_fix = probe.bridge_release_at_least(probe.FIRST_FIXED_BRIDGE)
        if shards_by_ep is None and release_has_fix:
            return _by_version(release_has_fix)
        signature = probe.rng_state_signature(get_rng_state)
        if signature is None:
            return Decision.refuse(f"unknown signature {TARGET}{probe.describe_signature(get_rng_state)}")
        if shards_by_ep is None:
            return _by_version(release_has_fix)
        if not probe.builds_rng_sharded_object(get_rng_state):
            return Decision.refuse(f"unexpected {TARGET}: its source builds no ShardedObject with a replica_id")
        note = "; its version number claims the fix, its code does not have it" if release_has_fix else ""
        return Decision.apply(f"{signature.describe()} shards by (pp, tp) only{note}")

    def instrument(self, checkpointing: ModuleType) -> None:
        signature = probe.rng_state_signature(getattr(checkpointing, TARGET))
        wrapt.wrap_function_wrapper(checkpointing, TARGET, ep_aware_rng_state(signature))


PATCH = SaveShardingPatch()
