"""What a checkpoint already on disk holds of its ranks' RNG state, and what a patched resume would do with it.

Reads metadata only, never the tensors: the dist_checkpointing ``metadata.json``, the shard keys in torch's
``.metadata`` (scanned, see ``rng_layout``; an fsdp_dtensor checkpoint's RNG entries the same way), how many states
the first (pp, tp) RNG shard lists (its pickle alone, read as the common state is), and the
parallel sizes of the run that wrote it: the ``run_config.yaml`` Megatron-Bridge saves, the ``args`` Megatron-LM's
loop and ms-swift keep in their common state (read without running any pickled code), or the
``transformer_config.json`` verl writes beside its dist-checkpoints (``global_step_*``: the RNG state in
``extra/dist_ckpt`` from 0.8, in ``dist_ckpt`` before), on a file system or through the Multi-Storage Client
(``msc://``). Needs no GPU, no torch, and no Megatron import.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bridge_rng_patch.loops import LOOPS, SAVE_SHARDING, TrainingLoop
from bridge_rng_patch.rng_layout import (
    METADATA_FILE,
    RNG_STATE_KEY,
    RankCoordinates,
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
# One save of any stack: ``iter_{n}``, ``global_step_{n}``.
_PREFIXES = sorted({loop.on_disk.iteration_prefix for loop in LOOPS})
_ITERATION_DIR = re.compile(f"(?:{'|'.join(map(re.escape, _PREFIXES))})(\\d+)")
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")


class CheckpointInputError(ValueError):
    """The path given is not something this inspector can read; the message says what it is and why."""


MEGATRON_LM_COMMON = "common.pt"
# The stacks that record their run beside each save, and the one whose common state's args carry no mark of another.
_CONFIGURED = tuple(loop for loop in LOOPS if loop.on_disk.run_config)
_ARGS_BY_DEFAULT = next(loop for loop in LOOPS if not (loop.on_disk.run_config or loop.on_disk.args_mark))


@dataclass
class RunLayout:
    """The parallel layout of the run that wrote a checkpoint, and the loop that wrote it, from its saved
    configuration."""

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

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_table(self) -> str:
        where = "" if self.iteration is None else f" (iteration {self.iteration})"
        if self.verdict == UNREADABLE:
            return f"checkpoint {self.checkpoint}{where}: {UNREADABLE}: {self.summary}"
        lines = [f"checkpoint   {self.checkpoint}{where}"]
        if self.run is not None:
            run = self.run
            dp = "?" if run.dp is None else run.dp
            sizes = f"{run.loop}, TP {run.tp}, PP {run.pp}, EP {run.ep}, CP {run.cp}, DP {dp}"
            lines.append(f"written by   {sizes} (DP: {run.dp_source})")
        if self.rng_layout is not None:
            layout = self.rng_layout
            shape = tuple(layout["global_shape"])
            shards = f"{layout['shards']} shard{'s' if layout['shards'] != 1 else ''} stored"
            lines.append(f"RNG layout   by {layout['axes']}, global shape {shape}, {shards}")
        lines.append(f"verdict      {self.verdict}: {self.summary}")
        if self.without_package is not None:
            lines.append(f"resumes without the package: {self.without_package}")
        if self.resume:
            lines.append("on a patched resume:" + (f" {self.resume_note}" if self.resume_note else ""))
            lines.append("    pp   tp   dp  gets")
            lines.extend(f"  {rank['pp']:>4} {rank['tp']:>4} {rank['dp']:>4}  {rank['gets']}" for rank in self.resume)
        return "\n".join(lines)


def iteration_dirs(checkpoint: str, iteration: int | None = None) -> list[Path]:
    """The iteration directories ``checkpoint`` names, latest first; raises CheckpointInputError if none.

    ``checkpoint`` is a file system path or an ``msc://`` one (read through the Multi-Storage Client, with the
    profiles ``MSC_CONFIG`` names); the paths returned have pathlib's methods either way.
    """
    try:
        path = checkpoint_path(checkpoint)
    except StorageUnavailable as error:
        raise CheckpointInputError(str(error)) from None
    if not path.exists():
        raise CheckpointInputError(f"{checkpoint}: no such file or directory")
    if not path.is_dir():
        raise CheckpointInputError(
            f"{checkpoint}: not a directory; give a checkpoint save directory or one save's (iter_* or global_step_*)"
        )
    if _is_iteration_dir(path):
        if iteration is not None and _iteration_number(path) != iteration:
            raise CheckpointInputError(f"{checkpoint} is iteration {_iteration_number(path)}, not {iteration}")
        return [path]
    found = sorted(
        (child for child in path.iterdir() if _ITERATION_DIR.fullmatch(child.name) and child.is_dir()),
        key=_iteration_number,
        reverse=True,
    )
    if iteration is not None:
        found = [child for child in found if _iteration_number(child) == iteration]
        if not found:
            raise CheckpointInputError(
                f"{checkpoint}: no iteration {iteration} (no iter_{iteration:07d} or global_step_{iteration})"
            )
    if not found:
        raise CheckpointInputError(
            f"{checkpoint}: not a Megatron-Bridge, Megatron-LM, verl or ms-swift checkpoint (no iter_* or "
            f"global_step_* directories, no {METADATA_FILE} or metadata.json)"
        )
    return found


def _is_iteration_dir(path: Path) -> bool:
    names = ("metadata.json", METADATA_FILE, *(loop.on_disk.run_config for loop in _CONFIGURED))
    return any((path / name).exists() for name in names) or any(
        child.name.startswith("mp_rank_") for child in path.iterdir()
    )


def _configured_by(directory: Path) -> TrainingLoop | None:
    """The stack whose run configuration lies in the save, if any."""
    return next((loop for loop in _CONFIGURED if (directory / loop.on_disk.run_config).is_file()), None)


def _rng_dir(directory: Path, writer: TrainingLoop | None) -> Path:
    """The dist-checkpoint that holds one save's RNG state: the save itself, or where its stack keeps it in it."""
    rng_dirs = () if writer is None else writer.on_disk.rng_dirs
    return next((directory / name for name in rng_dirs if (directory / name).is_dir()), directory)


def _iteration_number(path: Path) -> int | None:
    match = _ITERATION_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def inspect_iteration(directory: Path, resume_with: dict[str, int] | None = None) -> IterationReport:
    """One iteration's verdict; every problem becomes an "unreadable" report that says why."""
    report = IterationReport(str(directory), _iteration_number(directory), UNREADABLE, "")
    try:
        writer = _configured_by(directory)
        rng_dir = _rng_dir(directory, writer)
        _check_format(rng_dir)
        report.run = _run_layout(directory, rng_dir, writer)
        stored = _plain_rng_layout(rng_dir)
    except (CheckpointInputError, RngCheckpointError) as error:
        report.summary = str(error)
        return report
    if stored is None:
        report.verdict = NO_RNG_STATE
        report.summary = "the checkpoint stores no RNG state (saved with save_rng=False): every rank resumes fresh"
        return report
    run, states = report.run, _states_per_entry(rng_dir, stored)
    # Where the layout counts the DP ranks: its third axis, or a list of every DP rank's state (with context
    # parallel where this package gathered it, as the replica ids count them).
    counted = stored.global_shape[2] if stored.per_dp_rank else states if states and states > 1 else None
    by_cp = 1 if not stored.per_dp_rank and run.data_parallel_random_init else run.cp
    if counted is not None and counted % by_cp == 0:
        run.dp, run.dp_source = counted // by_cp, "the stored RNG layout"
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
    """The layout of the one RNG object: ``rng_state``, or Megatron-LM's prefixed ``{key_prefix}rng_state``; a
    MegatronMIMO checkpoint, with one RNG object per module, is refused."""
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
    raise CheckpointInputError(
        f"{directory}: not a Megatron-Bridge or Megatron-LM checkpoint (no metadata.json, no {METADATA_FILE})"
    )


def _run_layout(directory: Path, rng_dir: Path, writer: TrainingLoop | None) -> RunLayout:
    """From the run configuration ``writer`` wrote beside the save, else from the ``args`` in its common state."""
    if writer is not None:
        return _configured_run_layout(writer, directory, rng_dir)
    args = _megatron_lm_args(directory)
    if args is None:
        configured = ", ".join(f"{loop.on_disk.run_config} ({loop.name})" for loop in _CONFIGURED)
        from_args = " or ".join(f"{loop.name}'s" for loop in LOOPS if loop not in _CONFIGURED)
        raise CheckpointInputError(
            f"{directory}: neither {configured} nor {from_args} args in its common state, so the parallel layout of "
            "the run that wrote it is unknown"
        )
    try:
        sizes = {axis: int(getattr(args, key, None) or 1) for axis, key in PARALLEL_SIZES.items()}
        dp = getattr(args, "data_parallel_size", None)
        dp = int(dp) if dp else None
    except (TypeError, ValueError) as error:
        raise CheckpointInputError(f"{directory / MEGATRON_LM_COMMON}: args with unreadable sizes ({error})") from None
    dp, dp_source = (dp, "its saved args") if dp is not None else _data_parallel_size(directory, sizes)
    random_init = bool(getattr(args, "data_parallel_random_init", False))
    marked = (loop for loop in LOOPS if loop.on_disk.args_mark and hasattr(args, loop.on_disk.args_mark))
    writer = next(marked, _ARGS_BY_DEFAULT)
    return RunLayout(writer.name, **sizes, dp=dp, dp_source=dp_source, data_parallel_random_init=random_init)


def _configured_run_layout(writer: TrainingLoop, directory: Path, rng_dir: Path) -> RunLayout:
    """From the stack's run configuration: YAML with the sizes under ``model``, or JSON with them at its top."""
    config_file = directory / writer.on_disk.run_config
    yaml_config = config_file.suffix == ".yaml"
    try:
        with config_file.open("rb") as stream:
            text = _bounded_read(config_file, stream, config_file.stat().st_size, "run configuration")
        config = _yaml().safe_load(text) if yaml_config else json.loads(text)
        model, rng = (config["model"], config.get("rng") or {}) if yaml_config else (config, config)
        sizes = {axis: int(model.get(key) or 1) for axis, key in PARALLEL_SIZES.items()}
        random_init = bool(rng.get("data_parallel_random_init"))
    except CheckpointInputError:
        raise
    except Exception as error:
        raise CheckpointInputError(f"{config_file}: not a readable run configuration ({error!r})") from None
    dp, dp_source = _configured_data_parallel_size(writer, directory, rng_dir, sizes)
    return RunLayout(writer.name, **sizes, dp=dp, dp_source=dp_source, data_parallel_random_init=random_init)


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise CheckpointInputError("reading run_config.yaml needs PyYAML (a dependency of Megatron-Bridge)") from None
    return yaml


def _configured_data_parallel_size(
    writer: TrainingLoop, directory: Path, rng_dir: Path, sizes: dict[str, int]
) -> tuple[int | None, str]:
    """From the world size in the stack's manifest, where it writes one, else from the writers of the save's model
    dist-checkpoint (an RNG one has a single writer under the old layout), else of the RNG one."""
    on_disk = writer.on_disk
    model_parallel = sizes["tp"] * sizes["pp"] * sizes["cp"]
    if on_disk.manifest is not None:
        manifest = directory / on_disk.manifest
        try:
            with manifest.open("rb") as stream:
                text = _bounded_read(manifest, stream, manifest.stat().st_size, "manifest")
            world = int(json.loads(text)["world_size"])
        except (OSError, ValueError, KeyError, TypeError, CheckpointInputError):
            world = None
        if world is not None and world % model_parallel == 0:
            return world // model_parallel, f"the world size in {on_disk.manifest}"
    model_dir = directory / on_disk.model_dir if on_disk.model_dir else None
    return _data_parallel_size(model_dir if model_dir is not None and model_dir.is_dir() else rng_dir, sizes)


class _Unpickled:
    """What a class or function named in a pickle becomes here: a placeholder that keeps what it was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@functools.cache
def _placeholder_class(module: str, name: str) -> type:
    """One class per name: a pickle may name a class once per object, in a few bytes each time."""
    return type(name, (_Unpickled,), {"__module__": f"unpickled.{module}"})


class _ArgsReader(pickle.Unpickler):
    """Unpickles Megatron-LM's common state without running pickled code: ``argparse.Namespace`` is built for
    real (a plain attribute holder); every other class or function it names (enums, torch dtypes, signals)
    becomes a placeholder, and tensor storages become None."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        return _placeholder_class(module, name)

    def persistent_load(self, pid: Any) -> None:
        return None


def _megatron_lm_args(directory: Path) -> argparse.Namespace | None:
    """The ``args`` of Megatron-LM's common state, or None where the checkpoint keeps none.

    megatron-core up to 0.18 writes the common state to ``common.pt``; 0.19 stores it inside the checkpoint, as
    a ``common_state/...`` item of torch's DCP whose file, offset and length ``.metadata`` records. Either way it
    is a torch zip archive, read with the reader below, and only its bytes are read.
    """
    common = directory / MEGATRON_LM_COMMON
    if common.is_file():
        with common.open("rb") as archive:  # a zip archive is read where it says, its pickle alone
            return _args_in_archive(common, archive)
    metadata = directory / METADATA_FILE
    data = metadata.read_bytes() if metadata.is_file() else b""
    if _COMMON_STATE_ITEM not in data:
        return None
    where = _item_storage(metadata, data, lambda key: key.startswith(_COMMON_STATE_ITEM.decode()), "common state")
    with (directory / where["relative_path"]).open("rb") as storage:
        storage.seek(where["offset"])
        return _args_in_archive(metadata, io.BytesIO(_bounded_read(metadata, storage, where["length"])))


# The args are kilobytes (a real Megatron-LM common state's pickle: 17 KB, core 0.13 to 0.16); what is read for them
# is bounded, so that a crafted or foreign file cannot make the inspector read or inflate gigabytes.
COMMON_STATE_LIMIT = 16 * 2**20


def _bounded_read(where: Path, stream: Any, size: int, what: str = "common state") -> bytes:
    """The ``size`` bytes of ``stream`` where they are at most ``COMMON_STATE_LIMIT``; CheckpointInputError, with
    nothing read, where they are more."""
    if size > COMMON_STATE_LIMIT:
        raise CheckpointInputError(
            f"{where}: its {what} holds {size:,} bytes, more than the {COMMON_STATE_LIMIT >> 20} MiB this inspector "
            "reads for the run's args (a real one holds kilobytes), so it was not read"
        )
    return stream.read(size)


_COMMON_STATE_ITEM = b"common_state/"


def _item_storage(metadata: Path, data: bytes, matches: Callable[[str], bool], what: str) -> dict[str, Any]:
    """Where ``.metadata`` says the bytes of the item whose key ``matches`` are: relative_path, offset, length."""
    try:
        storage_data = _ArgsReader(io.BytesIO(data)).load().state["storage_data"]
        return next(info.state for index, info in storage_data.items() if matches(index.state["fqn"]))
    except Exception as error:  # a cut or foreign file: pickle, attribute and lookup errors alike
        raise CheckpointInputError(f"{metadata}: no readable {what} in it ({type(error).__name__})") from None


def _pickle_in_archive(where: Path, archive_file: Any, what: str) -> Any:
    """What the pickle of a torch archive holds, read as ``_ArgsReader`` reads (tensor data is not read)."""
    try:
        with zipfile.ZipFile(archive_file) as archive:
            pickled = next(info for info in archive.infolist() if info.filename.endswith("/data.pkl"))
            with archive.open(pickled) as member:  # zipfile inflates no more than the size its header states
                data = _bounded_read(where, member, pickled.file_size, f"pickle {pickled.filename}, inflated,")
            return _ArgsReader(io.BytesIO(data)).load()
    except CheckpointInputError:
        raise
    except Exception as error:  # a cut or foreign file: zipfile, pickle and StopIteration errors alike
        raise CheckpointInputError(f"{where}: not a readable {what} ({type(error).__name__})") from None


def _args_in_archive(where: Path, archive_file: Any) -> argparse.Namespace | None:
    state = _pickle_in_archive(where, archive_file, "common state")
    if isinstance(state, list) and len(state) == 1:  # 0.19 keeps the common state as a one-item list
        state = state[0]
    args = state.get("args") if isinstance(state, dict) else None
    return args if isinstance(args, argparse.Namespace) else None


class _Slice(io.RawIOBase):
    """``length`` bytes of ``stream`` from ``offset``, as a file of their own: a zip archive stored inside a DCP file
    is read where zipfile asks, its directory and one member, never whole."""

    def __init__(self, stream: Any, offset: int, length: int) -> None:
        self._stream, self._offset, self._length, self._position = stream, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = (0, self._position, self._length)[whence]
        self._position = max(0, min(base + position, self._length))
        return self._position

    def readinto(self, buffer: Any) -> int:
        self._stream.seek(self._offset + self._position)
        data = self._stream.read(min(len(buffer), self._length - self._position))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def _states_per_entry(directory: Path, stored: StoredRngLayout) -> int | None:
    """How many states a (pp, tp) entry of a torch_dist checkpoint holds: 1 (its writer's), or every DP rank's
    (gathered with data_parallel_random_init, or by this package's save under EP > 1); None for another layout or
    where the entry cannot be read. Read from the first entry's pickle alone, without running pickled code."""
    if stored.per_dp_rank or stored.fsdp_dtensor:
        return None
    shard = f"{stored.key}/shard_{_dotted(min(stored.offsets))}_{_dotted(stored.global_shape)}"
    metadata = directory / METADATA_FILE
    try:
        where = _item_storage(metadata, metadata.read_bytes(), shard.__eq__, "RNG entry")
        with (directory / where["relative_path"]).open("rb") as storage:
            entry = _pickle_in_archive(metadata, _Slice(storage, where["offset"], where["length"]), "RNG entry")
    except (OSError, CheckpointInputError):
        return None
    # megatron-core stores a ShardedObject's data as the one item of a list.
    states = entry[0] if isinstance(entry, list) and len(entry) == 1 else None
    return len(states) if isinstance(states, list) else None


def _dotted(indices: tuple[int, ...]) -> str:
    return ".".join(map(str, indices))


def _data_parallel_size(directory: Path, sizes: dict[str, int]) -> tuple[int | None, str]:
    """DP size, which no saved configuration records: from the stored RNG layout, else from the writers.

    A (pp, tp, dp) layout has it as its last axis. Otherwise the shard files tell how many ranks wrote data
    (``__{rank}_{n}.distcp``); where fewer ranks wrote than ran, this undercounts, and says so.
    """
    ranks = {int(match.group(1)) for child in directory.iterdir() if (match := _RANK_FILE.fullmatch(child.name))}
    model_parallel = sizes["tp"] * sizes["pp"] * sizes["cp"]
    if not ranks:
        return None, "no shard files"
    world = max(ranks) + 1
    if world % model_parallel:
        return None, f"{world} ranks wrote shard files, not a multiple of TP x PP x CP = {model_parallel}"
    return world // model_parallel, f"{world} ranks wrote shard files (a lower bound where some ranks wrote none)"


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
        return COMPLETE, ("written with data_parallel_random_init: each (pp, tp) shard holds every DP rank's RNG state")
    if states is not None and states > 1:
        return COMPLETE, f"each (pp, tp) shard holds every DP rank's RNG state ({states}, saved with bridge_rng_patch)"
    stored_states = len(stored.offsets)
    if run.dp is None:
        lost = (
            "the RNG states of every rank but DP rank 0 of each (pp, tp) were never written "
            f"(DP size unknown: {run.dp_source})"
        )
    else:
        ranks = stored.global_shape[0] * stored.global_shape[1] * run.dp * run.cp
        lost = f"{ranks - stored_states} of {ranks} ranks' RNG states were never written"
        if stored.fsdp_dtensor:
            lost += " whole (torch DCP kept one rank's copy of each leaf, so the stored state mixes ranks)"
    return INCOMPLETE, (
        f"written with EP {run.ep} and one RNG state per (pp, tp) (the old bug): {lost}; a resume gives those ranks "
        "DP rank 0's, so each whose EP rank differs from DP rank 0's loses its expert-parallel RNG stream"
    )


def _without_package(stored: StoredRngLayout, run: RunLayout) -> str:
    """Whether the writer's releases resume the checkpoint's RNG state without this package, and what the others need:
    a release loads the layout it writes itself, and fails on another (the stack's own switch then skips RNG state)."""
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
    """What each (pp, tp, dp) rank of the target layout restores on a resume with this package: the rule the
    stored-layout load follows (``StoredRngLayout.restores``); dp counts DP ranks with context parallel, as the RNG
    layout does."""
    pp_size, tp_size = target.get("pp", run.pp), target.get("tp", run.tp)
    dp_size = target.get("dp", run.dp)
    if dp_size is None:
        raise CheckpointInputError("--resume-with needs dp=N: the DP size of the run that wrote it is unknown")
    # A (pp, tp) entry holds every DP rank's state where a run with data_parallel_random_init or this package wrote it.
    random_init = (run.dp or 0) if run.data_parallel_random_init else None
    gathered = states if states is not None and states > 1 else random_init
    return [
        {
            "pp": pp,
            "tp": tp,
            "dp": dp,
            "gets": stored.restores(RankCoordinates(pp, tp, dp), (pp_size, tp_size), gathered, run.ep <= 1),
        }
        for pp in range(pp_size)
        for tp in range(tp_size)
        for dp in range(dp_size * target.get("cp", run.cp))
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


def inspect_checkpoint(
    checkpoint: str, iteration: int | None = None, resume_with: str | None = None
) -> list[IterationReport]:
    """One report per iteration of ``checkpoint``, latest first. Raises CheckpointInputError for a path that
    is no checkpoint at all; an iteration that cannot be read gets an "unreadable" report saying why."""
    target = parse_layout(resume_with) if resume_with else None
    return [inspect_iteration(directory, target) for directory in iteration_dirs(checkpoint, iteration)]
