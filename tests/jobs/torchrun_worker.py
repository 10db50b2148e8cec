"""One worker of a job that torchrun starts: the rank job's body (rng_job.py) for this process's RANK.

Run as ``python -m torch.distributed.run --standalone --nproc-per-node N tests/jobs/torchrun_worker.py '<spec>'``.
Like a training script nobody edited, it never imports bridge_rng_patch; it reports whether the package was
imported before its own code ran (by ``bridge-rng-patch run``'s bootstrap). Each rank writes its report to
``{out}/rank{RANK}.json``.
"""

from __future__ import annotations

import sys

PACKAGE_IMPORTED_AT_START = "bridge_rng_patch" in sys.modules

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rng_job  # noqa: E402


def main(spec: dict) -> None:
    rank = int(os.environ["RANK"])
    try:
        importlib.import_module("megatron.bridge.training.checkpointing")
        report = rng_job.run_rank(rank, None, {**spec, "world": int(os.environ["WORLD_SIZE"]), "patched": False})
    except BaseException:
        report = {"rank": rank, "crash": traceback.format_exc()}
    report["package_imported_at_start"] = PACKAGE_IMPORTED_AT_START
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
