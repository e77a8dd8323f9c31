"""`prunebench run`: the command line of prunebench.run.harness."""

from __future__ import annotations

import argparse
import dataclasses

from prunebench.run.harness import (
    BUILTIN_METHODS,
    DEFAULT_BUDGETS,
    DEFAULT_MODEL,
    DEFAULT_TASKS,
    TRAINING_FREE_METHODS,
    RunSettings,
    run,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, local dir, or built-in name (default {DEFAULT_MODEL})")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit of --model (part of the records' model name)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the checkpoint run its own Python code (off by default; the supported families need none)")
    parser.add_argument("--methods", default=None,
                        help=f"comma list, options as name:key=value (default on {DEFAULT_MODEL}: {BUILTIN_METHODS}; "
                             f"on other models: {TRAINING_FREE_METHODS})")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help="lmms-eval task names, aliases or prunebench tasks (default %(default)s)")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help="visual tokens kept: counts (64) or fractions (0.25, 25%%)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples of each task")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"samples per forward pass (default: 16 on {DEFAULT_MODEL}, 1 on other models)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 (default: fp16 on GPU; on CPU bf16 where "
                        "the CPU has bf16 units (AMX, AVX512-BF16), else fp32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="results", help="results store directory (default %(default)s)")
    parser.add_argument("--task-data", action="append", default=[], metavar="TASK=PATH",
                        help="run TASK on a local parquet/json/csv file, keeping its prompts and metrics")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap every task's answer length (smoke runs)")
    parser.add_argument("--force", action="store_true", help="recompute cells that already have a record")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help="add each in-LLM method's floor control: budget 'floor', one visual token after each of "
                             "its stages, so the score is what its unpruned layers carry (default on)")
    parser.add_argument("--vision-cache-mb", type=int, default=None,
                        help="keep each batch's processed inputs and vision-tower output for the task's later cells, "
                             "up to this many MB (default: 2048 on CPU, 0 on GPU, where the tower is a small share "
                             "of the time and the memory is the model's); 0 runs the tower in every cell")
    parser.add_argument("--verbose", action="store_true",
                        help="show lmms-eval's output (otherwise in RESULTS/lmms-eval.log) and a line per finished cell")


def main(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(RunSettings)}
    run(RunSettings(**{k: v for k, v in vars(args).items() if k in names}))
    return 0
