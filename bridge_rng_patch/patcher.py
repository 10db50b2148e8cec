"""The one place that applies and undoes the patches and keeps their status.

Patches are applied once, when ``megatron.bridge.training.checkpointing`` is imported (or at once if it already
is), each only after it has probed the installed code. A patch that cannot apply says why and leaves the module
untouched. Undo puts back the exact original objects. Nothing heavy is imported here: the patch modules, and
with them wrapt, torch and megatron, are imported only when the target module is.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Mapping
from types import ModuleType
from typing import Any, NamedTuple, Protocol

from bridge_rng_patch.decision import APPLIED, DISABLED, PENDING, UNDONE, Decision, report

TARGET_MODULE = "megatron.bridge.training.checkpointing"
DISABLE_ENV = "BRIDGE_RNG_PATCH_DISABLE"

# name -> what it does; each name is also the module that holds the patch, one per upstream fix.
PATCHES = {
    "save_sharding": "get_rng_state shards the saved RNG state by (pp, tp, dp) when EP > 1",
    "tracker_restore": "the RNG restore converts tracker states to the form the tracker in use keeps",
    "layout_load": "the RNG load asks for the layout the checkpoint stores; the entry restored is checked first",
}


class PatchStatus(NamedTuple):
    name: str
    summary: str
    state: str
    reason: str
    versions: Mapping[str, str]


class Patch(Protocol):
    """One patch: the module attributes it replaces, a probe that decides, and the replacement."""

    targets: tuple[str, ...]

    def decide(self, checkpointing: ModuleType) -> Decision: ...

    def instrument(self, checkpointing: ModuleType) -> None: ...


_lock = threading.RLock()
_states: dict[str, Decision] = {
    name: Decision(PENDING, f"waiting for {TARGET_MODULE} to be imported") for name in PATCHES
}
_originals: dict[str, dict[str, object]] = {}
_versions: dict[str, str] = {}
_switched_off = False


class _PostImportHook:
    """Patches the target module right after it has executed, like wrapt's ``register_post_import_hook``.

    wrapt's own hook would import wrapt at ``import bridge_rng_patch``, which costs 40-60 ms with wrapt 2
    (it imports asyncio); wrapt is imported only when patching, after Megatron-Bridge's seconds-long import.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = None if finder is self or find_spec is None else find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                _patch_after_execution(spec.loader)
                return spec
        return None


def _patch_after_execution(loader: Any) -> None:
    execute = loader.exec_module

    def execute_then_patch(module: ModuleType) -> None:
        execute(module)
        _on_checkpointing_imported(module)

    loader.exec_module = execute_then_patch


_hook = _PostImportHook()


def disabled_by_environment() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def install() -> None:
    """Arrange for the patches to apply when Megatron-Bridge's checkpointing module is imported."""
    global _switched_off
    with _lock:
        if disabled_by_environment():
            for name, decision in _states.items():
                if decision.state in (PENDING, UNDONE):
                    _record(name, Decision(DISABLED, f"{DISABLE_ENV} is set"))
            return
        _switched_off = False
        checkpointing = sys.modules.get(TARGET_MODULE)
        if checkpointing is not None:
            _on_checkpointing_imported(checkpointing)
        elif _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)


def apply() -> tuple[PatchStatus, ...]:
    """Apply every patch the installed code needs (again, after ``undo``); returns the status."""
    install()
    return status()


def undo() -> tuple[PatchStatus, ...]:
    """Put back the original functions and switch the package off until ``apply`` is called."""
    global _switched_off
    with _lock:
        _switched_off = True
        checkpointing = sys.modules.get(TARGET_MODULE)
        for name in PATCHES:
            originals = _originals.pop(name, None)
            if originals is not None:
                for attribute, original in originals.items():
                    setattr(checkpointing, attribute, original)
                _record(name, Decision(UNDONE, "original functions restored"))
            elif _states[name].state == PENDING:
                _record(name, Decision(UNDONE, "switched off before Megatron-Bridge was imported"))
    return status()


def status() -> tuple[PatchStatus, ...]:
    """Per patch: applied / not needed / disabled / refused / pending / undone, why, and the versions found."""
    with _lock:
        if not _versions:
            from bridge_rng_patch.probe import installed_versions

            _versions.update(installed_versions())
        return tuple(
            PatchStatus(name, summary, _states[name].state, _states[name].reason, dict(_versions))
            for name, summary in PATCHES.items()
        )


def _on_checkpointing_imported(checkpointing: ModuleType) -> None:
    if not _switched_off and not disabled_by_environment():
        _apply_all(checkpointing)


def _apply_all(checkpointing: ModuleType) -> None:
    with _lock:
        for name in PATCHES:
            if _states[name].state in (PENDING, UNDONE):
                _apply_one(name, checkpointing)


def _apply_one(name: str, checkpointing: ModuleType) -> None:
    try:
        patch: Patch = importlib.import_module(f"bridge_rng_patch.{name}").PATCH
        decision = patch.decide(checkpointing)
    except Exception as error:  # a probe that breaks must leave Bridge as it is
        _record(name, Decision.refuse(f"probing the installed code failed: {error!r}"))
        return
    if decision.state == APPLIED:
        originals = {attribute: getattr(checkpointing, attribute) for attribute in patch.targets}
        try:
            patch.instrument(checkpointing)
        except Exception as error:
            for attribute, original in originals.items():
                setattr(checkpointing, attribute, original)
            decision = Decision.refuse(f"instrumenting failed, module left untouched: {error!r}")
        else:
            _originals[name] = originals
    _record(name, decision)


def _record(name: str, decision: Decision) -> None:
    _states[name] = decision
    report(f"{name}: {decision.state}: {decision.reason}")
