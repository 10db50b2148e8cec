"""Find out what is installed: versions from package metadata, features from the code actually loaded.

Patches decide by the features (signatures, what a function's source does, which helpers exist); the
release number is only a second signal, reported beside them.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

from packaging.version import InvalidVersion, Version

BRIDGE_DISTRIBUTION = "megatron-bridge"
CORE_DISTRIBUTION = "megatron-core"
# The first Megatron-Bridge release with EP-aware RNG sharding and graph-safe RNG restore (PR #2092).
FIRST_FIXED_BRIDGE = Version("0.3.0")

_RNG_STATE_FIRST_PARAMETERS = ("data_parallel_random_init", "ckpt_format")
_EP_AWARE_SHARDING = re.compile(r"\.ep\b|\bep_size\b|expert_model_parallel")


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it is not installed from a package."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str | None]:
    return {name: installed_version(name) for name in (BRIDGE_DISTRIBUTION, CORE_DISTRIBUTION, "torch", "wrapt")}


def bridge_release_has_fix() -> bool | None:
    """What the installed Megatron-Bridge's version number says about the fix; None when it says nothing."""
    version = installed_version(BRIDGE_DISTRIBUTION)
    if version is None:
        return None
    try:
        return Version(version) >= FIRST_FIXED_BRIDGE
    except InvalidVersion:
        return None


def describe_signature(function: Callable) -> str:
    try:
        return str(inspect.signature(function))
    except (TypeError, ValueError):
        return "(?)"


@functools.cache
def source_of(function: Callable) -> str | None:
    """The function's source, read once: each patch asks about its target more than once."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return None


@dataclass(frozen=True)
class RngStateSignature:
    """How a ``get_rng_state`` takes its process groups: mpu globals, or a ``pg_collection`` argument."""

    pg_collection_position: int | None
    takes_pg_collection: bool

    def describe(self) -> str:
        parameters = ", ".join(_RNG_STATE_FIRST_PARAMETERS)
        if not self.takes_pg_collection:
            return f"get_rng_state({parameters}) with mpu globals"
        keyword_only = "*, " if self.pg_collection_position is None else ""
        return f"get_rng_state({parameters}, {keyword_only}pg_collection)"


def rng_state_signature(get_rng_state: Callable) -> RngStateSignature | None:
    """The signature of ``get_rng_state`` if it is one the old releases have, else None."""
    try:
        parameters = list(inspect.signature(get_rng_state).parameters.values())
    except (TypeError, ValueError):
        return None
    names = tuple(parameter.name for parameter in parameters)
    if names == _RNG_STATE_FIRST_PARAMETERS:
        return RngStateSignature(pg_collection_position=None, takes_pg_collection=False)
    if names != (*_RNG_STATE_FIRST_PARAMETERS, "pg_collection"):
        return None
    keyword_only = parameters[2].kind is inspect.Parameter.KEYWORD_ONLY
    return RngStateSignature(pg_collection_position=None if keyword_only else 2, takes_pg_collection=True)


def shards_rng_state_by_ep(get_rng_state: Callable) -> bool | None:
    """Whether ``get_rng_state`` already shards by EP (the upstream fix); None when its source is unavailable."""
    source = source_of(get_rng_state)
    if source is None:
        return None
    return bool(_EP_AWARE_SHARDING.search(source))


def builds_rng_sharded_object(get_rng_state: Callable) -> bool | None:
    source = source_of(get_rng_state)
    return None if source is None else "ShardedObject(" in source and "replica_id=" in source


def restore_converts_tracker_states(load_checkpoint_from_path: Callable) -> bool | None:
    """Whether Bridge's RNG restore already converts tracker states (the upstream fix)."""
    source = source_of(load_checkpoint_from_path)
    return None if source is None else "convert_cuda_rng_state" in source


def restore_sets_tracker_states(load_checkpoint_from_path: Callable) -> bool | None:
    """Whether Bridge's RNG restore has the shape this package patches: tracker states set from the checkpoint."""
    source = source_of(load_checkpoint_from_path)
    if source is None:
        return None
    return "get_cuda_rng_tracker().set_states(" in source and '"rng_state" in state_dict' in source


def core_has_rng_conversion(tensor_parallel: ModuleType) -> bool:
    """Whether megatron-core brings ``convert_cuda_rng_state`` and ``is_graph_safe_cuda_rng_tracker``."""
    return all(
        callable(getattr(tensor_parallel, name, None))
        for name in ("convert_cuda_rng_state", "is_graph_safe_cuda_rng_tracker")
    )
