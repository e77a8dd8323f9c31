"""Training objectives shared by the selector trainer and the tiny-LLaVA recipe (the VLM stays frozen)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunebench.engine.adapters import LlavaAdapter



def vlm_loss(adapter: LlavaAdapter, batch: dict[str, torch.Tensor], image_embeds: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled tokens, with ``image_embeds`` in the image slots."""
    hidden, positions = decoder_inputs(adapter, batch, image_embeds)
    return decoder_loss(adapter, hidden, batch["attention_mask"], positions, batch["labels"])


def decoder_inputs(adapter: LlavaAdapter, batch: dict[str, torch.Tensor],
                   image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings with ``image_embeds`` in the image slots, in order; contiguous position ids) of a
    right-padded batch: what decoder layer 0 is fed."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    hidden = adapter.embed(input_ids)
    image_slots = (input_ids == adapter.image_token_id)[..., None]
    hidden = hidden.masked_scatter(image_slots, image_embeds.to(hidden.dtype))
    return hidden, (attention_mask.cumsum(-1) - 1).clamp_min(0)


def drop_unselected(batch: dict[str, torch.Tensor], keep: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
    """The batch as a pre-LLM stage that re-indexes leaves the sequence: each row's image tokens
    not in ``keep`` (``(B, K)`` sorted indices into that row's image tokens) removed and the rest
    moved up, so the position ids :func:`decoder_inputs` counts over the mask are re-indexed."""
    input_ids = batch["input_ids"]
    kept = input_ids != image_token_id
    for row, chosen in enumerate(keep):
        kept[row, (input_ids[row] == image_token_id).nonzero().flatten()[chosen]] = True
    index = kept.nonzero()[:, 1].view(len(input_ids), -1)  # every row keeps the same count
    return {**batch, **{name: batch[name].gather(1, index) for name in ("input_ids", "attention_mask", "labels")}}


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


def autoselect_loss(module, adapter: LlavaAdapter, batch, k: int, tau: float, generator,
                    drop: bool = False) -> tuple[torch.Tensor, dict]:
    """``drop``: the step sees what inference sees: the non-selected tokens dropped, positions
    re-indexed, nothing noised or denoised (AutoSelect.forward)."""
    features = vision_features(adapter, batch["pixel_values"])
    if drop:
        selected, keep = module(features, k=k, tau=tau, generator=generator, drop=True)
        batch = drop_unselected(batch, keep, adapter.image_token_id)
    else:
        selected, _ = module(features, k=k, tau=tau, generator=generator)
    loss = vlm_loss(adapter, batch, adapter.project(selected.to(features.dtype)))
    return loss, {}


def gumbel_loss(module, adapter: LlavaAdapter, batch, tau: float, generator) -> tuple[torch.Tensor, dict]:
    features = vision_features(adapter, batch["pixel_values"])
    reconstruction, keep = module(features, tau=tau, generator=generator)
    base = module.module if hasattr(module, "module") else module  # unwrap DDP
    loss, mse, kept = base.loss(features, reconstruction, keep)
    return loss, {"mse": float(mse.detach()), "kept": float(kept.detach())}
