"""Save side: with EP > 1, ``get_rng_state`` keeps every DP rank's RNG state, in the release's own layout: its (pp, tp)
object's list holds every DP rank's state (entry 0 stays the writer's, for releases without the package), and
fsdp_dtensor's ``{"(pp, tp)": states}`` gets the rank's own ``(pp, tp, dp)`` entry beside it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject

from bridge_rng_patch import groups, probe
from bridge_rng_patch.decision import Decision, Plan, Wrapping
from bridge_rng_patch.loops import SAVE_SHARDING
from bridge_rng_patch.resume import ResumeWatch
from bridge_rng_patch.rng_layout import with_own_fsdp_entry


def ep_aware_rng_state(
    signature: probe.RngStateSignature, watch: ResumeWatch, torch_dist: bool = True
) -> Callable[..., Any]:
    """The ``get_rng_state`` wrapper: fills the release's object at saves only, argument positions found once."""
    group_positions = {name: signature.position(name) for name in signature.names if name in groups.ARGUMENTS}

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        rng_state = wrapped(*args, **kwargs)
        fsdp_dtensor = isinstance(rng_state, dict)
        if not (fsdp_dtensor or (torch_dist and isinstance(rng_state, ShardedObject))):  # torch's per-rank list
            return rng_state
        passed = {name: _passed(args, kwargs, name, position) for name, position in group_positions.items()}
        if groups.size(passed, groups.EP) <= 1:
            return rng_state
        # DP with context parallel, as the loop's own replica ids count it.
        if fsdp_dtensor:
            return with_own_fsdp_entry(rng_state, groups.rank(passed, groups.DP_CP))
        if watch.resumes_running:  # a load request: what it asks for is the stored layout, not this list
            return rng_state
        return with_every_dp_rank_state(rng_state, passed)

    return wrapper


def with_every_dp_rank_state(per_pp_tp: ShardedObject, passed: dict[str, Any]) -> ShardedObject:
    """The (pp, tp) object's list filled with every DP rank's state, in one collective over DP, in place."""
    group = groups.dp_cp_group(passed)
    if len(per_pp_tp.data) != 1 or group is None or group.size() <= 1:
        return per_pp_tp
    states = [None] * group.size()
    torch.distributed.all_gather_object(states, per_pp_tp.data[0], group=group)
    per_pp_tp.data = states
    return per_pp_tp


def _passed(args: tuple, kwargs: dict, name: str, position: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if position is not None and position < len(args) else None


def plan(stack: probe.InstalledStack, watch: ResumeWatch) -> Plan:
    target = stack.loop.get_rng_state
    if stack.get_rng_state is None:
        return Plan.refuse(f"{stack.module.__name__} has no {target}")
    # Is the fix already there? Asked first: fixed releases change the signature too (module_name, ...).
    every_dp_rank, fsdp_by_pp_tp = (stack.shards_every_dp_rank, stack.keys_fsdp_rng_by_pp_tp)
    if every_dp_rank and not fsdp_by_pp_tp:
        shown = probe.describe_signature(stack.get_rng_state)
        return Plan.not_needed(f"upstream {target}{shown} already writes every DP rank's RNG state")
    unavailable = f"the source of {target}"
    if every_dp_rank is None and stack.claims_fix(SAVE_SHARDING):
        return Plan(stack.decide_by_release(SAVE_SHARDING, unavailable))
    signature = stack.rng_state_signature
    if signature is None:
        return Plan.refuse(f"unknown signature {target}{probe.describe_signature(stack.get_rng_state)}")
    if every_dp_rank is None:
        decision = stack.decide_by_release(SAVE_SHARDING, unavailable)
    elif every_dp_rank:
        decision = Decision.apply(
            f"{signature.describe()} writes every DP rank's RNG state for torch_dist, but one rank's per (pp, tp) "
            "for fsdp_dtensor"
        )
    elif not stack.builds_rng_sharded_object:
        return Plan.refuse(f"unexpected {target}: its source builds no ShardedObject with a replica_id")
    else:
        note = (
            "; its version number claims the fix, its code does not have it" if stack.claims_fix(SAVE_SHARDING) else ""
        )
        formats = "torch_dist and fsdp_dtensor" if fsdp_by_pp_tp else "torch_dist"
        decision = Decision.apply(f"{signature.describe()} shards by (pp, tp) only ({formats}){note}")
    wrapping = Wrapping(target, ep_aware_rng_state(signature, watch, torch_dist=not every_dp_rank))
    # The torch_dist fix gathers at saves only: the watch tells a load from a save by a resume running.
    return Plan(decision, (wrapping,), watched=not every_dp_rank)
