"""Give old Megatron-Bridge releases the RNG checkpointing of Megatron-Bridge 0.3.0.

``import bridge_rng_patch`` at the start of training registers an import hook; when (or if already)
``megatron.bridge.training.checkpointing`` is imported, each patch probes the installed code and applies only
where the fix is missing. Set ``BRIDGE_RNG_PATCH_DISABLE=1`` to switch it off; ``undo()`` restores the originals.
"""

from typing import Any

from bridge_rng_patch.patcher import PatchStatus, apply, install, status, undo

__all__ = ["PatchStatus", "RngCheckpointError", "apply", "status", "undo"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # RngCheckpointError lives with the layouts, whose module would add dataclasses to every import.
    if name == "RngCheckpointError":
        from bridge_rng_patch.rng_layout import RngCheckpointError

        return RngCheckpointError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


install()
