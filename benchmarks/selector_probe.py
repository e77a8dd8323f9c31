"""Do trained selectors keep the patches that hold the content? A proxy check on synthetic images.

    python -m benchmarks.selector_probe --kind autoselect     # the shipped checkpoint of each K
    python -m benchmarks.selector_probe --kind autoselect --ckpt DIR --model MODEL

On images of the built-in world the trainer never saw (another seed), a patch is *foreground*
when any of its pixels differs from the background. For each K the probe reports the recall of
foreground patches among the selector's top-K (capped by the number of foreground patches) next
to K drawn uniformly at random, and where the picks that are not foreground sit: the share on the
image's outer ring of patches (a border that holds no content more often than any other place).
Whether a selector learned where the content is, apart from answer accuracy (`prunebench run`).
Without ``--ckpt`` AutoSelect uses the checkpoint shipped for each K (``--shipped sampled-k``: the
one scorer trained for K in 64..192).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prunebench.engine.adapters import adapter_for
from prunebench.models.loading import load_model
from prunebench.training.selectors import load_selector, shipped_checkpoint
from prunebench.training.losses import vision_features
from prunebench.training.trainer import BuiltinQuestions, Collator


def foreground_patches(image, patch: int) -> np.ndarray:
    """(n_patches,) bool: the patch holds a pixel that differs from the top-left (background) one."""
    pixels = np.asarray(image).astype(int)
    rows, cols = pixels.shape[0] // patch, pixels.shape[1] // patch
    differs = np.abs(pixels - pixels[0, 0]).sum(-1) > 0
    return differs[: rows * patch, : cols * patch].reshape(rows, patch, cols, patch).any(axis=(1, 3)).reshape(-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["autoselect", "gumbel"], required=True)
    parser.add_argument("--ckpt", default=None, help="default: the checkpoint(s) shipped for builtin:tiny-llava")
    parser.add_argument("--shipped", choices=["per-budget", "sampled-k"], default="per-budget",
                        help="autoselect without --ckpt: the checkpoint of each K, or the sampled-K one")
    parser.add_argument("--model", default="builtin:tiny-llava")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=99, help="synthetic image seed (training uses 0)")
    parser.add_argument("--budgets", default="64,128")
    args = parser.parse_args(argv)

    model, processor = load_model(args.model)
    adapter = adapter_for(model)
    budgets = [int(k) for k in args.budgets.split(",")]
    if args.ckpt:
        ckpts = dict.fromkeys(budgets, args.ckpt)
    elif args.kind == "autoselect":
        variants = {k: "sampled-k" if args.shipped == "sampled-k" else f"k{k}" for k in budgets}
        ckpts = {k: shipped_checkpoint(args.kind, v) for k, v in variants.items()}
    else:
        ckpts = dict.fromkeys(budgets, shipped_checkpoint(args.kind))
    selectors = {k: load_selector(ckpts[k], args.kind) for k in budgets}
    patch, size = model.config.vision_config.patch_size, model.config.vision_config.image_size
    side = size // patch
    grid = np.arange(side * side).reshape(side, side)
    ring = np.isin(np.arange(side * side), np.concatenate([grid[0], grid[-1], grid[:, 0], grid[:, -1]]))
    data = BuiltinQuestions(args.images, seed=args.seed)
    collate = Collator(processor, with_text=False)
    rng = np.random.default_rng(0)
    learned: dict[int, list[float]] = {k: [] for k in budgets}
    uniform: dict[int, list[float]] = {k: [] for k in budgets}
    on_ring: dict[int, list[float]] = {k: [] for k in budgets}
    shares, ring_background = [], []
    for i in range(args.images):
        example = data[i]
        foreground = foreground_patches(example.image.resize((size, size), Image.NEAREST), patch)
        shares.append(foreground.mean())
        ring_background.append((ring & ~foreground).sum() / max(1, (~foreground).sum()))
        features = vision_features(adapter, collate([example])["pixel_values"])
        for k in budgets:
            with torch.no_grad():
                picks = selectors[k].scores(features)[0].topk(k).indices.numpy()
            cap = max(1, min(k, int(foreground.sum())))
            learned[k].append(foreground[picks].sum() / cap)
            uniform[k].append(foreground[rng.permutation(len(foreground))[:k]].sum() / cap)
            background = picks[~foreground[picks]]
            if len(background):
                on_ring[k].append(ring[background].mean())
    print(f"{args.kind} on {args.images} unseen images (seed {args.seed}); foreground = {np.mean(shares):.1%} of "
          f"patches; the outer ring holds {np.mean(ring_background):.1%} of the background patches")
    print("| K | checkpoint | foreground recall, learned | foreground recall, random | background picks on the outer ring |")
    print("|---|---|---|---|---|")
    for k in budgets:
        ring_share = f"{np.mean(on_ring[k]):.1%}" if on_ring[k] else "–"
        print(f"| {k} | {Path(ckpts[k]).name} | {np.mean(learned[k]):.3f} | {np.mean(uniform[k]):.3f} | {ring_share} |")


if __name__ == "__main__":
    main()
