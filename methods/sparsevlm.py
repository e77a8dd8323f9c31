"""SparseVLM (Zhang et al., ICML 2025) and SparseVLM+ (v2.0) (Gumpest/SparseVLMs): in-LLM,
three stages, text-guided.

Raters: from the LLM input embeddings, R = softmax over text of (V T^T) (V: image embeddings,
T: the text after the image, i.e. the question and the answer prompt, as officially), averaged
over the image tokens; the text tokens scoring above the mean rate the image (all of that text
if none does, where the official code would average an empty set). They are picked once, at a
pre-LLM stage that keeps every token (the engine hands methods the embeddings there).

Stages: in each of ``layers`` (default 2, 6, 15) the image tokens still present are scored by
the attention the raters pay them in that layer (softmax rows, mean over heads, then over
raters); the official code runs the layer on every token and drops the losers from its output,
so here the stage sits before layers 3, 7 and 16, scored with the attention of layers 2, 6 and
15 (from the KV cache and the raters' queries: no eager attention). The top ones survive in
their original order. v2.0 (SparseVLM+) first divides the attention by its positional part
(the logit of all-ones q and k under the rotary embedding; "gravity correction") and averages
only the ``heads`` heads that give the most attention from the raters to the image.

Recycling (v1.5 default; off in v2.0): of the tokens a stage deletes, the top ``recycle_top``
(int(d * 0.3) + 1 of d) by score are clustered by DPC-kNN into int(n / ``cluster_every``) + 1
clusters (n recycled; kNN with k = the cluster count, density exp(-mean squared kNN distance),
centres = largest density * distance-to-denser, every token joins its nearest centre) on the
hidden states leaving the scoring layer, and each cluster's mean is appended after the kept
image tokens; merged tokens compete like image tokens at later stages. The official code adds
1e-6 random noise to the densities to break ties; here ties go to the lower index.

Positions: v1.5 re-indexes (contiguous); v2.0 keeps the original ids.

Schedules (tokens kept after each stage, LLaVA-1.5, 576 image tokens), used for those budgets
when ``published`` is on (whatever the stage layers):
    v1.5: 192 -> 300/200/110, 128 -> 303/110/36, 96 -> 238/48/26, 64 -> 66/30/17
    v2.0: 192 -> 300/200/118, 128 -> 238/108/60, 96 -> 246/54/28, 64 -> 66/34/20
These are nominal: the engine counts layers 0-2 at 576 (layer 2 really runs on every token)
and recycled tokens on top (SparseVLM issue #33), e.g. v2.0 "192" averages 206.75 tokens.
Any other budget K (or ``published=false``) gets geometric counts N * lam**s whose layer
average, as the engine counts it (recycled tokens excluded), is exactly K (see
``layer_averaged_counts`` in prunebench/budget.py). Budget ``all`` keeps every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from prunebench import (
    PRE_LLM,
    Budget,
    Method,
    MethodError,
    PositionPolicy,
    Selection,
    Stage,
    StageContext,
    layer_averaged_counts,
    register_method,
)

PUBLISHED = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}


@register_method
@dataclass(kw_only=True)
class SparseVLM(Method):
    """SparseVLM: text raters score image tokens by attention at three layers; deleted ones recycled."""

    name: ClassVar[str] = "sparsevlm"
    stage: ClassVar[str] = "llm"
    layers: tuple[int, ...] = (2, 6, 15)  # scoring layers; pruned tokens leave their outputs
    version: Literal["1.5", "2.0"] = "1.5"
    recycle: bool | None = None  # None: on for v1.5, off for v2.0
    recycle_top: float = 0.3  # fraction of a stage's deleted tokens that are recycled
    cluster_every: int = 10  # recycled tokens per DPC-kNN cluster: int(n / cluster_every) + 1
    heads: int = 14  # v2.0: heads with the most rater-to-image attention that are averaged
    published: bool = True  # use the published schedule for 192/128/96/64
    positions: PositionPolicy | None = None  # None: reindex for v1.5, original for v2.0

    def __post_init__(self) -> None:
        if self.recycle is None:
            self.recycle = self.version == "1.5"
        if self.positions is None:
            self.positions = "reindex" if self.version == "1.5" else "original"
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise MethodError(f"sparsevlm: layers={self.layers} must be strictly increasing and >= 0")
        if not 0.0 < self.recycle_top <= 1.0 or self.cluster_every < 1 or self.heads < 1:
            raise MethodError(
                f"sparsevlm: recycle_top={self.recycle_top} must lie in (0, 1], cluster_every={self.cluster_every} "
                f"and heads={self.heads} must be >= 1"
            )

    def spec(self) -> str:
        """Canonical spec; ``recycle``/``positions`` equal to the version's own choice count as defaults."""
        implied = {"recycle": str(self.version == "1.5"), "positions": "reindex" if self.version == "1.5" else "original"}
        name, _, options = super().spec().partition(":")
        changed = [o for o in options.split(",") if o and implied.get(o.partition("=")[0]) != o.partition("=")[2]]
        return name + (":" + ",".join(changed) if changed else "")

    @property
    def stage_layers(self) -> tuple[int, ...]:
        return tuple(layer + 1 for layer in self.layers)

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        if self.layers[-1] + 1 >= num_layers:
            raise MethodError(
                f"sparsevlm: scoring layer {self.layers[-1]} leaves no later layer to prune in this "
                f"{num_layers}-layer decoder; give layers within 0..{num_layers - 2} (e.g. sparsevlm:layers=1/3/5 for 8)"
            )
        table = PUBLISHED[self.version]
        if budget.is_all:  # every stage keeps everything: no raters needed
            return [Stage(layer, n_visual) for layer in self.stage_layers]
        if self.published and budget.tokens in table and len(self.layers) == 3 and table[budget.tokens][0] <= n_visual:
            counts = table[budget.tokens]
        else:
            counts = layer_averaged_counts(n_visual, budget.resolve(n_visual), self.stage_layers, num_layers)
        return [Stage(PRE_LLM, n_visual), *(Stage(layer, keep) for layer, keep in zip(self.stage_layers, counts))]

    def floor_schedule(self, n_visual: int, num_layers: int) -> list[Stage]:
        """The floor control: the raters' pre-LLM stage, then one token after each stage (the
        engine adds no recycled tokens under the floor budget)."""
        stages = self.schedule(n_visual, Budget.all(), num_layers)  # checks the layers against the model
        return [Stage(PRE_LLM, n_visual), *(Stage(stage.layer, 1) for stage in stages)]

    def select(self, ctx: StageContext) -> Selection:
        everything = [torch.arange(n, device=ctx.hidden.device) for n in ctx.n_visual]
        if ctx.layer is None:
            ctx.state["raters"] = raters(ctx)
            return Selection(keep=everything)
        if ctx.keep == ctx.n_visual:
            return Selection(keep=everything)
        scores = self.scores(ctx, layer=ctx.layer - 1)
        keep = ctx.top_k(scores)
        merged = self.recycled(ctx, scores, keep) if self.recycle else None
        return Selection(keep=keep, merged=merged)

    def scores(self, ctx: StageContext, layer: int) -> torch.Tensor:
        """``(B, n_max)`` rater attention to each image token in ``layer``."""
        rows, mask = rater_slots(ctx)
        probs = ctx.attention(layer, rows=rows)  # (B, H, R, n_max)
        if self.version == "2.0":
            index = ctx.visual_index[:, None, :].expand(-1, rows.shape[1], -1)
            probs = probs / ctx.positional_logits(layer, rows).gather(-1, index)[:, None]
            if self.heads > probs.shape[1]:
                raise MethodError(f"sparsevlm: heads={self.heads} but layer {layer} has {probs.shape[1]} attention heads")
            real = mask[:, None, :, None] & ctx.visual_mask[:, None, None, :]
            top = (probs * real).sum((2, 3)).topk(self.heads, dim=-1).indices  # (B, heads)
            probs = probs.gather(1, top[:, :, None, None].expand(-1, -1, *probs.shape[2:]))
        per_rater = probs.mean(1)  # (B, R, n_max)
        return (per_rater * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def recycled(self, ctx: StageContext, scores: torch.Tensor, keep: list[torch.Tensor]) -> torch.Tensor | None:
        """``(B, clusters, D)`` merged tokens from the best-scored deleted ones, or None."""
        tokens = ctx.visual_hidden()
        merged = []
        for b, (n, kept) in enumerate(zip(ctx.n_visual, keep)):
            deleted = torch.ones(n, dtype=torch.bool, device=kept.device)
            deleted[kept] = False
            deleted = deleted.nonzero().flatten()
            if len(deleted) == 0:
                merged.append(tokens[b, :0])
                continue
            best = deleted[scores[b, deleted].topk(int(len(deleted) * self.recycle_top) + 1).indices]
            clusters = int(len(best) / self.cluster_every) + 1
            merged.append(dpc_knn_merge(tokens[b, best].float(), clusters).to(tokens.dtype))
        if len({m.shape[0] for m in merged}) != 1:
            raise MethodError(
                f"sparsevlm: samples recycle different numbers of tokens {[m.shape[0] for m in merged]}; "
                "recycling needs the same schedule for every sample of a batch"
            )
        return torch.stack(merged) if merged[0].shape[0] else None


def after_image(ctx: StageContext) -> list[torch.Tensor]:
    """Per sample, the slots of the text after its image (question and answer prompt)."""
    return [text[text > slots[-1]] for text, slots in zip(ctx.text_slots(), ctx.visual_slots)]


def raters(ctx: StageContext) -> list[torch.Tensor]:
    """Per sample, offsets (into the text after the image) of the text raters, from embeddings."""
    image = ctx.visual_hidden().float()
    out = []
    for b, slots in enumerate(after_image(ctx)):
        text = ctx.hidden[b, slots].float()
        relevance = (image[b, : ctx.n_visual[b]] @ text.T).softmax(-1).mean(0)  # (T,)
        chosen = (relevance > relevance.mean()).nonzero().flatten()
        out.append(chosen if len(chosen) else torch.arange(len(slots), device=slots.device))
    return out


def rater_slots(ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, R)`` current slots of each sample's raters (padded by repeating one) and their mask."""
    offsets = ctx.state["raters"]
    rows = [slots[o] for slots, o in zip(after_image(ctx), offsets)]
    width = max(len(r) for r in rows)
    padded = torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows])
    mask = torch.arange(width, device=padded.device)[None] < torch.tensor([len(r) for r in rows], device=padded.device)[:, None]
    return padded, mask


def dpc_knn_merge(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Cluster the rows of ``x`` (n, C) by DPC-kNN into ``clusters`` groups; ``(clusters, C)`` means,
    ordered by centre score (ties: lower index first)."""
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[1])
    density = (-(dist.topk(clusters, dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    to_denser = torch.where(denser, dist, dist.max()).min(-1).values
    # mutual nearest neighbours tie exactly (equal density, both far from anything denser)
    centres = (to_denser * density).sort(descending=True, stable=True).indices[:clusters]
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(clusters, device=x.device)
    sums = x.new_zeros(clusters, x.shape[1]).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=clusters).to(x.dtype)
    return sums / counts[:, None]
