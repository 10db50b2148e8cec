"""What is installed: versions, signatures, and what the code of a stack's checkpointing module does, resolved once
per stack (``InstalledStack``). The code decides; the release number is a second signal."""

from __future__ import annotations

import contextlib
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
from typing import Any

from packaging.version import InvalidVersion, Version

from bridge_rng_patch import targets
from bridge_rng_patch.decision import Decision
from bridge_rng_patch.loops import LOOPS, LoadFunction, TrainingLoop

# Where each distribution states its version in its own code, for sources on PYTHONPATH without metadata.
_VERSION_FROM = {loop.distribution: loop.version_from for loop in LOOPS if loop.version_from}
UNKNOWN = "unknown"
NOT_INSTALLED = "not installed"

# A get_rng_state that shards by EP, or by a third axis after (pp_size, tp_size), keeps every DP rank's state.
_EVERY_DP_RANK_SHARDED = re.compile(r"\.ep\b|\bep_size\b|expert_model_parallel|\(\s*pp_size\s*,\s*tp_size\s*,")
_FSDP_KEYED_BY_PP_TP = re.compile(r"""\{\s*f["']\(\{pp_rank\}, \{tp_rank\}\)["']\s*:""")
_CALLED_NAME = re.compile(r"\b([A-Za-z_]\w*)\s*\(")
# A call of a function of another module through the module's global: ms-swift's ``fsdp_checkpoint.build_rng_state(``.
_CALLED_THROUGH_MODULE = re.compile(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)\s*\(")
# The fsdp_dtensor branch of a loop's load, up to its RNG restore, where a fixed loop compares TP and PP.
_FSDP_LOAD_BRANCH = re.compile(
    r"""elif\s+(?:\w+\.)*ckpt_format\s*==\s*["']fsdp_dtensor["']\s*:(.*?)["']rng_state["'] in state_dict""", re.DOTALL
)
_COMPARES_MODEL_PARALLEL = re.compile(r"mismatch|tp_pp")
_READS_STORED_METADATA = re.compile(r"load_sharded_metadata|load_tensors_metadata|read_metadata\(|state_dict_metadata")
# The arguments that name the groups the save wrapper sizes EP and DP by; without them, mpu globals.
_GROUP_ARGUMENTS = ("pg_collection", "dp_cp_group")


def installed_version(distribution: str) -> str | None:
    """The version the imported code states (sources on ``PYTHONPATH`` lack metadata), else its metadata's."""
    package = _VERSION_FROM.get(distribution)
    present, version = _code_version(package) if package else (False, None)
    if version is not None:
        return version
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return UNKNOWN if present else None


def _code_version(package: str) -> tuple[bool, str | None]:
    """Whether ``package`` is importable, and its ``package_info.__version__``, read without importing it."""
    loaded = sys.modules.get(f"{package}.package_info")
    if loaded is not None:
        return True, getattr(loaded, "__version__", None)
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return False, None
    namespace: dict = {}
    for path in (Path(location) / "package_info.py" for location in spec.submodule_search_locations or ()):
        if path.is_file():
            with contextlib.suppress(Exception):
                exec(compile(path.read_text(), str(path), "exec"), namespace)
            break
    version = namespace.get("__version__")
    return True, version if isinstance(version, str) else None


def installed_versions() -> dict[str, str]:
    """The versions of the Megatron packages (or "not installed"), of each other stack there, of torch and wrapt."""
    always = (*_VERSION_FROM, "torch", "wrapt")
    names = dict.fromkeys((*_VERSION_FROM, *(loop.distribution for loop in LOOPS), "torch", "wrapt"))
    versions = {name: installed_version(name) for name in names}
    return {name: version or NOT_INSTALLED for name, version in versions.items() if version or name in always}


def describe_signature(function: Callable) -> str:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return "(?)"
    bare = [each.replace(annotation=each.empty, default=each.empty) for each in signature.parameters.values()]
    return str(signature.replace(parameters=bare, return_annotation=signature.empty))


@functools.cache
def source_of(function: Callable) -> str | None:
    """The function's source, read once: each patch asks about its target more than once."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return None


def module_source(name: str) -> str | None:
    """The source of module ``name``, read without importing it (it may be importing the checkpointing module)."""
    try:
        spec = importlib.util.find_spec(name)
        return None if spec is None or not spec.has_location else Path(spec.origin).read_text()
    except (ImportError, ValueError, OSError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class RngStateSignature:
    """How a ``get_rng_state`` takes what the save wrapper needs, positional or keyword-only."""

    names: tuple[str, ...]
    keyword_only: frozenset[str]
    shown: str

    def position(self, name: str) -> int | None:
        if name not in self.names or name in self.keyword_only:
            return None
        return self.names.index(name)

    def describe(self) -> str:
        groups = "" if any(name in self.names for name in _GROUP_ARGUMENTS) else " with mpu globals"
        return f"{self.shown}{groups}"


def rng_state_signature(get_rng_state: Callable, loop: TrainingLoop, method: bool = False) -> RngStateSignature | None:
    """The signature of ``get_rng_state`` where the package knows every parameter (a method's after its instance)."""
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


def fsdp_load_ignores_rng_after_model_parallel_change(restore: Callable) -> bool | None:
    """Whether the loop's fsdp_dtensor load compares the stored TP and PP itself; None where not known."""
    branch = _FSDP_LOAD_BRANCH.search(source_of(restore) or "")
    return None if branch is None else bool(_COMPARES_MODEL_PARALLEL.search(branch.group(1)))


def missing_parameters(function: Callable, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` ``function`` cannot bind by name; all of them when it has no signature."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return list(names)
    return [name for name in names if name not in parameters]


class InstalledStack:
    """A stack's module as installed: what its declaration names there, and each fact the probes find, kept."""

    def __init__(self, loop: TrainingLoop, module: ModuleType) -> None:
        self.loop = loop
        self.module = module

    def function(self, path: str) -> Any:
        try:
            return targets.lookup(self.module, path)
        except AttributeError:
            return None

    def lacks(self, *paths: str) -> str | None:
        """ "MODULE lacks A, B" for the paths the module does not have; None when it has them all."""
        missing = [path for path in paths if self.function(path) is None]
        return f"{self.module.__name__} lacks {', '.join(missing)}" if missing else None

    def unbound(self, load: LoadFunction, names: tuple[str, ...]) -> str | None:
        """ "unknown signature PATH(...): no A, B" where ``load`` cannot bind ``names`` by name; None when it can."""
        function = self.function(load.path)
        missing = missing_parameters(function, names)
        return (
            f"unknown signature {load.path}{describe_signature(function)}: no {', '.join(missing)}" if missing else None
        )

    @functools.cached_property
    def loads(self) -> tuple[LoadFunction, ...]:
        declared = (self.loop.dist_load, self.loop.fsdp_load)
        return tuple(load for load in declared if load is not None and self.function(load.path) is not None)

    @functools.cached_property
    def get_rng_state(self) -> Callable | None:
        return self.function(self.loop.get_rng_state)

    @functools.cached_property
    def rng_state_signature(self) -> RngStateSignature | None:
        method = targets.is_method(self.module, self.loop.get_rng_state)
        return rng_state_signature(self.get_rng_state, self.loop, method)

    @functools.cached_property
    def shards_every_dp_rank(self) -> bool | None:
        """Whether ``get_rng_state`` already writes every DP rank's state (the upstream fix); None without source."""
        source = source_of(self.get_rng_state)
        return None if source is None else bool(_EVERY_DP_RANK_SHARDED.search(source))

    @functools.cached_property
    def keys_fsdp_rng_by_pp_tp(self) -> bool | None:
        """Whether ``get_rng_state``, or what it calls through a module global, keys fsdp_dtensor's by (pp, tp)."""
        source = source_of(self.get_rng_state)
        if source is None:
            return None
        modules = (
            (getattr(self.module, name, None), function) for name, function in _CALLED_THROUGH_MODULE.findall(source)
        )
        callees = (getattr(module, function, None) for module, function in modules if isinstance(module, ModuleType))
        texts = (source, *(source_of(callee) or "" for callee in callees if callable(callee)))
        return any(_FSDP_KEYED_BY_PP_TP.search(text) for text in texts)

    @functools.cached_property
    def builds_rng_sharded_object(self) -> bool | None:
        source = source_of(self.get_rng_state)
        return None if source is None else "ShardedObject(" in source and "replica_id=" in source

    @functools.cached_property
    def restore_source(self) -> str | None:
        return source_of(self.function(self.loop.restore_function))

    @functools.cached_property
    def load_follows_stored_rng_layout(self) -> bool | None:
        """Whether the loop's load already calls a helper about RNG state and the stored metadata (upstream's)."""
        paths = (self.loop.resume_function, self.loop.dist_load.path)
        sources = [source for path in paths if (source := source_of(self.function(path)))]
        if not sources:
            return None
        called = {name for source in sources for name in _CALLED_NAME.findall(source) if "rng" in name.lower()}
        helpers = [(name, getattr(self.module, name, None)) for name in sorted(called)]
        return any(
            "metadata" in name.lower() or bool(_READS_STORED_METADATA.search(source_of(helper) or ""))
            for name, helper in helpers
            if callable(helper)
        )

    @functools.cached_property
    def loads_fsdp_dtensor(self) -> bool:
        """Whether the stack writes fsdp_dtensor RNG entries by (pp, tp), through a load that binds what is needed."""
        load = self.loop.fsdp_load
        if load is None or load not in self.loads or self.get_rng_state is None or not self.keys_fsdp_rng_by_pp_tp:
            return False
        return self.unbound(load, (load.request, *load.named_by)) is None

    @functools.cached_property
    def fsdp_load_keeps_fresh_state_after_model_parallel_change(self) -> bool:
        """Whether the loop's fsdp_dtensor load leaves RNG state alone after a TP or PP change itself (Bridge #5100)."""
        return bool(fsdp_load_ignores_rng_after_model_parallel_change(self.function(self.loop.resume_function)))

    @functools.cached_property
    def names_base_dir(self) -> bool:
        return not missing_parameters(self.module.get_checkpoint_name, ("return_base_dir",))

    @functools.cached_property
    def release(self) -> Version | None:
        """The release number the installed code states (read once: it may execute ``package_info.py``)."""
        try:
            return Version(installed_version(self.loop.distribution) or "")
        except InvalidVersion:
            return None

    def claims_fix(self, patch: str) -> bool:
        known = self.loop.fixed_in[patch].known
        return self.release is not None and known is not None and self.release >= Version(known)

    def decide_by_release(self, patch: str, unavailable: str) -> Decision:
        """The release number alone decides, for code whose features cannot be read."""
        release, fixed_in = self.release, self.loop.fixed_in[patch]
        product = self.loop.distribution if self.loop.version_from == "megatron.core" else self.loop.name
        if release is None:
            return Decision.refuse(f"{unavailable} is unavailable and the {product} version unknown")
        if self.claims_fix(patch):
            return Decision.not_needed(f"{unavailable} is unavailable; {product} >= {fixed_in.known} has the fix")
        if release < Version(fixed_in.possibly):
            return Decision.apply(f"{unavailable} is unavailable; {product} < {fixed_in.possibly} lacks the fix")
        return Decision.refuse(
            f"{unavailable} is unavailable, and whether {product} {release} has the fix is not known"
        )
