"""Seconds per training step of each stage of the built-in recipe (prunebench/builtin.py), measured
on a few steps of each from a fresh model, 2 threads. To compare two commits, check the other one
out beside this tree and pass its root:

    git worktree add /tmp/old <commit> && python experiments/stage_times.py /tmp/old
    python experiments/stage_times.py

Step costs barely depend on the weights (sequence lengths do not), so a fresh model's steps cost
what a full run's do; only the language stage's thinned steps grow with the curriculum's share of
background patches, and the 8 measured here are its first (fewest) ones."""

import sys
import time

if len(sys.argv) > 1:  # import prunebench from that tree (prunebench.tasks stays this install's)
    sys.path.insert(0, sys.argv[1])

import torch
from rich.console import Console

from prunebench import builtin

STEPS = {"reader": 30, "vision": 8, "projector": 10, "language": 16}


def main() -> None:
    torch.set_num_threads(2)
    recipe = builtin.Recipe(vision_steps=STEPS["vision"], projector_steps=STEPS["projector"],
                            language_steps=STEPS["language"], distractors_full=0.5, eval_every=10**6)
    trainer = builtin.Trainer(recipe, Console(stderr=True, quiet=True))
    trainer.model.train()
    world = builtin.world
    seconds = {}
    for phase, example in (("existence", lambda i: world.existence_example(0, i, turns=6)),
                           ("quota", lambda i: world.quota_example(0, i, turns=6))):
        start = time.perf_counter()
        trainer._reader_phase(phase, STEPS["reader"], example)
        seconds[phase] = (time.perf_counter() - start) / STEPS["reader"]
    for stage, run in (("vision", trainer.train_vision), ("projector", trainer.train_projector)):
        start = time.perf_counter()
        run()
        seconds[stage] = (time.perf_counter() - start) / STEPS[stage]
    trainer.probe = lambda: None  # a language step here is the step alone
    trainer.train_language()
    log = [e for e in trainer.log if e["stage"] == "language"]
    half = STEPS["language"] // 2  # thinned inputs, then the full input (distractors_full 0.5)
    seconds["language thinned"] = (log[half - 1]["seconds"] - log[0]["seconds"]) / (half - 1)
    seconds["language full"] = (log[-1]["seconds"] - log[half]["seconds"]) / (half - 1)
    print(builtin.__file__)
    for name, value in seconds.items():
        print(f"{name:18s} {value:.3f} s/step")


if __name__ == "__main__":
    main()
