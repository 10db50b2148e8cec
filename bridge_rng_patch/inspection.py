"""What a checkpoint already on disk holds of its ranks' RNG state, and what a patched resume would do with it, read
from metadata alone with no torch, GPU or Megatron: the stored layout, how many states an entry lists, and the run's
parallel sizes from what each stack keeps beside a save (``loops.OnDisk``), on a file system or through ``msc://``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge_rng_patch.bounded_reader import CheckpointInputError, archive_item, bounded_read, pickle_in_archive
from bridge_rng_patch.loops import LOOPS, SAVE_SHARDING, TrainingLoop
from bridge_rng_patch.rng_layout import (
    METADATA_FILE,
    RNG_STATE_KEY,
    ResumingRank,
    RngCheckpointError,
    StoredRngLayout,
    read_stored_layouts,
)
from bridge_rng_patch.storage import StorageUnavailable, checkpoint_path

COMPLETE, INCOMPLETE, NO_RNG_STATE, UNREADABLE = "complete", "incomplete", "no RNG state", "unreadable"
EXIT_CODES = {COMPLETE: 0, INCOMPLETE: 1, NO_RNG_STATE: 1, UNREADABLE: 2}
PARALLEL_SIZES = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "ep": "expert_model_parallel_size",
    "cp": "context_parallel_size",
}
# One save of any stack (``iter_{n:07d}``, ``global_step_{n}``), and how the stacks are named in a message.
_ITERATION_FORMATS = tuple(dict.fromkeys(loop.on_disk.iteration_dir for loop in LOOPS))
_ITERATION_DIR = re.compile("|".join(f"{re.escape(form.partition('{')[0])}(\\d+)" for form in _ITERATION_FORMATS))
_STACKS = f"{', '.join(loop.name for loop in LOOPS[:-1])} or {LOOPS[-1].name}"
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")
_CONFIGURED = tuple(loop for loop in LOOPS if loop.on_disk.run_config)
# The stacks that keep their args in the common state; the one whose args carry no mark of another.
_FROM_ARGS = tuple(loop for loop in LOOPS if not loop.on_disk.run_config)
_ARGS_BY_DEFAULT = next(loop for loop in _FROM_ARGS if not loop.on_disk.args_mark)
_COMMON_STATE_ITEM = b"common_state/"


@dataclass
class RunLayout:
    """The parallel layout of the run that wrote a checkpoint, and the loop that wrote it."""

    loop: str
    tp: int
    pp: int
    ep: int
    cp: int
    dp: int | None
    dp_source: str
    data_parallel_random_init: bool


@dataclass
class IterationReport:
    checkpoint: str
    iteration: int | None
    verdict: str
    summary: str
    run: RunLayout | None = None
    rng_layout: dict[str, Any] | None = None
    without_package: str | None = None
    resume: list[dict[str, Any]] = field(default_factory=list)
    resume_note: str | None = None

    def as_table(self) -> str:
        where = "" if self.iteration is None else f" (iteration {self.iteration})"
        if self.verdict == UNREADABLE:
            return f"checkpoint {self.checkpoint}{where}: {UNREADABLE}: {self.summary}"
        lines = [f"checkpoint   {self.checkpoint}{where}"]
        if self.run is not None:
            run = self.run
            sizes = f"{run.loop}, TP {run.tp}, PP {run.pp}, EP {run.ep}, CP {run.cp}, DP {run.dp or '?'}"
            lines.append(f"written by   {sizes} (DP: {run.dp_source})")
        if self.rng_layout is not None:
            layout, shards = self.rng_layout, self.rng_layout["shards"]
            stored = f"{shards} shard{'s' if shards != 1 else ''} stored"
            lines.append(f"RNG layout   by {layout['axes']}, global shape {tuple(layout['global_shape'])}, {stored}")
        lines.append(f"verdict      {self.verdict}: {self.summary}")
        if self.without_package is not None:
            lines.append(f"resumes without the package: {self.without_package}")
        if self.resume:
            lines.append("on a patched resume:" + (f" {self.resume_note}" if self.resume_note else ""))
            lines.append("    pp   tp   dp  gets")
            lines.extend(f"  {rank['pp']:>4} {rank['tp']:>4} {rank['dp']:>4}  {rank['gets']}" for rank in self.resume)
        return "\n".join(lines)


def inspect_checkpoint(
    checkpoint: str, iteration: int | None = None, resume_with: str | None = None
) -> list[IterationReport]:
    """One report per iteration, latest first; CheckpointInputError where ``checkpoint`` is none at all."""
    target = parse_layout(resume_with) if resume_with else None
    return [inspect_iteration(directory, target) for directory in iteration_dirs(checkpoint, iteration)]


def iteration_dirs(checkpoint: str, iteration: int | None = None) -> list[Path]:
    """The iteration directories ``checkpoint`` (a path, or ``msc://``) names, latest first."""
    try:
        path = checkpoint_path(checkpoint)
    except StorageUnavailable as error:
        raise CheckpointInputError(str(error)) from None
    prefixes = " or ".join(f"{form.partition('{')[0]}*" for form in _ITERATION_FORMATS)
    if not path.exists():
        raise CheckpointInputError(f"{checkpoint}: no such file or directory")
    if not path.is_dir():
        raise CheckpointInputError(f"{checkpoint}: not a directory; give a save directory or one save's ({prefixes})")
    if _is_iteration_dir(path):
        if iteration is not None and _iteration_number(path) != iteration:
            raise CheckpointInputError(f"{checkpoint} is iteration {_iteration_number(path)}, not {iteration}")
        return [path]
    found = [child for child in path.iterdir() if _ITERATION_DIR.fullmatch(child.name) and child.is_dir()]
    found = sorted(found, key=_iteration_number, reverse=True)
    if iteration is not None:
        found = [child for child in found if _iteration_number(child) == iteration]
        if not found:
            names = " or ".join(form.format(iteration) for form in _ITERATION_FORMATS)
            raise CheckpointInputError(f"{checkpoint}: no iteration {iteration} (no {names})")
    if not found:
        raise CheckpointInputError(
            f"{checkpoint}: not a {_STACKS} checkpoint (no {prefixes} directories, no {METADATA_FILE} or metadata.json)"
        )
    return found


def _is_iteration_dir(path: Path) -> bool:
    names = ("metadata.json", METADATA_FILE, *(loop.on_disk.run_config for loop in _CONFIGURED))
    return any((path / name).exists() for name in names) or any(
        child.name.startswith("mp_rank_") for child in path.iterdir()
    )


def _iteration_number(path: Path) -> int | None:
    match = _ITERATION_DIR.fullmatch(path.name)
    return None if match is None else int(next(group for group in match.groups() if group is not None))


def inspect_iteration(directory: Path, resume_with: dict[str, int] | None = None) -> IterationReport:
    report = IterationReport(str(directory), _iteration_number(directory), UNREADABLE, "")
    try:
        writer = next((loop for loop in _CONFIGURED if (directory / loop.on_disk.run_config).is_file()), None)
        rng_dirs = () if writer is None else writer.on_disk.rng_dirs
        rng_dir = next((directory / name for name in rng_dirs if (directory / name).is_dir()), directory)
        _check_format(rng_dir)
        writer, sizes, random_init, known = _run_configuration(directory, writer)
        stored = _plain_rng_layout(rng_dir)
        states = None if stored is None else _states_per_entry(rng_dir, stored)
        dp, source = _data_parallel_size(directory, rng_dir, writer, sizes, known, stored, states, random_init)
        report.run = RunLayout(writer.name, **sizes, dp=dp, dp_source=source, data_parallel_random_init=random_init)
    except (CheckpointInputError, RngCheckpointError) as error:
        report.summary = str(error)
        return report
    if stored is None:
        report.verdict = NO_RNG_STATE
        report.summary = "the checkpoint stores no RNG state (saved with save_rng=False): every rank resumes fresh"
        return report
    run = report.run
    report.rng_layout = {
        "axes": stored.axes,
        "global_shape": list(stored.global_shape),
        "shards": len(stored.offsets),
        "states_per_shard": states,
    }
    report.verdict, report.summary = _verdict(stored, run, states)
    report.without_package = _without_package(stored, run)
    if resume_with is not None:
        report.resume_note = _model_parallel_change(run, resume_with)
        report.resume = _resume_plan(stored, run, states, resume_with)
    return report


def _plain_rng_layout(directory: Path) -> StoredRngLayout | None:
    """The layout of the one RNG object; a MegatronMIMO checkpoint, with one per module, is refused."""
    layouts = read_stored_layouts(str(directory))
    if len(layouts) > 1:
        raise CheckpointInputError(
            f"{directory}: a MegatronMIMO checkpoint (RNG state per module: {', '.join(layouts)}); this inspector "
            f"reads a single '{RNG_STATE_KEY}' only"
        )
    return next(iter(layouts.values()), None)


def _check_format(directory: Path) -> None:
    """Only torch_dist and fsdp_dtensor checkpoints are read; say what the others are and why not."""
    metadata_json = directory / "metadata.json"
    if metadata_json.is_file():
        try:
            backend = json.loads(metadata_json.read_text()).get("sharded_backend")
        except (OSError, ValueError, AttributeError) as error:
            raise CheckpointInputError(f"{metadata_json}: not readable dist_checkpointing metadata ({error})") from None
        if backend != "torch_dist":
            raise CheckpointInputError(
                f"{directory}: a {backend!r} dist_checkpointing checkpoint; only torch_dist is supported"
            )
        return
    if (directory / METADATA_FILE).is_file():  # fsdp_dtensor: torch DCP without dist_checkpointing's metadata
        return
    if any(child.name.startswith("mp_rank_") for child in directory.iterdir()):
        raise CheckpointInputError(
            f"{directory}: a legacy torch format checkpoint (mp_rank_*/model_optim_rng.pt per rank), which holds "
            "RNG state inside each rank's pickle: only torch_dist is supported"
        )
    raise CheckpointInputError(f"{directory}: not a {_STACKS} checkpoint (no metadata.json, no {METADATA_FILE})")


def _run_configuration(
    directory: Path, writer: TrainingLoop | None
) -> tuple[TrainingLoop, dict[str, int], bool, dict[str, int]]:
    """The stack that wrote the save, its sizes, whether it gathered its states, and its DP size where recorded."""
    if writer is not None:
        return writer, *_configured(directory / writer.on_disk.run_config), {}
    args = _common_state_args(directory)
    if args is None:
        configured = ", ".join(f"{loop.on_disk.run_config} ({loop.name})" for loop in _CONFIGURED)
        from_args = " or ".join(f"{loop.name}'s" for loop in _FROM_ARGS)
        raise CheckpointInputError(
            f"{directory}: neither {configured} nor {from_args} args in its common state, so the parallel layout "
            "of the run that wrote it is unknown"
        )
    try:
        sizes = {axis: int(getattr(args, key, None) or 1) for axis, key in PARALLEL_SIZES.items()}
        known = {"its saved args": int(getattr(args, "data_parallel_size", None) or 0)}
    except (TypeError, ValueError) as error:
        raise CheckpointInputError(f"{directory}: args with unreadable sizes ({error})") from None
    random_init = bool(getattr(args, "data_parallel_random_init", False))
    marked = (loop for loop in _FROM_ARGS if loop.on_disk.args_mark and hasattr(args, loop.on_disk.args_mark))
    return next(marked, _ARGS_BY_DEFAULT), sizes, random_init, known


def _configured(config_file: Path) -> tuple[dict[str, int], bool]:
    """The sizes and ``data_parallel_random_init`` in a run configuration: YAML under ``model``, or JSON."""
    try:
        with config_file.open("rb") as stream:
            text = bounded_read(config_file, stream, config_file.stat().st_size, "run configuration")
        if config_file.suffix == ".yaml":
            import yaml  # Megatron-Bridge's dependency, which writes the YAML

            config = yaml.safe_load(text)
            model, rng = config["model"], config.get("rng") or {}
        else:
            model = rng = json.loads(text)
        sizes = {axis: int(model.get(key) or 1) for axis, key in PARALLEL_SIZES.items()}
        return sizes, bool(rng.get("data_parallel_random_init"))
    except CheckpointInputError:
        raise
    except Exception as error:
        raise CheckpointInputError(f"{config_file}: not a readable run configuration ({error!r})") from None


def _data_parallel_size(
    directory: Path,
    rng_dir: Path,
    writer: TrainingLoop,
    sizes: dict[str, int],
    known: dict[str, int],
    stored: StoredRngLayout | None,
    states: int | None,
    random_init: bool,
) -> tuple[int | None, str]:
    """DP size and its source, in one order: the stored layout, the saved args, a manifest, the shard writers."""
    model_parallel = sizes["tp"] * sizes["pp"] * sizes["cp"]
    counted = None
    if stored is not None:
        counted = stored.global_shape[2] if stored.per_dp_rank else states if states and states > 1 else None
        by_cp = 1 if not stored.per_dp_rank and random_init else sizes["cp"]
        counted = counted // by_cp if counted is not None and counted % by_cp == 0 else None
    candidates = {"the stored RNG layout": counted, **known}
    manifest = writer.on_disk.manifest
    if manifest is not None:
        candidates[f"the world size in {manifest}"] = _world_size(directory / manifest, model_parallel)
    for source, dp in candidates.items():
        if dp:
            return dp, source
    model_dir = directory / writer.on_disk.model_dir if writer.on_disk.model_dir else None
    shards = model_dir if model_dir is not None and model_dir.is_dir() else rng_dir
    ranks = {int(match.group(1)) for child in shards.iterdir() if (match := _RANK_FILE.fullmatch(child.name))}
    if not ranks:
        return None, "no shard files"
    world = max(ranks) + 1
    if world % model_parallel:
        return None, f"{world} ranks wrote shard files, not a multiple of TP x PP x CP = {model_parallel}"
    return world // model_parallel, f"{world} ranks wrote shard files (a lower bound where some ranks wrote none)"


def _world_size(manifest: Path, model_parallel: int) -> int | None:
    try:
        with manifest.open("rb") as stream:
            world = int(json.loads(bounded_read(manifest, stream, manifest.stat().st_size, "manifest"))["world_size"])
    except (OSError, ValueError, KeyError, TypeError, CheckpointInputError):
        return None
    return world // model_parallel if world % model_parallel == 0 else None


def _common_state_args(directory: Path) -> argparse.Namespace | None:
    """A common state's ``args``: ``common.pt`` up to megatron-core 0.18, an item inside the checkpoint from 0.19."""
    for name in dict.fromkeys(loop.on_disk.common_state for loop in _FROM_ARGS):
        common = directory / name
        if common.is_file():
            with common.open("rb") as archive:
                return _args_of(pickle_in_archive(common, archive, "common state"))
    metadata = directory / METADATA_FILE
    data = metadata.read_bytes() if metadata.is_file() else b""
    if _COMMON_STATE_ITEM not in data:
        return None
    prefix = _COMMON_STATE_ITEM.decode()
    return _args_of(archive_item(directory, metadata, data, lambda key: key.startswith(prefix), "common state"))


def _args_of(state: Any) -> Any:
    if isinstance(state, list) and len(state) == 1:  # 0.19 keeps the common state as a one-item list
        state = state[0]
    args = state.get("args") if isinstance(state, dict) else None
    return args if isinstance(args, argparse.Namespace) else None


def _states_per_entry(directory: Path, stored: StoredRngLayout) -> int | None:
    """How many states the first (pp, tp) entry of a torch_dist checkpoint holds; None where not known."""
    if stored.per_dp_rank or stored.fsdp_dtensor:
        return None
    dotted = ".".join
    shard = f"{stored.key}/shard_{dotted(map(str, min(stored.offsets)))}_{dotted(map(str, stored.global_shape))}"
    metadata = directory / METADATA_FILE
    try:
        entry = archive_item(directory, metadata, metadata.read_bytes(), shard.__eq__, "RNG entry")
    except (OSError, CheckpointInputError):
        return None
    # megatron-core stores a ShardedObject's data as the one item of a list.
    states = entry[0] if isinstance(entry, list) and len(entry) == 1 else None
    return len(states) if isinstance(states, list) else None


def _verdict(stored: StoredRngLayout, run: RunLayout, states: int | None) -> tuple[str, str]:
    parts = "entries" if stored.fsdp_dtensor else "shards"
    if stored.per_dp_rank:
        expected = stored.global_shape[0] * stored.global_shape[1] * stored.global_shape[2]
        if len(stored.offsets) < expected:
            return INCOMPLETE, f"{len(stored.offsets)} of {expected} (pp, tp, dp) RNG {parts} are stored"
        return COMPLETE, f"every DP rank's RNG state is stored ({expected} {parts}, one per (pp, tp, dp))"
    if run.ep <= 1:
        return COMPLETE, "written with EP 1: the DP ranks of each (pp, tp) share one RNG state, and it is stored"
    if run.data_parallel_random_init:
        return COMPLETE, "written with data_parallel_random_init: each (pp, tp) shard holds every DP rank's RNG state"
    if states is not None and states > 1:
        return COMPLETE, f"each (pp, tp) shard holds every DP rank's RNG state ({states}, saved with bridge_rng_patch)"
    if run.dp is None:
        lost = (
            "the RNG states of every rank but DP rank 0 of each (pp, tp) were never written "
            f"(DP size unknown: {run.dp_source})"
        )
    else:
        ranks = stored.global_shape[0] * stored.global_shape[1] * run.dp * run.cp
        lost = f"{ranks - len(stored.offsets)} of {ranks} ranks' RNG states were never written"
        if stored.fsdp_dtensor:
            lost += " whole (torch DCP kept one rank's copy of each leaf, so the stored state mixes ranks)"
    return INCOMPLETE, (
        f"written with EP {run.ep} and one RNG state per (pp, tp) (the old bug): {lost}; a resume gives those ranks "
        "DP rank 0's, so each whose EP rank differs from DP rank 0's loses its expert-parallel RNG stream"
    )


def _without_package(stored: StoredRngLayout, run: RunLayout) -> str:
    """Whether the writer's releases resume it without the package: a release reads the layout it writes."""
    writer = next(loop for loop in LOOPS if loop.name == run.loop)
    fixed = writer.fixed_in[SAVE_SHARDING].known
    by_pp_tp = f"{writer.name} before {fixed}" if fixed else f"every {writer.name} release on the registry"
    remedy = f"resume with {writer.skip_rng_load}, or with the package"
    if stored.fsdp_dtensor:
        return "yes: the (pp, tp) entries every release reads are stored, and read as in the release's own checkpoint"
    if stored.per_dp_rank:
        if fixed is None:
            return f"no: {by_pp_tp} asks for a (pp, tp) shard, which it does not hold: {remedy}"
        return (
            f"on {writer.name} {fixed} and later at EP > 1 and this DP size; not on {by_pp_tp}, which asks for a "
            f"(pp, tp) shard it does not hold: {remedy}"
        )
    upstream = "its own state" if run.data_parallel_random_init else "the state of DP rank 0 of its (pp, tp)"
    answer = f"yes on {by_pp_tp}: every rank resumes {upstream}, as from the release's own checkpoint"
    if fixed is not None and run.ep > 1:
        answer += f"; not on {writer.name} {fixed} and later at EP > 1, which ask for a (pp, tp, dp) shard: {remedy}"
    return answer


def _model_parallel_change(run: RunLayout, target: dict[str, int]) -> str | None:
    """Why a resume in ``target`` restores no RNG state (its TP or PP differs from the run's), or None."""
    stored, running = (run.tp, run.pp), (target.get("tp", run.tp), target.get("pp", run.pp))
    if running == stored:
        return None
    return (
        f"(TP, PP) {running} differs from the checkpoint's {stored}: RNG state will not be restored, every rank "
        "keeps its fresh RNG state (as the loops do after a TP or PP change)"
    )


def _resume_plan(
    stored: StoredRngLayout, run: RunLayout, states: int | None, target: dict[str, int]
) -> list[dict[str, Any]]:
    """What each rank of the target layout restores on a patched resume: the live load's rule."""
    model_parallel = (target.get("pp", run.pp), target.get("tp", run.tp))
    dp_size = target.get("dp", run.dp)
    if dp_size is None:
        raise CheckpointInputError("--resume-with needs dp=N: the DP size of the run that wrote it is unknown")
    # A (pp, tp) entry of a run with data_parallel_random_init lists every DP rank's state, read or not.
    if states is None and run.data_parallel_random_init:
        states = run.dp
    written = {"gathers": run.data_parallel_random_init, "ranks_alike": run.ep <= 1}
    ranks = (
        ResumingRank(pp, tp, dp, model_parallel, **written)
        for pp in range(model_parallel[0])
        for tp in range(model_parallel[1])
        for dp in range(dp_size * target.get("cp", run.cp))
    )
    return [
        {"pp": rank.pp_rank, "tp": rank.tp_rank, "dp": rank.dp_rank, "gets": stored.restore(rank, states).kind}
        for rank in ranks
    ]


def parse_layout(text: str) -> dict[str, int]:
    """``dp=8,ep=2`` -> {"dp": 8, "ep": 2}; raises CheckpointInputError naming what is wrong."""
    layout = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in ("dp", *PARALLEL_SIZES) or not value.isdigit() or int(value) < 1:
            raise CheckpointInputError(
                f"--resume-with {text!r}: {item!r} is not AXIS=SIZE with AXIS one of dp, tp, pp, ep, cp and SIZE >= 1"
            )
        layout[name] = int(value)
    return layout
