"""A multi-process (gloo, CPU) training job around a loop's REAL ``save_checkpoint`` / ``load_checkpoint``.

Run as ``python tests/jobs/rng_job.py '<json spec>'`` with the python of a release environment. Every rank
seeds its RNG sources with the loop's own seeding (the tracker through megatron-core's real
``model_parallel_cuda_manual_seed``, so expert-parallel states differ by EP rank), moves them on, then saves or
loads a checkpoint, and reports fingerprints of every RNG source. Only CUDA calls are faked (see fake_cuda.py, and
megatron_lm_loop.py for Megatron-LM's loop).

Spec keys: world, tp, pp, ep, action ("save", "load", "signatures", "train": the tiny MoE model of trajectory.py, with
steps, iteration (saved after it) and resume; or one a job script built on this one registers in ``EXTRA_ACTIONS``),
checkpoint_dir, out; optional: loop ("megatron-bridge", the default, or "megatron-lm": Megatron-LM's
own loop, ``megatron.training``), cp (context parallel, default 1), patched (default true), package_first (default
true), key_prefix (Megatron-LM 0.19's RNG key prefix), real_cuda (on a GPU: nothing faked, one device for all ranks),
backend (default gloo), fully_parallel_load, data_parallel_random_init, graph_safe_tracker, seeding ("per-rank", the
default, or "megatron"; see ``seed_every_source``), load_rng, finetune, module_name (a MegatronMIMO module's RNG key,
Bridge 0.5 and later), ckpt_format (default torch_dist), strict_fsdp_dtensor_load (Bridge), iteration (the save's,
default 10), async_save (see ``_asynchronously``), then ("load": after the save, finalized, a resume in the same
process; "die": the ranks and every process they started exit before the save is finalized), tamper ("torch_rng_state",
"empty_tracker", "unknown_layout" or "truncated_metadata", at save), first_step (after the load, what the loop's set-up
runs before its first step, and that step: ``jobs/first_step.py``), data_init_callback (Bridge 0.5 and later: one that
draws, fired first), build_again (the iterators built once more after the first step), tensors (how many small
parameters the model has, default 8), audit_call (after the load, call ``bridge_rng_patch.audit_restored_rng()`` as a
loop the package does not patch would; with ``patched`` false the package is switched off first), audit_fails_on (a rank
whose part of the resume audit raises), environment (variables set before anything is imported), rank_environment
(the package's switches set in each rank, and the package applied again under them: jobs with and without a patch
fork from one parent), collective_timeout (seconds a collective waits for a rank that never joins it, default 90:
shorter for a job measured to hang).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import inspect
import io
import json
import logging
import multiprocessing
import os
import pickle
import queue
import random
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import first_step
import megatron_lm_loop
import stack_loops
import trajectory

SAVE_SEED = 1000
TRACKER_FILE = "latest_checkpointed_iteration.txt"
FRESH_SEED = 5000
STEP = 10


# Actions a job script built on this one registers (benchmarks/timing_job.py): name -> a function of
# (rank, state, model, device generator, spec) that returns what to add to the rank's report.
EXTRA_ACTIONS: dict[str, Callable[[int, Any, list, Any, dict], dict]] = {}


BRIDGE, MEGATRON_LM = "megatron-bridge", "megatron-lm"
CHECKPOINTING_MODULES = {
    BRIDGE: "megatron.bridge.training.checkpointing",
    MEGATRON_LM: megatron_lm_loop.MODULE,
    **stack_loops.MODULES,
}
RESTORE_FUNCTIONS = {
    BRIDGE: "_load_checkpoint_from_path",
    MEGATRON_LM: "load_checkpoint",
    stack_loops.VERL: "MegatronCheckpointManager.load_rng_states",
    stack_loops.MS_SWIFT: "load_mcore_checkpoint",
}
_job_loop = BRIDGE
_load_error: str | None = None


def main(spec: dict) -> None:
    """Import in the parent (as the spec orders), fork one process per rank, write the ranks' reports."""
    import_as_ordered(spec)
    run_ranks(spec)


def import_as_ordered(spec: dict) -> None:
    """Import the loop's checkpointing module and, as the spec orders, the package before or after it."""
    global _job_loop
    _job_loop = spec.get("loop", BRIDGE)
    os.environ.update(spec.get("environment", {}))
    if spec.get("audit_call") and not spec.get("patched", True):  # a loop the package leaves alone calls the audit
        os.environ["BRIDGE_RNG_PATCH_DISABLE"] = "1"
    if spec.get("patched", True) and spec.get("package_first", True):
        import bridge_rng_patch
    if _job_loop in stack_loops.MODULES:
        stack_loops.import_checkpointing(_job_loop)
    else:
        importlib.import_module(CHECKPOINTING_MODULES[_job_loop])
    if spec.get("patched", True):
        import bridge_rng_patch  # noqa: F401
    if spec.get("first_step"):
        for module in first_step.modules(_job_loop):
            importlib.import_module(module)


def run_ranks(spec: dict) -> None:
    """Fork one process per rank from this one, which has imported what the job needs, and write their reports."""
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    context = multiprocessing.get_context("fork")
    reports = context.Queue()
    ranks = [context.Process(target=_rank_main, args=(rank, port, spec, reports)) for rank in range(spec["world"])]
    for process in ranks:
        process.start()
    results = _collect_reports(ranks, reports)
    for process in ranks:
        process.join(timeout=60)
        if process.is_alive():  # a rank that never reported: it must not outlive its job
            process.kill()
    Path(spec["out"]).write_text(json.dumps(results, indent=1))


def serve(setup: dict, answers: int) -> None:
    """Import as ``setup`` orders, then run each job whose spec comes on standard input (a JSON line each) in turn,
    answering on the descriptor ``answers`` a JSON line when its reports are written ({"error": None}, or the
    traceback): jobs of one set-up pay its seconds-long import once, and each still forks its ranks afresh from a
    parent that has run no job's code."""
    import_as_ordered(setup)
    with os.fdopen(answers, "w") as answer:
        for line in sys.stdin:
            try:
                run_ranks(json.loads(line))
                error = None
            except BaseException:
                error = traceback.format_exc()
            answer.write(json.dumps({"error": error}) + "\n")
            answer.flush()


def _collect_reports(ranks: list, reports: Any, seconds: float = 300) -> list[dict]:
    """Every rank's report, by rank. A rank that died without one (killed, or crashed in native code) gets a
    crash report naming its exit code, so that a failed job says which rank failed, not only that the others
    then timed out waiting for it in a collective."""
    results: dict[int, dict] = {}
    deadline = time.monotonic() + seconds
    while len(results) < len(ranks) and time.monotonic() < deadline:
        try:
            result = reports.get(timeout=1)
        except queue.Empty:
            for rank, process in enumerate(ranks):
                if rank not in results and process.exitcode is not None and reports.empty():
                    crash = f"rank {rank} exited with code {process.exitcode} before reporting"
                    results[rank] = {"rank": rank, "crash": crash}
            continue
        results[result["rank"]] = result
    for rank in range(len(ranks)):
        results.setdefault(rank, {"rank": rank, "crash": f"rank {rank} did not report within {seconds:.0f} s"})
    return [results[rank] for rank in range(len(ranks))]


def _rank_main(rank: int, port: int, spec: dict, reports: Any) -> None:
    if spec.get("then") == "die":  # a process group of its own, which it and every process it starts die with
        os.setpgrp()
    try:
        reports.put(run_rank(rank, port, spec))
    except BaseException:  # with the load's own failure, where the rank crashed after it (waiting for the others)
        reports.put({"rank": rank, "crash": traceback.format_exc(), "error": _load_error})
    if spec.get("then") == "die":  # as a job killed after its save was scheduled: it and every process it started
        reports.close()
        reports.join_thread()
        # One signal to the whole group: the save's worker may be forking its writers right then, and a writer
        # forked after a listing of the children was taken would outlive the job, holding its output open.
        os.killpg(os.getpgrp(), signal.SIGKILL)


def run_rank(rank: int, port: int | None, spec: dict) -> dict:
    import fake_cuda
    import torch
    from megatron.core import parallel_state as mpu

    if port is not None:  # else a launcher (torchrun) has set the rendezvous up
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(spec["world"]))
    # A rank that fails must not leave the others waiting in a collective for long.
    torch.distributed.init_process_group(
        spec.get("backend", "gloo"),
        rank=rank,
        world_size=spec["world"],
        timeout=datetime.timedelta(seconds=spec.get("collective_timeout", 90)),
    )
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=spec["tp"],
        pipeline_model_parallel_size=spec["pp"],
        expert_model_parallel_size=spec["ep"],
        context_parallel_size=spec.get("cp", 1),
    )
    training = spec["action"] == "train"
    if spec.get("real_cuda"):
        torch.cuda.set_device(0)
        device_generator = torch.cuda.default_generators[0]
    elif training:  # see trajectory.py: what the model draws on "the device" draws from torch's own generator
        device_generator = fake_cuda.install(seed=rank, device_generator=torch.default_generator)
        trajectory.on_the_cpu()
    else:
        device_generator = fake_cuda.install(seed=rank)
    logs = _capture_package_logs()
    if spec.get("rank_environment"):  # the package's switches set in the rank, and the package applied again under them
        import bridge_rng_patch

        os.environ.update(spec["rank_environment"])
        bridge_rng_patch.undo()
        bridge_rng_patch.apply()
    if training:
        report = {"rank": rank, "coords": _coordinates(), **_train(spec, device_generator), "logs": logs}
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return report
    if _job_loop == BRIDGE:
        state, model = _build_state_and_model(spec)
    elif _job_loop == MEGATRON_LM:
        state, model = _megatron_lm_model(spec)
    else:
        model = [small_weights(_model_config(spec), spec)]
        state = stack_loops.build(_job_loop, spec, model)
    report = {"rank": rank, "coords": _coordinates()}
    if spec["action"] == "signatures":
        report["by_signature"] = _requests_for_each_signature()
    elif spec["action"] in EXTRA_ACTIONS:
        report.update(EXTRA_ACTIONS[spec["action"]](rank, state, model, device_generator, spec))
    elif spec["action"] == "save":
        seed_every_source(SAVE_SEED, rank, device_generator, spec)
        report["sharded_object"] = _describe_rng_request(spec, state)
        report["saved"] = rng_fingerprint(device_generator)
        report["weights"] = _trained_weights(model)
        with _tampered(spec.get("tamper")):
            save_checkpoint(state, model, spec)
        report["finished_before_finalize"] = _finished_files(spec)
        if spec.get("then") == "die":
            report["logs"] = logs
            return report
        if spec.get("async_save"):
            finalize_async_save(state)
        if spec.get("then") == "load":
            _load_and_report(report, state, model, device_generator, spec)
        torch.distributed.barrier()
        if spec.get("tamper") == "truncated_metadata":
            if rank == 0:
                _truncate(iteration_dir(spec) / ".metadata")
        else:
            report["stored_keys"], report["stored_states"] = _stored_rng_keys(spec)
    else:
        _load_and_report(report, state, model, device_generator, spec)
    report["logs"] = logs
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return report


def _coordinates() -> dict:
    from megatron.core import parallel_state as mpu

    return {
        "pp": mpu.get_pipeline_model_parallel_rank(),
        "tp": mpu.get_tensor_model_parallel_rank(),
        "dp": mpu.get_data_parallel_rank(with_context_parallel=True),
        "ep": mpu.get_expert_model_parallel_rank(),
    }


def _train(spec: dict, device_generator: Any) -> dict:
    """The action "train" (trajectory.py): a run of the tiny MoE model that saves after ``save_after`` (its
    ``iteration``), or, with ``resume``, that run resumed from its checkpoint in new processes."""
    _loop_seed(trajectory.SEED, spec)
    if spec.get("graph_safe_tracker"):
        _switch_to_graph_safe_tracker(device_generator.device)
    state, model, optimizer = _trajectory_state(spec, device_generator.device)
    steps, save_after = spec["steps"], spec["iteration"]
    if not spec.get("resume"):
        save = lambda step: save_checkpoint(state, model, spec, optimizer)  # noqa: E731
        return trajectory.trained(model, optimizer, range(1, steps + 1), save, save_after)
    with trajectory.sabotaged(spec.get("sabotage")):
        load_checkpoint(state, model, spec, optimizer)
    if _job_loop in (BRIDGE, MEGATRON_LM):  # what its set-up runs after the load, then its real training step
        first_step.run_until_first_step(_job_loop, state, spec, device_generator)
        first_step.enter_first_step(_job_loop)
    return trajectory.trained(model, optimizer, range(save_after + 1, steps + 1))


def _trajectory_state(spec: dict, device: Any) -> tuple[Any, list, Any]:
    """What the loop saves and loads with, around the tiny MoE model and its optimizer."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if _job_loop == BRIDGE:
        state, _ = _build_state_and_model(spec, trajectory.model_config(spec))
        state.cfg.model.finalize()  # what Bridge's set-up does to its model configuration before building
        return (state, *trajectory.build(state.cfg.model, device=device))
    if _job_loop == MEGATRON_LM:
        megatron_lm_loop.configure({**spec, "extra_arguments": trajectory.MEGATRON_LM_ARGUMENTS})
    # verl 0.9.1 cannot load a megatron-core optimizer's state here (its load builds the optimizer's request from the
    # model's sharded state dict after megatron-core's load consumed it: "Param id 0 does not match any model sharded
    # param", with the package or without): its runs train with SGD without momentum, whose state is empty.
    stateless = _job_loop == stack_loops.VERL
    config = TransformerConfig(**trajectory.model_config(spec))
    model, optimizer = trajectory.build(config, "sgd" if stateless else "adam", device)
    saved_optimizer = None if stateless else optimizer
    state = None if _job_loop == MEGATRON_LM else stack_loops.build(_job_loop, spec, model, saved_optimizer)
    return state, model, optimizer


def _load_and_report(report: dict, state: Any, model: list, device_generator: Any, spec: dict) -> None:
    """Seed fresh, load the checkpoint as a resume does, and report the RNG state before and after."""
    seed_every_source(FRESH_SEED, report["rank"], device_generator, spec)
    report["fresh"] = rng_fingerprint(device_generator)
    layout_reads = count_layout_reads(spec)
    if spec.get("audit_fails_on") == report["rank"]:
        _audit_fails_here()
    global _load_error
    try:
        load_checkpoint(state, model, spec)
        report["error"] = None
    except BaseException as error:  # the loops' own restore failure path calls sys.exit()
        report["error"] = _load_error = f"{type(error).__name__}: {error}"
    audit = _audit_called_after_the_load(spec) if spec.get("audit_call") else None
    if audit is not None:
        report["audit"] = _described_audit(audit)
    report["loaded"] = rng_fingerprint(device_generator)
    if spec.get("first_step"):
        report.update(first_step.run_until_first_step(_job_loop, state, spec, device_generator))
        report["at_first_step"] = rng_fingerprint(device_generator)
        report["first_step"] = first_step.enter_first_step(_job_loop)
        if spec.get("build_again"):
            report.update(first_step.build_again(_job_loop, state))
        if spec.get("audit_call"):
            report["first_step_check"] = _first_step_checked(audit)
    report["weights"] = weights_digest(model)
    report["layout_reads_from"] = layout_reads
    report["layout_reads"] = len(layout_reads)


def _audit_called_after_the_load(spec: dict) -> Any:
    """What a loop the package does not patch gets from the two lines it adds after its load."""
    import bridge_rng_patch

    return bridge_rng_patch.audit_restored_rng(spec.get("data_parallel_random_init", False))


def _described_audit(audit: Any) -> dict:
    collapsed = {collapse.stream: [list(ranks) for ranks in collapse.ranks_by_seed] for collapse in audit.collapsed}
    return {"passed": audit.passed, "line": audit.line, "collapsed": collapsed}


def _first_step_checked(audit: Any) -> dict | None:
    """What a loop the package does not patch gets from the line it adds at its first step."""
    import bridge_rng_patch

    check = bridge_rng_patch.check_first_step(audit)
    if check is None:
        return None
    return {"passed": check.passed, "line": check.line, "moved": {",".join(k): v for k, v in check.moved.items()}}


def _audit_fails_here() -> None:
    """This rank's part of the resume audit raises, as a broken source would make it."""
    from bridge_rng_patch import resume_audit

    def broken() -> dict:
        raise RuntimeError("a source that cannot be read")

    resume_audit._live_fingerprint = broken


def finalize_async_save(state: Any) -> None:
    """Every rank finalizes the asynchronous save, blocking, as the loop does before a load and at the end of
    training: the metadata and the tracker file are written here."""
    if _job_loop == BRIDGE:
        loop_checkpointing().maybe_finalize_async_save(state, state.cfg.checkpoint, blocking=True)
    else:
        megatron_lm_loop.finalize_async_save()


def save_checkpoint(state: Any, model: list, spec: dict, optimizer: Any = None) -> None:
    """The loop's real save_checkpoint, called as its training loop calls it at STEP."""
    if _job_loop == BRIDGE:
        loop_checkpointing().save_checkpoint(state, model, optimizer, None, 0, **_module_name(spec))
    elif _job_loop == MEGATRON_LM:
        megatron_lm_loop.save(model, spec, optimizer)
    else:
        stack_loops.save(_job_loop, state, model, spec, optimizer)


def load_checkpoint(state: Any, model: list, spec: dict, optimizer: Any = None) -> None:
    """The loop's real load_checkpoint, called as its training loop calls it on a resume."""
    if _job_loop == BRIDGE:
        loop_checkpointing().load_checkpoint(state, model, optimizer, None, **_module_name(spec))
    elif _job_loop == MEGATRON_LM:
        megatron_lm_loop.load(model, spec, optimizer)
    else:
        stack_loops.load(_job_loop, state, model, spec, optimizer)


def _module_name(spec: dict) -> dict:
    """A MegatronMIMO module's name, which Bridge 0.5 and later key the RNG state by (``rng_state.{name}``)."""
    return {"module_name": spec["module_name"]} if "module_name" in spec else {}


def installed_get_rng_state(spec: dict | None = None, state: Any = None) -> Any:
    """The installed get_rng_state, bound by name to the arguments save_checkpoint gives it."""
    if _job_loop == MEGATRON_LM:
        return lambda data_parallel_random_init=False: megatron_lm_loop.get_rng_state(data_parallel_random_init, spec)
    if _job_loop in stack_loops.MODULES:
        return lambda data_parallel_random_init=False: stack_loops.get_rng_state(
            _job_loop, state, data_parallel_random_init, spec or {}
        )
    checkpointing = sys.modules[CHECKPOINTING_MODULES[BRIDGE]]
    parameters = inspect.signature(checkpointing.get_rng_state).parameters
    kwargs: dict[str, Any] = {}
    if "ckpt_format" in parameters:  # releases without it always write torch_dist
        kwargs["ckpt_format"] = spec.get("ckpt_format", "torch_dist") if spec else "torch_dist"
    if "pg_collection" in parameters:
        from megatron.core.process_groups_config import ProcessGroupCollection

        kwargs["pg_collection"] = ProcessGroupCollection.use_mpu_process_groups()
    return lambda data_parallel_random_init=False: checkpointing.get_rng_state(data_parallel_random_init, **kwargs)


def count_layout_reads(spec: dict) -> list[str]:
    """The checkpoints whose stored RNG layout this rank reads from now on, one entry per read."""
    reads: list[str] = []
    if not spec.get("patched", True):
        return reads
    from bridge_rng_patch import restorable

    read = restorable.read_stored_layouts

    def counted(checkpoint_dir: str) -> Any:
        reads.append(checkpoint_dir)
        return read(checkpoint_dir)

    restorable.read_stored_layouts = counted
    return reads


def loop_checkpointing() -> Any:
    """The checkpointing module of the job's loop."""
    return sys.modules[CHECKPOINTING_MODULES[_job_loop]]


def loop_restore_function() -> Any:
    """The function of the job's loop that restores the loaded RNG state."""
    found = loop_checkpointing()
    for part in RESTORE_FUNCTIONS[_job_loop].split("."):
        found = getattr(found, part)
    return found


def _capture_package_logs() -> list[str]:
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.levelname}: {record.getMessage()}")

    logger = logging.getLogger("bridge_rng_patch")
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect())
    return messages


def _build_state_and_model(spec: dict, model_config: dict | None = None) -> tuple[Any, list]:
    """A real GlobalState with a real ConfigContainer, and the small model (or the model ``model_config`` configures,
    which the caller builds, with its optimizer saved and loaded)."""
    import torch
    from megatron.bridge.models.gpt_provider import GPTModelProvider
    from megatron.bridge.training.config import (
        CheckpointConfig,
        ConfigContainer,
        FinetuningDatasetConfig,
        LoggerConfig,
        OptimizerConfig,
        RNGConfig,
        SchedulerConfig,
        TrainingConfig,
    )
    from megatron.bridge.training.state import GlobalState
    from megatron.bridge.training.tokenizers.config import TokenizerConfig
    from megatron.core import parallel_state as mpu
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

    with_optimizer = model_config is not None
    model_config = GPTModelProvider(
        **(model_config or {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 1, **model_parallelism(spec)})
    )
    data_parallel_size = mpu.get_data_parallel_world_size()
    config = ConfigContainer(
        train=TrainingConfig(micro_batch_size=1, global_batch_size=data_parallel_size, train_iters=STEP),
        model=model_config,
        optimizer=OptimizerConfig(),
        scheduler=SchedulerConfig(),
        # No DataLoader workers: the data iterators some jobs build need none.
        dataset=FinetuningDatasetConfig(
            seq_length=8, dataloader_type="single", num_workers=0, pin_memory=False, persistent_workers=False
        ),
        logger=LoggerConfig(),
        tokenizer=TokenizerConfig(),
        checkpoint=CheckpointConfig(
            save=spec["checkpoint_dir"],
            load=spec["checkpoint_dir"],
            ckpt_format=spec.get("ckpt_format", "torch_dist"),
            save_rng=True,
            load_rng=spec.get("load_rng", True),
            finetune=spec.get("finetune", False),
            save_optim=with_optimizer,
            load_optim=with_optimizer,
            async_save=spec.get("async_save", False),
            fully_parallel_load=spec.get("fully_parallel_load", False),
            **({"strict_fsdp_dtensor_load": True} if spec.get("strict_fsdp_dtensor_load") else {}),
        ),
        rng=RNGConfig(seed=1234, data_parallel_random_init=spec.get("data_parallel_random_init", False)),
    )
    state = GlobalState()
    state.cfg = config
    state.train_state.step = spec.get("iteration", STEP)
    if spec.get("async_save"):
        state._async_calls_queue = _asynchronously(spec)
    init_num_microbatches_calculator(
        torch.distributed.get_rank(), None, config.train.global_batch_size, 1, data_parallel_size
    )

    return state, [] if with_optimizer else [small_weights(model_config, spec)]


def _asynchronously(spec: dict) -> Any:
    """The queue an asynchronous save is scheduled on: megatron-core's real one, with the temporary worker unless
    the spec asks for the ``persistent_worker`` (on a GPU).

    Bridge requires ``use_persistent_ckpt_worker`` with ``async_save``, and its persistent worker is a process
    started with spawn: on the CPU it inherits none of the CUDA stand-ins and dies in ``torch.cuda.set_device``, and
    the trainer waits for it for ever. The temporary worker is forked from the rank for each save, as megatron-core
    does without the persistent one, and writes the same files; on a GPU, ``tools/gpu_check.py`` saves with the
    persistent worker. What the package touches (``get_rng_state`` in the trainer, before any worker runs, and the
    load) is the same either way.
    """
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue(persistent=spec.get("persistent_worker", False))


def model_parallelism(spec: dict) -> dict:
    """The model configuration's parallel sizes; older megatron-core refuses EP without experts, and MoE with
    linear biases."""
    return {
        "tensor_model_parallel_size": spec["tp"],
        "pipeline_model_parallel_size": spec["pp"],
        "expert_model_parallel_size": spec["ep"],
        "context_parallel_size": spec.get("cp", 1),
        "num_moe_experts": spec["ep"] if spec["ep"] > 1 else None,
        "add_bias_linear": spec["ep"] == 1,
    }


def _megatron_lm_model(spec: dict) -> tuple[None, list]:
    """Megatron-LM's loop keeps its state in global args, set as its command line sets them."""
    megatron_lm_loop.configure(spec)
    return None, [small_weights(_model_config(spec), spec)]


def _model_config(spec: dict) -> Any:
    """The small model's configuration, with the sizes Megatron-LM's loop checks on a resume."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=megatron_lm_loop.LAYERS,
        pipeline_dtype=torch.float32,
        hidden_size=megatron_lm_loop.HIDDEN_SIZE,
        num_attention_heads=megatron_lm_loop.ATTENTION_HEADS,
        **model_parallelism(spec),
    )


def small_weights(model_config: Any, spec: dict) -> Any:
    """A real MegatronModule of ``tensors`` small parameters (8 by default): enough that megatron-core's fully
    parallel save gives every DP rank some to write."""
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.module import MegatronModule

    class SmallWeights(MegatronModule):
        def __init__(self, config: Any, tensors: int) -> None:
            super().__init__(config=config)
            self.weights = torch.nn.ParameterList(
                torch.nn.Parameter(torch.arange(4, dtype=torch.float32) + index) for index in range(tensors)
            )

        def sharded_state_dict(self, prefix: str = "", *args: Any, **kwargs: Any) -> dict:
            # Each pipeline stage holds its own layers, so its weight has a checkpoint key of its own; the dict is
            # keyed by the module's own names, as load_state_dict reads it (megatron-core before 0.13 keys it by
            # the checkpoint key).
            stage_prefix = f"{prefix}stage{mpu.get_pipeline_model_parallel_rank()}."
            sharded = super().sharded_state_dict(stage_prefix, *args, **kwargs)
            return {name.removeprefix(stage_prefix): value for name, value in sharded.items()}

    return SmallWeights(model_config, spec.get("tensors", 8))


def seed_every_source(seed: int, rank: int, device_generator: Any, spec: dict) -> None:
    """Seed as the loop's real training start does, then move the streams on before a save.

    Bridge's and Megatron-LM's own ``_set_random_seed`` seed python, numpy and torch per PP stage (and per DP
    rank with data_parallel_random_init) and the tracker through megatron-core per TP and EP rank, so the DP
    ranks of one (pp, tp) differ in the expert-parallel tracker only. ``seeding`` "per-rank" (the tests'
    default) then draws a rank-specific number of values from every source under EP > 1, so that a rank given
    another rank's state shows in every source; "megatron" runs the training steps a user's run takes
    (``_training_steps``), which leave the DP ranks as alike as the seeding made them.
    """
    import numpy as np
    import torch

    _loop_seed(seed, spec)
    if spec.get("graph_safe_tracker"):
        _switch_to_graph_safe_tracker(device_generator.device)
    if spec.get("seeding", "per-rank") == "megatron":
        _training_steps(device_generator, STEP)
    elif spec["ep"] > 1:
        draws = 1 + rank
        random.getrandbits(32 * draws)
        np.random.random(draws)
        torch.rand(draws)
        torch.rand(draws, generator=device_generator, device=device_generator.device)


def _loop_seed(seed: int, spec: dict) -> None:
    """The loop's own seeding at training start."""
    if _job_loop == BRIDGE:
        _set_bridge_random_seed(seed, spec)
    elif _job_loop == MEGATRON_LM:
        megatron_lm_loop.set_random_seed(seed, spec)
    else:
        stack_loops.set_random_seed(_job_loop, seed, spec)


# A training step's draws in a small MoE model: tokens routed, and experts.
TOKENS, EXPERTS = 16, 4


def _training_steps(device_generator: Any, steps: int) -> None:
    """What ``steps`` steps of an MoE model draw on each rank, the same on every rank, each inside the real
    tracker's ``fork`` where the model forks it: attention dropout from the model-parallel tracker; random router
    logits (``moe_router_force_load_balancing``: megatron-core 0.16 and later draw them from the expert-parallel
    tracker) and an expert dropout of the user's own from the expert-parallel tracker; router input jitter from
    the default CUDA generator. A draw on the device is a draw from the stand-in device generator.
    """
    import torch
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    for _ in range(steps):
        with tracker.fork("model-parallel-rng"):
            torch.rand(TOKENS, generator=device_generator)
        with tracker.fork("expert-parallel-rng"):
            torch.randn(TOKENS * EXPERTS, generator=device_generator)
            torch.rand(TOKENS, generator=device_generator)
        torch.rand(TOKENS, generator=device_generator)


def _set_bridge_random_seed(seed: int, spec: dict) -> None:
    from megatron.bridge.training.initialize import _set_random_seed

    kwargs = {}
    if "pg_collection" in inspect.signature(_set_random_seed).parameters:
        from megatron.core.process_groups_config import ProcessGroupCollection

        kwargs["pg_collection"] = ProcessGroupCollection.use_mpu_process_groups()
    _set_random_seed(seed, spec.get("data_parallel_random_init", False), **kwargs)


def _switch_to_graph_safe_tracker(device: Any) -> None:
    """A graph-safe tracker (``use_cudagraphable_rng``), holding the same states as graph-safe Generators.

    On a GPU it is a real one: built graph-safe, each state in a device Generator of its own, as its ``add``
    makes them. On the CPU its constructor refuses graph-safe mode (no CUDA graph support) and its ``add``
    needs a CUDA device, so the flag is set after construction, and the states the real seeding produced are
    put in as CPU Generators holding them: the form a graph-safe tracker keeps. megatron-core before 0.13 cannot
    build a tracker again (no ``force_reset``): there the one the seeding built is switched.
    """
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    seeded = tensor_parallel.get_cuda_rng_tracker().get_states()
    on_gpu = device.type == "cuda"
    rebuilds = "force_reset" in inspect.signature(initialize_rng_tracker).parameters
    initialize_rng_tracker(use_cudagraphable_rng=on_gpu, **({"force_reset": True} if rebuilds else {}))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.use_cudagraphable_rng = True
    tracker.set_states({name: _generator_holding(state, device) for name, state in seeded.items()})
    assert tracker.use_cudagraphable_rng


def _generator_holding(state: Any, device: Any) -> Any:
    import torch

    generator = torch.Generator(device=device)
    generator.set_state(state)
    return generator


def _trained_weights(model: list) -> str:
    """Move the weights on from their initial values, as training does, so that a load that misses them shows; the
    digest of what is saved."""
    import torch

    with torch.no_grad():
        for weight in model[0].parameters():
            weight.add_(STEP)
    return weights_digest(model)


def weights_digest(model: list) -> str:
    """The digest of this rank's model weights, to tell whether a load restored them."""
    return _digest(b"".join(weight.detach().numpy().tobytes() for weight in model[0].parameters()))


def _describe_rng_request(spec: dict, state: Any) -> dict:
    """The ShardedObject the installed (and maybe patched) get_rng_state builds for this rank."""
    return _describe(installed_get_rng_state(spec, state)(spec.get("data_parallel_random_init", False)))


def _requests_for_each_signature() -> dict:
    """The patched get_rng_state under every signature old releases have.

    No release has the later-main signature (``pg_collection`` as third argument), so functions with that
    signature delegate to this release's own get_rng_state and get the package's wrapper, as the patcher
    would give them. A ``pg_collection`` without an EP group must win over the mpu globals (EP 2 here).
    """
    import wrapt
    from megatron.core.process_groups_config import ProcessGroupCollection

    from bridge_rng_patch import loops, probe
    from bridge_rng_patch.resume import ResumeWatch
    from bridge_rng_patch.save_sharding import ep_aware_rng_state

    checkpointing = loop_checkpointing()
    watch = ResumeWatch(probe.InstalledStack(loops.BRIDGE, checkpointing))
    release_own = checkpointing.get_rng_state.__wrapped__

    def positional(data_parallel_random_init, ckpt_format="torch_dist", pg_collection=None):
        return release_own(data_parallel_random_init, ckpt_format)

    def keyword_only(data_parallel_random_init, ckpt_format="torch_dist", *, pg_collection):
        return release_own(data_parallel_random_init, ckpt_format)

    def patched(function: Any) -> Any:
        signature = probe.rng_state_signature(function, loops.BRIDGE)
        return wrapt.FunctionWrapper(function, ep_aware_rng_state(signature, watch))

    groups = ProcessGroupCollection.use_mpu_process_groups()
    without_ep = ProcessGroupCollection.use_mpu_process_groups()
    without_ep.ep = None
    return {
        "mpu globals": _describe(checkpointing.get_rng_state(False, "torch_dist")),
        "pg_collection positional": _describe(patched(positional)(False, "torch_dist", groups)),
        "pg_collection keyword": _describe(patched(keyword_only)(False, "torch_dist", pg_collection=groups)),
        "pg_collection without ep": _describe(patched(keyword_only)(False, "torch_dist", pg_collection=without_ep)),
    }


def _describe(sharded: Any) -> dict:
    if isinstance(sharded, dict):  # fsdp_dtensor's RNG state: lists of states by key
        return {"keys": sorted(sharded), "states": sum(len(states) for states in sharded.values())}
    return {
        "key": sharded.key,
        "global_shape": list(sharded.global_shape),
        "global_offset": list(sharded.global_offset),
        "replica_id": sharded.replica_id,
        "states": len(sharded.data),
    }


@contextlib.contextmanager
def _tampered(tamper: str | None):
    """Write a damaged RNG state, or another layout, on purpose, to see how a load treats it."""
    import torch
    from megatron.core import tensor_parallel

    checkpointing = loop_checkpointing()
    if tamper is None:
        yield
    elif tamper == "torch_rng_state":
        real = torch.get_rng_state
        torch.get_rng_state = lambda: torch.zeros(3)
        yield
        torch.get_rng_state = real
    elif tamper == "empty_tracker":
        tensor_parallel.get_cuda_rng_tracker().set_states({})
        yield
    elif tamper == "truncated_metadata":  # done after the save, see run_rank
        yield
    elif tamper == "unknown_layout":
        real = checkpointing.get_rng_state

        def one_dimensional(*args: Any, **kwargs: Any) -> Any:
            from megatron.core.dist_checkpointing.mapping import ShardedObject

            sharded = real(*args, **kwargs)
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            return ShardedObject("rng_state", sharded.data, (world,), (rank,), replica_id=0)

        checkpointing.get_rng_state = one_dimensional
        yield
        checkpointing.get_rng_state = real
    elif tamper == "per_dp_rank_layout":  # what Bridge 0.3.0 and later write, and earlier saves with the package did
        real = checkpointing.get_rng_state

        def per_dp_rank(*args: Any, **kwargs: Any) -> Any:
            sharded = real(*args, **kwargs)
            dp_size = torch.distributed.get_world_size() // (sharded.global_shape[0] * sharded.global_shape[1])
            sharded.global_shape = (*sharded.global_shape, dp_size)
            sharded.global_offset = (*sharded.global_offset, sharded.replica_id)
            sharded.replica_id = 0
            return sharded

        checkpointing.get_rng_state = per_dp_rank
        yield
        checkpointing.get_rng_state = real
    else:
        raise ValueError(f"unknown tamper {tamper!r}")


def iteration_dir(spec: dict) -> Path:
    """The dist-checkpoint of the save's RNG state: the loops' ``iter_{n}``, verl's own in its ``global_step_{n}``."""
    if _job_loop == stack_loops.VERL:
        return stack_loops.verl_rng_dir(spec)
    return Path(spec["checkpoint_dir"]) / f"iter_{spec.get('iteration', STEP):07d}"


def _finished_files(spec: dict) -> list[str]:
    """Which of the files that mark this save finished exist: the metadata torch's reader needs, and the tracker
    file naming its iteration, which a resume picks the iteration from."""
    metadata, tracker = iteration_dir(spec) / ".metadata", Path(spec["checkpoint_dir"]) / TRACKER_FILE
    finished = [metadata.name] if metadata.exists() else []
    if tracker.exists() and tracker.read_text().strip() == str(spec.get("iteration", STEP)):
        finished.append(tracker.name)
    return finished


def _truncate(path: Path) -> None:
    """A metadata file cut short, as a save interrupted while writing it leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _stored_rng_keys(spec: dict) -> tuple[list[str], list[int | None]]:
    """The RNG keys torch's own reader finds in the checkpoint, on the file system or through ``msc://``, and how many
    states each torch_dist shard's list holds (read with torch, on a file system; None elsewhere)."""
    checkpoint_dir = spec["checkpoint_dir"]
    if _job_loop == stack_loops.VERL:
        iteration_dir = str(stack_loops.verl_rng_dir(spec))
    else:  # a URL is joined as text: pathlib would fold msc:// into msc:/
        iteration_dir = f"{checkpoint_dir}/iter_{spec.get('iteration', STEP):07d}"
    if checkpoint_dir.startswith("msc://"):
        import multistorageclient

        reader = multistorageclient.torch.MultiStorageFileSystemReader(iteration_dir)
    else:
        from torch.distributed.checkpoint import FileSystemReader

        reader = FileSystemReader(iteration_dir)
    metadata = reader.read_metadata()
    keys = sorted(key for key in metadata.state_dict_metadata if "rng_state" in key)
    return keys, [_states_in_shard(iteration_dir, metadata, key) for key in keys]


def _states_in_shard(iteration_dir: str, metadata: Any, key: str) -> int | None:
    """The length of the list a torch_dist RNG shard holds, as torch stored its bytes; None for any other key."""
    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex

    storage = metadata.storage_data.get(MetadataIndex(key)) if "/shard_" in key else None
    if storage is None or iteration_dir.startswith("msc://"):
        return None
    with open(os.path.join(iteration_dir, storage.relative_path), "rb") as stream:
        stream.seek(storage.offset)
        (states,) = torch.load(io.BytesIO(stream.read(storage.length)), weights_only=False)  # megatron-core's [data]
    return len(states)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _as_tensor(state: Any) -> Any:
    import torch

    return state.get_state() if isinstance(state, torch.Generator) else state


def rng_fingerprint(device_generator: Any) -> dict:
    """Digests of every RNG source Bridge checkpoints, and the next draw of two of the streams."""
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    tracker_states = tensor_parallel.get_cuda_rng_tracker().get_states()
    python_copy = random.Random()
    python_copy.setstate(random.getstate())
    expert_state = tracker_states.get("expert-parallel-rng")
    if expert_state is None:
        expert_draw = None
    else:
        generator = _generator_holding(_as_tensor(expert_state), device_generator.device)
        expert_draw = torch.rand(1, generator=generator, device=generator.device)
    return {
        "random": _digest(pickle.dumps(random.getstate())),
        "numpy": _digest(pickle.dumps(np.random.get_state())),
        "torch": _digest(torch.get_rng_state().numpy().tobytes()),
        "cuda": _digest(device_generator.get_state().numpy().tobytes()),
        "tracker": {
            name: [type(state).__name__, _digest(_as_tensor(state).numpy().tobytes())]
            for name, state in sorted(tracker_states.items())
        },
        "next_random": python_copy.random(),
        "next_expert": None if expert_draw is None else round(float(expert_draw), 6),
    }


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve(json.loads(sys.argv[2]), int(sys.argv[3]))
    else:
        main(json.loads(sys.argv[1]))
