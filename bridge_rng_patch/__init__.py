"""Give each Megatron training stack's installed release the RNG checkpointing fixes it lacks: ``import
bridge_rng_patch`` at the start of training (or ``bridge-rng-patch run -- COMMAND``) patches each stack's modules as
they are imported, each patch only where the installed code lacks its fix. ``BRIDGE_RNG_PATCH_DISABLE`` switches
patches off, ``undo()`` restores the originals."""

import importlib
from typing import Any

from bridge_rng_patch.patcher import PatchStatus, apply, install, status, undo

# Loaded on first use, from their modules: those import torch and megatron-core, or dataclasses and re.
_LAZY = {
    "RngCheckpointError": "rng_layout",
    "audit_restored_rng": "resume_audit",
    "check_first_step": "resume_audit",
    "inspect_checkpoint": "inspection",
}
__all__ = ["PatchStatus", "apply", "status", "undo", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"bridge_rng_patch.{_LAZY[name]}"), name)


install()
