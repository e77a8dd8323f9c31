"""`prunebench train`: the command line of the selector trainer (prunebench.training.trainer) and of
the built-in model's recipe (prunebench.training.recipe)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from prunebench.training.recipe import RECIPES, Recipe
from prunebench.training.selectors import DENOISERS, GATE_NORMS, GATES, KINDS
from prunebench.training.trainer import OptionError, TrainConfig, train

TINY_LLAVA_STAGES = {
    "vision": "vision-tower steps",
    "existence": "LLM steps on existence questions only, on ideal visual tokens",
    "reader": "LLM steps on the mixed conversations, on ideal visual tokens",
    "side": "LLM steps on side-of-the-image questions, on ideal visual tokens",
    "comparison": "LLM steps on side and left/right-of questions, on ideal visual tokens",
    "quota": "LLM steps on quota conversations (every kind at once), on ideal visual tokens",
    "projector": "projector alignment steps",
    "language": "projector + LLM steps on real visual tokens",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("selector", choices=(*KINDS, "tiny-llava"),
                        help="which learned selector to train, or tiny-llava: the built-in model itself")
    for stage, what in TINY_LLAVA_STAGES.items():
        default = getattr(Recipe, f"{stage}_steps")
        parser.add_argument(f"--{stage}-steps", type=int, default=None, help=f"tiny-llava: {what} (default recipe: {default})")
    parser.add_argument("--recipe", choices=RECIPES, default="default",
                        help="tiny-llava: the shipped model's recipe (default) or the one shipped before it, without the position phases (mix)")
    parser.add_argument("--handover", type=Path, default=None, metavar="DIR",
                        help="tiny-llava: also save the model as it is before the language stage in DIR")
    parser.add_argument("--from-handover", type=Path, default=None, metavar="DIR",
                        help="tiny-llava: run only the language stage, from a state saved with --handover")
    parser.add_argument("--model", default="random:tiny-llava", help="hub id (downloaded on demand) or local dir, builtin:tiny-llava or random:tiny-llava")
    parser.add_argument("--data", default="synthetic",
                        help="a .jsonl/.parquet of image + caption (or question + answer), a Hugging Face dataset id "
                             "(downloaded on demand), or synthetic[:N] (questions about the built-in tasks' world, drawn in code)")
    parser.add_argument("--split", default="train", help="split of a Hugging Face dataset (default train)")
    parser.add_argument("--columns", default="", metavar="ROLE=COL,...",
                        help="column names when not guessed: image=..,caption=.. or image=..,question=..,answer=..")
    parser.add_argument("--budget", default=None,
                        help="autoselect: K (64), a fraction (25%%) or a range sampled per batch (default 64-192); "
                             "gumbel: the kept-fraction floor p (default 25%%)")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps (default 4000)")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW peak learning rate, cosine-decayed (default 2e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=8, help="examples per process per micro-batch (default 8)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--tau-start", type=float, default=2.0)
    parser.add_argument("--tau-end", type=float, default=0.1)
    parser.add_argument("--tau-steps", type=int, default=None, help="cosine annealing length (default min(2000, steps))")
    parser.add_argument("--gate", choices=GATES, default="vp", help="autoselect gate (default vp, the paper's)")
    parser.add_argument("--gate-norm", choices=GATE_NORMS, default="channel",
                        help="vp gate: standardise feature channels before the noise (default channel)")
    parser.add_argument("--denoiser", choices=DENOISERS, default="diagonal", help="autoselect denoiser (default diagonal)")
    parser.add_argument("--drop", type=float, default=0.0, metavar="SHARE",
                        help="autoselect: share of steps that drop the unselected tokens from the sequence and re-index "
                             "positions, as inference does (default 0: every step gates all N positions)")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default 2 autoselect scorer, 3 gumbel)")
    parser.add_argument("--width", type=int, default=None, help="autoselect scorer width (default the vision width)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default width/64, at most 16)")
    parser.add_argument("--dtype", default="auto", help="frozen model dtype (default bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--out", required=True, help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--num-workers", type=int, default=0, help="data-loading processes (default 0)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations to save memory")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    if args.selector == "tiny-llava":
        from prunebench.training.recipe import train as train_builtin

        steps = {f"{stage}_steps": getattr(args, f"{stage}_steps") for stage in TINY_LLAVA_STAGES}
        recipe = replace(RECIPES[args.recipe], seed=args.seed, **{k: v for k, v in steps.items() if v is not None})
        train_builtin(recipe, Path(args.out), handover=args.handover, from_handover=args.from_handover)
        return 0
    try:
        columns = dict(item.split("=", 1) for item in args.columns.split(",") if item)
    except ValueError:
        raise OptionError(f"--columns {args.columns!r}: write ROLE=COLUMN,...") from None
    options = {name: getattr(args, name) for name in (
        "model", "data", "split", "budget", "steps", "lr", "weight_decay", "batch_size", "grad_accum", "tau_start",
        "tau_end", "tau_steps", "gate", "gate_norm", "denoiser", "drop", "depth", "width", "heads", "dtype", "out", "resume",
        "save_every", "log_every", "num_workers", "gradient_checkpointing", "seed")}
    train(TrainConfig(selector=args.selector, columns=columns, **options))
    return 0
