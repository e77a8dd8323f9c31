"""How well can a pre-LLM selection do on the built-in tasks when it keeps every patch that holds content?

    python -m benchmarks.oracle_selection --budgets 64 --limit 200 --results results-oracle

An oracle that sees the pixels keeps every *foreground* patch (one whose pixels differ from the
background's, as benchmarks/selector_probe.py counts them) and fills the rest of K with background
patches chosen by ``background``: ``random`` (seeded per sample), ``ring`` (the image's outer
ring of patches first, as the AutoSelect scorer trained with sampled K picks them), ``spread``
(farthest-point sampling over the grid, so the kept background covers the image evenly) or
``adjacent`` (the left and right neighbours of content patches first, then random: the built-in
vision tower writes each patch's neighbours into its features). It runs
through `prunebench run` (lmms-eval, the tasks' own metrics) as the method ``oracle-content``,
registered by this script only: it reads the image's patch embeddings, which no real method sees.
The rows say what selecting the content alone is worth, and whether the background a selector
keeps beside it matters.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from prunebench import Method, Selection, StageContext, register_method


class PatchEmbeddings:
    """The vision tower's patch embeddings (before position embeddings) of the last batch encoded."""

    last: torch.Tensor | None = None

    @classmethod
    def hook(cls, module, args, output) -> None:
        cls.last = output.detach()


def foreground(patches: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` patch embeddings -> ``(B, h*w)`` bool: the patch differs from the top-left
    (background) one; identical pixels give identical embeddings."""
    flat = patches.flatten(2).transpose(1, 2).float()  # (B, n, C)
    scale = flat.abs().amax(dim=(1, 2), keepdim=True).squeeze(-1)
    return (flat - flat[:, :1]).abs().amax(-1) > 1e-4 * scale


def farthest_points(candidates: torch.Tensor, chosen: torch.Tensor, side: int, count: int) -> torch.Tensor:
    """``count`` of ``candidates`` (patch indices), each the farthest on the grid from all chosen so far."""
    coords = torch.stack([torch.arange(side * side) // side, torch.arange(side * side) % side], -1).float()
    picked = []
    distance = torch.cdist(coords[candidates], coords[chosen]).amin(-1) if len(chosen) else torch.full((len(candidates),), 1e9)
    for _ in range(count):
        best = int(distance.argmax())
        picked.append(int(candidates[best]))
        distance = torch.minimum(distance, torch.cdist(coords[candidates], coords[candidates[best]][None])[:, 0])
        distance[best] = -1
    return torch.tensor(picked, dtype=torch.long)


@register_method
@dataclass(kw_only=True)
class ContentOracle(Method):
    """Benchmark oracle: every foreground patch, the rest of K from the background (not a real method)."""

    name: ClassVar[str] = "oracle-content"
    stage: ClassVar[str] = "pre"
    background: Literal["random", "ring", "spread", "adjacent"] = "random"
    seed: int = 0

    def select(self, ctx: StageContext) -> Selection:
        if PatchEmbeddings.last is None or PatchEmbeddings.last.shape[0] != len(ctx.n_visual):
            raise RuntimeError("oracle-content needs the batch's patch embeddings: run it through this script "
                               "with --vision-cache-mb 0")
        side = PatchEmbeddings.last.shape[-1]
        content = foreground(PatchEmbeddings.last)
        ring = torch.zeros(side, side, dtype=torch.bool)
        ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
        keep = []
        for b, (n, k) in enumerate(zip(ctx.n_visual, ctx.keep)):
            fg = content[b].nonzero().flatten()[:k]
            rest = (~content[b]).nonzero().flatten()
            order = rest[torch.randperm(len(rest), generator=ctx.generator(b)).to(rest.device)]
            if self.background == "ring":
                order = torch.cat([order[ring.flatten()[order]], order[~ring.flatten()[order]]])
            if self.background == "adjacent":
                grid = content[b].view(side, side)
                beside = torch.zeros_like(grid)
                beside[:, 1:] |= grid[:, :-1]
                beside[:, :-1] |= grid[:, 1:]
                near = beside.flatten()[order]
                order = torch.cat([order[near], order[~near]])
            if self.background == "spread":
                order = farthest_points(rest, fg, side, min(k - len(fg), len(rest)))
            keep.append(torch.cat([fg, order[: k - len(fg)]]).to(ctx.hidden.device))
        return Selection(keep=keep)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="64")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--backgrounds", default="random,ring,spread,adjacent")
    parser.add_argument("--results", default="results")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    from prunebench.models import loading
    from prunebench.run.harness import RunSettings, run

    load = loading.load_model

    def load_with_hook(*a, **kw):
        model, processor = load(*a, **kw)
        tower = model.model.vision_tower
        getattr(tower, "vision_model", tower).embeddings.patch_embedding.register_forward_hook(PatchEmbeddings.hook)
        return model, processor

    loading.load_model = load_with_hook
    methods = ",".join(f"oracle-content:background={b}" for b in args.backgrounds.split(","))
    run(RunSettings(methods=methods, budgets=args.budgets, limit=args.limit, results=args.results, dtype=args.dtype,
                    vision_cache_mb=0, floor=False, argv=["benchmarks/oracle_selection.py", *(argv or [])]))


if __name__ == "__main__":
    main()
