"""Stand-in for Transformer Engine (CUDA only), visible only to imports made by Megatron-Bridge modules."""

import sys


def _importing_module() -> str:
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "transformer_engine")):
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")


if not _importing_module().startswith(("megatron.bridge", "mcore_bridge", "peft")):
    raise ModuleNotFoundError("No module named 'transformer_engine'", name="transformer_engine")

__version__ = "0.0.0"
