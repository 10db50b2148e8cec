"""Megatron-Bridge releases that cannot be installed here, judged from the source their wheels ship.

Megatron-Bridge 0.4.0 and later need Python 3.12 and a megatron-core (0.17+) that has no build for the
Python 3.11 that the local torch wheel needs. The package decides from signatures and source, so their
``megatron/bridge/training/checkpointing.py`` is enough to see what it decides: the wheel is downloaded from
the registry and unpacked, and its module is rebuilt from the file with its top-level functions as written
(undecorated, annotations unevaluated, so nothing it imports is needed). The unpacked wheel goes first on
``PYTHONPATH``, so the package reads the release's own ``package_info`` for its version.
"""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

from tools.release_envs import BASE_PYTHON, ENVS_DIR

# Fixed releases on the registry that need Python 3.12.
PYTHON_312_RELEASES = ("0.4.0", "0.4.1", "0.4.2", "0.5.0", "0.5.1", "0.6.0", "0.6.2")
CHECKPOINTING = "megatron/bridge/training/checkpointing.py"

# Run with the unpacked wheel on PYTHONPATH: registers the rebuilt module, then imports the package.
DECIDE_FROM_SOURCE = f"""
import __future__, ast, importlib.util, json, sys, types
from pathlib import Path
bridge_dir = importlib.util.find_spec("megatron.bridge").submodule_search_locations[0]  # not executed
path = Path(bridge_dir).parent.parent / {CHECKPOINTING!r}
tree = ast.parse(path.read_text())
tree.body = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
for node in tree.body:
    node.decorator_list = []
module = types.ModuleType("megatron.bridge.training.checkpointing")
module.__file__ = str(path)
exec(compile(tree, str(path), "exec", flags=__future__.annotations.compiler_flag, dont_inherit=True), module.__dict__)
from megatron.core import tensor_parallel
module.tensor_parallel = tensor_parallel
module.get_checkpoint_name = getattr(module, "get_checkpoint_name", lambda *args, **kwargs: "")
targets = ("get_rng_state", "tensor_parallel", "_load_global_dist_base_checkpoint")
originals = {{name: getattr(module, name) for name in targets}}
sys.modules[module.__name__] = module
import bridge_rng_patch
print(json.dumps({{
    "states": {{s.name: s.state for s in bridge_rng_patch.status()}},
    "reasons": {{s.name: s.reason for s in bridge_rng_patch.status()}},
    "bridge_version": bridge_rng_patch.status()[0].versions["megatron-bridge"],
    "untouched": all(getattr(module, name) is original for name, original in originals.items()),
}}))
"""


def unpacked_wheel(version: str) -> Path:
    """The megatron-bridge ``version`` wheel from the registry, unpacked (cached under ``.venvs/wheels``)."""
    directory = ENVS_DIR / "wheels" / f"bridge-{version}"
    if (directory / CHECKPOINTING).is_file():
        return directory
    downloads = ENVS_DIR / "wheels" / "downloads"
    command = [str(BASE_PYTHON), "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps"]
    command += ["--python-version", "3.12", "--only-binary=:all:", "-d", str(downloads), f"megatron-bridge=={version}"]
    subprocess.run(command, check=True)
    wheel = next(downloads.glob(f"megatron_bridge-{version}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(directory)
    return directory
