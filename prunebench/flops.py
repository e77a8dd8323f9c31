"""Analytic cost model of a LLaVA-style VLM: FLOPs per stage, KV-cache bytes, bytes moved.

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

from collections.abc import Sequence
from dataclasses import dataclass

# Decoders whose MLP is gated (gate, up, down): the three matrices the formula counts.
GATED_MLP_DECODERS = ("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text")

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
            "only 'llava' (fixed 336 px grid) is counted today"
        )
    grid = (vision.image_size // vision.patch_size) ** 2
    return grid + (1 if config.vision_feature_select_strategy == "full" else 0)


def vision_flops(config, images: int) -> int:
    """Vision tower (patch embedding + every encoder layer, as HF runs them all) + projector."""
    vision = config.vision_config
    if vision.model_type != "clip_vision_model":
        raise NotImplementedError(f"no FLOPs model for vision tower {vision.model_type!r}; supported: clip_vision_model")
    patches = (vision.image_size // vision.patch_size) ** 2
    seq = patches + 1  # CLS
    d, m = vision.hidden_size, vision.intermediate_size
    embed = patches * vision.num_channels * vision.patch_size**2 * d
    per_layer = 4 * seq * d * d + 2 * seq * seq * d + 2 * seq * d * m  # MLP: fc1, fc2
    width = config.text_config.hidden_size
    projector = visual_tokens_per_image(config) * (d * width + width * width)  # linear_1, linear_2
    return 2 * images * (embed + vision.num_hidden_layers * per_layer + projector)


def roofline_ms(flops: float, bytes_moved: float, peak_flops_per_s: float, peak_bytes_per_s: float) -> float:
    """The time bound max(FLOPs / peak compute, bytes / peak bandwidth), in ms."""
    return 1000.0 * max(flops / peak_flops_per_s, bytes_moved / peak_bytes_per_s)


def _check_layers(g: DecoderGeometry, tokens: TokensPerLayer) -> None:
    lengths = {len(row) for row in tokens}
    if lengths != {g.layers}:
        raise ValueError(f"token counts cover {sorted(lengths)} layers; the decoder has {g.layers}")
