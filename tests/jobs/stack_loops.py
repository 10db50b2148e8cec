"""What the rank job (rng_job.py) does for the stacks that checkpoint with code of their own: verl's Megatron
checkpoint manager and ms-swift's Megatron loop, each through its own real save and load.

- verl: a real ``MegatronCheckpointManager`` of the installed release saves and loads its ``model`` and ``extra``
  contents (the model's dist-checkpoint, and the RNG state, in a dist-checkpoint of its own from 0.8, in the model's
  up to 0.7) through its real ``save_checkpoint`` / ``load_checkpoint``; the optimizer is left out.
  It is seeded as verl's Megatron workers seed (``set_random_seed``: every source alike on every rank, the tracker
  through megatron-core), written out here because their module imports verl's whole training stack.
- ms-swift: its real ``save_mcore_checkpoint`` / ``load_mcore_checkpoint`` with the job's small model and the args its
  command line sets for them, seeded by its own ``set_random_seed`` (mcore_bridge's from 4.1).

Faked, beside fake_cuda.py's CUDA RNG calls: verl's device helpers answer as on a GPU host, so that it saves and
restores the device generator as it does there; both load with megatron-core's fully parallel strategy, which moves
tensors to the device to exchange them, and ms-swift agrees on the iteration in a CUDA tensor: here they stay on the
CPU; and ms-swift 4.1 and later import mcore_bridge, which patches Transformer Engine's classes at import
(``import_checkpointing``). Not for a GPU: ms-swift before 4.5.3 answers torch's save-plan check in the form of the
torch it was built for, which the tests' torch rejects (``_planner_check_for_this_torch``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import inspect
import random
import sys
import types
from pathlib import Path
from typing import Any

VERL, MS_SWIFT = "verl", "ms-swift"
MODULES = {
    VERL: "verl.utils.checkpoint.megatron_checkpoint_manager",
    MS_SWIFT: "swift.megatron.utils.megatron_lm_utils",
}
STEP = 10


def import_checkpointing(loop: str) -> types.ModuleType:
    """The stack's checkpointing module, imported as on a GPU host: for ms-swift, with what mcore_bridge needs of
    Transformer Engine (CUDA only) at import and nothing after it."""
    if loop != MS_SWIFT:
        return importlib.import_module(MODULES[loop])
    with _transformer_engine_for_mcore_bridge():
        return importlib.import_module(MODULES[loop])


@contextlib.contextmanager
def _transformer_engine_for_mcore_bridge():
    """mcore_bridge (ms-swift 4.1 and later) imports Transformer Engine and sets methods on megatron-core's TE layer
    classes when it is imported. Without Transformer Engine those classes are None: each becomes an empty class, and a
    bare ``transformer_engine`` module answers imports while the stack's module is imported, and is gone after it, so
    that megatron-core, imported first, keeps running without it."""
    from megatron.core.extensions import transformer_engine as extension

    for name in dir(extension):
        if name.startswith("TE") and getattr(extension, name) is None:
            setattr(extension, name, type(name, (), {}))
    stand_in = types.ModuleType("transformer_engine")
    stand_in.__version__ = "0.0.0"
    stand_in.__spec__ = importlib.machinery.ModuleSpec("transformer_engine", None)
    sys.modules["transformer_engine"] = stand_in
    try:
        yield
    finally:
        sys.modules.pop("transformer_engine", None)


def checkpointing(loop: str) -> types.ModuleType:
    return sys.modules[MODULES[loop]]


def set_random_seed(loop: str, seed: int, spec: dict) -> None:
    """The stack's own seeding at training start."""
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    if loop == VERL:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        checkpointing(loop).set_random_seed(seed, spec.get("data_parallel_random_init", False))


def build(loop: str, spec: dict, model: list, optimizer: Any = None) -> Any:
    """What the stack's save and load are called with: verl's manager, or ms-swift's args (and the optimizer, which
    they save and load where there is one)."""
    return _verl_manager(spec, model, optimizer) if loop == VERL else _ms_swift_args(spec, optimizer)


def _verl_manager(spec: dict, model: list, optimizer: Any) -> Any:
    from omegaconf import OmegaConf
    from tokenizers import Tokenizer, models
    from transformers import PretrainedConfig, PreTrainedTokenizerFast

    module = checkpointing(VERL)
    _verl_sees_a_gpu_host(module)
    _fully_parallel_load_on_the_cpu()
    saved = ["model", "extra", *(["optimizer"] if optimizer is not None else [])]
    contents = {"save_contents": saved, "load_contents": saved, "async_save": False}
    # Its save writes the Hugging Face config and tokenizer next to the model (up to 0.7): small real ones.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))
    offered = {
        "config": OmegaConf.create({"model": {"path": spec["checkpoint_dir"]}}),
        "checkpoint_config": OmegaConf.create(contents),
        "model_config": None,
        "transformer_config": model[0].config,
        "role": "actor",
        "model": model,
        "arch": "LlamaForCausalLM",
        "hf_config": PretrainedConfig(),
        "param_dtype": None,
        "share_embeddings_and_output_weights": False,
        "processing_class": tokenizer,
        "optimizer": optimizer,
        "optimizer_scheduler": None,
        "use_distributed_optimizer": False,
        "use_dist_checkpointing": True,
    }
    parameters = inspect.signature(module.MegatronCheckpointManager).parameters
    return module.MegatronCheckpointManager(**{name: value for name, value in offered.items() if name in parameters})


def _verl_sees_a_gpu_host(module: types.ModuleType) -> None:
    """verl saves the device generator only where its platform reports a device: here the stand-in one."""
    import torch

    module.get_device_name = lambda: "cuda"
    module.get_torch_device = lambda: torch.cuda
    if hasattr(module, "is_device_available"):
        module.is_device_available = lambda: True


def _ms_swift_args(spec: dict, optimizer: Any) -> argparse.Namespace:
    """ms-swift's args for its save and load, as its command line sets them for a full-parameter run."""
    import torch

    # ``_load_iteration`` agrees on the iteration in a CUDA tensor (NCCL on a GPU); here a CPU one, which gloo reduces.
    checkpointing(MS_SWIFT).torch = CpuForCuda(torch)
    if not spec.get("planner_check_as_released"):
        _planner_check_for_this_torch()
    _fully_parallel_load_on_the_cpu()
    return argparse.Namespace(
        output_dir=spec["checkpoint_dir"],
        mcore_model=spec["checkpoint_dir"],
        tuner_type="full",
        train_type="full",
        tensor_model_parallel_size=spec["tp"],
        pipeline_model_parallel_size=spec["pp"],
        expert_model_parallel_size=spec["ep"],
        context_parallel_size=spec.get("cp", 1),
        data_parallel_random_init=spec.get("data_parallel_random_init", False),
        use_megatron_fsdp=spec.get("ckpt_format") == "fsdp_dtensor",
        strict_fsdp_dtensor_load=spec.get("strict_fsdp_dtensor_load", False),
        async_save=False,
        no_save_optim=optimizer is None,
        no_load_optim=optimizer is None,
        no_save_rng=False,
        no_load_rng=spec.get("load_rng") is False,
        finetune=spec.get("finetune", False),
        dist_ckpt_save_pre_mcore_014=False,
        dist_ckpt_optim_fully_reshardable=False,
        distrib_optim_fully_reshardable_mem_efficient=False,
        use_distributed_optimizer=False,
        fp16=False,
        bf16=False,
        seed=1234,
    )


def _planner_check_for_this_torch() -> None:
    """ms-swift before 4.5.3 replaces torch's ``_validate_global_plan`` (a slow check) with one that answers True,
    the valid answer of the torch it was built for; torch 2.13 expects a list of errors, and its save dies on True
    ("can only join an iterable") before any RNG code runs. Here the replacement answers as ms-swift's own does
    on such a torch from 4.5.3: an empty list."""
    from torch.distributed.checkpoint import default_planner

    if default_planner._validate_global_plan.__module__.startswith("swift.") and (
        default_planner._validate_global_plan() is True
    ):
        default_planner._validate_global_plan = lambda *args, **kwargs: []


def _fully_parallel_load_on_the_cpu() -> None:
    """Both stacks load with megatron-core's fully parallel strategy, whose exchange moves each loaded tensor to the
    device to broadcast it: here it stays on the CPU, which gloo broadcasts."""
    import torch
    from megatron.core.dist_checkpointing import exchange_utils

    exchange_utils.torch = CpuForCuda(torch)
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor


class CpuForCuda:
    """torch, as one module sees it: a tensor it creates on "cuda" is created on the CPU."""

    def __init__(self, torch: types.ModuleType) -> None:
        self._torch = torch

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._torch, name)
        if not callable(found) or isinstance(found, type):
            return found

        def on_the_cpu(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return found(*args, **kwargs)

        return on_the_cpu


def save(loop: str, state: Any, model: list, spec: dict, optimizer: Any = None) -> None:
    """The stack's real save (verl's manager holds the optimizer it saves)."""
    iteration = spec.get("iteration", STEP)
    if loop == VERL:
        state.save_checkpoint(local_path=str(verl_step_dir(spec)), global_step=iteration)
    else:
        checkpointing(loop).save_mcore_checkpoint(state, model, optimizer, iteration=iteration)


def load(loop: str, state: Any, model: list, spec: dict, optimizer: Any = None) -> None:
    if loop == VERL:
        state.load_checkpoint(local_path=str(verl_step_dir(spec)))
    else:
        checkpointing(loop).load_mcore_checkpoint(state, model, optimizer)


def verl_step_dir(spec: dict) -> Path:
    """Where verl's trainer puts one save: ``global_step_{n}`` under the checkpoint directory."""
    return Path(spec["checkpoint_dir"]) / f"global_step_{spec.get('iteration', STEP)}"


def verl_rng_dir(spec: dict) -> Path:
    """The dist-checkpoint that holds a verl save's RNG state: ``extra/dist_ckpt`` from 0.8, the one of the whole
    save (``dist_ckpt``) before."""
    step = verl_step_dir(spec)
    extra = step / "extra" / "dist_ckpt"
    return extra if extra.is_dir() else step / "dist_ckpt"


def get_rng_state(loop: str, state: Any, data_parallel_random_init: bool, spec: dict) -> Any:
    """The installed get_rng_state, called as the stack's save calls it."""
    if loop == VERL:
        return state.get_rng_state()
    get_rng_state = checkpointing(loop)._get_rng_state
    parameters = inspect.signature(get_rng_state).parameters
    fsdp_dtensor = {"fsdp_dtensor": spec.get("ckpt_format") == "fsdp_dtensor"} if "fsdp_dtensor" in parameters else {}
    random_init = {"data_parallel_random_init": data_parallel_random_init} if len(parameters) > 1 else {}
    return get_rng_state(**fsdp_dtensor, **random_init)
