"""What the rank job (rng_job.py) does differently for Megatron-LM's own loop (``megatron.training``).

The loop reads its configuration from global args: they are built as ``pretrain_gpt.py`` builds them, by the
real ``parse_args`` / ``validate_args`` / ``set_global_variables`` from a command line (below), without a
tokenizer. The model is the job's small MegatronModule; there is no optimizer, as with ``--no-save-optim``.
Faked, beside fake_cuda.py's CUDA RNG calls: the one CUDA tensor the loop's ``read_metadata`` all-reduces to
agree on the iteration is made on the CPU, which gloo reduces; the device's properties, which
``validate_args`` reads with TP or CP > 1, are a Hopper GPU's; and on a core_v0.12 tree, whose load asks for
Transformer Engine's version installed or not, megatron-core's cached answer is a version older than any.
"""

from __future__ import annotations

import os
import sys
from typing import Any

MODULE = "megatron.training.checkpointing"
STEP = 10
# The loop refuses a resume whose model sizes differ from the checkpoint's args: the same for every layout, with two
# heads and two layers, which every TP and PP the tests use divides.
HIDDEN_SIZE, ATTENTION_HEADS, LAYERS = 8, 2, 2


def configure(spec: dict) -> Any:
    """Global args as Megatron-LM's loop sets them, from the command line a user would give it."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables

    command_line = [
        "pretrain_gpt.py",
        *("--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN_SIZE)),
        *("--num-attention-heads", str(ATTENTION_HEADS)),
        *("--seq-length", "8", "--max-position-embeddings", "8", "--micro-batch-size", "1"),
        *("--tokenizer-type", "NullTokenizer", "--vocab-size", "16", "--transformer-impl", "local"),
        *("--tensor-model-parallel-size", str(spec["tp"]), "--pipeline-model-parallel-size", str(spec["pp"])),
        *("--expert-model-parallel-size", str(spec["ep"]), "--context-parallel-size", str(spec.get("cp", 1))),
        *(("--num-experts", str(spec["ep"]), "--disable-bias-linear") if spec["ep"] > 1 else ()),
        *("--save", spec["checkpoint_dir"], "--load", spec["checkpoint_dir"]),
        *("--ckpt-format", spec.get("ckpt_format", "torch_dist")),
        *("--train-iters", str(STEP), "--save-interval", str(STEP), "--seed", "1234"),
        *("--eval-interval", str(STEP), "--eval-iters", "1"),
        *(() if spec.get("extra_arguments") else ("--no-save-optim", "--no-load-optim")),
        "--no-gradient-accumulation-fusion",
        *(("--use-megatron-fsdp",) if spec.get("ckpt_format") == "fsdp_dtensor" else ()),
        *(("--data-parallel-random-init",) if spec.get("data_parallel_random_init") else ()),
        *(("--no-load-rng",) if spec.get("load_rng") is False else ()),
        *(("--finetune",) if spec.get("finetune") else ()),
        *spec.get("extra_arguments", ()),  # a model of the job's own, its optimizer saved and loaded (trajectory.py)
    ]
    _a_hopper_device()
    if spec.get("ckpt_format") != "fsdp_dtensor":  # as Megatron-LM's launch scripts export it, except for FSDP
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    saved_argv, sys.argv = sys.argv, command_line
    try:
        args = parse_args()
    finally:
        sys.argv = saved_argv
    validate_args(args)
    if spec.get("async_save"):
        # validate_args keeps --async-save only with the persistent worker, which is spawned and so dies on the CPU
        # (it inherits no CUDA stand-ins): the save runs in the temporary forked worker instead (see rng_job.py).
        args.async_save, args.use_persistent_ckpt_worker, args.async_strategy = True, False, "mcore"
    set_global_variables(args, build_tokenizer=False)
    _iteration_agreed_on_the_cpu()
    _no_transformer_engine_version()
    return args


def _a_hopper_device() -> None:
    import types

    import torch

    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(major=9, minor=0, name="stand-in")


def _iteration_agreed_on_the_cpu() -> None:
    """``read_metadata`` all-reduces the iteration in a CUDA tensor (NCCL on a GPU); here it is a CPU one."""
    import torch

    cpu_for_cuda_tensors(MODULE)
    torch.cuda.empty_cache = lambda: None


def cpu_for_cuda_tensors(module: str) -> None:
    """The ``torch`` that ``module`` sees makes CPU tensors where it asks for CUDA ones (the flags and counts the
    loops agree on across ranks, NCCL's on a GPU, gloo's here); nothing else of torch changes."""
    import torch
    import wrapt

    class CpuForCudaTensors(wrapt.ObjectProxy):
        def tensor(self, *args: Any, device: Any = None, **kwargs: Any) -> Any:
            return self.__wrapped__.tensor(*args, device="cpu" if device == "cuda" else device, **kwargs)

    sys.modules[module].torch = CpuForCudaTensors(torch)


def _no_transformer_engine_version() -> None:
    """core_v0.12's ``load_checkpoint`` asks for Transformer Engine's version whether it is installed or not
    (``fix_fp8_params_lose_precision_when_loading_dist_ckpt``), and Transformer Engine needs CUDA: where it is
    absent, megatron-core's cached answer is a version older than every release, so the fix finds no FP8 tensor."""
    import importlib.util
    import inspect

    from megatron.core import utils
    from packaging.version import Version

    fix = getattr(sys.modules[MODULE], "fix_fp8_params_lose_precision_when_loading_dist_ckpt", None)
    asks_version = fix is not None and "is_te_min_version" in inspect.getsource(fix)
    if asks_version and importlib.util.find_spec("transformer_engine") is None:
        utils._te_version = Version("0.0.0")


def set_random_seed(seed: int, spec: dict) -> None:
    """The loop's own seeding at training start (``initialize_megatron``)."""
    from megatron.training.initialize import _set_random_seed

    _set_random_seed(seed, spec.get("data_parallel_random_init", False))


def _key_prefix(spec: dict) -> dict:
    """Megatron-LM 0.19's prefix of the RNG key (``{key_prefix}rng_state``), for disjoint grids."""
    return {"rng_state_key_prefix": spec["key_prefix"]} if "key_prefix" in spec else {}


def save(model: list, spec: dict, optimizer: Any = None) -> None:
    sys.modules[MODULE].save_checkpoint(spec.get("iteration", STEP), model, optimizer, None, 0, **_key_prefix(spec))


def finalize_async_save() -> None:
    """What the loop does before a load in the same process, and at the end of training: every rank finalizes."""
    from megatron.training.async_utils import maybe_finalize_async_save

    maybe_finalize_async_save(blocking=True)


def load(model: list, spec: dict, optimizer: Any = None) -> None:
    sys.modules[MODULE].load_checkpoint(model, optimizer, None, **_key_prefix(spec))


def get_rng_state(data_parallel_random_init: bool, spec: dict | None) -> Any:
    """The installed get_rng_state, called as the loop's save_checkpoint calls it (its args are global), with what
    its release takes: ``use_dist_ckpt`` up to core_v0.11, the format from 0.12, the groups from 0.16."""
    import inspect

    from megatron.core import parallel_state as mpu

    args = sys.modules["megatron.training.global_vars"].get_args()
    args.data_parallel_random_init = data_parallel_random_init
    get_rng_state = sys.modules[MODULE].get_rng_state
    parameters = inspect.signature(get_rng_state).parameters
    if "use_dist_ckpt" in parameters:
        return get_rng_state(True)
    groups = (mpu.get_tensor_model_parallel_group(), mpu.get_pipeline_model_parallel_group())
    groups = groups if "tp_group" in parameters else ()
    key_prefix = {"key_prefix": spec["key_prefix"]} if spec and "key_prefix" in spec else {}
    return get_rng_state(args.ckpt_format, *groups, **key_prefix)
