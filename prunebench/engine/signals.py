"""What a method sees at a stage: lazily computed signals over the current batch.

Nothing here is computed unless the method asks. Attention is never taken from an eager
forward: the rows a method names are recomputed from that layer's own q/k projections and
rotary embedding (keys of already-run layers come straight from the KV cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import zlib
from functools import cached_property

import torch

from prunebench.engine.adapters import Adapter, VisionOutput
from prunebench.errors import MethodError
from prunebench.engine.sequence import TokenLayout

if TYPE_CHECKING:
    from prunebench.engine.method import Stage


class SampleKeys:
    """Per sample, a number identifying it by content: its prompt tokens and its image's pixels
    (so the same question on two images differs), whatever batch it is in. Computed on first use
    (a host copy of ids and pixels), only by methods that draw at random."""

    def __init__(self, input_ids: torch.Tensor, valid: torch.Tensor, pixels: Callable[[], list[torch.Tensor]]):
        self._ids, self._valid, self._pixels = input_ids, valid, pixels
        self._keys: list[int] | None = None

    def __getitem__(self, b: int) -> int:
        if self._keys is None:
            self._keys = []
            for ids, keep, image in zip(self._ids, self._valid, self._pixels()):
                key = zlib.crc32(ids[keep].cpu().numpy().tobytes())
                self._keys.append(zlib.crc32(image.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes(), key))
        return self._keys[b]


class SignalUnavailableError(MethodError):
    """A signal this backbone cannot provide: a method that needs it cannot run on this model."""


class StageContext:
    """Signals for one stage. ``layer`` is None before the LLM, else the decoder layer about to run.

    Visual tokens are indexed 0..n-1 per sample, in sequence order; methods return indices in
    that space. Tensors over visual tokens are ``(B, n_max, ...)``, right-padded where samples
    hold different counts (``visual_mask`` says which entries are real).
    """

    def __init__(
        self,
        *,
        stage: Stage,
        keep: list[int],
        adapter: Adapter,
        vision: VisionOutput,
        image_embeds: torch.Tensor,
        layout: TokenLayout,
        hidden: torch.Tensor,
        layer_inputs: dict[int, torch.Tensor],
        cache,
        sample_keys: SampleKeys,
        seed: int,
        state: dict,
        input_ids: torch.Tensor | None = None,
        tokenizer=None,
    ):
        self.stage = stage
        self.layer = stage.layer
        self.keep = keep
        self.layout = layout
        self.hidden = hidden  # (B, S, D): embeddings before the LLM, else the input of `layer`
        self.state = state  # shared by the stages of one prefill: a multi-stage method's memory
        self._sample_keys = sample_keys
        self._seed = seed
        self._adapter = adapter
        self._vision = vision
        self._image_embeds = image_embeds
        self._layer_inputs = layer_inputs
        self._cache = cache
        self._input_ids = input_ids
        self._tokenizer = tokenizer

    # -- shapes and bookkeeping -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (schedules that average over layers must agree with it)."""
        return self._adapter.num_layers

    @cached_property
    def n_visual(self) -> list[int]:
        return self.layout.n_visual

    @property
    def uniform_keep(self) -> int:
        """The kept count when it is the same for every sample (it is, unless budgets are fractions
        over images of different sizes)."""
        if len(set(self.keep)) != 1:
            raise MethodError(f"samples keep different counts {self.keep}; use ctx.keep[b] per sample")
        return self.keep[0]

    @cached_property
    def visual_slots(self) -> list[torch.Tensor]:
        """Per sample, the sequence slots of its visual tokens."""
        return self.layout.visual_positions()

    @cached_property
    def visual_index(self) -> torch.Tensor:
        """``(B, n_max)`` slots of the visual tokens, padded with the last real slot."""
        n_max = max(self.n_visual)
        out = torch.zeros(self.batch_size, n_max, dtype=torch.long, device=self.hidden.device)
        for b, slots in enumerate(self.visual_slots):
            out[b, : len(slots)] = slots
            out[b, len(slots) :] = slots[-1] if len(slots) else 0
        return out

    @cached_property
    def visual_mask(self) -> torch.Tensor:
        """``(B, n_max)`` True where a visual entry is real."""
        n = torch.tensor(self.n_visual, device=self.hidden.device)
        return torch.arange(self.visual_index.shape[1], device=n.device)[None] < n[:, None]

    @cached_property
    def patch_ids(self) -> torch.Tensor:
        """``(B, n_max)`` original image patch of each current visual token (-2 for merged ones)."""
        return self.layout.visual_id.gather(1, self.visual_index)

    @cached_property
    def last_slot(self) -> torch.Tensor:
        """``(B,)`` slot of each sample's last token (the end of the prompt, under left padding)."""
        return torch.full((self.batch_size,), self.hidden.shape[1] - 1, device=self.hidden.device)

    def top_k(self, scores: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the indices of its ``keep[b]`` highest ``scores`` (``(B, n_max)``) among its
        real visual tokens."""
        return [row[:n].topk(k).indices for row, n, k in zip(scores, self.n_visual, self.keep)]

    def generator(self, b: int) -> torch.Generator:
        """A generator for sample ``b`` seeded by (method seed, the sample's prompt tokens and image
        pixels): a sample draws the same tokens whatever batch it is in."""
        seed = zlib.crc32(f"{self._seed}:{self._sample_keys[b]}".encode())
        return torch.Generator(device=self.hidden.device).manual_seed(seed)

    def text_slots(self) -> list[torch.Tensor]:
        """Per sample, the slots of its text tokens."""
        text = self.layout.valid & ~self.layout.visual
        return [row.nonzero().flatten() for row in text]

    def text_after_image(self) -> list[str]:
        """Per sample, the prompt's text after its image (the instruction, and whatever the chat
        template puts after it), decoded by the engine's tokenizer without special tokens."""
        if self._tokenizer is None or self._input_ids is None:
            raise MethodError("the prompt's text needs the engine's tokenizer: create PruningEngine(model, tokenizer)")
        texts = []
        for ids in self._input_ids:
            image = (ids == self._adapter.image_token_id).nonzero()
            texts.append(self._tokenizer.decode(ids[int(image.max()) + 1 :], skip_special_tokens=True))
        return texts

    # -- vision signals ---------------------------------------------------------------------
    @property
    def vision_features(self) -> torch.Tensor:
        """``(B, n_max, d_v)`` vision features before the projector, one row per original visual
        token (Qwen2-VL: the 2x2 merged patches side by side, ``4 * d_v``)."""
        if self._vision.features is None:
            raise SignalUnavailableError(f"vision features are not available on this backbone: {self._vision.no_features}")
        return self._vision.features

    @property
    def image_embeds(self) -> torch.Tensor:
        """``(B, N, D)`` projector output, all original patches."""
        return self._image_embeds

    @property
    def token_grid(self) -> list[tuple[int, int]]:
        """Per sample, (rows, columns) of the image's visual tokens, which lie in row-major order
        (LLaVA-1.5: 24 x 24; Qwen2-VL: the merged grid). Describes the tokens as encoded, before
        any stage pruned them."""
        if self._vision.grid is None:
            raise SignalUnavailableError(f"the visual tokens form no single 2-D grid on this backbone: {self._vision.no_grid}")
        return self._vision.grid

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The model's projector: vision features ``(B, M, d_v)`` -> LLM tokens ``(B, M, D)``
        (for methods that merge before the projector and hand back ``Selection.merged``)."""
        return self._adapter.project(features)

    def vision_hidden(self, layer: int) -> torch.Tensor:
        """``(B, T, d_v)`` vision tower hidden states entering encoder layer ``layer``."""
        self._require_tower_signals("vision-tower hidden states")
        return self._adapter.vision_hidden(self._vision, layer)

    def cls_attention(self, layer: int = -2) -> torch.Tensor:
        """``(B, H, N)`` attention of the CLS query to each patch inside vision encoder ``layer``."""
        self._require_tower_signals("CLS attention")
        if self._vision.patch_offset != 1:
            raise SignalUnavailableError("this vision tower has no CLS token (vision_feature_select_strategy is not 'default')")
        probs = self._adapter.vision_attention(self._vision, layer, rows=torch.tensor([0]))
        return probs[:, :, 0, 1:]

    def vision_attention(self, layer: int) -> torch.Tensor:
        """``(B, H, T, T)`` full attention probabilities inside vision encoder ``layer``."""
        self._require_tower_signals("vision-tower attention")
        return self._adapter.vision_attention(self._vision, layer)

    def vision_keys(self, layer: int) -> torch.Tensor:
        """``(B, H, T, d)`` keys inside vision encoder ``layer`` (T counts the CLS token)."""
        self._require_tower_signals("vision-tower keys")
        return self._adapter.vision_keys(self._vision, layer)

    # -- LLM signals ------------------------------------------------------------------------
    def visual_hidden(self) -> torch.Tensor:
        """``(B, n_max, D)`` current visual tokens (projected embeddings before the LLM)."""
        return self.hidden.gather(1, self.visual_index[..., None].expand(-1, -1, self.hidden.shape[-1]))

    def layer_input(self, layer: int) -> torch.Tensor:
        if layer not in self._layer_inputs:
            raise MethodError(
                f"hidden states entering layer {layer} are not available at the stage before layer "
                f"{self.layer}; available layers: {sorted(self._layer_inputs) or 'none (pre-LLM stage)'}"
            )
        return self._layer_inputs[layer]

    def keys(self, layer: int) -> torch.Tensor:
        """``(B, H_kv, S, d)`` rotary-embedded keys of decoder ``layer`` over the current sequence."""
        if self.layer is not None and layer < self.layer and self._cache is not None:
            cached = self._cache.layers[layer].keys
            if cached is not None and cached.shape[-2] == self.hidden.shape[1]:
                return cached
        attn = self._adapter.layers[layer].self_attn
        normed = self._adapter.layers[layer].input_layernorm(self.layer_input(layer))
        k = _head_norm(attn, "k_norm", attn.k_proj(normed).view(*normed.shape[:-1], -1, attn.head_dim)).transpose(1, 2)
        cos, sin = self._rotary(normed)
        return self._rope(k, cos, sin)

    def attention(self, layer: int, rows: str | torch.Tensor = "last", visual_only: bool = True) -> torch.Tensor:
        """Softmax(q_i K^T / sqrt(d)) of decoder ``layer`` for the query rows named.

        ``rows``: ``"last"`` (each sample's last prompt token) or a ``(B, R)`` tensor of slots.
        Causal and padding masks apply as in the model. Returns ``(B, H, R, n_max)`` over the
        visual tokens when ``visual_only`` (padded entries are 0), else ``(B, H, R, S)``.
        """
        row_slots = self.last_slot[:, None] if isinstance(rows, str) and rows == "last" else rows
        if isinstance(row_slots, str):
            raise MethodError(f"rows must be 'last' or a (B, R) tensor of slots, not {rows!r}")
        block = self._adapter.layers[layer]
        attn = block.self_attn
        hidden = self.layer_input(layer)
        picked = hidden.gather(1, row_slots[..., None].expand(-1, -1, hidden.shape[-1]))
        q = attn.q_proj(block.input_layernorm(picked))
        q = _head_norm(attn, "q_norm", q.view(*q.shape[:-1], -1, attn.head_dim)).transpose(1, 2)  # (B, H, R, d)
        cos, sin = self._rotary(hidden, slots=row_slots)
        q = self._rope(q, cos, sin)
        k = self.keys(layer)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query heads
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling
        key_slot = torch.arange(k.shape[-2], device=k.device)
        allowed = self.layout.valid[:, None, :] & (key_slot[None, None, :] <= row_slots[..., None])
        probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        if not visual_only:
            return probs
        index = self.visual_index[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
        return probs.gather(-1, index) * self.visual_mask[:, None, None, :]

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's final norm (the one before lm_head) applied to ``hidden`` (DART compares
        tokens on these normalised states)."""
        return self._adapter.decoder.norm(hidden)

    def positional_logits(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """``(B, R, S)`` logits q.k * scale of all-ones queries (at slots ``rows``) and keys, both
        rotated at their position ids: the part of decoder ``layer``'s attention logit that depends
        on positions only (SparseVLM v2.0 divides attention by it). Padding keys are included."""
        attn = self._adapter.layers[layer].self_attn
        ones = self.hidden.new_ones(self.batch_size, 1, self.hidden.shape[1], attn.head_dim).float()
        k = self._rope(ones, *self._rotary(ones))
        row_ones = ones[:, :, : rows.shape[1]]
        q = self._rope(row_ones, *self._rotary(row_ones, slots=rows))
        return torch.matmul(q, k.transpose(-1, -2))[:, 0] * attn.scaling

    # -- helpers ----------------------------------------------------------------------------
    def _require_tower_signals(self, what: str) -> None:
        if self._vision.no_tower_signals is not None:
            raise SignalUnavailableError(f"{what} is not available on this backbone: {self._vision.no_tower_signals}")

    def _rotary(self, like: torch.Tensor, slots: torch.Tensor | None = None):
        """cos/sin of the decoder's own rotary embedding (M-RoPE sections included) at the
        position ids of all slots, or of ``slots``."""
        positions = self.layout.positions if slots is None else self.layout.positions_at(slots)
        return self._adapter.decoder.rotary_emb(like, positions)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotated, _ = self._adapter.apply_rotary(x, x, cos, sin)
        return rotated


def _head_norm(attn, name: str, x: torch.Tensor) -> torch.Tensor:
    """The per-head RMSNorm Qwen3-family attention applies to queries / keys before rotary
    (``q_norm`` / ``k_norm``); other decoders have none."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)
