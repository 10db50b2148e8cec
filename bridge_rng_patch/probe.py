"""Find out what is installed: versions and features (signatures, source, helpers) of the code actually loaded.

Patches decide by the features (signatures, what a function's source does, which helpers exist); the
release number is only a second signal, reported beside them.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

from packaging.version import InvalidVersion, Version

BRIDGE_DISTRIBUTION = "megatron-bridge"
CORE_DISTRIBUTION = "megatron-core"
# The first Megatron-Bridge release with EP-aware RNG sharding and graph-safe RNG restore (PR #2092).
FIRST_FIXED_BRIDGE = Version("0.3.0")
# The first version that may ask for the RNG layout a checkpoint stores: no release up to 0.6.2 does; Bridge main
# does since Sep 2026 and has stated 0.7.0 since Aug 2026, before that. A version number can only say it lacks it.
FIRST_POSSIBLY_ALIGNING_BRIDGE = Version("0.7.0")
# Where each Megatron package states its version in its own code, for sources on PYTHONPATH without metadata.
_PACKAGE_INFO = {BRIDGE_DISTRIBUTION: "megatron.bridge", CORE_DISTRIBUTION: "megatron.core"}
UNKNOWN = "unknown"
NOT_INSTALLED = "not installed"

_EP_AWARE_SHARDING = re.compile(r"\.ep\b|\bep_size\b|expert_model_parallel")
_CALLED_NAME = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
_READS_STORED_METADATA = re.compile(r"load_sharded_metadata|load_tensors_metadata|read_metadata\(|state_dict_metadata")


def installed_version(distribution: str) -> str | None:
    """The version of ``distribution`` as the code that gets imported states it, else its package metadata.

    Training images that put Megatron sources on ``PYTHONPATH`` have no metadata, or metadata of another copy,
    so the code's own ``package_info`` comes first. "unknown" for code that states none; None when absent.
    """
    package = _PACKAGE_INFO.get(distribution)
    present, version = _code_version(package) if package else (False, None)
    if version is not None:
        return version
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return UNKNOWN if present else None


def _code_version(package: str) -> tuple[bool, str | None]:
    """Whether ``package`` is importable, and its ``package_info.__version__``, read without importing it.

    Importing Megatron-Bridge takes seconds; its ``package_info`` holds constants only.
    """
    loaded = sys.modules.get(f"{package}.package_info")
    if loaded is not None:
        return True, getattr(loaded, "__version__", None)
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False, None
    if spec is None:
        return False, None
    for location in spec.submodule_search_locations or ():
        path = Path(location) / "package_info.py"
        if path.is_file():
            namespace: dict = {}
            try:
                exec(compile(path.read_text(), str(path), "exec"), namespace)
            except Exception:
                return True, None
            version = namespace.get("__version__")
            return True, version if isinstance(version, str) else None
    return True, None


def installed_versions() -> dict[str, str]:
    return {
        name: installed_version(name) or NOT_INSTALLED
        for name in (BRIDGE_DISTRIBUTION, CORE_DISTRIBUTION, "torch", "wrapt")
    }


def bridge_release_at_least(first: Version) -> bool | None:
    """Whether the installed Megatron-Bridge's version number is ``first`` or later; None when it says nothing."""
    version = installed_version(BRIDGE_DISTRIBUTION)
    if version is None:
        return None
    try:
        return Version(version) >= first
    except InvalidVersion:
        return None


def describe_signature(function: Callable) -> str:
    """``(name, ..., *, name)``: the parameters a function binds, without annotations or defaults."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return "(?)"
    bare = [
        parameter.replace(annotation=parameter.empty, default=parameter.empty)
        for parameter in signature.parameters.values()
    ]
    return str(signature.replace(parameters=bare, return_annotation=signature.empty))


@functools.cache
def source_of(function: Callable) -> str | None:
    """The function's source, read once: each patch asks about its target more than once."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return None


@dataclass(frozen=True)
class RngStateSignature:
    """How a ``get_rng_state`` takes what the save wrapper needs, known by the parameters it binds.

    Old releases take ``data_parallel_random_init`` and, from 0.1.0rc3, ``ckpt_format`` (without it the format
    is always torch_dist); unreleased main between 0.2.2 and the fix adds ``pg_collection``, positional or
    keyword-only. Process groups come from ``pg_collection`` where it is given, else from mpu globals.
    """

    names: tuple[str, ...]
    keyword_only: frozenset[str]
    shown: str

    @property
    def pg_collection_position(self) -> int | None:
        """Where ``pg_collection`` may come positionally; None when it is keyword-only or not taken."""
        if "pg_collection" not in self.names or "pg_collection" in self.keyword_only:
            return None
        return self.names.index("pg_collection")

    def describe(self) -> str:
        groups = "" if "pg_collection" in self.names else " with mpu globals"
        return f"get_rng_state{self.shown}{groups}"


_RNG_STATE_REQUIRED = "data_parallel_random_init"
_RNG_STATE_OPTIONAL = frozenset({"ckpt_format", "pg_collection"})


def rng_state_signature(get_rng_state: Callable) -> RngStateSignature | None:
    """The signature of ``get_rng_state`` if every parameter is one the package knows how to fix, else None."""
    try:
        parameters = list(inspect.signature(get_rng_state).parameters.values())
    except (TypeError, ValueError):
        return None
    names = tuple(parameter.name for parameter in parameters)
    if not names or names[0] != _RNG_STATE_REQUIRED or not set(names[1:]) <= _RNG_STATE_OPTIONAL:
        return None
    if parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
        return None
    keyword_only = frozenset(parameter.name for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY)
    return RngStateSignature(names, keyword_only, describe_signature(get_rng_state))


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


def missing_parameters(function: Callable, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` ``function`` cannot bind by name; all of them when it has no signature."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return list(names)
    return [name for name in names if name not in parameters]


def restore_sets_tracker_states(load_checkpoint_from_path: Callable) -> bool | None:
    """Whether Bridge's RNG restore has the shape this package patches: tracker states set from the checkpoint."""
    source = source_of(load_checkpoint_from_path)
    if source is None:
        return None
    return "get_cuda_rng_tracker().set_states(" in source and '"rng_state" in state_dict' in source


def load_follows_stored_rng_layout(checkpointing: ModuleType, load_functions: tuple[str, ...]) -> bool | None:
    """Whether Bridge's own load path already asks for the RNG shards the checkpoint stores (Bridge main).

    True when one of ``load_functions`` calls a function of the module that is about RNG state and about the
    checkpoint's metadata (upstream's ``_align_rng_state_sharded_metadata``): by its name, or by a source that
    reads the stored metadata. None when none of their sources can be read.
    """
    sources = [source_of(function) for name in load_functions if (function := getattr(checkpointing, name, None))]
    if not any(sources):
        return None
    called = {name for source in sources if source for name in _CALLED_NAME.findall(source)}
    for name in sorted(called):
        helper = getattr(checkpointing, name, None)
        if "rng" not in name.lower() or not callable(helper):
            continue
        if "metadata" in name.lower() or _READS_STORED_METADATA.search(source_of(helper) or ""):
            return True
    return False
