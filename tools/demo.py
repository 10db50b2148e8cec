"""Show the fix on a real old release: save and resume a 4-rank EP=2 job, without and with the package.

``python3 tools/demo.py``: builds the Megatron-Bridge 0.2.0rc6 environment if needed, then runs the real
``save_checkpoint`` and ``load_checkpoint`` in 4 gloo processes (TP 1, PP 1, EP 2, DP 4), twice: unpatched
and with ``import bridge_rng_patch``. Per rank it prints the next draw of the expert-parallel RNG stream and
of python's ``random`` when the checkpoint was saved and after the resume. Only CUDA calls are faked, on CPU.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.jobs import run_job
from tools.release_envs import RELEASES, ensure

ENV = RELEASES["bridge-0.2.0rc6"]
LAYOUT = {"world": 4, "tp": 1, "pp": 1, "ep": 2}


def _save_and_resume(work: Path, patched: bool) -> tuple[list[dict], list[dict]]:
    name = "patched" if patched else "unpatched"
    checkpoint = {"checkpoint_dir": str(work / name), "patched": patched, **LAYOUT}
    saved = run_job(ENV, {"action": "save", **checkpoint}, work, f"{name}-save")
    resumed = run_job(ENV, {"action": "load", **checkpoint}, work, f"{name}-load")
    return saved, resumed


def _cell(saved: dict, resumed: dict, key: str) -> str:
    mark = "ok " if resumed[key] == saved[key] else "LOST"
    return f"{resumed[key]:.6f} {mark}"


def main() -> int:
    ensure(ENV)
    print(f"megatron-bridge {ENV.bridge}, megatron-core {ENV.core}; 4 ranks, TP 1, PP 1, EP 2, DP 4", flush=True)
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        runs = {patched: _save_and_resume(work, patched) for patched in (False, True)}
    stored = {patched: runs[patched][0][0]["stored_keys"] for patched in runs}
    print(f"RNG shards written, unpatched: {stored[False]}")
    print(f"RNG shards written, patched:   {stored[True]}\n")
    header = (
        f"{'rank':>4} {'dp':>2} {'ep':>2}  {'stream':<8} {'at save':>9}  "
        f"{'resumed, unpatched':>20}  {'resumed, patched':>18}"
    )
    print(header)
    print("-" * len(header))
    all_kept, any_lost_unpatched = True, False
    for rank in range(LAYOUT["world"]):
        for stream, key in (("expert", "next_expert"), ("random", "next_random")):
            saved_unpatched, resumed_unpatched = runs[False][0][rank]["saved"], runs[False][1][rank]["loaded"]
            saved_patched, resumed_patched = runs[True][0][rank]["saved"], runs[True][1][rank]["loaded"]
            coords = runs[True][1][rank]["coords"]
            unpatched_cell = _cell(saved_unpatched, resumed_unpatched, key)
            patched_cell = _cell(saved_patched, resumed_patched, key)
            print(
                f"{rank:>4} {coords['dp']:>2} {coords['ep']:>2}  {stream:<8} {saved_patched[key]:>9.6f}  "
                f"{unpatched_cell:>20}  {patched_cell:>18}"
            )
            all_kept &= resumed_patched == saved_patched
            any_lost_unpatched |= resumed_unpatched != saved_unpatched
    print(
        "\nunpatched: every rank resumes DP rank 0's streams (only its state was written);"
        "\npatched:   every rank resumes its own streams, bit-exact (every RNG source compared)."
    )
    return 0 if all_kept and any_lost_unpatched else 1


if __name__ == "__main__":
    sys.exit(main())
