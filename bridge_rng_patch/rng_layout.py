"""The two layouts of the ``rng_state`` ShardedObject in a torch_dist checkpoint, and how to read one back.

- per (pp, tp): global shape ``(pp, tp)``, the DP rank as ``replica_id``; one list per (pp, tp) is written (by DP
  rank 0). A save without the EP-aware fix writes it always; one with it, when EP == 1. The list holds the writer's
  state alone, or every DP rank's: with ``data_parallel_random_init`` (in DP order), and under EP > 1 with this
  package (in the order of DP with context parallel). Its first entry is the writer's either way.
- per (pp, tp, dp): global shape ``(pp, tp, dp)``, ``replica_id`` 0; every DP rank's state is written.
  A save with the fix writes it when EP > 1 (Megatron-Bridge 0.3.0 and later), and so did earlier saves with this
  package.

MegatronMIMO checkpoints keep one such object per module, keyed ``rng_state.{module_name}``, and Megatron-LM can
prefix the key (``{key_prefix}rng_state``); each key has a layout of its own. A checkpoint's stored layout, not the
running configuration, decides which shard a rank can read back.

fsdp_dtensor checkpoints (torch DCP) keep the RNG state as a dict of lists instead, which DCP stores leaf by leaf
(``rng_state.{entry}.{index}.{source}``) with one writer per leaf: the entry ``(pp, tp)`` that every release
writes keeps one rank's leaves, mixed across ranks; this package adds each rank's own entry ``(pp, tp, dp)`` beside
it under EP > 1. The same layouts describe both: entries by (pp, tp) or by (pp, tp, dp).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bridge_rng_patch.storage import StorageUnavailable, checkpoint_path, dcp_metadata_reader

if TYPE_CHECKING:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

RNG_STATE_KEY = "rng_state"


def nothing_restored(skip_rng_load: str) -> str:
    """What a load that fails on RNG state adds: nothing of it was restored, and the stack's own switch (``loops``
    declares it) that resumes without it."""
    return f"no RNG state was restored; resume with {skip_rng_load} to start from fresh RNG state"


# Whose RNG state a rank restores: the state stored for its own coordinates, the one state stored for its (pp, tp)
# (another rank's: the checkpoint holds none per rank), or its own fresh state (none is stored for it).
OWN, SHARED, FRESH = "own state", "shared state", "fresh state"


class RngCheckpointError(RuntimeError):
    """A checkpoint's RNG state cannot be restored as stored; the message names the checkpoint and the key."""


class UnknownRngLayout(RngCheckpointError):
    """A checkpoint's RNG shards fit no layout this package knows; a load adds the stack's switch to resume without
    them."""


def fsdp_entry(*coordinates: int) -> str:
    """The key of an fsdp_dtensor RNG entry: ``"(pp, tp)"`` as the releases write it, ``"(pp, tp, dp)"`` per rank."""
    return f"({', '.join(str(index) for index in coordinates)})"


def fsdp_entry_coordinates(entry: object) -> tuple[int, ...] | None:
    """(pp, tp) or (pp, tp, dp) from an fsdp_dtensor RNG entry's key; None for any other key."""
    match = _FSDP_ENTRY.fullmatch(entry) if isinstance(entry, str) else None
    return None if match is None else tuple(int(index) for index in match.groups() if index is not None)


def with_own_fsdp_entry(by_pp_tp: dict, dp_rank: int) -> dict:
    """fsdp_dtensor's RNG dict with this rank's states also under an entry of its own, ``(pp, tp, dp)``.

    DCP keeps one writer per leaf of the shared ``(pp, tp)`` entry; a key per rank has one writer, the rank
    itself. The shared entry stays, so a release without this package reads the checkpoint as it reads its
    own. A list gathered with data_parallel_random_init already holds every DP rank's state and is left alone.
    """
    if len(by_pp_tp) != 1:
        return by_pp_tp
    ((entry, states),) = by_pp_tp.items()
    coordinates = fsdp_entry_coordinates(entry)
    if coordinates is None or len(coordinates) != 2 or not isinstance(states, list) or len(states) != 1:
        return by_pp_tp
    by_pp_tp[fsdp_entry(*coordinates, dp_rank)] = states
    return by_pp_tp


@dataclass(frozen=True)
class RankCoordinates:
    """Where a rank sits for RNG purposes, as its own load request tells."""

    pp_rank: int
    tp_rank: int
    dp_rank: int

    @classmethod
    def of_request(cls, request: ShardedObject) -> RankCoordinates:
        pp_rank, tp_rank = request.global_offset[:2]
        # A (pp, tp) request carries the DP rank (with context parallel) as its replica id.
        dp_rank = request.global_offset[2] if len(request.global_offset) == 3 else request.replica_id
        return cls(int(pp_rank), int(tp_rank), int(dp_rank))


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

    def stored_offset(self, pp_rank: int, tp_rank: int, dp_rank: int) -> tuple[int, ...] | None:
        """The offset of the shard a rank at these coordinates reads; None where the checkpoint holds none."""
        offset = (pp_rank, tp_rank, dp_rank) if self.per_dp_rank else (pp_rank, tp_rank)
        return offset if offset in self.offsets else None

    def restores(
        self,
        rank: RankCoordinates,
        model_parallel: tuple[int, int],
        gathered: int | None = None,
        ranks_alike: bool = False,
    ) -> str:
        """Whose state a rank at ``rank``'s coordinates restores (``OWN``, ``SHARED`` or ``FRESH``), in a job of
        ``model_parallel`` (PP, TP) sizes: the one rule the stored-layout load and the inspector share.

        After a TP or PP change no stored state belongs to a running rank (Megatron seeds the model-parallel stream
        per TP rank, every source per PP stage): every rank keeps fresh state. A (pp, tp) entry holds the states of
        ``gathered`` DP ranks where they were gathered (``data_parallel_random_init``, or this package's save under
        EP > 1), each rank's own; else one
        state, DP rank 0's in torch_dist (its writer, replica 0) and mixed from several ranks' leaves in fsdp_dtensor,
        which is each rank's own only where the DP ranks of a (pp, tp) held one state (``ranks_alike``: EP 1).
        """
        if self.global_shape[:2] != tuple(model_parallel):
            return FRESH
        if self.stored_offset(rank.pp_rank, rank.tp_rank, rank.dp_rank) is None:
            return FRESH
        if self.per_dp_rank:
            return OWN
        if gathered is not None:
            return OWN if rank.dp_rank < gathered else FRESH
        return OWN if ranks_alike or (rank.dp_rank == 0 and not self.fsdp_dtensor) else SHARED

    def requests_for(self, rank: RankCoordinates, dp_size: int, data: object) -> dict[str, ShardedObject]:
        """The load requests of ``rank`` in a job of ``dp_size`` DP ranks, by state-dict key.

        Its own stored shard (none when the checkpoint holds none for it) under ``rng_state``; after a DP
        shrink, also the shards of DP ranks that no longer exist, since dist_checkpointing requires a load
        to cover every stored shard of a ShardedObject. Those extra states are read and dropped.
        """
        requests = {}
        own = self._shard(rank, rank.dp_rank, data)
        if own is not None:
            requests[RNG_STATE_KEY] = own
        if self.per_dp_rank:
            for orphan_dp_rank in range(dp_size + rank.dp_rank, self.global_shape[2], dp_size):
                requests[f"{RNG_STATE_KEY}.of_dp_rank_{orphan_dp_rank}"] = self._shard(rank, orphan_dp_rank, data)
        return requests

    def _shard(self, rank: RankCoordinates, dp_rank: int, data: object) -> ShardedObject | None:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        offset = self.stored_offset(rank.pp_rank, rank.tp_rank, dp_rank)
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
    """The RNG shard key whose pickled short string holds position ``at``, found by walking back to its opcode
    (a key prefix puts it further back); None where none does. A literal search finds the few RNG keys among
    thousands of tensor keys faster than a pattern anchored at every short string's opcode."""
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
    """Whether ``data`` is a whole pickle, told without unpickling it.

    A pickle ends with STOP ("."), but a cut one may end with a "." of its own (torch's keys are full of them).
    Protocol 4 and later (torch writes 4) put the opcodes in frames that state their length, so a walk over
    the frame headers finds a cut anywhere; where a frame is followed by unframed data (a large object), what
    follows is judged by its last byte only.
    """
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


def layouts_of_keys(checkpoint_dir: str, keys: set[str]) -> dict[str, StoredRngLayout]:
    """The layout of each RNG object the shard keys (or fsdp_dtensor leaves) describe, by its key;
    RngCheckpointError for shards of an object that fit no known layout."""
    shards_by_key: dict[str, list[tuple[str, str]]] = {}
    fsdp_entries = set()
    for key in keys:
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
    """The entries a rank can read: its own ``(pp, tp, dp)`` ones where the checkpoint has them, else the
    shared ``(pp, tp)`` ones; the extent of each axis is what the entries span."""
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


def read_stored_layouts(checkpoint_dir: str) -> dict[str, StoredRngLayout]:
    """The RNG layouts stored in ``checkpoint_dir``, by key: ``rng_state``, and a MIMO checkpoint's
    ``rng_state.{module}`` keys; empty when it stores no RNG state."""
    return layouts_of_keys(checkpoint_dir, stored_rng_shard_keys(checkpoint_dir))


def _indices(text: str) -> tuple[int, ...]:
    return tuple(int(index) for index in text.split("."))


def _inside(offset: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(offset) == len(shape) and all(0 <= index < size for index, size in zip(offset, shape, strict=True))
