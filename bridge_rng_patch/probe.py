"""Find out what is installed: which training loops, their versions, and the features (signatures, source,
helpers) of the code actually loaded.

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

from bridge_rng_patch.decision import Decision
from bridge_rng_patch.loops import LOOPS, TrainingLoop

BRIDGE_DISTRIBUTION = "megatron-bridge"
CORE_DISTRIBUTION = "megatron-core"
# Where each Megatron package states its version in its own code, for sources on PYTHONPATH without metadata.
_PACKAGE_INFO = {BRIDGE_DISTRIBUTION: "megatron.bridge", CORE_DISTRIBUTION: "megatron.core"}
UNKNOWN = "unknown"
NOT_INSTALLED = "not installed"

# Bridge's fix shards by EP; a layout with a third axis after (pp_size, tp_size) keeps every DP rank's state too
# (Megatron-LM #6858 shards by (pp, tp, dp_cp) always).
_EVERY_DP_RANK_SHARDED = re.compile(r"\.ep\b|\bep_size\b|expert_model_parallel|\(\s*pp_size\s*,\s*tp_size\s*,")
_FSDP_KEYED_BY_PP_TP = re.compile(r"""\{\s*f["']\(\{pp_rank\}, \{tp_rank\}\)["']\s*:""")
_CALLED_NAME = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
# A call of a function of another module through the module's global: ms-swift's ``fsdp_checkpoint.build_rng_state(``.
_CALLED_THROUGH_MODULE = re.compile(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)\s*\(")
# The fsdp_dtensor branch of a loop's load, up to its RNG restore; Bridge #5100 (0.6.0) compares TP and PP in it.
_FSDP_LOAD_BRANCH = re.compile(
    r"""elif\s+(?:\w+\.)*ckpt_format\s*==\s*["']fsdp_dtensor["']\s*:(.*?)["']rng_state["'] in state_dict""", re.DOTALL
)
_COMPARES_MODEL_PARALLEL = re.compile(r"mismatch|tp_pp")
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
    """Megatron-Bridge's and megatron-core's versions (or that they are not installed), each other stack's where it is
    installed, torch's and wrapt's."""
    versions = {name: installed_version(name) or NOT_INSTALLED for name in (BRIDGE_DISTRIBUTION, CORE_DISTRIBUTION)}
    for name in (*(loop.distribution for loop in LOOPS if loop.distribution not in versions), "torch", "wrapt"):
        version = installed_version(name)
        if version is not None or name in ("torch", "wrapt"):
            versions[name] = version or NOT_INSTALLED
    return versions


def _release(loop: TrainingLoop) -> Version | None:
    try:
        return Version(installed_version(loop.distribution) or "")
    except InvalidVersion:
        return None


def release_claims_fix(loop: TrainingLoop, patch: str) -> bool:
    """Whether the loop's version number says it has the fix ``patch`` carries (the second signal)."""
    release, known = _release(loop), loop.fixed_in[patch].known
    return release is not None and known is not None and release >= Version(known)


def decide_by_release(loop: TrainingLoop, patch: str, unavailable: str) -> Decision:
    """The version number alone decides, for code whose features cannot be read."""
    release, fixed_in = _release(loop), loop.fixed_in[patch]
    product = "megatron-core" if loop.distribution == CORE_DISTRIBUTION else loop.name
    if release is None:
        return Decision.refuse(f"{unavailable} is unavailable and the {product} version unknown")
    if release_claims_fix(loop, patch):
        return Decision.not_needed(f"{unavailable} is unavailable; {product} >= {fixed_in.known} has the fix")
    if release < Version(fixed_in.possibly):
        return Decision.apply(f"{unavailable} is unavailable; {product} < {fixed_in.possibly} lacks the fix")
    return Decision.refuse(f"{unavailable} is unavailable, and whether {product} {release} has the fix is not known")


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


# The arguments that name the process groups the save wrapper sizes EP and DP by: Bridge's ``pg_collection``
# (later main and the fixed releases), Megatron-LM's ``dp_cp_group`` (0.19). Without them, mpu globals.
_GROUP_ARGUMENTS = ("pg_collection", "dp_cp_group")


@dataclass(frozen=True)
class RngStateSignature:
    """How a ``get_rng_state`` takes what the save wrapper needs, known by the parameters it binds.

    Old Bridge releases take ``data_parallel_random_init`` and, from 0.1.0rc3, ``ckpt_format`` (without it the
    format is always torch_dist); unreleased main between 0.2.2 and the fix adds ``pg_collection``, positional
    or keyword-only. Megatron-LM's takes ``(use_dist_ckpt)`` in source trees up to core_v0.11, ``(ckpt_format)``
    from 0.12, ``(ckpt_format, tp_group, pp_group)`` from 0.16, and from 0.19 ``dp_cp_group``, ``dp_group`` and
    ``key_prefix``. Process groups come from those arguments where given, else from mpu globals.
    """

    names: tuple[str, ...]
    keyword_only: frozenset[str]
    shown: str

    def position(self, name: str) -> int | None:
        """Where ``name`` may come positionally; None when it is keyword-only or not taken."""
        if name not in self.names or name in self.keyword_only:
            return None
        return self.names.index(name)

    def describe(self) -> str:
        groups = "" if any(name in self.names for name in _GROUP_ARGUMENTS) else " with mpu globals"
        return f"{self.shown}{groups}"


def rng_state_signature(get_rng_state: Callable, loop: TrainingLoop, method: bool = False) -> RngStateSignature | None:
    """The signature of ``get_rng_state`` if every parameter is one the package knows how to fix, else None; a
    ``method`` is known by the parameters after the instance, which a wrapper of a bound call does not see."""
    try:
        parameters = list(inspect.signature(get_rng_state).parameters.values())[1 if method else 0 :]
    except (TypeError, ValueError):
        return None
    names = tuple(parameter.name for parameter in parameters)
    if names and (names[0] not in loop.rng_state_first or not set(names[1:]) <= loop.rng_state_optional):
        return None
    if names and parameters[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    keyword_only = frozenset(parameter.name for parameter in parameters if parameter.kind is parameter.KEYWORD_ONLY)
    shown = describe_signature(get_rng_state)
    if method:
        shown = "(" + shown[1:].partition(", ")[2] if ", " in shown else "()"
    return RngStateSignature(names, keyword_only, f"{loop.get_rng_state}{shown}")


def shards_every_dp_rank(get_rng_state: Callable) -> bool | None:
    """Whether ``get_rng_state`` already writes every DP rank's state (the upstream fix); None when its source is
    unavailable."""
    source = source_of(get_rng_state)
    if source is None:
        return None
    return bool(_EVERY_DP_RANK_SHARDED.search(source))


def keys_fsdp_rng_by_pp_tp(get_rng_state: Callable, module: ModuleType | None = None) -> bool | None:
    """Whether ``get_rng_state`` keys fsdp_dtensor's RNG state by (pp, tp) alone, as every release up to Bridge
    0.6.2 and Megatron-LM 0.19.2 does, in its own code or in a function it calls through a module of ``module``'s
    (ms-swift's ``fsdp_checkpoint.build_rng_state``); None when its source is unavailable."""
    source = source_of(get_rng_state)
    if source is None:
        return None
    return any(_FSDP_KEYED_BY_PP_TP.search(text) for text in (source, *_callees_through_modules(source, module)))


def _callees_through_modules(source: str, module: ModuleType | None) -> list[str]:
    """The sources of the functions ``source`` calls as ``name.function(`` where ``name`` is a module global of
    ``module``."""
    found = []
    for name, function in _CALLED_THROUGH_MODULE.findall(source):
        owner = getattr(module, name, None) if module is not None else None
        callee = getattr(owner, function, None) if isinstance(owner, ModuleType) else None
        found.append(source_of(callee) or "" if callable(callee) else "")
    return found


def builds_rng_sharded_object(get_rng_state: Callable) -> bool | None:
    source = source_of(get_rng_state)
    return None if source is None else "ShardedObject(" in source and "replica_id=" in source


def restore_converts_tracker_states(restore: Callable) -> bool | None:
    """Whether the loop's RNG restore already converts tracker states (the upstream fix)."""
    source = source_of(restore)
    return None if source is None else "convert_cuda_rng_state" in source


def fsdp_load_ignores_rng_after_model_parallel_change(restore: Callable) -> bool | None:
    """Whether the loop's fsdp_dtensor load compares the stored TP and PP with the running ones before it asks for
    RNG state (Bridge #5100, in 0.6.0), as every loop's torch_dist load does; None when the restore's source is
    unavailable or has no fsdp_dtensor branch."""
    source = source_of(restore)
    branch = _FSDP_LOAD_BRANCH.search(source or "")
    return None if branch is None else bool(_COMPARES_MODEL_PARALLEL.search(branch.group(1)))


def missing_parameters(function: Callable, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` ``function`` cannot bind by name; all of them when it has no signature."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return list(names)
    return [name for name in names if name not in parameters]


def restore_sets_tracker_states(restore: Callable) -> bool | None:
    """Whether the loop's RNG restore has the shape this package patches: tracker states set from the checkpoint's
    ``rng_tracker_states``."""
    source = source_of(restore)
    if source is None:
        return None
    return ".set_states(" in source and "rng_tracker_states" in source


def load_follows_stored_rng_layout(checkpointing: ModuleType, load_functions: list[Callable]) -> bool | None:
    """Whether the loop's own load path already asks for the RNG shards the checkpoint stores (Bridge main).

    True when one of ``load_functions`` calls a function of the module that is about RNG state and about the
    checkpoint's metadata (upstream's ``_align_rng_state_sharded_metadata``): by its name, or by a source that
    reads the stored metadata. None when none of their sources can be read.
    """
    sources = [source_of(function) for function in load_functions]
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
