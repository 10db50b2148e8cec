"""The stored layouts of a checkpoint's RNG state, how to read them, and what a rank restores from one: torch_dist's
``rng_state`` ShardedObject sharded by (pp, tp) or by (pp, tp, dp), fsdp_dtensor's lists under ``(pp, tp)`` or
``(pp, tp, dp)`` entries. The stored layout, not the running configuration, decides what a rank can read back."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from bridge_rng_patch.storage import StorageUnavailable, checkpoint_path, dcp_metadata_reader

if TYPE_CHECKING:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

RNG_STATE_KEY = "rng_state"


def nothing_restored(skip_rng_load: str) -> str:
    """What a load that fails on RNG state adds: nothing was restored, and the stack's switch that resumes without."""
    return f"no RNG state was restored; resume with {skip_rng_load} to start from fresh RNG state"


# Whose RNG state a rank restores: the state stored for its own coordinates, the one state stored for its (pp, tp)
# (another rank's: the checkpoint holds none per rank), or its own fresh state (none is stored for it).
OWN, SHARED, FRESH = "own state", "shared state", "fresh state"


class RngCheckpointError(RuntimeError):
    """A checkpoint's RNG state cannot be restored as stored; the message names the checkpoint and the key."""


class UnknownRngLayout(RngCheckpointError):
    """A checkpoint's RNG shards fit no layout this package knows."""


def fsdp_entry(*coordinates: int) -> str:
    return f"({', '.join(str(index) for index in coordinates)})"


def fsdp_entry_coordinates(entry: object) -> tuple[int, ...] | None:
    match = _FSDP_ENTRY.fullmatch(entry) if isinstance(entry, str) else None
    return None if match is None else tuple(int(index) for index in match.groups() if index is not None)


def with_own_fsdp_entry(by_pp_tp: dict, dp_rank: int) -> dict:
    """fsdp_dtensor's RNG dict with this rank's states under an entry of its own too, which has one writer."""
    if len(by_pp_tp) != 1:
        return by_pp_tp
    ((entry, states),) = by_pp_tp.items()
    coordinates = fsdp_entry_coordinates(entry)
    if coordinates is None or len(coordinates) != 2 or not isinstance(states, list) or len(states) != 1:
        return by_pp_tp
    by_pp_tp[fsdp_entry(*coordinates, dp_rank)] = states
    return by_pp_tp


def coordinates_of(request: ShardedObject) -> tuple[int, int, int]:
    """(pp, tp, dp) of the rank whose load request this is; a (pp, tp) request carries the DP rank as replica id."""
    pp_rank, tp_rank = request.global_offset[:2]
    dp_rank = request.global_offset[2] if len(request.global_offset) == 3 else request.replica_id
    return int(pp_rank), int(tp_rank), int(dp_rank)


class ResumingRank(NamedTuple):
    """A resuming rank as the restore rule needs it: where it sits (DP with CP), the job's (PP, TP), whether the run
    gathers its own states (and its restore indexes them as gathered), whether its DP ranks held one state (EP 1)."""

    pp_rank: int
    tp_rank: int
    dp_rank: int
    model_parallel: tuple[int, int]
    gathers: bool = False
    indexes_as_gathered: bool = True
    ranks_alike: bool = False


class Restore(NamedTuple):
    """Whose state a rank restores, and its index in the list the load hands (None: the restore picks)."""

    kind: str
    index: int | None = None


@dataclass(frozen=True)
class StoredRngLayout:
    """The shards of one RNG ShardedObject (``rng_state``, or a MIMO module's) a checkpoint holds."""

    checkpoint_dir: str
    key: str
    global_shape: tuple[int, ...]
    offsets: frozenset[tuple[int, ...]]
    fsdp_dtensor: bool = False

    @property
    def per_dp_rank(self) -> bool:
        return len(self.global_shape) == 3

    @property
    def axes(self) -> str:
        return "(pp, tp, dp)" if self.per_dp_rank else "(pp, tp)"

    def describe(self) -> str:
        if self.fsdp_dtensor:
            return f"in fsdp_dtensor entries by {self.axes}, spanning {self.global_shape}"
        return f"sharded by {self.axes}, global shape {self.global_shape}"

    def stored_offset(self, rank: ResumingRank, dp_rank: int | None = None) -> tuple[int, ...] | None:
        """The offset of the shard ``rank`` (or its ``dp_rank``) reads; None where the checkpoint holds none."""
        dp_rank = rank.dp_rank if dp_rank is None else dp_rank
        offset = (rank.pp_rank, rank.tp_rank, dp_rank) if self.per_dp_rank else (rank.pp_rank, rank.tp_rank)
        return offset if offset in self.offsets else None

    def restore(self, rank: ResumingRank, states: int | None = None) -> Restore:
        """Whose state ``rank`` restores from a list of ``states`` (None before the load): the rule the live loads and
        ``inspect`` share. After a TP or PP change no stored state is a rank's (Megatron seeds per TP and PP rank); a
        (pp, tp) list of every DP rank's state holds each rank's own; a list of one, the writer's (torch_dist) or one
        mixed from several ranks (fsdp_dtensor), which is each rank's own only where its DP ranks held one state."""
        if self.global_shape[:2] != rank.model_parallel or self.stored_offset(rank) is None:
            return Restore(FRESH)
        if self.per_dp_rank:
            return Restore(OWN, 0 if states == 1 else None)
        if states is not None and (states > 1 or rank.gathers):
            index = None if rank.gathers and rank.indexes_as_gathered else rank.dp_rank
            return Restore(OWN if rank.dp_rank < states else FRESH, index)
        alike = rank.ranks_alike or (rank.dp_rank == 0 and not self.fsdp_dtensor)
        return Restore(OWN if alike else SHARED)

    def requests_for(self, rank: ResumingRank, dp_size: int, data: object) -> dict[str, ShardedObject]:
        """A rank's requests: its own stored shard, and after a DP shrink those of ranks gone (a load covers all)."""
        requests = {}
        own = self._shard(rank, rank.dp_rank, data)
        if own is not None:
            requests[RNG_STATE_KEY] = own
        if self.per_dp_rank:
            for orphan_dp_rank in range(dp_size + rank.dp_rank, self.global_shape[2], dp_size):
                requests[f"{RNG_STATE_KEY}.of_dp_rank_{orphan_dp_rank}"] = self._shard(rank, orphan_dp_rank, data)
        return requests

    def _shard(self, rank: ResumingRank, dp_rank: int, data: object) -> ShardedObject | None:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        offset = self.stored_offset(rank, dp_rank)
        if offset is None:
            return None
        replica_id = 0 if self.per_dp_rank else dp_rank
        return ShardedObject(self.key, data, self.global_shape, offset, replica_id=replica_id)


METADATA_FILE = ".metadata"
# A shard key as pickle writes a short string: opcode SHORT_BINUNICODE, a length byte, then the text, which for
# an RNG key holds "rng_state/" or, for a MIMO module's, "rng_state." (after Megatron-LM's key prefix, if any).
_SHORT_STRING = b"\x8c"
_RNG_IN_KEY = re.compile(re.escape(RNG_STATE_KEY.encode()) + rb"[./]")
_SHARD_KEY = re.compile(rf"([^/]*{re.escape(RNG_STATE_KEY)}(?:\.[^/]+)?)/shard_(\d+(?:\.\d+)*)_(\d+(?:\.\d+)*)")
_FSDP_ENTRY = re.compile(r"\((\d+), (\d+)(?:, (\d+))?\)")
# A leaf of an fsdp_dtensor RNG entry as DCP names it: rng_state.{entry}.{index}.{source}[.{tracker name}].
_FSDP_LEAF_KEY = re.compile(rf"{re.escape(RNG_STATE_KEY)}\.({_FSDP_ENTRY.pattern})\.\d+\..+")


def _is_rng_key(key: str) -> bool:
    return bool(_SHARD_KEY.fullmatch(key) or _FSDP_LEAF_KEY.fullmatch(key))


def stored_rng_shard_keys(checkpoint_dir: str) -> set[str]:
    """The RNG shard keys in a torch_dist checkpoint's metadata (an fsdp_dtensor one's RNG leaves), found without
    unpickling it.

    torch's ``.metadata`` is one pickle of every tensor's metadata: unpickling it costs about 80 us per tensor
    (232 ms at 3,000 tensors), while the keys of the RNG shards (``rng_state/shard_{offset}_{shape}``, or
    ``rng_state.{module}/shard_...``, ``{key_prefix}rng_state/shard_...``) stand in it as plain strings that a scan
    of the bytes finds in milliseconds (4.3 ms at 30,000 tensors, reading the file included). Where the scan finds
    none, torch's own reader decides, so that a format the scan does not know costs time, never a wrong answer. Both
    read where the release does: ``msc://`` through the Multi-Storage Client, a file system path directly.
    """
    try:
        data = (checkpoint_path(checkpoint_dir) / METADATA_FILE).read_bytes()
    except StorageUnavailable as error:
        raise RngCheckpointError(str(error)) from None
    except OSError as error:
        why = error.strerror or str(error)
        raise RngCheckpointError(f"checkpoint {checkpoint_dir}: cannot read {METADATA_FILE}: {why}") from None
    if not _is_whole_pickle(data):
        raise RngCheckpointError(
            f"checkpoint {checkpoint_dir}: {METADATA_FILE} is truncated or corrupt ({len(data)} bytes, not a whole "
            "pickle), so nothing of this checkpoint can be loaded; resume from another checkpoint"
        )
    keys = {key for found in _RNG_IN_KEY.finditer(data) if (key := _pickled_key_around(data, found.start()))}
    return keys or _rng_shard_keys_read_by_torch(checkpoint_dir)


def _pickled_key_around(data: bytes, at: int) -> str | None:
    """The RNG key whose pickled short string holds position ``at``, found from its opcode; None where none."""
    floor = max(0, at - 256)
    start = data.rfind(_SHORT_STRING, floor, at)
    while start != -1:
        end = start + 2 + data[start + 1]
        if end > at:
            key = data[start + 2 : end].decode("utf-8", "replace")
            if _is_rng_key(key):
                return key
        start = data.rfind(_SHORT_STRING, floor, start)
    return None


_FRAME = 0x95  # pickle protocol 4 and later: FRAME, then the frame's length in 8 bytes, little-endian


def _is_whole_pickle(data: bytes) -> bool:
    """Whether ``data`` is a whole pickle: a walk over protocol 4's frame headers finds a cut anywhere."""
    if not (data.startswith(b"\x80") and data.endswith(b".")):
        return False
    position = 2
    while position < len(data) and data[position] == _FRAME:
        position += 9 + int.from_bytes(data[position + 1 : position + 9], "little")
    return position <= len(data)


def _rng_shard_keys_read_by_torch(checkpoint_dir: str) -> set[str]:
    try:
        reader = dcp_metadata_reader(checkpoint_dir)
    except ImportError:  # the checkpoint inspector runs without torch; the scan has answered
        return set()
    keys = reader.read_metadata().state_dict_metadata
    return {key for key in keys if _is_rng_key(key)}


def read_stored_layouts(checkpoint_dir: str) -> dict[str, StoredRngLayout]:
    """The RNG layouts ``checkpoint_dir`` stores, by key; UnknownRngLayout for shards that fit none known."""
    shards_by_key: dict[str, list[tuple[str, str]]] = {}
    fsdp_entries = set()
    for key in stored_rng_shard_keys(checkpoint_dir):
        shard = _SHARD_KEY.fullmatch(key)
        if shard is None:
            fsdp_entries.add(fsdp_entry_coordinates(_FSDP_LEAF_KEY.fullmatch(key).group(1)))
            continue
        object_key, offset, shape = shard.groups()
        shards_by_key.setdefault(object_key, []).append((offset, shape))
    layouts = {key: _layout(checkpoint_dir, key, shards) for key, shards in sorted(shards_by_key.items())}
    if fsdp_entries:
        layouts[RNG_STATE_KEY] = _fsdp_layout(checkpoint_dir, fsdp_entries)
    return layouts


def _fsdp_layout(checkpoint_dir: str, entries: set[tuple[int, ...]]) -> StoredRngLayout:
    """The entries a rank can read, its own ``(pp, tp, dp)`` ones, else the shared ``(pp, tp)`` ones, and their span."""
    own = {entry for entry in entries if len(entry) == 3}
    readable = own or entries
    shape = tuple(max(axis) + 1 for axis in zip(*readable, strict=True))
    return StoredRngLayout(checkpoint_dir, RNG_STATE_KEY, shape, frozenset(readable), fsdp_dtensor=True)


def _layout(checkpoint_dir: str, key: str, shards: list[tuple[str, str]]) -> StoredRngLayout:
    shapes = {_indices(shape) for _, shape in shards}
    offsets = frozenset(_indices(offset) for offset, _ in shards)
    shape = next(iter(shapes)) if len(shapes) == 1 else None
    if shape is None or len(shape) not in (2, 3) or any(not _inside(offset, shape) for offset in offsets):
        raise UnknownRngLayout(
            f"checkpoint {checkpoint_dir}: the metadata of '{key}' fits no known RNG layout "
            f"(shard shapes {sorted(shapes)}, expected one (pp, tp) or (pp, tp, dp) shape)"
        )
    return StoredRngLayout(checkpoint_dir, key, shape, offsets)


def _indices(text: str) -> tuple[int, ...]:
    return tuple(int(index) for index in text.split("."))


def _inside(offset: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(offset) == len(shape) and all(0 <= index < size for index, size in zip(offset, shape, strict=True))
