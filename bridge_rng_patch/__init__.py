"""Give old Megatron-Bridge releases the RNG checkpointing of Megatron-Bridge 0.3.0.

``import bridge_rng_patch`` at the start of training registers an import hook; when (or if already)
``megatron.bridge.training.checkpointing`` is imported, each patch probes the installed code and applies only
where the fix is missing. Set ``BRIDGE_RNG_PATCH_DISABLE=1`` to switch it off; ``undo()`` restores the originals.
"""

from bridge_rng_patch.patcher import PatchStatus, apply, install, status, undo
from bridge_rng_patch.rng_layout import RngCheckpointError

__all__ = ["PatchStatus", "RngCheckpointError", "apply", "status", "undo"]
__version__ = "0.1.0"

install()
