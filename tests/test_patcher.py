"""Applying, undoing and reporting, on the real releases' checkpointing module, each in a fresh interpreter."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_python

from tools.release_envs import RELEASES

RUNNER = RELEASES["bridge-0.2.0rc6"]

TARGETS = (
    "('get_rng_state', '_load_checkpoint_from_path', '_load_global_dist_base_checkpoint', '_load_base_checkpoint')"
)
PATCH_NAMES = (
    "save_sharding",
    "tracker_restore",
    "layout_load",
    "data_init_callbacks",
    "keep_restored",
    "resume_audit",
)
# Prints the patch states and, per patched attribute of Bridge's checkpointing module, whether it is wrapped.
PRINT_STATES_AND_WRAPPED = f"""
import json
print(json.dumps({{
    "states": [s.state for s in bridge_rng_patch.status("Megatron-Bridge")],
    "wrapped": [hasattr(getattr(checkpointing, name), "__wrapped__") for name in {TARGETS}],
}}))
"""


# Bridge 0.2.0rc6's decisions, in PATCHES order: it fires no data-init callbacks (they came in 0.5.0).
OLD_BRIDGE_STATES = ["applied", "applied", "applied", "not needed", "applied", "applied"]
APPLIED_ON_OLD_BRIDGE = tuple(
    name for name, state in zip(PATCH_NAMES, OLD_BRIDGE_STATES, strict=True) if state == "applied"
)
# With its checkpointing module alone imported: the patches whose wrappers go on its set-up and training step wait.
CHECKPOINTING_ONLY_STATES = [*OLD_BRIDGE_STATES[:4], "pending", "pending"]
SET_UP_MODULES = "import megatron.bridge.training.setup, megatron.bridge.training.train\n"


def _result(process) -> dict:
    assert process.returncode == 0, process.stderr[-4000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_importing_the_package_imports_neither_torch_nor_megatron():
    result = _result(
        run_python(
            RUNNER,
            """
            import json, sys
            import bridge_rng_patch
            heavy = sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'megatron', 'numpy'))
            print(json.dumps({'heavy': heavy, 'states': [s.state for s in bridge_rng_patch.status()]}))
            """,
        )
    )
    assert result == {"heavy": [], "states": ["pending"] * 24}  # every stack's patches wait for their imports


@pytest.mark.parametrize("order", ["package first", "bridge first"])
def test_patches_apply_whichever_is_imported_first(order):
    imports = ["import bridge_rng_patch", "import megatron.bridge.training.checkpointing as checkpointing"]
    if order == "bridge first":
        imports.reverse()
    result = _result(run_python(RUNNER, "\n".join(imports) + PRINT_STATES_AND_WRAPPED))
    assert result == {"states": CHECKPOINTING_ONLY_STATES, "wrapped": [True] * 4}


def test_repeated_imports_and_concurrent_threads_apply_each_patch_once():
    process = run_python(
        RUNNER,
        """
        import importlib, json, logging, threading
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        import bridge_rng_patch
        barrier = threading.Barrier(8)
        def race():
            barrier.wait()
            importlib.import_module("megatron.bridge.training.checkpointing")
            bridge_rng_patch.apply()
        threads = [threading.Thread(target=race) for _ in range(8)]
        [thread.start() for thread in threads]
        [thread.join() for thread in threads]
        import megatron.bridge.training.setup, megatron.bridge.training.train
        importlib.reload(bridge_rng_patch)
        bridge_rng_patch.apply()
        import megatron.bridge.training.checkpointing as checkpointing
        from megatron.core import tensor_parallel
        # Wrapped once: under each wrapper is the release's own function, not another wrapper.
        print(json.dumps({
            "inner": checkpointing.get_rng_state.__wrapped__.__module__,
            "inner_is_plain_function": type(checkpointing.get_rng_state.__wrapped__).__name__,
            # Three wrappers on the resume: the graph-safe restore, the audit around it, the resume watch outermost.
            "load_inner_is_plain_function": type(
                checkpointing._load_checkpoint_from_path.__wrapped__.__wrapped__.__wrapped__
            ).__name__,
            "tensor_parallel_outside_loads_is_megatron_cores": checkpointing.tensor_parallel is tensor_parallel,
        }))
        """,
    )
    result = _result(process)
    assert result == {
        "inner": "megatron.bridge.training.checkpointing",
        "inner_is_plain_function": "function",
        "load_inner_is_plain_function": "function",
        "tensor_parallel_outside_loads_is_megatron_cores": True,
    }
    for patch in APPLIED_ON_OLD_BRIDGE:
        assert process.stderr.count(f"{patch}: applied") == 1


def test_disable_environment_variable_leaves_bridge_untouched():
    result = _result(
        run_python(
            RUNNER,
            "import bridge_rng_patch\nimport megatron.bridge.training.checkpointing as checkpointing"
            + PRINT_STATES_AND_WRAPPED,
            extra_env={"BRIDGE_RNG_PATCH_DISABLE": "1"},
        )
    )
    assert result == {"states": ["disabled"] * 6, "wrapped": [False] * 4}


def test_undo_restores_the_exact_original_objects_and_apply_reapplies():
    result = _result(
        run_python(
            RUNNER,
            f"""
            import json
            import megatron.bridge.training.checkpointing as checkpointing
            originals = {{name: getattr(checkpointing, name) for name in {TARGETS}}}
            import bridge_rng_patch
            patched = [getattr(checkpointing, name) is not original for name, original in originals.items()]
            bridge_rng_patch.undo()
            restored = [getattr(checkpointing, name) is original for name, original in originals.items()]
            undone = [s.state for s in bridge_rng_patch.status("Megatron-Bridge")]
            bridge_rng_patch.apply()
            reapplied = [s.state for s in bridge_rng_patch.status("Megatron-Bridge")]
            print(json.dumps(dict(patched=patched, restored=restored, undone=undone, reapplied=reapplied)))
            """,
        )
    )
    assert result == {
        "patched": [True] * 4,
        "restored": [True] * 4,
        "undone": ["undone", "undone", "undone", "not needed", "undone", "undone"],
        "reapplied": CHECKPOINTING_ONLY_STATES,
    }


def test_undo_before_bridge_is_imported_keeps_it_unpatched():
    result = _result(
        run_python(
            RUNNER,
            "import bridge_rng_patch\nbridge_rng_patch.undo()\n"
            "import megatron.bridge.training.checkpointing as checkpointing" + PRINT_STATES_AND_WRAPPED,
        )
    )
    assert result == {"states": ["undone"] * 6, "wrapped": [False] * 4}


def test_unknown_code_is_refused_with_one_log_line_and_left_untouched():
    process = run_python(
        RUNNER,
        """
        import json, logging, sys, types
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        # A checkpointing module from some other fork: get_rng_state takes arguments no release has.
        unknown = types.ModuleType("megatron.bridge.training.checkpointing")
        def get_rng_state(seed, layout):
            return None
        unknown.get_rng_state = get_rng_state
        sys.modules[unknown.__name__] = unknown
        import bridge_rng_patch
        print(json.dumps({
            "states": [s.state for s in bridge_rng_patch.status("Megatron-Bridge")],
            "untouched": unknown.get_rng_state is get_rng_state,
        }))
        """,
    )
    refused = ["refused", "refused", "refused", "not needed", "refused", "refused"]
    assert _result(process) == {"states": refused, "untouched": True}
    refusals = [line for line in process.stderr.splitlines() if "refused" in line]
    assert refusals == [
        "bridge_rng_patch: Megatron-Bridge save_sharding: refused: unknown signature get_rng_state(seed, layout)",
        "bridge_rng_patch: Megatron-Bridge tracker_restore: refused: megatron.bridge.training.checkpointing lacks "
        "_load_checkpoint_from_path, tensor_parallel",
        "bridge_rng_patch: Megatron-Bridge layout_load: refused: megatron.bridge.training.checkpointing lacks "
        "_load_global_dist_base_checkpoint, get_checkpoint_name",
        "bridge_rng_patch: Megatron-Bridge keep_restored: refused: megatron.bridge.training.checkpointing lacks "
        "_load_checkpoint_from_path, _load_global_dist_base_checkpoint",
        "bridge_rng_patch: Megatron-Bridge resume_audit: refused: megatron.bridge.training.checkpointing lacks "
        "_load_checkpoint_from_path, _load_global_dist_base_checkpoint",
    ]


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        ("bridge-0.2.0rc6", OLD_BRIDGE_STATES),
        ("bridge-0.3.1", ["applied", "not needed", "applied", "not needed", "applied", "applied"]),
    ],
)
def test_cli_prints_each_patch_state_with_reason_and_versions(release, expected):
    process = run_python(RELEASES[release], "import runpy; runpy.run_module('bridge_rng_patch', run_name='__main__')")
    lines = process.stdout.splitlines()
    assert f"megatron-bridge {release.removeprefix('bridge-')}" in lines[0]
    rows = [line for line in lines if line.startswith(PATCH_NAMES)]
    assert [row.split()[0] for row in rows] == list(PATCH_NAMES)
    width = max(map(len, PATCH_NAMES))
    assert [row[width + 1 : width + 12].strip() for row in rows] == expected
    assert sum(line.strip().startswith("why: ") for line in lines) == len(PATCH_NAMES)
    # megatron-core before 0.17 ships no megatron.training: one line, and nothing else changes.
    assert lines[-3:] == [
        "Megatron-LM: megatron.training is not installed here: nothing to patch",
        "verl: verl is not installed here: nothing to patch",
        "ms-swift: swift is not installed here: nothing to patch",
    ]
    assert process.returncode == 0


# What the package decides beyond the three fixes on Bridge 0.2.0rc6 and 0.3.1 alike: neither fires data-init
# callbacks, both build their iterators after the load.
BEYOND_THE_FIXES = {
    "data_init_callbacks": [
        "not needed",
        "megatron.bridge.training.setup fires no on_data_init_start callbacks in this release",
    ],
    "keep_restored": [
        "pending",
        "waiting for megatron.bridge.training.setup, megatron.bridge.training.train to be imported; then: after a "
        "resume that restored RNG state, every source is put back after "
        "megatron.bridge.training.setup.setup_data_iterators",
    ],
    "resume_audit": [
        "pending",
        "waiting for megatron.bridge.training.train to be imported; then: after _load_checkpoint_from_path resumes RNG "
        "state, one small collective compares each rank's streams with what it was handed and with the other ranks'; "
        "rank 0 logs one line",
    ],
}


# A checkpointing module shaped like Megatron-Bridge main after 0.6.2 (Sep 2026), which no release has yet: its
# save shards by EP, its restore converts, and its dist load aligns the RNG request with the stored metadata.
BRIDGE_MAIN_SHAPE = """
from megatron.core import tensor_parallel


def get_rng_state(data_parallel_random_init, ckpt_format="torch_dist", *, pg_collection, module_name=None):
    ep_size = pg_collection.ep.size()


def _load_checkpoint_from_path(load_dir, state, model, optimizer, opt_param_scheduler):
    state_dict = {}
    if "rng_state" in state_dict:
        tensor_parallel.get_cuda_rng_tracker().set_states(
            {k: tensor_parallel.convert_cuda_rng_state(v, to_graphable=False) for k, v in {}.items()}
        )


def _align_rng_state_sharded_metadata(sharded_state_dict, checkpoint_name, load_strategy):
    return sharded_state_dict


def _load_global_dist_base_checkpoint(
    load_dir, ckpt_cfg, rank0, sharded_state_dict, iteration, release, checkpoint_path_override=None, *, pg_collection
):
    checkpoint_name = get_checkpoint_name(load_dir, iteration, release)
    sharded_state_dict = _align_rng_state_sharded_metadata(sharded_state_dict, checkpoint_name, None)


def get_checkpoint_name(load_dir, iteration, release):
    return load_dir


def _load_base_checkpoint(load_dir, ckpt_cfg, rank0=False, sharded_state_dict=None, *, pg_collection):
    return _load_global_dist_base_checkpoint(load_dir, ckpt_cfg, rank0, sharded_state_dict, 1, False)
"""


def test_a_release_whose_load_follows_the_stored_layout_needs_no_patch(tmp_path):
    """Decided from the code: its version number (main states 0.7.0 since before the change) cannot say."""
    (tmp_path / "bridge_main_checkpointing.py").write_text(BRIDGE_MAIN_SHAPE)
    process = run_python(
        RELEASES["bridge-0.3.1"],
        f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location(
            "megatron.bridge.training.checkpointing", {str(tmp_path / "bridge_main_checkpointing.py")!r}
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[spec.name] = module
        import bridge_rng_patch
        print(json.dumps({{s.name: [s.state, s.reason] for s in bridge_rng_patch.status("Megatron-Bridge")}}))
        """,
    )
    assert _result(process) == {
        "save_sharding": [
            "not needed",
            "upstream get_rng_state(data_parallel_random_init, ckpt_format, *, pg_collection, module_name) already "
            "writes every DP rank's RNG state",
        ],
        "tracker_restore": [
            "not needed",
            "upstream RNG restore already converts tracker states for the tracker in use",
        ],
        "layout_load": ["not needed", "upstream's load already asks for the RNG layout the checkpoint stores"],
        **BEYOND_THE_FIXES,
    }


def test_the_cli_example_in_the_docs_is_what_the_cli_prints():
    """docs/usage.md shows a real run on 0.2.0rc6; only the wrapt version on the first line may differ."""
    readme = (REPO / "docs" / "usage.md").read_text()
    block = readme[readme.index("```\nbridge_rng_patch 0.1.0; found ") + 4 :]
    shown = block[: block.index("```")].rstrip("\n").splitlines()
    process = run_python(RUNNER, "import runpy; runpy.run_module('bridge_rng_patch', run_name='__main__')")
    printed = process.stdout.rstrip("\n").splitlines()
    assert [line.rsplit(", wrapt ", 1)[0] for line in printed[:1]] == [
        line.rsplit(", wrapt ", 1)[0] for line in shown[:1]
    ]
    assert printed[1:] == shown[1:]


@pytest.mark.parametrize("command", [[], ["inspect"], ["run"]], ids=["main", "inspect", "run"])
def test_help_reads_in_an_80_column_terminal_without_markup(command):
    code = f"from bridge_rng_patch.__main__ import main; main({[*command, '--help']})"
    process = run_python(RUNNER, code, extra_env={"COLUMNS": "80"})
    assert process.returncode == 0, process.stderr
    assert "``" not in process.stdout
    too_wide = [line for line in process.stdout.splitlines() if len(line) > 80]
    assert not too_wide, too_wide


# The old release's three targets, compiled from text so that inspect cannot read their source: as an image that
# ships only bytecode. Their behaviour does not matter here, only what can be told of them.
WITHOUT_SOURCE = """
import sys, types
from megatron.core import tensor_parallel
module = types.ModuleType("megatron.bridge.training.checkpointing")
exec(compile('''
def get_rng_state(data_parallel_random_init, ckpt_format="torch_dist"):
    pass
def _load_checkpoint_from_path(load_dir, state, model, optimizer, opt_param_scheduler):
    pass
def _load_global_dist_base_checkpoint(load_dir, ckpt_cfg, rank0, sharded_state_dict, iteration, release):
    pass
def get_checkpoint_name(load_dir, iteration, release):
    return load_dir
def _load_base_checkpoint(load_dir, ckpt_cfg, rank0=False, sharded_state_dict=None):
    pass
''', "<no source>", "exec"), module.__dict__)
module.tensor_parallel = tensor_parallel
sys.modules[module.__name__] = module
import json, bridge_rng_patch
print(json.dumps({s.name: [s.state, s.reason] for s in bridge_rng_patch.status("Megatron-Bridge")}))
"""


def test_code_whose_source_cannot_be_read_is_decided_by_the_release_number():
    """The second signal, alone only where the first cannot be read: 0.2.0rc6 lacks all three fixes."""
    assert _result(run_python(RUNNER, WITHOUT_SOURCE)) == {
        "save_sharding": [
            "applied",
            "the source of get_rng_state is unavailable; Megatron-Bridge < 0.3.0 lacks the fix",
        ],
        "tracker_restore": [
            "applied",
            "the source of _load_checkpoint_from_path is unavailable; Megatron-Bridge < 0.3.0 lacks the fix",
        ],
        "layout_load": ["applied", "the load's source is unavailable; Megatron-Bridge < 0.7.0 lacks the fix"],
        **BEYOND_THE_FIXES,
    }


# A stack's package as a zip archive serves it (a zipapp, a PEX image): one zipimporter loads every module of the
# archive. A module shaped like ms-swift's megatron_lm_utils imports a sibling while it executes.
ZIPPED_STACK = {
    "swift/__init__.py": "",
    "swift/megatron/__init__.py": "",
    "swift/megatron/utils/__init__.py": "",
    "swift/megatron/utils/rng_helpers.py": "LOADED = True\n",
    "swift/megatron/utils/megatron_lm_utils.py": """
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from swift.megatron.utils import rng_helpers


def _get_rng_state(fsdp_dtensor=False, data_parallel_random_init=False):
    return ShardedObject("rng_state", [{}], (1, 1), (0, 0), replica_id=0)


def load_mcore_checkpoint(args, model, optimizer, checkpoint_dir):
    state_dict = dist_checkpointing.load({"rng_state": _get_rng_state()}, checkpoint_dir)
    tensor_parallel.get_cuda_rng_tracker().set_states(state_dict["rng_state"][0]["rng_tracker_states"])
""",
}


def test_a_stack_imported_from_a_zip_archive_gets_its_module_patched_and_no_other(tmp_path):
    import zipfile

    archive = tmp_path / "stack.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name, text in ZIPPED_STACK.items():
            zipped.writestr(name, text)
    process = run_python(
        RUNNER,
        f"""
        import json, logging, sys, zipimport
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        sys.path.insert(0, {str(archive)!r})
        import bridge_rng_patch
        import swift.megatron.utils.megatron_lm_utils as checkpointing
        from swift.megatron.utils import rng_helpers
        loader = checkpointing.__loader__
        print(json.dumps({{
            "states": [s.state for s in bridge_rng_patch.status("ms-swift")],
            "loaded_by_the_zip_importer": isinstance(loader, zipimport.zipimporter),
            "same_loader_for_the_sibling": rng_helpers.__loader__ is loader,
            "loader_edited": "exec_module" in vars(loader),
            "wrapped": hasattr(checkpointing._get_rng_state, "__wrapped__"),
        }}))
        """,
    )
    assert _result(process) == {
        "states": ["applied", "applied", "applied", "not needed", "pending", "pending"],
        "loaded_by_the_zip_importer": True,
        "same_loader_for_the_sibling": True,
        "loader_edited": False,
        "wrapped": True,
    }
    assert "refused" not in process.stderr


def test_disable_names_single_patches_and_the_status_says_so():
    process = run_python(
        RUNNER,
        "import json, logging\nlogging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "import bridge_rng_patch\nimport megatron.bridge.training.checkpointing as checkpointing\n"
        "print(json.dumps([s.reason for s in bridge_rng_patch.status('Megatron-Bridge')]))" + PRINT_STATES_AND_WRAPPED,
        extra_env={"BRIDGE_RNG_PATCH_DISABLE": "layout_load, resume_audit,no_such_patch"},
    )
    assert process.returncode == 0, process.stderr[-4000:]
    reasons = json.loads(process.stdout.splitlines()[-2])
    assert reasons[2] == reasons[5] == "BRIDGE_RNG_PATCH_DISABLE names it"
    # Both loads are wrapped by the resume watch alone, which the save and the keep act on.
    assert _result(process) == {
        "states": ["applied", "applied", "disabled", "not needed", "pending", "disabled"],
        "wrapped": [True, True, True, True],
    }
    assert (
        "bridge_rng_patch: BRIDGE_RNG_PATCH_DISABLE names 'no_such_patch', which is no patch of bridge_rng_patch "
        "(save_sharding, tracker_restore, layout_load, data_init_callbacks, keep_restored, resume_audit)"
        in process.stderr.splitlines()
    )


@pytest.mark.parametrize("value", ["0", "off", "false", ""])
def test_disable_set_to_off_disables_nothing(value):
    result = _result(
        run_python(
            RUNNER,
            "import bridge_rng_patch\nimport megatron.bridge.training.checkpointing as checkpointing"
            + PRINT_STATES_AND_WRAPPED,
            extra_env={"BRIDGE_RNG_PATCH_DISABLE": value},
        )
    )
    assert result == {"states": CHECKPOINTING_ONLY_STATES, "wrapped": [True] * 4}


# Wrappers on the training step, outermost first, and the states, after a set-up module without the function the keep
# wraps there is imported (a fork that renamed it): the keep is refused and its wrappers come off, the audit's stay.
SET_UP_WITHOUT_THE_BUILDER = """
import importlib, json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import bridge_rng_patch
import megatron.bridge.training.checkpointing, megatron.bridge.training.train as train
original = train.train_step.__wrapped__.__wrapped__
def wrappers(function):
    found = []
    while hasattr(function, "_self_wrapper"):
        found.append(getattr(function._self_wrapper, "__name__", type(function._self_wrapper).__name__))
        function = function.__wrapped__
    return found
before = wrappers(train.train_step)
sys.modules["megatron.bridge.training"].__path__.insert(0, {fork!r})
importlib.import_module("megatron.bridge.training.setup")
statuses = {{s.name: [s.state, s.reason] for s in bridge_rng_patch.status("Megatron-Bridge")}}
after = wrappers(train.train_step)
bridge_rng_patch.undo()
print(json.dumps({{"before": before, "after": after, "statuses": statuses, "undone": train.train_step is original}}))
"""


def test_a_set_up_module_without_the_function_a_patch_wraps_there_refuses_it_and_takes_its_wrappers_off(tmp_path):
    (tmp_path / "setup.py").write_text("def setup():\n    pass\n")
    process = run_python(RUNNER, SET_UP_WITHOUT_THE_BUILDER.format(fork=str(tmp_path)))
    result = _result(process)
    assert result["before"] == ["at_first_step", "MarkingFirstStep"]
    assert result["statuses"]["keep_restored"] == [
        "refused",
        "megatron.bridge.training.setup has no setup_data_iterators in this release",
    ]
    assert result["statuses"]["resume_audit"][0] == "applied"
    assert result["after"] == ["at_first_step"]  # taken out from under the audit's wrapper
    assert result["undone"]
    assert "keep_restored: refused: megatron.bridge.training.setup has no setup_data_iterators" in process.stderr
