"""Model adapters: where a VLM keeps its vision tower, projector and decoder.

The engine talks to a model only through an adapter, so a new backbone is a new adapter, not a
new engine. Wired backbones:

- ``LlavaForConditionalGeneration`` (LLaVA-1.5): CLIP -> MLP projector -> Llama; 576 tokens.
- ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT, anyres): the base image and its crops go
  through CLIP, are projected, unpadded and packed with one ``image_newline`` token per row
  (HF's own ``pack_image_features``). Every packed token, newlines included, is a visual token;
  a budget K is the total kept per image (as FastV/SparseVLM/VisionZip report for NeXT).
- ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``: dynamic
  resolution; the vision tower's merger (2x2 patches -> one token) is the projector, so a visual
  token's vision features are its four patches' features side by side (``4 * d_v``). Positions
  are 3-D M-RoPE ids from the model's own ``get_rope_index``. Token counts vary per image, so a
  fraction budget (``25%``) is the natural form.
- ``Qwen3VLForConditionalGeneration``: as Qwen2-VL (no window attention, a LayerNorm-per-patch
  merger), plus DeepStack: three more mergers turn early vision blocks into tokens the model adds
  to the outputs of decoder layers 0-2 at the image slots (``VisionOutput.deepstack``; the engine
  adds each kept token's own rows).
- ``InternVLForConditionalGeneration`` (InternVL 3 / 3.5): InternViT per tile, CLS dropped, pixel
  shuffle 0.5 (a token = a 2x2 patch block, ``4 * d_v``), LN-MLP projector. An image is its tiles
  (row-major crops, then a thumbnail when there are several), one run of tokens; a budget counts
  every tile's tokens, as for NeXT.
- ``LlavaOnevisionForConditionalGeneration``: NeXT's packing with SigLIP (no CLS), no newline after
  the base view, and the crop grid's tokens interpolated down when they exceed the anyres_max cap.
- ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` (SmolVLM): SigLIP per
  tile (tiles + a global image), pixel shuffle (a token = an s x s patch block), one linear layer.
  An image's tokens come in one run per tile with text markers between them (``<row_r_col_c>``,
  ``<global-img>``): the markers are text and stay; a budget counts the tokens of every tile.

Per sample, images give ``counts[b]`` visual tokens; tensors over them are ``(B, n_max, ...)``,
right-padded. The extra processor outputs an adapter needs are named by ``image_keys``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

from prunebench.errors import UserError


class BackboneError(UserError, ValueError):
    """Inputs or signals a backbone cannot provide, with the reason."""


@dataclass
class VisionOutput:
    """What the vision side produced for a batch of images (one image per sample)."""

    counts: list[int]  # visual tokens per sample
    features: torch.Tensor | None  # (B, n_max, d) vision features per visual token, pre-projector
    hidden_states: tuple[torch.Tensor, ...] | None  # vision tower hidden states; [i] enters layer i (read via Adapter.vision_hidden)
    patch_offset: int = 0  # index of the first patch in hidden_states (1 when a CLS token leads)
    embeds: torch.Tensor | None = None  # (B, n_max, D) LLM tokens, when the backbone builds them itself
    no_features: str | None = None  # why ``features`` is missing
    no_tower_signals: str | None = None  # why the vision tower's attention/keys/hidden are not offered
    deepstack: tuple[torch.Tensor, ...] = ()  # (B, n_max, D) per decoder layer 0, 1, ..: added to that layer's output (Qwen3-VL)
    grid: list[tuple[int, int]] | None = None  # per sample, (rows, columns) of its visual tokens in row-major order
    no_grid: str | None = "its visual tokens are not one row-major 2-D grid (tiles, crops or packed runs)"  # why no ``grid``


def _module_rotary(layer: nn.Module):
    """The rotary helper of the decoder's own modelling file."""
    return sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample ``(n_b, d)`` rows -> ``(B, n_max, d)``, zero right-padded."""
    n_max = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), n_max, rows[0].shape[-1])
    for b, row in enumerate(rows):
        out[b, : row.shape[0]] = row
    return out


class Adapter:
    """The parts every backbone shares: a decoder with layers, norm, rotary embedding, lm_head."""

    image_keys: tuple[str, ...] = ()  # processor outputs ``encode_images`` needs besides pixels

    def __init__(self, model: nn.Module, decoder: nn.Module, image_token_id: int):
        self.model = model
        self.decoder = decoder
        self.lm_head = model.lm_head
        self.image_token_id = image_token_id
        self.apply_rotary = _module_rotary(self.layers[0])
        kinds = set(getattr(decoder.config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:  # the engine builds full causal masks only
            raise NotImplementedError(
                f"{type(model).__name__}: decoder layer types {sorted(kinds)}; prunebench runs full-attention decoders "
                "(a checkpoint with use_sliding_window: true is not supported)"
            )

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def visual_tokens_per_image(self) -> int:
        raise BackboneError(
            f"{type(self.model).__name__}: visual tokens vary per image; budgets are checked per image at run time"
        )

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the decoder was built for (``max_position_embeddings``)."""
        return getattr(self.decoder.config, "max_position_embeddings", None)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    def sample_pixels(self, pixel_values: torch.Tensor, **image_inputs) -> list[torch.Tensor]:
        """Per sample, its image's pixels, the same whatever batch it is in (seeds use them)."""
        return list(pixel_values)

    def image_inputs(self, inputs) -> dict[str, torch.Tensor]:
        """The extra image inputs (``image_keys``) picked from a processor output."""
        missing = [key for key in self.image_keys if key not in inputs]
        if missing:
            raise BackboneError(
                f"{type(self.model).__name__} needs the processor outputs {', '.join(self.image_keys)} "
                f"besides pixel_values; missing: {', '.join(missing)}"
            )
        return {key: inputs[key] for key in self.image_keys}

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **image_inputs) -> torch.Tensor | None:
        """The model's own position ids, or None for contiguous 1-D ids."""
        return None

    def embed_images(self, vision: VisionOutput) -> torch.Tensor:
        """``(B, n_max, D)`` LLM tokens of the images."""
        return vision.embeds if vision.embeds is not None else self.project(vision.features)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def vision_attention(self, vision: VisionOutput, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        raise BackboneError(vision.no_tower_signals or "this backbone offers no vision-tower attention")

    def vision_keys(self, vision: VisionOutput, layer: int) -> torch.Tensor:
        raise BackboneError(vision.no_tower_signals or "this backbone offers no vision-tower keys")

    def vision_hidden(self, vision: VisionOutput, index: int) -> torch.Tensor:
        raise BackboneError(vision.no_tower_signals or "this backbone offers no vision-tower hidden states")


class LlavaAdapter(Adapter):
    """LLaVA-1.5: CLIP vision tower -> MLP projector -> Llama-family decoder."""

    CLS_IN_GRID = "vision_feature_select_strategy 'full' puts the CLS token before the patch grid"

    def __init__(self, model: nn.Module):
        inner = model.model
        super().__init__(model, inner.language_model, model.config.image_token_id)
        self.vision_tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        config = model.config
        self.feature_layer = single_feature_layer(config)
        self.select_strategy = config.vision_feature_select_strategy

    @property
    def vision_layers(self) -> nn.ModuleList:
        # transformers 5 flattened CLIPVisionModel; older releases nest it under .vision_model
        return getattr(self.vision_tower, "vision_model", self.vision_tower).encoder.layers

    @property
    def visual_tokens_per_image(self) -> int:
        vision = self.model.config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        return n + (1 if self.select_strategy == "full" else 0)

    def encode_images(self, pixel_values: torch.Tensor) -> VisionOutput:
        """The tower up to the layer the projector reads and no further: later layers are never used
        (HF runs them all; serving engines drop them). LLaVA-1.5 skips 1 of CLIP-L's 24 layers."""
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        states = [hidden]
        for layer in self.vision_layers[: clip_layers_run(self.model.config)]:
            hidden = layer(hidden, None)
            states.append(hidden)
        features, offset = hidden, 0
        if self.select_strategy == "default":
            features, offset = features[:, 1:], 1
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        grid, no_grid = ([(side, side)] * features.shape[0], None) if offset else (None, self.CLS_IN_GRID)
        return VisionOutput([features.shape[1]] * features.shape[0], features, tuple(states), offset,
                            grid=grid, no_grid=no_grid)

    def vision_hidden(self, vision: VisionOutput, index: int) -> torch.Tensor:
        """``hidden_states[index]`` of the whole tower (negative: counted from its end), which enters
        encoder layer ``index``; only states up to the projector's feature layer exist."""
        depth = len(self.vision_layers) + 1
        if not -depth <= index < depth:
            raise BackboneError(f"vision hidden state {index}: this tower has {depth} (-{depth}..{depth - 1})")
        if index % depth >= len(vision.hidden_states):
            raise BackboneError(
                f"vision hidden state {index} comes after the projector's feature layer "
                f"({self.feature_layer}), beyond which the tower is not run; choose an index up to that layer"
            )
        return vision.hidden_states[index % depth]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def vision_attention(self, vision: VisionOutput, layer: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention inside vision encoder layer ``layer`` (HF ``attentions[layer]``).

        ``rows``: query indices (default: all). Returns ``(B, H, R, T)`` over all T tokens.
        """
        block = self.vision_layers[layer]
        hidden = block.layer_norm1(self.vision_hidden(vision, layer % len(self.vision_layers)))
        attn = block.self_attn
        queries = hidden if rows is None else hidden[:, rows]
        q = _heads(attn.q_proj(queries), attn.head_dim)
        k = _heads(attn.k_proj(hidden), attn.head_dim)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
        return scores.softmax(-1)

    def vision_keys(self, vision: VisionOutput, layer: int) -> torch.Tensor:
        """Keys of vision encoder layer ``layer``, ``(B, H, T, d)``."""
        block = self.vision_layers[layer]
        hidden = block.layer_norm1(self.vision_hidden(vision, layer % len(self.vision_layers)))
        return _heads(block.self_attn.k_proj(hidden), block.self_attn.head_dim)


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT (anyres): base image + crops through CLIP, projected, unpadded, packed with
    newline tokens by the model's own ``get_image_features``. Budgets count all packed tokens."""

    image_keys = ("image_sizes",)
    NO_FEATURES = (
        "LLaVA-NeXT packs its visual tokens with image_newline tokens that live in LLM space and have "
        "no vision feature, and its vision tower runs per crop (base image + anyres crops), so "
        "pre-projector features, the CLS token's attention and vision-tower keys do not map onto the "
        "packed tokens; use a method that scores the projected tokens or the LLM's attention"
    )

    NO_GRID = (
        "LLaVA-NeXT's packed tokens are a base-image grid followed by unpadded anyres crops with one "
        "newline token per row, not one row-major grid"
    )

    def __init__(self, model: nn.Module):
        inner = model.model
        super().__init__(model, inner.language_model, model.config.image_token_id)
        config = model.config
        single_feature_layer(config)
        self.inner = inner
        self.projector = inner.multi_modal_projector

    def sample_pixels(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """The base image and crops of each sample, without the padding a batch adds."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        counts = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                  for size in image_sizes]
        return [pixels[:count] for pixels, count in zip(pixel_values, counts)]

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionOutput:
        config = self.model.config
        out = self.inner.get_image_features(
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        rows = list(out.pooler_output)
        return VisionOutput(
            counts=[r.shape[0] for r in rows], features=None, hidden_states=None, embeds=_pad_rows(rows),
            no_features=self.NO_FEATURES, no_tower_signals=self.NO_FEATURES, no_grid=self.NO_GRID,
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class QwenVLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: ViT (2-D RoPE; window attention in 2.5) -> 2x2 patch merger -> Qwen2
    decoder with M-RoPE. The merger is the projector; a visual token's features are its four
    patches' last-block features concatenated (``(B, n_max, 4 * d_v)``), which ``project`` maps
    exactly as the merger does."""

    image_keys = ("image_grid_thw",)
    NO_TOWER_SIGNALS = (
        "the Qwen2-VL vision tower has no CLS token, and its attention runs over the 4x more patches "
        "before the 2x2 merger (in windows on Qwen2.5-VL), so CLS attention, vision-tower attention, "
        "keys and hidden states are not offered on it"
    )

    def __init__(self, model: nn.Module):
        inner = model.model
        super().__init__(model, inner.language_model, model.config.image_token_id)
        self.inner = inner
        self.visual = inner.visual
        self.merge_unit = self.visual.spatial_merge_size**2
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")  # Qwen2.5-VL

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """``(3, B, S)`` M-RoPE ids exactly as the model computes them for generate."""
        kinds = (input_ids == self.image_token_id).int()
        positions, _ = self.inner.get_rope_index(
            input_ids, mm_token_type_ids=kinds, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        return positions

    def sample_pixels(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list[torch.Tensor]:
        """The patches of each sample's image (the processor concatenates a batch's)."""
        return list(pixel_values.split(image_grid_thw.prod(-1).tolist()))

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionOutput:
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw)
        patches = out.last_hidden_state
        grouped = patches.reshape(-1, self.merge_unit * patches.shape[-1])  # merge groups, tower order
        if self.windowed:  # 2.5 runs in window order and un-permutes only the merger's output
            from transformers.vision_utils import get_vision_window_index

            config = self.visual.config
            window, _ = get_vision_window_index(image_grid_thw, config.spatial_merge_size, config.window_size, config.patch_size)
            grouped = grouped[torch.argsort(window.to(grouped.device))]
        counts = (image_grid_thw.prod(-1) // self.merge_unit).tolist()
        return VisionOutput(
            counts=counts,
            features=_pad_rows(list(grouped.split(counts))),
            hidden_states=None,
            embeds=_pad_rows(list(out.pooler_output.split(counts))),
            no_tower_signals=self.NO_TOWER_SIGNALS,
            grid=self.token_grid(image_grid_thw),
        )

    def token_grid(self, image_grid_thw: torch.Tensor) -> list[tuple[int, int]]:
        """Per image, (rows, columns) of its merged tokens, which come in raster order."""
        merge = self.visual.spatial_merge_size
        return [(int(h) // merge, int(w) // merge) for _, h, w in image_grid_thw.tolist()]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        merger = self.visual.merger
        per_patch = features.reshape(*features.shape[:-1], self.merge_unit, -1)
        return merger.mlp(merger.ln_q(per_patch).flatten(-2))


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen2-VL's layout (a token = 4 patches side by side, M-RoPE from the model's own
    ``get_rope_index``) with a vision tower without windows, a merger that normalises each patch,
    and DeepStack: the tokens of ``deepstack_visual_indexes`` vision blocks, each through its own
    merger, are added to the outputs of decoder layers 0, 1, 2 at the image slots."""

    NO_TOWER_SIGNALS = (
        "the Qwen3-VL vision tower has no CLS token, and its attention runs over the 4x more patches "
        "before the 2x2 merger, so CLS attention, vision-tower attention, keys and hidden states are not offered on it"
    )

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionOutput:
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw)
        patches = out.last_hidden_state
        counts = (image_grid_thw.prod(-1) // self.merge_unit).tolist()
        grouped = patches.reshape(-1, self.merge_unit * patches.shape[-1])  # merge groups, raster order
        return VisionOutput(
            counts=counts,
            features=_pad_rows(list(grouped.split(counts))),
            hidden_states=None,
            embeds=_pad_rows(list(out.pooler_output.split(counts))),
            no_tower_signals=self.NO_TOWER_SIGNALS,
            deepstack=tuple(_pad_rows(list(level.split(counts))) for level in out.deepstack_features),
            grid=self.token_grid(image_grid_thw),
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        merger = self.visual.merger
        per_patch = merger.norm(features.reshape(*features.shape[:-1], self.merge_unit, -1))
        return merger.linear_fc2(merger.act_fn(merger.linear_fc1(per_patch.flatten(-2))))


class InternVLAdapter(Adapter):
    """InternVL 3 / 3.5: InternViT per tile -> CLS dropped -> pixel shuffle 0.5 -> LN-MLP projector
    -> Qwen2 / Qwen3 decoder. A visual token's features are its 2x2 patch block side by side
    (``4 * d_v``), which ``project`` maps as the projector does. The processor does not return the
    tiles per image; they are the image tokens over the tokens per tile (``image_tiles``)."""

    image_keys = ("image_tiles",)
    NO_TOWER_SIGNALS = (
        "InternVL's vision tower runs per tile and its pixel shuffle folds 2x2 patches into one token, so the "
        "CLS token's attention, vision-tower keys and hidden states are per tile and per patch, not per visual token"
    )

    def __init__(self, model: nn.Module):
        inner = model.model
        super().__init__(model, inner.language_model, model.config.image_token_id)
        config = model.config
        single_feature_layer(config)
        self.inner = inner
        self.projector = inner.multi_modal_projector
        self.tokens_per_tile = config.image_seq_length

    def image_inputs(self, inputs) -> dict[str, torch.Tensor]:
        if "image_tiles" in inputs:
            return {"image_tiles": inputs["image_tiles"]}
        if "input_ids" not in inputs:
            raise BackboneError(
                f"{type(self.model).__name__} needs the tiles per image (image_tiles) or the prompt's input_ids to count them"
            )
        return {"image_tiles": (inputs["input_ids"] == self.image_token_id).sum(-1) // self.tokens_per_tile}

    def sample_pixels(self, pixel_values: torch.Tensor, image_tiles: torch.Tensor) -> list[torch.Tensor]:
        """The tiles of each sample's image (the processor concatenates a batch's)."""
        return list(pixel_values.split(image_tiles.tolist()))

    def encode_images(self, pixel_values: torch.Tensor, image_tiles: torch.Tensor) -> VisionOutput:
        config = self.model.config
        tower = self.inner.vision_tower
        last = config.vision_feature_layer == -1
        out = tower(pixel_values=pixel_values.to(self.inner.dtype), output_hidden_states=not last)
        hidden = out.last_hidden_state if last else out.hidden_states[config.vision_feature_layer]
        patches = hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden
        side = int(patches.shape[1] ** 0.5)
        blocks = self.inner.pixel_shuffle(patches.reshape(len(patches), side, side, -1), scale_factor=config.downsample_ratio)
        features = blocks.reshape(len(patches), -1, blocks.shape[-1])  # (tiles, tokens per tile, 4 d_v)
        counts = (image_tiles * features.shape[1]).tolist()

        def per_sample(x: torch.Tensor) -> torch.Tensor:
            return _pad_rows(list(x.reshape(-1, x.shape[-1]).split(counts)))

        return VisionOutput(counts, per_sample(features), None, embeds=per_sample(self.projector(features)),
                            no_tower_signals=self.NO_TOWER_SIGNALS)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: the model's own packing (SigLIP per crop, projector per crop, the crop grid
    unpadded and interpolated down to the anyres_max cap, a newline per grid row), as for NeXT."""

    NO_FEATURES = (
        "LLaVA-OneVision packs its visual tokens with image_newline tokens that live in LLM space and have no "
        "vision feature, interpolates the crop grid's tokens after the projector (anyres_max), and its SigLIP "
        "tower has no CLS token and runs per crop, so pre-projector features, CLS attention and vision-tower "
        "keys do not map onto the packed tokens; use a method that scores the projected tokens or the LLM's attention"
    )

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionOutput:
        rows = list(self.inner.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output)
        return VisionOutput(
            counts=[r.shape[0] for r in rows], features=None, hidden_states=None, embeds=_pad_rows(rows),
            no_features=self.NO_FEATURES, no_tower_signals=self.NO_FEATURES,
        )


class SmolVLMAdapter(Adapter):
    """SmolVLM (Idefics3 / SmolVLM classes): SigLIP per tile (all-zero padding tiles dropped, as the
    model does) -> pixel shuffle -> one linear layer -> Llama. A visual token's features are its
    ``s x s`` patch block side by side (``s^2 * d_v``), which ``project`` maps as the connector does."""

    image_keys = ("pixel_attention_mask",)
    NO_TOWER_SIGNALS = (
        "SmolVLM's SigLIP tower has no CLS token, runs per tile and its pixel shuffle folds s x s patches into one "
        "token, so CLS attention, vision-tower attention, keys and hidden states are not offered on it"
    )

    def __init__(self, model: nn.Module):
        inner = model.model
        super().__init__(model, inner.text_model, model.config.image_token_id)
        self.inner = inner
        self.connector = inner.connector

    def sample_pixels(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """The tiles of each sample's image, without the all-zero tiles a batch pads with."""
        return [tiles[(tiles != 0).flatten(1).any(-1)] for tiles in pixel_values.flatten(1, -4)]

    def encode_images(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor) -> VisionOutput:
        out = self.inner.get_image_features(pixel_values, pixel_attention_mask)
        rows = list(out.pooler_output)  # per sample: its tiles' tokens, tile after tile
        blocks = self.connector.pixel_shuffle(out.last_hidden_state, self.connector.scale_factor)
        counts = [len(row) for row in rows]
        features = list(blocks.reshape(-1, blocks.shape[-1]).split(counts))
        return VisionOutput(counts, _pad_rows(features), None, embeds=_pad_rows(rows), no_tower_signals=self.NO_TOWER_SIGNALS)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.connector.modality_projection(features)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*d) -> (B, H, T, d)"""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


ADAPTERS: dict[str, type[Adapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": QwenVLAdapter,
    "Qwen2_5_VLForConditionalGeneration": QwenVLAdapter,
    "Qwen3VLForConditionalGeneration": Qwen3VLAdapter,
    "InternVLForConditionalGeneration": InternVLAdapter,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionAdapter,
    "Idefics3ForConditionalGeneration": SmolVLMAdapter,
    "SmolVLMForConditionalGeneration": SmolVLMAdapter,
}


def adapter_for(model: nn.Module) -> Adapter:
    kind = type(model).__name__
    if kind not in ADAPTERS:
        raise NotImplementedError(f"no prunebench adapter for {kind}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[kind](model)


def clip_layers_run(config) -> int:
    """CLIP encoder layers a LLaVA config needs: those up to ``vision_feature_layer`` (-2: all but the last)."""
    return config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)


def single_feature_layer(config) -> int:
    """The one vision layer a LLaVA-style config's projector reads; a list of layers is not supported."""
    if not isinstance(config.vision_feature_layer, int):
        raise NotImplementedError(
            "prunebench supports a single vision_feature_layer (as LLaVA-1.5 uses); "
            f"this config has {config.vision_feature_layer!r}"
        )
    return config.vision_feature_layer
