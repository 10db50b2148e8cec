"""Where a rank sits in each parallel group, as the loop counts it: the groups its call passed (a ``pg_collection``,
or one argument per group), else megatron-core's mpu globals, as the loop's own code falls back to them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron.core import parallel_state

TP, PP, DP, DP_CP, EP = "tp", "pp", "dp", "dp_cp", "ep"
# Each axis: the argument a loop passes its group by, mpu's name for it, and whether it counts context parallel too
# (DP with context parallel is what the RNG layouts' replica ids and DP axis count).
_AXES = {
    TP: ("tp_group", "tensor_model_parallel", False),
    PP: ("pp_group", "pipeline_model_parallel", False),
    DP: ("dp_group", "data_parallel", False),
    DP_CP: ("dp_cp_group", "data_parallel", True),
    EP: ("ep_group", "expert_model_parallel", False),
}
ARGUMENTS = frozenset({"pg_collection", *(argument for argument, _, _ in _AXES.values())})
_NOT_PASSED = object()


def _passed_group(passed: Mapping[str, Any], axis: str) -> Any:
    """The group the loop passed for ``axis`` (None: its collection has none); ``_NOT_PASSED`` where none."""
    pg_collection = passed.get("pg_collection")
    if pg_collection is not None:
        return getattr(pg_collection, axis, None)
    group = passed.get(_AXES[axis][0])
    return _NOT_PASSED if group is None else group


def _from_mpu(axis: str, what: str) -> Any:
    _, name, with_context_parallel = _AXES[axis]
    getter = getattr(parallel_state, f"get_{name}_{what}")
    return getter(with_context_parallel=True) if with_context_parallel else getter()


def size(passed: Mapping[str, Any], axis: str) -> int:
    """The size of ``axis``; 1 where the loop's collection has no such group (no EP group: no expert parallelism)."""
    group = _passed_group(passed, axis)
    if group is _NOT_PASSED:
        return _from_mpu(axis, "world_size")
    return 1 if group is None else group.size()


def rank(passed: Mapping[str, Any], axis: str) -> int:
    group = _passed_group(passed, axis)
    if group is _NOT_PASSED:
        return _from_mpu(axis, "rank")
    return 0 if group is None else group.rank()


def dp_cp_group(passed: Mapping[str, Any]) -> Any:
    """The process group of DP with context parallel, for a collective over it: the loop's, else mpu's."""
    group = _passed_group(passed, DP_CP)
    return _from_mpu(DP_CP, "group") if group is _NOT_PASSED else group
