"""`prunebench profile`: the command line of prunebench.profiling.profiler."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

from prunebench.models.loading import BACKBONES as BUILTIN_BACKBONES
from prunebench.models.tiny import BUILTIN_RANDOM
from prunebench.profiling.presets import preset_names
from prunebench.profiling.profiler import (
    DTYPES,
    ProfileRequest,
    ProfileSettings,
    profile,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:mid-llava",
                        help=", ".join([*BUILTIN_RANDOM, *BUILTIN_BACKBONES]) + ", a preset (" + ", ".join(preset_names()) +
                        "; random weights), or a hub id or local directory of a supported family")
    parser.add_argument("--methods", default="none,random", help="method list, e.g. 'random:seed=1,fastv:layer=3'")
    parser.add_argument("--budgets", default="192,128,64", help="visual tokens kept: counts, fractions (0.25, 25%%) or 'all'")
    parser.add_argument("--random-weights", action="store_true",
                        help="build a hub id's geometry from its shipped preset config with random weights")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA; on CPU bfloat16 where the CPU has bf16 units (AMX, AVX512-BF16), else float32")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-size", type=_at_least(1), default=ProfileSettings.batch_size)
    parser.add_argument("--prompt-tokens", type=_at_least(1), default=ProfileSettings.prompt_tokens,
                        help="text tokens around the image")
    parser.add_argument("--image-size", type=_image_size, default=ProfileSettings.image_size, metavar="HxW",
                        help="the synthetic image, height x width px (default 672x672); sets the visual tokens of "
                        "every backbone but LLaVA-1.5, which resizes any image to 336x336 (Qwen-VL rounds its sides to "
                        "multiples of 28 px, 32 on Qwen3-VL; InternVL and SmolVLM cut it into tiles)")
    parser.add_argument("--warmup", type=_at_least(0), default=ProfileSettings.warmup)
    parser.add_argument("--repeats", type=_at_least(1), default=ProfileSettings.repeats)
    parser.add_argument("--decode-tokens", type=_at_least(1), default=ProfileSettings.decode_tokens,
                        help="generated tokens per pass (1: prefill only)")
    parser.add_argument("--threads", type=_at_least(1), default=None,
                        help="CPU threads for torch (default: torch's choice); on a shared machine 1 avoids "
                        "OpenMP threads waiting on each other")
    parser.add_argument("--results", default="results", help="results store directory")
    parser.add_argument("--markdown", default=None, help="also write the table (with its settings) to this file")


def main(args: argparse.Namespace) -> int:
    settings = ProfileSettings(args.batch_size, args.prompt_tokens, args.warmup, args.repeats, args.decode_tokens,
                               args.image_size)
    request = ProfileRequest(args.model, args.methods, args.budgets, args.random_weights, args.dtype, args.device,
                             settings, args.threads, args.results, args.markdown, _command(args))
    try:
        profile(request)
    except NotImplementedError as err:  # a backbone the engine or the FLOPs model does not cover
        print(f"prunebench profile: error: {err}", file=sys.stderr)
        return 2
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every option spelled out)."""
    parts = ["prunebench", "profile"]
    for option in ("model", "methods", "budgets", "dtype", "device", "batch_size", "prompt_tokens", "image_size",
                   "warmup", "repeats", "decode_tokens", "threads", "results", "markdown"):
        value = getattr(args, option)
        if option == "image_size":
            value = "x".join(map(str, value))
        if value is not None:
            parts += ["--" + option.replace("_", "-"), shlex.quote(str(value))]
    if args.random_weights:
        parts.append("--random-weights")
    return " ".join(parts)


def _image_size(text: str) -> tuple[int, int]:
    """``HxW`` (e.g. 448x672) -> (448, 672)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels, e.g. 672x672; got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"image sides must be positive, got {text!r}")
    return height, width


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse
