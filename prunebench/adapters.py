"""Model adapters: where a VLM keeps its vision tower, projector and decoder.

The engine talks to a model only through an adapter, so a new backbone is a new adapter, not a
new engine. Only LLaVA-1.5 (``LlavaForConditionalGeneration``) is wired today.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionOutput:
    features: torch.Tensor  # (B, N, d_v) the features the projector consumes (CLS dropped)
    hidden_states: tuple[torch.Tensor, ...]  # vision tower hidden states; [i] enters encoder layer i
    patch_offset: int  # index of the first patch in hidden_states (1 when a CLS token leads)


class LlavaAdapter:
    """LLaVA-1.5: CLIP vision tower -> MLP projector -> Llama-family decoder."""

    def __init__(self, model: nn.Module):
        inner = model.model
        self.model = model
        self.vision_tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.decoder = inner.language_model
        self.lm_head = model.lm_head
        config = model.config
        self.image_token_id = config.image_token_id
        if not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError(
                "prunebench supports a single vision_feature_layer (as LLaVA-1.5 uses); "
                f"this config has {config.vision_feature_layer!r}"
            )
        self.feature_layer = config.vision_feature_layer
        self.select_strategy = config.vision_feature_select_strategy
        # the rotary helper of the decoder's own modelling file
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def vision_layers(self) -> nn.ModuleList:
        # transformers 5 flattened CLIPVisionModel; older releases nest it under .vision_model
        return getattr(self.vision_tower, "vision_model", self.vision_tower).encoder.layers

    @property
    def visual_tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + (1 if self.select_strategy == "full" else 0)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def encode_images(self, pixel_values: torch.Tensor) -> VisionOutput:
        out = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        features = out.hidden_states[self.feature_layer]
        offset = 0
        if self.select_strategy == "default":
            features, offset = features[:, 1:], 1
        return VisionOutput(features=features, hidden_states=out.hidden_states, patch_offset=offset)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def vision_attention(self, vision: VisionOutput, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention inside vision encoder layer ``layer`` (HF ``attentions[layer]``).

        ``rows``: query indices (default: all). Returns ``(B, H, R, T)`` over all T tokens.
        """
        layers = self.vision_layers
        block = layers[layer]
        hidden = block.layer_norm1(vision.hidden_states[layer % len(layers)])
        attn = block.self_attn
        queries = hidden if rows is None else hidden[:, rows]
        q = _heads(attn.q_proj(queries), attn.head_dim)
        k = _heads(attn.k_proj(hidden), attn.head_dim)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        return scores.softmax(-1)

    def vision_keys(self, vision: VisionOutput, layer: int) -> torch.Tensor:
        """Keys of vision encoder layer ``layer``, ``(B, H, T, d)``."""
        layers = self.vision_layers
        block = layers[layer]
        attn = block.self_attn
        return _heads(attn.k_proj(block.layer_norm1(vision.hidden_states[layer % len(layers)])), attn.head_dim)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)"""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def adapter_for(model: nn.Module) -> LlavaAdapter:
    kind = type(model).__name__
    if kind == "LlavaForConditionalGeneration":
        return LlavaAdapter(model)
    raise NotImplementedError(
        f"no prunebench adapter for {kind}; supported: LlavaForConditionalGeneration "
        "(LLaVA-NeXT and Qwen2-VL adapters are planned)"
    )
