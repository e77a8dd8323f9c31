"""`prunebench draw-task`: write a generated task's evaluation set drawn with another seed, to run with
``prunebench run --task-data NAME=PATH`` (does a ranking hold on other questions?)."""

from __future__ import annotations

import argparse

from prunebench.tasks import GENERATED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=list(GENERATED), help="the generated task to draw")
    parser.add_argument("--seed", type=int, required=True,
                        help=f"seed of the draw (the shipped sets use {next(iter(GENERATED.values())).seed})")
    parser.add_argument("--size", type=int, default=None, help="samples (default: the task's own size)")
    parser.add_argument("--out", required=True, help="parquet file to write")


def main(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from prunebench.run.taskspec import draw_generated

    size = args.size if args.size is not None else GENERATED[args.task].size
    path = draw_generated(args.task, args.seed, size, args.out)
    print(f"wrote {path}: {args.task}, {size} samples, seed {args.seed}; run it with "
          f"`prunebench run --tasks {args.task} --task-data {args.task}={path}`")
    return 0
