"""The training stacks the package patches, the patches' names, and the upstream facts each patch decides by: where
each stack keeps what a patch wraps, how its functions are known, how it seeds, which releases have each fix, how its
saves look on disk. It only declares, like an OpenTelemetry instrumentor's ``instruments``, and costs nothing.
"""

from __future__ import annotations

from typing import NamedTuple

# Each patch's name is also the module that holds it (its ``plan(stack, watch)``); the first three are the fixes the
# release tables show. Applied in this order, each wrapping what those before it left, and undone in the reverse one.
SAVE_SHARDING, TRACKER_RESTORE, LAYOUT_LOAD = "save_sharding", "tracker_restore", "layout_load"
DATA_INIT_CALLBACKS, KEEP_RESTORED, RESUME_AUDIT = "data_init_callbacks", "keep_restored", "resume_audit"
PATCHES = {
    SAVE_SHARDING: "get_rng_state saves every DP rank's RNG state, in the release's own layout, when EP > 1",
    TRACKER_RESTORE: "the RNG restore converts tracker states to the form the tracker in use keeps",
    LAYOUT_LOAD: "the RNG load asks for the layout the checkpoint stores; the entry restored is checked first",
    DATA_INIT_CALLBACKS: "data-init callbacks fired after the load leave every RNG source as they found it",
    KEEP_RESTORED: "after a resume, building the data iterators (and re-seeds around them) leaves the restored state",
    RESUME_AUDIT: "after a resume, and again at its first training step, rank 0 logs whether every rank holds the RNG "
    "state it should",
}


class FixedIn(NamedTuple):
    """Which releases have one fix, by number: before ``possibly`` none; from ``known`` on all (None: none yet)."""

    possibly: str
    known: str | None = None


class LoadFunction(NamedTuple):
    """A load of checkpoint state, known by what it binds by name: its ``request``, what names the checkpoint
    (``checkpoint``: the argument that is its directory); ``returns_tuple``, as the Megatron loops' loads do."""

    path: str
    named_by: tuple[str, ...]
    request: str = "sharded_state_dict"
    checkpoint: str | None = None
    returns_tuple: bool = True


class OnDisk(NamedTuple):
    """How one save sits on disk: its directory, what records the run's sizes (``run_config``, else the ``args`` of its
    ``common_state``), where its RNG dist-checkpoint is, and what counts its DP ranks (``manifest``, ``model_dir``)."""

    iteration_dir: str = "iter_{:07d}"
    run_config: str | None = None
    common_state: str = "common.pt"
    args_mark: str | None = None
    rng_dirs: tuple[str, ...] = ()
    manifest: str | None = None
    model_dir: str | None = None


class Elsewhere(NamedTuple):
    """A function of another module of the stack (its set-up, its training step): the module and the path there."""

    module: str
    path: str


class BeforeFirstStep(NamedTuple):
    """What a stack runs between its restore and its ``first_step``: functions that draw or re-seed
    (``keeps_restored``), and where it fires data-init callbacks (upstream #5255 keeps the RNG state over them)."""

    keeps_restored: tuple[Elsewhere, ...]
    first_step: Elsewhere | None
    data_init_callbacks: Elsewhere | None = None
    callbacks_fired_in: str | None = None
    preserves_callbacks: str | None = None

    @property
    def modules(self) -> tuple[str, ...]:
        targets = (*self.keeps_restored, self.first_step, self.data_init_callbacks)
        return tuple(dict.fromkeys(target.module for target in targets if target is not None))


class Seeding(NamedTuple):
    """How far apart a stack's seeding puts each PP rank's seed, and each DP rank's with data_parallel_random_init."""

    pipeline: int
    data_parallel: int


# Megatron-LM's and Megatron-Bridge's ``_set_random_seed``: ``seed + 100 * pp`` (``+ 10 * dp``).
MEGATRON_SEEDING = Seeding(pipeline=100, data_parallel=10)


class TrainingLoop(NamedTuple):
    """A stack the package patches: ``get_rng_state`` (taking one of ``rng_state_first``, then any of
    ``rng_state_optional``) builds what a save writes; ``resume_function`` runs a resume, ``restore_function`` sets the
    RNG state; ``skip_rng_load`` is its switch that resumes without; ``version_from`` states its release in code."""

    name: str
    module: str
    package: str
    distribution: str
    get_rng_state: str
    rng_state_first: frozenset[str]
    rng_state_optional: frozenset[str]
    resume_function: str
    restore_function: str
    dist_load: LoadFunction
    fsdp_load: LoadFunction | None
    seeding: Seeding
    skip_rng_load: str
    fixed_in: dict[str, FixedIn]
    on_disk: OnDisk
    before_first_step: BeforeFirstStep = BeforeFirstStep((), None)
    optional_sources: frozenset[str] = frozenset()
    version_from: str | None = None


# The load of every format both Megatron loops have: fsdp_dtensor's is inside it (Megatron-LM) or below it (Bridge).
_MEGATRON_BASE_LOAD = LoadFunction("_load_base_checkpoint", named_by=("load_dir", "rank0"))
_MEGATRON_DIST_LOAD = LoadFunction(
    "_load_global_dist_base_checkpoint", named_by=("load_dir", "rank0", "iteration", "release")
)

BRIDGE = TrainingLoop(
    name="Megatron-Bridge",
    module="megatron.bridge.training.checkpointing",
    package="megatron.bridge",
    distribution="megatron-bridge",
    version_from="megatron.bridge",
    get_rng_state="get_rng_state",
    rng_state_first=frozenset({"data_parallel_random_init"}),
    rng_state_optional=frozenset({"ckpt_format", "pg_collection", "module_name"}),
    resume_function="_load_checkpoint_from_path",
    restore_function="_load_checkpoint_from_path",
    dist_load=_MEGATRON_DIST_LOAD,
    fsdp_load=_MEGATRON_BASE_LOAD,
    seeding=MEGATRON_SEEDING,
    skip_rng_load="checkpoint.load_rng=False",
    fixed_in={
        SAVE_SHARDING: FixedIn("0.3.0", "0.3.0"),
        TRACKER_RESTORE: FixedIn("0.3.0", "0.3.0"),
        LAYOUT_LOAD: FixedIn("0.7.0"),
    },
    on_disk=OnDisk(run_config="run_config.yaml"),
    # ``setup()`` loads the checkpoint, fires ``on_data_init_start`` (0.5.0 and later), then builds the iterators.
    before_first_step=BeforeFirstStep(
        keeps_restored=(Elsewhere("megatron.bridge.training.setup", "setup_data_iterators"),),
        first_step=Elsewhere("megatron.bridge.training.train", "train_step"),
        data_init_callbacks=Elsewhere("megatron.bridge.training.callbacks", "CallbackManager.fire"),
        callbacks_fired_in="megatron.bridge.training.setup",
        preserves_callbacks="_preserve_rng_state",
    ),
)
# Megatron-LM's own loop (``megatron.training``), from the megatron-core wheels or a source tree.
MEGATRON_LM = TrainingLoop(
    name="Megatron-LM",
    module="megatron.training.checkpointing",
    package="megatron.training",
    distribution="megatron-core",
    version_from="megatron.core",
    get_rng_state="get_rng_state",
    rng_state_first=frozenset({"ckpt_format", "use_dist_ckpt"}),
    rng_state_optional=frozenset({"tp_group", "pp_group", "dp_cp_group", "dp_group", "key_prefix"}),
    resume_function="load_checkpoint",
    restore_function="load_checkpoint",
    dist_load=_MEGATRON_DIST_LOAD,
    fsdp_load=_MEGATRON_BASE_LOAD,
    seeding=MEGATRON_SEEDING,
    skip_rng_load="--no-load-rng",
    fixed_in={
        SAVE_SHARDING: FixedIn("0.20.0"),
        TRACKER_RESTORE: FixedIn("0.16.0", "0.16.0"),
        LAYOUT_LOAD: FixedIn("0.20.0"),
    },
    on_disk=OnDisk(),
    # ``pretrain()`` loads in ``setup_model_and_optimizer``, then builds the iterators.
    before_first_step=BeforeFirstStep(
        keeps_restored=(Elsewhere("megatron.training.training", "build_train_valid_test_data_iterators"),),
        first_step=Elsewhere("megatron.training.training", "train_step"),
    ),
)
# verl's Megatron checkpoint manager: the RNG state is a method of the manager, loaded from a dist-checkpoint of its
# own through verl's ``load_dist_checkpointing`` and restored by ``load_rng_states``; verl seeds every rank alike.
VERL = TrainingLoop(
    name="verl",
    module="verl.utils.checkpoint.megatron_checkpoint_manager",
    package="verl",
    distribution="verl",
    get_rng_state="MegatronCheckpointManager.get_rng_state",
    rng_state_first=frozenset({"use_dist_ckpt"}),
    rng_state_optional=frozenset({"data_parallel_random_init"}),
    resume_function="MegatronCheckpointManager.load_checkpoint",
    restore_function="MegatronCheckpointManager.load_rng_states",
    dist_load=LoadFunction("load_dist_checkpointing", ("ckpt_dir",), checkpoint="ckpt_dir", returns_tuple=False),
    fsdp_load=None,
    seeding=Seeding(pipeline=0, data_parallel=0),
    skip_rng_load="checkpoint.load_contents without 'extra' (verl 0.4 and 0.5: save_contents too)",
    fixed_in={SAVE_SHARDING: FixedIn("0.9.2"), TRACKER_RESTORE: FixedIn("0.9.2"), LAYOUT_LOAD: FixedIn("0.9.2")},
    on_disk=OnDisk(
        iteration_dir="global_step_{}",
        run_config="transformer_config.json",
        rng_dirs=("extra/dist_ckpt", "dist_ckpt"),
        manifest="ckpt_contents.json",
        model_dir="model/dist_ckpt",
    ),
    optional_sources=frozenset({"cuda_rng_state"}),
)
# ms-swift's own Megatron loop in ``megatron_lm_utils``, which loads through megatron-core's ``dist_checkpointing.load``
# and its own fsdp_dtensor module; seeded by mcore_bridge's ``set_random_seed`` (``seed + 1009 * pp``, ``+ 11 * dp``).
MS_SWIFT = TrainingLoop(
    name="ms-swift",
    module="swift.megatron.utils.megatron_lm_utils",
    package="swift",
    distribution="ms-swift",
    get_rng_state="_get_rng_state",
    rng_state_first=frozenset({"fsdp_dtensor"}),
    rng_state_optional=frozenset({"data_parallel_random_init"}),
    resume_function="load_mcore_checkpoint",
    restore_function="load_mcore_checkpoint",
    dist_load=LoadFunction(
        "dist_checkpointing.load", ("checkpoint_dir",), checkpoint="checkpoint_dir", returns_tuple=False
    ),
    fsdp_load=LoadFunction(
        "fsdp_checkpoint.load_checkpoint",
        ("checkpoint_dir",),
        request="state_dict",
        checkpoint="checkpoint_dir",
        returns_tuple=False,
    ),
    seeding=Seeding(pipeline=1009, data_parallel=11),
    skip_rng_load="--no_load_rng true",
    fixed_in={SAVE_SHARDING: FixedIn("4.7.0"), TRACKER_RESTORE: FixedIn("4.7.0"), LAYOUT_LOAD: FixedIn("4.7.0")},
    on_disk=OnDisk(args_mark="mcore_model"),
    # The trainer loads in its constructor; ``train()`` sets GRPO's and GKD's resampling iterator up between two
    # re-seeds (``seed + 1``, then ``seed``), then builds the iterators.
    before_first_step=BeforeFirstStep(
        keeps_restored=(
            Elsewhere("swift.megatron.trainers.base", "BaseMegatronTrainer._prepare_data_iterator"),
            Elsewhere("swift.megatron.trainers.grpo_trainer", "MegatronGRPOTrainer._init_resample_data_iterator"),
            Elsewhere("swift.megatron.trainers.gkd_trainer", "MegatronGKDTrainer._init_resample_data_iterator"),
        ),
        first_step=Elsewhere("swift.megatron.trainers.base", "BaseMegatronTrainer.train_step"),
    ),
)
LOOPS = (BRIDGE, MEGATRON_LM, VERL, MS_SWIFT)
