"""Analytic cost model of a VLM: visual tokens per image, FLOPs per stage, KV-cache bytes, bytes moved.

Counting rule: only matrix products count, and one multiply-accumulate (MAC) is 2 FLOPs. Norms,
activations, softmax, rotary embedding and residual adds are O(n d) and left out.

A decoder layer run by ``n`` query tokens against ``s`` keys (prefill: ``s = n``), with hidden
width ``d``, MLP width ``m``, query width ``d_q = heads x head_dim`` and key/value width
``d_kv = kv_heads x head_dim``::

    MACs = n d (d_q + 2 d_kv)     q, k, v projections
         + n d_q d                output projection
         + 2 n s d_q              q k^T and softmax(.) v, every query against every key
         + 3 n d m                gated (SwiGLU) MLP: gate, up and down projections

With multi-head attention (``d_q = d_kv = d``) and ``s = n`` this is the
``4nd^2 + 2n^2 d + 3ndm`` of REFERENCE.md section 3, and FLOPs = 2 x MACs. That convention
reproduces the efficiency anchor (DiffPrune Table 4: 8.89 TFLOPs for unpruned LLaVA-1.5-7B at
about 94 text tokens + 576 visual ones). FastV's and DivPrune's scripts write ``2ndm`` for the
MLP, which leaves out one of the three matrices a Llama MLP has; we count all three. The causal
mask is not discounted (the kernels compute the full score matrix or close to it).

A prefill's LLM FLOPs sum that layer count over every sample and layer, each layer at the number
of tokens that actually entered it (text tokens + the visual tokens the method left there), plus
the LM head on the last prompt token, which is all the engine runs it on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from prunebench.engine.adapters import clip_layers_run

# Decoders whose MLP is gated (gate, up, down): the three matrices the formula counts.
GATED_MLP_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")

FORMULA = (
    "FLOPs = 2 x MACs per decoder layer: n*d*(d_q + 2*d_kv) + n*d_q*d + 2*n*s*d_q + 3*n*d*m "
    "(= 4nd^2 + 2n^2d + 3ndm for MHA prefill); LM head on the last prompt token only"
)

TokensPerLayer = Sequence[Sequence[int]]  # [sample][layer] tokens entering that decoder layer


@dataclass(frozen=True)
class DecoderGeometry:
    """The widths the FLOPs of a decoder depend on."""

    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> DecoderGeometry:
        """From a VLM config (its ``text_config``) or a decoder config."""
        text = getattr(config, "text_config", None) or config
        if text.model_type not in GATED_MLP_DECODERS:
            raise NotImplementedError(
                f"no FLOPs model for decoder type {text.model_type!r}; supported (gated MLP): "
                f"{', '.join(GATED_MLP_DECODERS)}"
            )
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            mlp=text.intermediate_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab=text.vocab_size,
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def layer_macs(g: DecoderGeometry, queries: int, keys: int) -> int:
    """Multiply-accumulates of one decoder layer: ``queries`` tokens attending to ``keys`` keys."""
    projections = queries * g.hidden * (g.q_width + 2 * g.kv_width) + queries * g.q_width * g.hidden
    attention = 2 * queries * keys * g.q_width
    mlp = 3 * queries * g.hidden * g.mlp
    return projections + attention + mlp


def lm_head_flops(g: DecoderGeometry, tokens: int = 1) -> int:
    return 2 * tokens * g.hidden * g.vocab


def prefill_flops(g: DecoderGeometry, tokens: TokensPerLayer) -> int:
    """LLM prefill FLOPs of a batch; ``tokens[b][l]``: tokens entering layer ``l`` in sample ``b``."""
    _check_layers(g, tokens)
    return sum(2 * layer_macs(g, n, n) for row in tokens for n in row) + len(tokens) * lm_head_flops(g)


def decode_flops_per_step(g: DecoderGeometry, tokens: TokensPerLayer, steps: int) -> float:
    """Mean FLOPs of one decode step of the batch over ``steps`` steps after the prefill.

    Step ``t`` (1-based) runs one token per sample through every layer against the layer's
    prefill keys plus ``t`` new ones, then the LM head.
    """
    _check_layers(g, tokens)
    if steps < 1:
        raise ValueError(f"decode steps must be >= 1, got {steps}")
    total = 0
    for t in range(1, steps + 1):
        total += sum(2 * layer_macs(g, 1, n + t) for row in tokens for n in row) + len(tokens) * lm_head_flops(g)
    return total / steps


def kv_cache_bytes(g: DecoderGeometry, tokens: TokensPerLayer, bytes_per_element: int, extra_tokens: int = 0) -> int:
    """Bytes of keys and values held for the batch (padding excluded), ``extra_tokens`` decoded."""
    _check_layers(g, tokens)
    held = sum(n + extra_tokens for row in tokens for n in row)
    return 2 * g.kv_width * held * bytes_per_element


def visual_tokens_per_image(config) -> int:
    """Visual tokens one image gives a LLaVA-1.5-style model (fixed resolution, CLIP/SigLIP grid)."""
    vision = config.vision_config
    if config.model_type != "llava":
        raise NotImplementedError(
            f"visual tokens of {config.model_type!r} depend on the image (dynamic resolution); "
            "count them with image_tokens(config, height, width)"
        )
    grid = (vision.image_size // vision.patch_size) ** 2
    return grid + (1 if config.vision_feature_select_strategy == "full" else 0)


# -- image geometry of the dynamic backbones ---------------------------------------------------
# LLaVA-NeXT (anyres): the image is fitted into the best of ``image_grid_pinpoints`` and cut into
# crops of the CLIP input size; base image + crops go through CLIP. The crops' token grid is then
# cropped back to the image's aspect ratio ("unpad") and every row gains one image_newline token.
# LLaVA-OneVision: the same with SigLIP (no CLS), no newline after the base view, and a grid of
# more than 1.1^2 x N crops' worth of tokens interpolated down to about N crops (anyres_max_N).
# Qwen2-VL / 2.5-VL / 3-VL: the image is resized to multiples of patch x merge (28 px; 32 px on
# Qwen3-VL) and every 2x2 group of patches becomes one LLM token.
# InternVL: the image is resized onto the tile grid (of 1..12 tiles) whose aspect ratio is
# closest to its own and cut into tiles; several tiles get a thumbnail tile. 256 tokens a tile.
# SmolVLM / Idefics3: the longest edge is resized to 4 tiles, both sides rounded up to whole tiles,
# then rows x cols tiles + a global image (one tile when the image fits in one). 64 tokens a tile
# on the 256M / 500M models.
DYNAMIC = ("llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "idefics3", "smolvlm")
QWEN_VL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SMOLVLM = ("idefics3", "smolvlm")
INTERNVL_MAX_TILES = 12  # InternVL's processor default (max_patches; min_patches 1)
SMOLVLM_TILES_PER_EDGE = 4  # SmolVLM's processor: longest edge 4 x 512 px (2048) on 512 px tiles


def anyres_resolution(config, height: int, width: int) -> tuple[int, int]:
    """The pinpoint (height, width) LLaVA-NeXT fits an image into: the one that keeps the most of
    the image's pixels after an aspect-preserving downscale, the least padding on a tie."""
    best, best_key = None, None
    for pin_h, pin_w in config.image_grid_pinpoints:
        scale = min(pin_w / width, pin_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(pin_w * pin_h - kept))
        if best_key is None or key > best_key:
            best, best_key = (pin_h, pin_w), key
    return best


def anyres_crops(config, height: int, width: int) -> int:
    """CLIP inputs LLaVA-NeXT runs for one image: the base image + the crops of its pinpoint."""
    side = config.vision_config.image_size
    pin_h, pin_w = anyres_resolution(config, height, width)
    return 1 + -(-pin_h // side) * -(-pin_w // side)


def _unpadded_grid(config, height: int, width: int) -> tuple[int, int]:
    """Rows and columns of the crops' token grid after unpadding (LLaVA-NeXT / OneVision)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size  # tokens per crop side
    pin_h, pin_w = anyres_resolution(config, height, width)
    rows, cols = pin_h // vision.image_size * side, pin_w // vision.image_size * side
    # unpad: keep the centred band of rows (or columns) the image itself covers
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    return rows, cols


def _anyres_tokens(config, height: int, width: int) -> int:
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    base = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    rows, cols = _unpadded_grid(config, height, width)
    return base + rows * cols + rows  # + one image_newline per row


def _onevision_tokens(config, height: int, width: int) -> int:
    """Base view (SigLIP: no CLS) + the unpadded grid, interpolated down when it holds more than
    1.1^2 x N crops of tokens (``anyres_max_N``), + one newline per grid row."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    rows, cols = _unpadded_grid(config, height, width)
    cap = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (cap * side * side))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return side * side + rows * cols + rows


def internvl_tiles(config, height: int, width: int, max_tiles: int = INTERNVL_MAX_TILES) -> int:
    """Tiles InternVL's processor cuts an image into: the (columns, rows) grid of 1..``max_tiles``
    tiles whose aspect ratio is closest to the image's (a tie goes to more tiles while the image
    covers over half of them), plus a thumbnail when there is more than one."""
    side = tile_side(config.vision_config.image_size)
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles),
                   key=lambda grid: grid[0] * grid[1])
    best, best_diff = (1, 1), float("inf")
    for columns, rows in grids:
        diff = abs(width / height - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and width * height > 0.5 * side * side * columns * rows:
            best = (columns, rows)
    tiles = best[0] * best[1]
    return tiles + (1 if tiles > 1 else 0)


def smolvlm_tiles(config, height: int, width: int, tiles_per_edge: int = SMOLVLM_TILES_PER_EDGE) -> int:
    """Tiles SmolVLM's processor cuts an image into: the longest edge resized to ``tiles_per_edge``
    tiles (the other keeping the aspect ratio, made even), both sides rounded up to whole tiles;
    rows x cols tiles + the global image, or the image alone when it fits in one tile."""
    tile = config.vision_config.image_size
    longest = tiles_per_edge * tile
    if width >= height:
        height, width = int(longest / (width / height)), longest
        height += height % 2
    else:
        width, height = int(longest * (width / height)), longest
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    if width >= height:
        cols = math.ceil(width / tile)
        rows = math.ceil(int(cols * tile / (width / height)) / tile)
    else:
        rows = math.ceil(height / tile)
        cols = math.ceil(int(rows * tile * (width / height)) / tile)
    return rows * cols + 1 if rows * cols > 1 else 1


def _tokens_per_tile(config) -> int:
    """Visual tokens of one tile after the pixel shuffle (InternVL, SmolVLM)."""
    vision = config.vision_config
    patches = (tile_side(vision.image_size) // tile_side(vision.patch_size)) ** 2
    if config.model_type == "internvl":
        return int(patches * config.downsample_ratio**2)
    return patches // config.scale_factor**2


def tile_side(size) -> int:
    """A square size given as an int or as (height, width)."""
    return size if isinstance(size, int) else size[0]


def qwen_patch_grid(config, height: int, width: int) -> tuple[int, int]:
    """Qwen2-VL's grid of 14 px patches for an image resized to the nearest multiples of 28 px
    (the processor's rounding; its min/max pixel clamp is the processor's and not applied here)."""
    vision = config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size
    rows, cols = (max(unit, round(side / unit) * unit) // vision.patch_size for side in (height, width))
    return rows, cols


def image_tokens(config, height: int, width: int) -> int:
    """Visual tokens an image of ``height`` x ``width`` px gives the model (LLaVA-1.5: always its
    grid), with the processors' default tiling (InternVL: up to 12 tiles; SmolVLM: 4 tiles a side)."""
    kind = config.model_type
    if kind == "llava":
        return visual_tokens_per_image(config)
    if kind == "llava_next":
        return _anyres_tokens(config, height, width)
    if kind == "llava_onevision":
        return _onevision_tokens(config, height, width)
    if kind in QWEN_VL:
        rows, cols = qwen_patch_grid(config, height, width)
        return rows * cols // config.vision_config.spatial_merge_size**2
    if kind == "internvl":
        return internvl_tiles(config, height, width) * _tokens_per_tile(config)
    if kind in SMOLVLM:
        return smolvlm_tiles(config, height, width) * _tokens_per_tile(config)
    raise NotImplementedError(f"no visual-token count for {kind!r}; supported: llava, {', '.join(DYNAMIC)}")


def max_image_tokens(config, image_processor=None) -> int:
    """The most visual tokens one image can give: LLaVA-1.5's fixed grid; LLaVA-NeXT's largest
    pinpoint (unpadding only removes tokens); Qwen-VL's processor ``max_pixels`` / (28 px)^2."""
    kind = config.model_type
    if kind == "llava":
        return visual_tokens_per_image(config)
    if kind == "llava_next":
        return max(_anyres_tokens(config, h, w) for h, w in config.image_grid_pinpoints)
    if kind == "llava_onevision":  # the largest canvas (the interpolation caps its grid)
        return max(_onevision_tokens(config, h, w) for h, w in config.image_grid_pinpoints)
    if kind in QWEN_VL:
        max_pixels = getattr(getattr(image_processor, "size", None), "longest_edge", None)
        if max_pixels is None:
            raise NotImplementedError(
                "the most visual tokens of a Qwen-VL image depend on its processor's max_pixels; pass the image processor"
            )
        vision = config.vision_config
        return max_pixels // (vision.patch_size * vision.spatial_merge_size) ** 2
    if kind == "internvl":  # every tile + the thumbnail
        tiles = getattr(image_processor, "max_patches", None) or INTERNVL_MAX_TILES
        return (tiles + (tiles > 1)) * _tokens_per_tile(config)
    if kind in SMOLVLM:  # a square image: the most tiles a side, + the global image
        size = getattr(image_processor, "size", None)
        tile = config.vision_config.image_size
        per_edge = size["longest_edge"] // tile if size and "longest_edge" in size else SMOLVLM_TILES_PER_EDGE
        return (per_edge * per_edge + (per_edge > 1)) * _tokens_per_tile(config)
    raise NotImplementedError(f"no visual-token count for {kind!r}; supported: llava, {', '.join(DYNAMIC)}")


# -- vision FLOPs ------------------------------------------------------------------------------
def vision_flops(config, images: int, height: int | None = None, width: int | None = None) -> int:
    """Vision tower + projector FLOPs of ``images`` images of ``height`` x ``width`` px (LLaVA-1.5:
    any size, it resizes to its grid). CLIP counts the layers up to the projector's feature layer
    for LLaVA-1.5 (the engine runs no more, ``clip_layers_run``) and all of them for LLaVA-NeXT
    (its tower runs inside HF's ``get_image_features``).

    - LLaVA-1.5: CLIP over 1 + 576 tokens, MLP projector on the 576.
    - LLaVA-NeXT: the same per CLIP input (base + crops), the projector on all their tokens
      before unpadding; newline tokens cost no matmul.
    - Qwen2-VL: ViT over the P patches (Conv3d patch embedding, full attention per image, fc1/fc2
      MLP of ``mlp_ratio x d``), then the merger MLP (4d -> 4d -> D) on the P / 4 tokens.
    - Qwen2.5-VL: the same with a gated MLP, and attention within windows of ``window_size`` px
      except in ``fullatt_block_indexes`` blocks.
    - Qwen3-VL: Qwen2-VL's ViT (fc1/fc2 MLP of ``intermediate_size``, full attention per image),
      the merger, and one more merger per DeepStack level (the learned position embedding is
      interpolated by a weighted sum: no matmul).
    - LLaVA-OneVision: SigLIP over each crop's patches (no CLS, every layer), the projector on
      every crop's tokens; the grid's interpolation and the newline tokens cost no matmul.
    - InternVL: InternViT over each tile's 1 + patches (CLS), the projector (4d -> D -> D) on the
      pixel-shuffled tokens of each tile.
    - SmolVLM: SigLIP over each tile's patches (no CLS), the connector (s^2 d -> D) on its tokens.
    """
    kind = config.model_type
    if kind == "llava":
        return 2 * images * _clip_macs(config, crops=1, layers=clip_layers_run(config))
    if height is None or width is None:
        raise ValueError(f"vision FLOPs of {kind!r} depend on the image: give its height and width")
    if kind == "llava_next":
        return 2 * images * _clip_macs(config, crops=anyres_crops(config, height, width),
                                       layers=config.vision_config.num_hidden_layers)
    if kind in QWEN_VL:
        return 2 * images * _qwen_vit_macs(config, *qwen_patch_grid(config, height, width))
    if kind == "llava_onevision":
        side = config.vision_config.image_size // config.vision_config.patch_size
        projector = side * side * (config.vision_config.hidden_size + config.text_config.hidden_size) * config.text_config.hidden_size
        return 2 * images * anyres_crops(config, height, width) * (_vit_tile_macs(config.vision_config, cls=False) + projector)
    if kind == "internvl":
        tokens, d, width_llm = _tokens_per_tile(config), config.vision_config.hidden_size, config.text_config.hidden_size
        wide = int(d / config.downsample_ratio**2)
        per_tile = _vit_tile_macs(config.vision_config, cls=True) + tokens * (wide * width_llm + width_llm * width_llm)
        return 2 * images * internvl_tiles(config, height, width) * per_tile
    if kind in SMOLVLM:
        tokens, d = _tokens_per_tile(config), config.vision_config.hidden_size
        per_tile = _vit_tile_macs(config.vision_config, cls=False) + tokens * d * config.scale_factor**2 * config.text_config.hidden_size
        return 2 * images * smolvlm_tiles(config, height, width) * per_tile
    raise NotImplementedError(f"no FLOPs model for {kind!r}; supported: llava, {', '.join(DYNAMIC)}")


def _vit_tile_macs(vision, cls: bool) -> int:
    """One square input through a plain ViT (every layer): the patch embedding, then per layer the
    q, k, v and output projections, q k^T and softmax(.) v, and a fc1/fc2 MLP."""
    patches = (tile_side(vision.image_size) // tile_side(vision.patch_size)) ** 2
    seq = patches + (1 if cls else 0)
    d, m = vision.hidden_size, vision.intermediate_size
    embed = patches * vision.num_channels * tile_side(vision.patch_size) ** 2 * d
    return embed + vision.num_hidden_layers * (4 * seq * d * d + 2 * seq * seq * d + 2 * seq * d * m)


def _clip_macs(config, crops: int, layers: int) -> int:
    vision = config.vision_config
    if vision.model_type != "clip_vision_model":
        raise NotImplementedError(f"no FLOPs model for vision tower {vision.model_type!r}; supported: clip_vision_model")
    patches = (vision.image_size // vision.patch_size) ** 2
    seq = patches + 1  # CLS
    d, m = vision.hidden_size, vision.intermediate_size
    embed = patches * vision.num_channels * vision.patch_size**2 * d
    per_layer = 4 * seq * d * d + 2 * seq * seq * d + 2 * seq * d * m  # MLP: fc1, fc2
    width = config.text_config.hidden_size
    features = patches + (1 if config.vision_feature_select_strategy == "full" else 0)
    projector = features * (d * width + width * width)  # linear_1, linear_2
    return crops * (embed + layers * per_layer + projector)


def qwen_windows(config, rows: int, cols: int) -> list[int]:
    """Patches in each attention window of a Qwen2.5-VL image of ``rows`` x ``cols`` patches:
    windows tile the merged-token grid in squares of ``window_size`` px, cut at its edges."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    side = vision.window_size // merge // vision.patch_size  # merged tokens per window side

    def spans(n: int) -> list[int]:
        return [side] * (n // side) + ([n % side] if n % side else [])

    return [h * w * merge * merge for h in spans(rows // merge) for w in spans(cols // merge)]


def _qwen_vit_macs(config, rows: int, cols: int) -> int:
    vision = config.vision_config
    patches = rows * cols
    kind = config.model_type
    d = vision.embed_dim if kind == "qwen2_vl" else vision.hidden_size
    embed = patches * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * d
    projections = 4 * patches * d * d  # qkv + proj
    mergers = 1
    if kind == "qwen2_5_vl":
        mlp = 3 * patches * d * vision.intermediate_size  # gate, up, down
        full = set(vision.fullatt_block_indexes)
        window_attention = 2 * d * sum(n * n for n in qwen_windows(config, rows, cols))
        attention = sum(2 * patches * patches * d if i in full else window_attention for i in range(vision.depth))
        out = vision.out_hidden_size
    elif kind == "qwen3_vl":
        mlp = 2 * patches * d * vision.intermediate_size  # fc1, fc2
        attention = vision.depth * 2 * patches * patches * d
        out = vision.out_hidden_size
        mergers += len(vision.deepstack_visual_indexes)  # one more merger per DeepStack level
    else:
        mlp = 2 * patches * d * d * vision.mlp_ratio  # fc1, fc2
        attention = vision.depth * 2 * patches * patches * d
        out = vision.hidden_size
    merged = patches // vision.spatial_merge_size**2
    wide = d * vision.spatial_merge_size**2
    merger = mergers * merged * (wide * wide + wide * out)
    return embed + vision.depth * (projections + mlp) + attention + merger


def roofline_ms(flops: float, bytes_moved: float, peak_flops_per_s: float, peak_bytes_per_s: float) -> float:
    """The time bound max(FLOPs / peak compute, bytes / peak bandwidth), in ms."""
    return 1000.0 * max(flops / peak_flops_per_s, bytes_moved / peak_bytes_per_s)


def _check_layers(g: DecoderGeometry, tokens: TokensPerLayer) -> None:
    lengths = {len(row) for row in tokens}
    if lengths != {g.layers}:
        raise ValueError(f"token counts cover {sorted(lengths)} layers; the decoder has {g.layers}")
