"""Give each Megatron training stack's installed release the RNG checkpointing fixes it lacks.

``import bridge_rng_patch`` at the start of training (or ``bridge-rng-patch run -- COMMAND``) registers an import
hook; when (or if already) a stack's checkpointing module is imported, each patch, one per upstream fix, probes the
installed code and applies only where its fix is missing. Set ``BRIDGE_RNG_PATCH_DISABLE=1`` to switch it off, or
``=NAME[,NAME]`` to switch off those patches; ``undo()`` restores the originals. After each resume, rank 0 logs
whether every rank holds the RNG state it should, and at the first training step whether it still does
(``BRIDGE_RNG_PATCH_AUDIT=0`` switches both off); a loop the package does not patch calls ``audit_restored_rng()``
after its load and ``check_first_step(audit)`` at its first step for the same lines.
"""

from typing import Any

from bridge_rng_patch.patcher import PatchStatus, apply, install, status, undo

__all__ = [
    "PatchStatus",
    "RngCheckpointError",
    "apply",
    "audit_restored_rng",
    "check_first_step",
    "inspect_checkpoint",
    "status",
    "undo",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Loaded on first use: their modules would add dataclasses and re to every import.
    if name == "RngCheckpointError":
        from bridge_rng_patch.rng_layout import RngCheckpointError

        return RngCheckpointError
    if name in ("audit_restored_rng", "check_first_step"):  # import torch and megatron-core
        from bridge_rng_patch import resume_audit

        return getattr(resume_audit, name)
    if name == "inspect_checkpoint":
        from bridge_rng_patch.inspection import inspect_checkpoint

        return inspect_checkpoint
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


install()
