"""What a user's own MoE run loses on a resume, and what the package gives back, on real Megatron-Bridge releases.

``python3 tools/demo.py`` builds the Python 3.11 environments of Megatron-Bridge 0.2.0rc6 and 0.3.1 if needed,
then runs their real ``save_checkpoint`` and ``load_checkpoint`` in gloo processes on the CPU (only CUDA calls
are faked), without and with ``import bridge_rng_patch``. Every rank seeds as the loop itself does and takes the
draws of 10 training steps, the same on every rank, each inside the real tracker's fork where a model forks it
(``tests/jobs/rng_job.py``: ``_training_steps``), then saves; a new job seeds afresh and resumes. A stream is
kept when the rank resumes it bit for bit as it was saved, so that its next step draws what an uninterrupted
run would.

1. 0.2.0rc6, 4 ranks with EP 2 (DP 4): the old save keeps one DP rank's state per (pp, tp); then the same with
   data_parallel_random_init.
2. 0.3.1, a fixed release, saved with DP 4 and resumed with DP 2.
3. No lock-in: the checkpoint 0.2.0rc6 saved with the package in 1, resumed by 0.2.0rc6 without it.
4. The first step: the resumes of 1 go on as Bridge's ``setup()`` goes on after its load (the real
   ``setup_data_iterators``), into the real ``train_step``: what each rank holds there, against the uninterrupted run.
5. Training through the resume: a tiny real megatron-core MoE model (``tests/jobs/trajectory.py``) on 0.2.0rc6 with
   megatron-core 0.16.1, 2 ranks at EP 2, 6 steps saved after step 3, then resumed: each rank's loss at steps 4 to 6,
   uninterrupted | unpatched | patched, and where each resume parts from the uninterrupted run.
"""

from __future__ import annotations

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.jobs import coordinates, lost_streams, run_job, saved_by_coordinates
from tools.release_envs import OLD_ON_NEWER_CORE, RELEASES, Release, ensure

OLD, FIXED = RELEASES["bridge-0.2.0rc6"], RELEASES["bridge-0.3.1"]
# Its forced router logits draw from the expert-parallel tracker from megatron-core 0.16 (on 0.15, from a generator of
# their own that no release checkpoints).
TRAINED = OLD_ON_NEWER_CORE
TRAJECTORY = {"world": 2, "tp": 1, "pp": 1, "ep": 2, "action": "train", "steps": 6, "iteration": 3, "first_step": True}
EP2_DP4 = {"world": 4, "tp": 1, "pp": 1, "ep": 2}
EP2_DP2 = {**EP2_DP4, "world": 2}
EXPERT_STREAM = "expert-parallel-rng"
# DP rank 0, whose state the old save keeps, is EP rank 0: the ranks of EP rank 1 lose their expert stream.
EP_RANK_1 = {1, 3}


class Demo:
    """Runs the jobs, two at a time (each job is about one core's work), and says whether each rank did what the
    text says it does."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.all_as_described = True

    def job(self, env: Release, name: str, action: str, layout: dict, checkpoint: str, **spec) -> list[dict]:
        checkpoint_dir = str(self.work / checkpoint)
        job_spec = {"action": action, "checkpoint_dir": checkpoint_dir, "seeding": "megatron", **layout, **spec}
        return run_job(env, job_spec, self.work, name)

    def save_and_resume(self, env: Release, name: str, **spec) -> tuple[list[dict], list[dict]]:
        """A save, and a resume that goes on to the first training step."""
        saved = self.job(env, f"{name}-save", "save", EP2_DP4, name, **spec)
        return saved, self.job(env, f"{name}-resume", "load", EP2_DP4, name, first_step=True, **spec)

    def resize(self) -> tuple[list[dict], dict[bool, list[dict]]]:
        """A fixed release's own checkpoint (the package steps aside from its save), resumed with DP 2."""
        saved = self.job(FIXED, "resize-save", "save", EP2_DP4, "resize", patched=False)
        resumes = {
            patched: self.job(FIXED, f"resize-{patched}", "load", EP2_DP2, "resize", patched=patched)
            for patched in (False, True)
        }
        return saved, resumes

    def trajectories(self) -> dict[bool, tuple[list[dict], list[dict]]]:
        """The tiny MoE model's run, saved after step 3, and its resume in new processes, unpatched and patched."""
        runs = {}
        for patched in (False, True):
            name = f"trajectory-{patched}"
            spec = {**TRAJECTORY, "checkpoint_dir": str(self.work / name), "patched": patched}
            uninterrupted = run_job(TRAINED, spec, self.work, name)
            runs[patched] = uninterrupted, run_job(TRAINED, {**spec, "resume": True}, self.work, f"{name}-resumed")
        return runs

    def as_described(self, expectation: bool) -> str:
        self.all_as_described &= expectation
        return "" if expectation else "  << NOT AS DESCRIBED"

    def print_same_layout(self, runs: dict[bool, tuple[list[dict], list[dict]]], expect_lost: set[int]) -> None:
        """Per rank: the streams lost, unpatched and patched; the next draw from the expert stream."""
        print(
            f"  {'rank':>4} {'dp':>3} {'ep':>3}   {'lost, unpatched':<27} {'lost, patched':<15}"
            "next expert-stream draw: uninterrupted | unpatched | patched"
        )
        for rank in range(EP2_DP4["world"]):
            lost, draws = {}, []
            for patched, (saved, resumed) in runs.items():
                saved_state = saved_by_coordinates(saved)[coordinates(resumed[rank])]
                resumed_state = resumed[rank]["loaded"]
                lost[patched] = lost_streams(saved_state, resumed_state)
                draws.append(resumed_state["next_expert"])
            uninterrupted = saved_state["next_expert"]
            shown = " | ".join(f"{draw:+.4f}" for draw in (uninterrupted, *draws))
            expected = lost[False] == ([EXPERT_STREAM] if rank in expect_lost else []) and not lost[True]
            coords = runs[True][1][rank]["coords"]
            print(
                f"  {rank:>4} {coords['dp']:>3} {coords['ep']:>3}   {', '.join(lost[False]) or 'nothing':<27} "
                f"{', '.join(lost[True]) or 'nothing':<15}{shown}{self.as_described(expected)}"
            )

    def print_without_the_package(self, upstream: list[dict], without: list[dict]) -> None:
        """Per rank: what it resumed from the package's checkpoint without the package, against what it resumed
        from the release's own checkpoint (step 1, unpatched)."""
        for mine, theirs in zip(without, upstream, strict=True):
            same = mine["error"] is None and mine["loaded"] == theirs["loaded"]
            what = "what it resumes from the release's own checkpoint" if same else "ANOTHER state, or none"
            print(f"  rank {mine['rank']} (dp {mine['coords']['dp']}) resumed {what}{self.as_described(same)}")

    def print_first_step(self, runs: dict[bool, tuple[list[dict], list[dict]]], expect_lost: set[int]) -> None:
        """Per rank: the streams that differ at the first step from the uninterrupted run's, unpatched and patched."""
        print(f"  {'rank':>4} {'dp':>3} {'ep':>3}   {'differ, unpatched':<40} {'differ, patched':<15}")
        for rank in range(EP2_DP4["world"]):
            differ = {}
            for patched, (saved, resumed) in runs.items():
                uninterrupted = saved_by_coordinates(saved)[coordinates(resumed[rank])]
                differ[patched] = lost_streams(uninterrupted, resumed[rank]["at_first_step"])
            draws = runs[False][1][rank]["torch_draws_past_restore"]
            named = [f"torch ({draws} draws on)" if name == "torch" else name for name in differ[False]]
            unpatched = ", ".join(named) or "nothing"
            expected_unpatched = {"torch", *([EXPERT_STREAM] if rank in expect_lost else [])}
            expected = set(differ[False]) == expected_unpatched and not differ[True]
            coords = runs[True][1][rank]["coords"]
            print(
                f"  {rank:>4} {coords['dp']:>3} {coords['ep']:>3}   {unpatched:<40} "
                f"{', '.join(differ[True]) or 'nothing':<15}{self.as_described(expected)}"
            )
        line = next((line for line in runs[True][1][0]["logs"] if "RNG first-step check" in line), "no line")
        print(f"\n   With the package, rank 0's log at the first step:\n   {line}")

    def print_losses(self, runs: dict[bool, tuple[list[dict], list[dict]]]) -> None:
        """Per rank and step after the resume, the loss of the uninterrupted run and of each resume (* where it parts
        from the uninterrupted run's), then whether the final weights are the uninterrupted run's."""
        print(f"  {'rank':>4} {'ep':>3} {'step':>4}   {'uninterrupted':<15}{'unpatched':<17}{'patched'}")
        uninterrupted = runs[True][0]
        for rank, run in enumerate(uninterrupted):
            resumed = {patched: runs[patched][1][rank] for patched in runs}
            for step in sorted(resumed[True]["losses"], key=int):
                shown = [f"{float.fromhex(run['losses'][step]):<14.9f}"]
                for patched in (False, True):
                    loss = resumed[patched]["losses"][step]
                    shown.append(f"{float.fromhex(loss):.9f}{' *' if loss != run['losses'][step] else '  '}   ")
                print(f"  {rank:>4} {run['coords']['ep']:>3} {step:>4}   {' '.join(shown)}")
            same = {patched: _trains_as(run, resumed[patched]) for patched in runs}
            print(
                f"  {'':>13}final weights: unpatched {'the same' if same[False] else 'DIFFERENT'}, patched "
                f"{'the same' if same[True] else 'DIFFERENT'}{self.as_described(same[True] and not same[False])}"
            )
        alike = [rank["losses"] for rank in runs[False][0]] == [rank["losses"] for rank in uninterrupted]
        verdict = "the same losses" if alike else "DIFFERENT"
        print(f"\n   The runs never interrupted, unpatched and patched: {verdict}{self.as_described(alike)}")

    def print_resize(self, saved: list[dict], resumes: dict[bool, list[dict]]) -> None:
        for patched, resumed in resumes.items():
            label = "with the package" if patched else "unpatched"
            errors = [rank["error"] for rank in resumed if rank["error"]]
            if errors:
                last_line = errors[0].strip().splitlines()[-1]
                expected = not patched and len(errors) == len(resumed)
                crashed = f"{len(errors)} of {len(resumed)} ranks crashed"
                print(f"  {label:<17} {crashed}: {last_line}{self.as_described(expected)}")
                continue
            for rank in resumed:
                own = not lost_streams(saved_by_coordinates(saved)[coordinates(rank)], rank["loaded"])
                state = "its own state, every stream" if own else "ANOTHER state"
                print(
                    f"  {label:<17} rank {rank['rank']} (dp {rank['coords']['dp']}) resumed {state}"
                    f"{self.as_described(patched and own)}"
                )
                label = ""


def _trains_as(uninterrupted: dict, resumed: dict) -> bool:
    """Whether a resumed rank's losses after the resume, and its final weights, are the uninterrupted run's."""
    losses = {step: loss for step, loss in uninterrupted["losses"].items() if step in resumed["losses"]}
    return resumed["losses"] == losses and resumed["weights"] == uninterrupted["weights"]


def main() -> int:
    for env in (OLD, FIXED, TRAINED):
        ensure(env)
    with tempfile.TemporaryDirectory() as work_dir, ThreadPoolExecutor(max_workers=2) as pool:
        demo = Demo(Path(work_dir))
        old = {
            patched: pool.submit(demo.save_and_resume, OLD, f"old-{patched}", patched=patched)
            for patched in (False, True)
        }
        random_init = {
            patched: pool.submit(
                demo.save_and_resume, OLD, f"random-init-{patched}", patched=patched, data_parallel_random_init=True
            )
            for patched in (False, True)
        }
        resize = pool.submit(demo.resize)
        trajectories = pool.submit(demo.trajectories)
        # Submitted once the save with the package (step 1) is written: the same release resumes it without the package.
        without = pool.submit(
            lambda: (
                old[True].result()
                and demo.job(OLD, "old-True-resume-unpatched", "load", EP2_DP4, "old-True", patched=False)
            )
        )
        print(
            f"1. Megatron-Bridge {OLD.bridge} (megatron-core {OLD.core}), 4 ranks: TP 1, PP 1, EP 2, DP 4. Seeded"
            " as Megatron seeds,\n   10 training steps, a save, then a resume in a new job.\n",
            flush=True,
        )
        demo.print_same_layout({patched: run.result() for patched, run in old.items()}, EP_RANK_1)
        print(
            f"\n   The old save writes DP rank 0's state for all 4 DP ranks. Megatron seeds every other stream alike"
            f"\n   on the DP ranks of one (pp, tp), so only {EXPERT_STREAM} is lost, on each rank whose EP rank"
            "\n   differs from DP rank 0's. It feeds random router logits (moe_router_force_load_balancing, with"
            "\n   megatron-core 0.16 and later) and any layer of your own that forks it.\n"
        )
        print("   With data_parallel_random_init (every stream seeded per DP rank; the save gathers all 4 ranks'):")
        demo.print_same_layout({patched: run.result() for patched, run in random_init.items()}, set())
        print("\n   Nothing is lost on a resume with the same layout, with or without the package.\n")
        print(
            f"2. Megatron-Bridge {FIXED.bridge} (megatron-core {FIXED.core}), a fixed release: saved with 4 ranks"
            " (EP 2, DP 4),\n   resumed with 2 (EP 2, DP 2).\n",
            flush=True,
        )
        demo.print_resize(*resize.result())
        print(
            f"\n3. No lock-in: the checkpoint {OLD.bridge} saved with the package in 1, resumed by {OLD.bridge} without"
            "\n   it (an image without the package). The package writes the release's own (pp, tp) shard, its list"
            "\n   holding every DP rank's state: the release reads its first entry, DP rank 0's, as its own.\n",
            flush=True,
        )
        demo.print_without_the_package(old[False].result()[1], without.result())
        print(
            "\n4. The first step: each resume of 1 goes on as Bridge's setup() does after its load. It builds the data"
            "\n   iterators (the real setup_data_iterators: each DataLoader's iter() draws its base seed from torch's"
            "\n   generator), then enters the real train_step. What each rank holds there, against what the"
            "\n   uninterrupted run holds at its step 11 (what it saved at step 10):\n"
        )
        demo.print_first_step({patched: run.result() for patched, run in old.items()}, EP_RANK_1)
        print(
            "\n5. Training through the resume: a tiny real MoE model (megatron-core's GPTModel, 4 experts top-2,"
            f"\n   random router logits, dropout, DDP, Adam) on Megatron-Bridge {TRAINED.bridge} with megatron-core"
            f"\n   {TRAINED.core}, 2 ranks (EP 2, DP 2), 6 steps, saved after step 3, resumed in new processes."
            "\n   Each rank's loss (* where it parts from the uninterrupted run's):\n",
            flush=True,
        )
        demo.print_losses(trajectories.result())
        print(
            "\n   On the CPU the device generator is torch's own, so the data iterators' base-seed draws after the load"
            "\n   move dropout too: unpatched, both ranks part at step 4. On a GPU they move a shuffled loader's order"
            "\n   instead, and EP rank 1, which lost its expert stream, parts first."
        )
    verdict = "as described" if demo.all_as_described else "NOT as described: see the rows marked"
    print(f"\nEvery rank, every stream: {verdict}.")
    return 0 if demo.all_as_described else 1


if __name__ == "__main__":
    sys.exit(main())
