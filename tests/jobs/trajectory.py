"""A tiny real megatron-core mixture-of-experts model trained through a stack's real save and load, on the CPU: the
rank job's (rng_job.py) action "train".

The model is megatron-core's own ``GPTModel`` with its local layer spec: 2 layers, hidden 64, 4 experts routed top-2
with the ``allgather`` dispatcher, vocabulary 128, sequence 16, hidden and attention dropout 0.1, and the router's
forced load balancing (``moe_router_force_load_balancing``: random router logits, drawn from the expert-parallel
tracker from megatron-core 0.16). It is wrapped in megatron-core's ``DistributedDataParallel`` and trained with Adam
from ``get_megatron_optimizer``, each DP rank on batches of its own that no RNG source draws.

A run seeds as its loop seeds and builds the model; unless it resumes, it trains ``steps`` steps and saves through the
stack's real save (model, optimizer and RNG state) after step ``save_after``; a resume builds the same model in new
processes, loads through the stack's real load, runs what the loop's set-up runs after the load (the data iterators'
builders, as ``first_step.py`` does), enters the release's real training step, then trains the steps left. Each rank
reports every step's loss as a float's hex and a digest of its final weights.

Faked, beside fake_cuda.py's CUDA calls: the device generator is torch's own CPU generator, so that what megatron-core
draws "on the device" (dropout, the router's logits, inside the tracker's ``fork``) draws from the states a
checkpoint restores, as on a GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Iterator
from typing import Any

VOCAB, SEQUENCE, MICRO_BATCH, HIDDEN, LAYERS, HEADS, EXPERTS = 128, 16, 2, 64, 2, 4, 4
SEED = 1234
# The model as Megatron-LM's command line sets it, for its loop's args (which its load checks against the checkpoint).
MEGATRON_LM_ARGUMENTS = (
    *("--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN), "--ffn-hidden-size", str(HIDDEN)),
    *("--num-attention-heads", str(HEADS), "--seq-length", str(SEQUENCE)),
    *("--max-position-embeddings", str(SEQUENCE), "--vocab-size", str(VOCAB), "--micro-batch-size", str(MICRO_BATCH)),
    *("--num-experts", str(EXPERTS), "--moe-router-topk", "2", "--moe-token-dispatcher-type", "allgather"),
    *("--moe-router-force-load-balancing", "--moe-router-load-balancing-type", "none"),
    *("--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--lr", "0.001", "--optimizer", "adam"),
)


def on_the_cpu() -> None:
    """What megatron-core's DDP and optimizer need of a GPU, on the CPU: streams that order nothing, CPU tensors where
    they make the CUDA ones they keep flags and norms in, and no warning that the CPU generator moved inside the
    tracker's ``fork`` (here the CPU generator is the device's)."""
    import logging

    import fake_cuda
    import stack_loops
    import torch

    fake_cuda.install_streams()
    for name in ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads", "megatron.core.utils"):
        importlib.import_module(name).torch = stack_loops.CpuForCuda(torch)
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    # megatron-core 0.16 leaves Transformer Engine's GEMM undefined where TE is absent (0.19 sets it None): the router
    # then takes its own matmul, as it does from 0.19.
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)


@contextlib.contextmanager
def sabotaged(what: str | None) -> Iterator[None]:
    """A resume broken on purpose: ``"expert_tracker_restore"``, the load restores every RNG source but the
    expert-parallel tracker's stream."""
    if what is None:
        yield
        return
    from megatron.core import tensor_parallel

    assert what == "expert_tracker_restore", what
    tracker = tensor_parallel.get_cuda_rng_tracker()
    set_states = tracker.set_states
    kept = tracker.get_states()["expert-parallel-rng"]
    tracker.set_states = lambda states: set_states({**states, "expert-parallel-rng": kept})
    try:
        yield
    finally:
        del tracker.set_states


def model_config(spec: dict) -> dict:
    """The model's configuration, as keyword arguments of megatron-core's ``TransformerConfig`` (or a provider
    subclass of it: Megatron-Bridge's)."""
    import torch

    return {
        "num_layers": LAYERS,
        "hidden_size": HIDDEN,
        "ffn_hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_moe_experts": EXPERTS,
        "moe_router_topk": 2,
        "moe_grouped_gemm": False,
        "moe_token_dispatcher_type": "allgather",
        "moe_router_force_load_balancing": True,
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "hidden_dropout": 0.1,
        "attention_dropout": 0.1,
        "add_bias_linear": False,
        # No fused kernels (torch.compile's and CUDA's), which a CPU cannot build; what they compute is the same.
        "bias_dropout_fusion": False,
        "masked_softmax_fusion": False,
        "bias_activation_fusion": False,
        "gradient_accumulation_fusion": False,
        "cross_entropy_loss_fusion": False,
        "use_cpu_initialization": True,
        "params_dtype": torch.float32,
        "pipeline_dtype": torch.float32,
        "tensor_model_parallel_size": spec["tp"],
        "pipeline_model_parallel_size": spec["pp"],
        "expert_model_parallel_size": spec["ep"],
    }


def build(config: Any, optimizer: str = "adam", device: Any = "cpu") -> tuple[list, Any]:
    """The model, wrapped in megatron-core's DDP, and its optimizer (Adam, or SGD without momentum, whose state is
    empty), as the loops build them."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    layer_spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    gpt = GPTModel(config, layer_spec, vocab_size=VOCAB, max_sequence_length=SEQUENCE).to(device)
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=False, use_distributed_optimizer=False)
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=gpt)]
    optimizer_config = OptimizerConfig(
        optimizer=optimizer, lr=1e-3, sgd_momentum=0.0, clip_grad=0.0, params_dtype=torch.float32
    )
    return model, get_megatron_optimizer(optimizer_config, model)


def batch(step: int, device: Any) -> tuple[Any, Any, Any, Any]:
    """This DP rank's batch of ``step``: tokens, position ids, the causal mask and the labels, drawn from a generator
    of its own, so that the data is the same whatever state the RNG sources are in."""
    import torch
    from megatron.core import parallel_state as mpu

    generator = torch.Generator().manual_seed(10_000 * step + mpu.get_data_parallel_rank())
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQUENCE + 1), generator=generator)
    positions = torch.arange(SEQUENCE).unsqueeze(0).expand(MICRO_BATCH, SEQUENCE)
    mask = torch.triu(torch.ones(1, 1, SEQUENCE, SEQUENCE, dtype=torch.bool), diagonal=1)
    return tuple(tensor.to(device) for tensor in (tokens[:, :-1], positions, mask, tokens[:, 1:]))


def train_step(model: list, optimizer: Any, step: int) -> float:
    """One step: forward, backward, the gradients reduced across DP, Adam; the loss this rank saw."""
    (ddp,) = model
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    tokens, positions, mask, labels = batch(step, next(ddp.parameters()).device)
    loss = ddp(tokens, positions, mask, labels=labels).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    optimizer.step()
    return float(loss.detach())


def weights_digest(model: list) -> str:
    data = b"".join(parameter.detach().cpu().numpy().tobytes() for parameter in model[0].parameters())
    return hashlib.sha256(data).hexdigest()[:16]


def trained(model: list, optimizer: Any, steps: range, save: Any = None, save_after: int | None = None) -> dict:
    """Train ``steps``, saving after ``save_after``: every step's loss as a float's hex, by step, and a digest of the
    final weights."""
    losses = {}
    for step in steps:
        losses[str(step)] = train_step(model, optimizer, step).hex()
        if step == save_after:
            save(step)
    return {"losses": losses, "weights": weights_digest(model)}


def losses_apart(reference: dict, resumed: dict) -> int | None:
    """The first step at which a rank's losses part from the reference's; None where every step is bit-identical."""
    return next((int(step) for step in sorted(resumed, key=int) if resumed[step] != reference.get(step)), None)
