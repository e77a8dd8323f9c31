"""Do trained selectors keep the patches that hold the content? A proxy check on synthetic images.

    python -m benchmarks.selector_probe --kind autoselect     # the shipped checkpoint
    python -m benchmarks.selector_probe --kind autoselect --ckpt DIR --model MODEL

On images of the built-in world the trainer never saw (another seed), a patch is *foreground*
when any of its pixels differs from the background. For K = 64 / 128 the probe reports the recall
of foreground patches among the selector's top-K (capped by the number of foreground patches)
next to K drawn uniformly at random: whether a selector learned where the content is, apart from
answer accuracy (which `prunebench run` measures).
"""

from __future__ import annotations

import argparse

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
    parser.add_argument("--ckpt", default=None, help="default: the checkpoint shipped for builtin:tiny-llava")
    parser.add_argument("--model", default="builtin:tiny-llava")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=99, help="synthetic image seed (training uses 0)")
    parser.add_argument("--budgets", default="64,128")
    args = parser.parse_args(argv)

    model, processor = load_model(args.model)
    adapter = adapter_for(model)
    ckpt = args.ckpt or shipped_checkpoint(args.kind)
    selector = load_selector(ckpt, args.kind)
    patch, size = model.config.vision_config.patch_size, model.config.vision_config.image_size
    data = BuiltinQuestions(args.images, seed=args.seed)
    collate = Collator(processor, with_text=False)
    rng = np.random.default_rng(0)
    budgets = [int(k) for k in args.budgets.split(",")]
    learned: dict[int, list[float]] = {k: [] for k in budgets}
    uniform: dict[int, list[float]] = {k: [] for k in budgets}
    shares = []
    for i in range(args.images):
        example = data[i]
        foreground = foreground_patches(example.image.resize((size, size), Image.NEAREST), patch)
        shares.append(foreground.mean())
        with torch.no_grad():
            scores = selector.scores(vision_features(adapter, collate([example])["pixel_values"]))[0]
        for k in budgets:
            cap = max(1, min(k, int(foreground.sum())))
            learned[k].append(foreground[scores.topk(k).indices.numpy()].sum() / cap)
            uniform[k].append(foreground[rng.permutation(len(foreground))[:k]].sum() / cap)
    print(f"{args.kind} ({ckpt}) on {args.images} unseen images; foreground = {np.mean(shares):.1%} of patches")
    print("| K | foreground recall, learned | foreground recall, random |")
    print("|---|---|---|")
    for k in budgets:
        print(f"| {k} | {np.mean(learned[k]):.3f} | {np.mean(uniform[k]):.3f} |")


if __name__ == "__main__":
    main()
