"""Where a rank sits in each parallel group, as the loop itself counts it: the groups the loop passed, else
megatron-core's mpu globals.

Loops hand their groups over in different ways: a ``pg_collection`` (attributes ``tp``, ``pp``, ``dp``,
``dp_cp``, ``ep``), one argument per group (``tp_group``, ``pp_group``, ``dp_cp_group``, ``dp_group``), or none at
all. A patch passes what the call it wraps bound, by
name, and asks for an axis; a group the call did not pass comes from mpu, as the loop's own code falls back to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from megatron.core import parallel_state

TP, PP, DP, DP_CP, EP = "tp", "pp", "dp", "dp_cp", "ep"


class _Axis(NamedTuple):
    argument: str
    mpu_size: Callable[[], int]
    mpu_rank: Callable[[], int]


_AXES = {
    TP: _Axis(
        "tp_group",
        parallel_state.get_tensor_model_parallel_world_size,
        parallel_state.get_tensor_model_parallel_rank,
    ),
    PP: _Axis(
        "pp_group",
        parallel_state.get_pipeline_model_parallel_world_size,
        parallel_state.get_pipeline_model_parallel_rank,
    ),
    DP: _Axis("dp_group", parallel_state.get_data_parallel_world_size, parallel_state.get_data_parallel_rank),
    # DP with context parallel: what the RNG layouts' replica ids and DP axis count.
    DP_CP: _Axis(
        "dp_cp_group",
        lambda: parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        lambda: parallel_state.get_data_parallel_rank(with_context_parallel=True),
    ),
    EP: _Axis(
        "ep_group",
        parallel_state.get_expert_model_parallel_world_size,
        parallel_state.get_expert_model_parallel_rank,
    ),
}
# The arguments a loop's functions pass groups by.
ARGUMENTS = frozenset({"pg_collection", *(axis.argument for axis in _AXES.values())})
_NOT_PASSED = object()


def _passed_group(passed: Mapping[str, Any], axis: str) -> Any:
    """The group the loop passed for ``axis``: its ``pg_collection``'s (None where the collection has none), else
    the argument of that name; ``_NOT_PASSED`` where it passed neither."""
    pg_collection = passed.get("pg_collection")
    if pg_collection is not None:
        return getattr(pg_collection, axis, None)
    group = passed.get(_AXES[axis].argument)
    return _NOT_PASSED if group is None else group


def size(passed: Mapping[str, Any], axis: str) -> int:
    """The size of ``axis`` (``TP``, ``PP``, ``DP``, ``DP_CP``, ``EP``); 1 where the loop's collection has no such
    group (a collection without an EP group runs without expert parallelism)."""
    group = _passed_group(passed, axis)
    if group is _NOT_PASSED:
        return _AXES[axis].mpu_size()
    return 1 if group is None else group.size()


def rank(passed: Mapping[str, Any], axis: str) -> int:
    """This rank's index along ``axis``; 0 where the loop's collection has no such group."""
    group = _passed_group(passed, axis)
    if group is _NOT_PASSED:
        return _AXES[axis].mpu_rank()
    return 0 if group is None else group.rank()


def dp_cp_group(passed: Mapping[str, Any]) -> Any:
    """The process group of DP with context parallel, for a collective over it: the loop's, else mpu's."""
    group = _passed_group(passed, DP_CP)
    return parallel_state.get_data_parallel_group(with_context_parallel=True) if group is _NOT_PASSED else group
