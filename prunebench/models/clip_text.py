"""CLIP's joint image-text space, for methods that score visual tokens against the instruction
with CLIP's text tower (CDPruner on LLaVA-1.5). LLaVA checkpoints hold CLIP's vision tower only,
so the text tower, its tokenizer, the vision ``post_layernorm`` and ``visual_projection`` come from
the CLIP checkpoint the tower was taken from (``openai/clip-vit-large-patch14-336`` for
LLaVA-1.5), loaded from local files only, safetensors only.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from prunebench.errors import ModelNotFoundError

PROJECTION_KEYS = ("visual_projection.weight", "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias")


class ClipSpace(nn.Module):
    """CLIP's text tower with projection, and the vision side's last norm and projection."""

    def __init__(self, text_model: nn.Module, tokenizer, post_layernorm: nn.LayerNorm, visual_projection: nn.Linear,
                 files: list[Path]):
        super().__init__()
        self.files = files  # what it was loaded from: their contents are part of a record's key
        self.text_model = text_model.eval()
        self.tokenizer = tokenizer
        self.post_layernorm = post_layernorm
        self.visual_projection = visual_projection

    @property
    def vision_width(self) -> int:
        return self.visual_projection.in_features

    @torch.inference_mode()
    def text_embeds(self, text: str) -> torch.Tensor:
        """``(M, P)`` projected embeddings of ``text`` in M chunks of the text tower's context
        (77 tokens): tokenized whole (BOS ... EOS, no truncation), right-padded with id 0 and mask 0
        to a multiple of the context, each chunk encoded on its own (as CDPruner does)."""
        context = self.text_model.config.max_position_embeddings
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        chunks = (ids.shape[1] - 1) // context + 1
        pad = chunks * context - ids.shape[1]
        device = self.visual_projection.weight.device
        inputs = {
            "input_ids": torch.cat([ids, ids.new_zeros(1, pad)], dim=1).view(chunks, context).to(device),
            "attention_mask": torch.cat([torch.ones_like(ids), ids.new_zeros(1, pad)], dim=1).view(chunks, context).to(device),
        }
        return self.text_model(**inputs).text_embeds.float()

    @torch.inference_mode()
    def image_embeds(self, patch_states: torch.Tensor) -> torch.Tensor:
        """``(B, N, P)``: vision-tower patch states through ``post_layernorm`` and ``visual_projection``."""
        return self.visual_projection(self.post_layernorm(patch_states.to(self.post_layernorm.weight.dtype)).float())


@functools.lru_cache(maxsize=2)
def load_clip_space(name: str) -> ClipSpace:
    """The CLIP space of checkpoint ``name`` (a hub id in the local cache, or a directory), in float32
    on the CPU (``.to(device)`` moves it; one copy per name is kept)."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open
    from transformers import AutoTokenizer, CLIPConfig, CLIPTextModelWithProjection

    try:
        directory = Path(name) if os.path.isdir(name) else Path(snapshot_download(name, local_files_only=True))
        text_model = CLIPTextModelWithProjection.from_pretrained(directory, dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        eps = CLIPConfig.from_pretrained(directory).vision_config.layer_norm_eps
    except (OSError, ValueError) as err:  # not cached, no safetensors file, or not a hub id (HFValidationError)
        raise ModelNotFoundError(
            f"cannot load the CLIP checkpoint {name!r} (text tower, tokenizer, visual_projection) from local files "
            f"({err.__class__.__name__}; prunebench loads safetensors only); download it first (`hf download {name}`) into "
            f"HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}, or pass a local directory"
        ) from None
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            present = set(f.keys())
            tensors.update({key: f.get_tensor(key) for key in PROJECTION_KEYS if key in present})
    missing = [key for key in PROJECTION_KEYS if key not in tensors]
    if missing:
        raise ModelNotFoundError(f"the CLIP checkpoint {name!r} lacks {', '.join(missing)}: it must be a full CLIPModel")
    projection = tensors["visual_projection.weight"].float()
    visual_projection = nn.Linear(projection.shape[1], projection.shape[0], bias=False)
    visual_projection.weight.data.copy_(projection)
    norm = nn.LayerNorm(projection.shape[1], eps=eps)
    norm.weight.data.copy_(tensors["vision_model.post_layernorm.weight"].float())
    norm.bias.data.copy_(tensors["vision_model.post_layernorm.bias"].float())
    return ClipSpace(text_model, tokenizer, norm, visual_projection, sorted(p for p in directory.iterdir() if p.is_file()))
