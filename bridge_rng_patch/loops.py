"""The training loops whose checkpointing the package patches, and the upstream facts each patch decides by.

Like an OpenTelemetry instrumentor's ``instruments``, this only declares: where each loop keeps its
checkpointing code, how its functions are known, and which release numbers have each fix (the second signal,
after the code itself). Importing it costs nothing: ``import bridge_rng_patch`` needs it for its import hook.
"""

from __future__ import annotations

from typing import NamedTuple

SAVE_SHARDING, TRACKER_RESTORE, LAYOUT_LOAD = "save_sharding", "tracker_restore", "layout_load"


class FixedIn(NamedTuple):
    """Which releases have one fix, by their version number alone: releases before ``possibly`` lack it;
    ``known`` and later have it (None: no release is known to)."""

    possibly: str
    known: str | None = None


class TrainingLoop(NamedTuple):
    """A training loop whose checkpointing module the package patches.

    ``rng_state_first`` is the first parameter of its ``get_rng_state`` (one per family of releases),
    ``rng_state_optional`` those its releases add after it; ``restore_function`` restores the loaded RNG state;
    ``load_function`` loads a checkpoint in every format, given what to load as ``sharded_state_dict``;
    ``distribution`` states the release number.
    """

    name: str
    module: str
    distribution: str
    restore_function: str
    load_function: str
    rng_state_first: frozenset[str]
    rng_state_optional: frozenset[str]
    fixed_in: dict[str, FixedIn]

    @property
    def package(self) -> str:
        """Its training package, whose absence means there is nothing of this loop to patch."""
        return self.module.rsplit(".", 1)[0]


BRIDGE = TrainingLoop(
    name="Megatron-Bridge",
    module="megatron.bridge.training.checkpointing",
    distribution="megatron-bridge",
    restore_function="_load_checkpoint_from_path",
    load_function="_load_base_checkpoint",
    rng_state_first=frozenset({"data_parallel_random_init"}),
    rng_state_optional=frozenset({"ckpt_format", "pg_collection", "module_name"}),
    fixed_in={
        # EP-aware sharding and the graph-safe restore came with PR #2092 in 0.3.0. No release up to 0.6.2 asks for
        # the RNG layout a checkpoint stores; main does since Sep 2026, and has stated 0.7.0 since Aug 2026. The
        # fsdp_dtensor load ignores RNG state after a TP or PP change from 0.6.0 (#5100): layout_load reads that from
        # the load's code.
        SAVE_SHARDING: FixedIn("0.3.0", "0.3.0"),
        TRACKER_RESTORE: FixedIn("0.3.0", "0.3.0"),
        LAYOUT_LOAD: FixedIn("0.7.0"),
    },
)
# Megatron-LM's own loop (``megatron.training``), in the megatron-core wheels from 0.17 on and in source trees before
# them: get_rng_state(use_dist_ckpt) up to core_v0.11, (ckpt_format) from 0.12, (ckpt_format, tp_group, pp_group)
# from 0.16, and 0.19 adds dp_cp_group, dp_group, key_prefix.
MEGATRON_LM = TrainingLoop(
    name="Megatron-LM",
    module="megatron.training.checkpointing",
    distribution="megatron-core",
    restore_function="load_checkpoint",
    load_function="_load_base_checkpoint",
    rng_state_first=frozenset({"ckpt_format", "use_dist_ckpt"}),
    rng_state_optional=frozenset({"tp_group", "pp_group", "dp_cp_group", "dp_group", "key_prefix"}),
    fixed_in={
        # Per-rank RNG sharding (#6858, Aug 2026) and a stored-layout load are in no release up to 0.19.2, the newest
        # read; the restore converts tracker states from 0.16 (PR #2641), before megatron.training shipped.
        SAVE_SHARDING: FixedIn("0.20.0"),
        TRACKER_RESTORE: FixedIn("0.16.0", "0.16.0"),
        LAYOUT_LOAD: FixedIn("0.20.0"),
    },
)
LOOPS = (BRIDGE, MEGATRON_LM)
