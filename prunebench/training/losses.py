"""Training objectives shared by the selector trainer and the tiny-LLaVA recipe (the VLM stays frozen)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunebench.engine.adapters import LlavaAdapter



def vlm_loss(adapter: LlavaAdapter, batch: dict[str, torch.Tensor], image_embeds: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens, with ``image_embeds`` in the image slots."""
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    hidden = adapter.embed(input_ids)
    image_slots = (input_ids == adapter.image_token_id)[..., None]
    hidden = hidden.masked_scatter(image_slots, image_embeds.to(hidden.dtype))
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return decoder_loss(adapter, hidden, attention_mask, positions, labels)


def decoder_loss(adapter: LlavaAdapter, hidden: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the decoder fed ``hidden`` (embeddings) on the labelled tokens."""
    out = adapter.decoder(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    targets = labels[:, 1:]
    scored = targets != -100
    # the LM head only on the positions that predict a labelled token
    logits = adapter.lm_head(out.last_hidden_state[:, :-1][scored]).float()
    return F.cross_entropy(logits, targets[scored])


def vision_features(adapter: LlavaAdapter, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return adapter.encode_images(pixel_values).features


def autoselect_loss(module, adapter: LlavaAdapter, batch, k: int, tau: float, generator) -> tuple[torch.Tensor, dict]:
    features = vision_features(adapter, batch["pixel_values"])
    selected, _ = module(features, k=k, tau=tau, generator=generator)
    loss = vlm_loss(adapter, batch, adapter.project(selected.to(features.dtype)))
    return loss, {}


def gumbel_loss(module, adapter: LlavaAdapter, batch, tau: float, generator) -> tuple[torch.Tensor, dict]:
    features = vision_features(adapter, batch["pixel_values"])
    reconstruction, keep = module(features, tau=tau, generator=generator)
    base = module.module if hasattr(module, "module") else module  # unwrap DDP
    loss, mse, kept = base.loss(features, reconstruction, keep)
    return loss, {"mse": float(mse.detach()), "kept": float(kept.detach())}
