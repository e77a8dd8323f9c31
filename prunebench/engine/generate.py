"""The pruning-aware engine: prefill with pruning stages, then a KV-cached decode loop.

It owns the layer loop and nothing else: the model's own embedding, vision tower, projector,
decoder layers (SDPA, or eager attention given explicit masks), norm, rotary embedding and
lm_head do all the maths. The engine decides which tokens enter each layer.

    image -> vision tower -> projector -> [pre-LLM stage] -> layers 0..L-1 -> [stage at L] -> ...
          -> norm -> lm_head -> first token -> decode steps (per-layer-group KV lengths)

Layers between two stages form a *group*: they saw the same tokens, so they share one padding
mask and one set of position ids, and their KV caches have the same length. Decoding appends a
token to every group, each with its own next position id.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from prunebench.engine.adapters import VisionOutput, adapter_for
from prunebench.budget import Budget, BudgetError
from prunebench.engine.method import PRE_LLM, Method, MethodError, Stage, check_stages
from prunebench.engine.sequence import TokenLayout, normalise_keep
from prunebench.engine.signals import SampleKeys, StageContext
from prunebench.engine.timing import StageClock


@dataclass
class DecodeConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    eos_token_id: int | list[int] | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends and the text is cut before them


@dataclass
class Group:
    """Consecutive decoder layers that saw the same token layout."""

    first_layer: int
    valid: torch.Tensor  # (B, S_g) bool, grows by one column per decode step
    next_position: torch.Tensor  # (B,) position id of the next token in this group
    padded: bool  # some sample has padding: masks are needed (else SDPA runs unmasked/causal)


@dataclass
class EncodedImages:
    """The vision side's output for a batch: it depends on the pixels only, never on the method, so
    a caller may keep it and pass it back for the same batch (``images=``)."""

    vision: VisionOutput
    embeds: torch.Tensor  # (B, n_max, D) the images' LLM tokens

    @property
    def nbytes(self) -> int:
        tensors = [self.embeds, self.vision.features, self.vision.embeds, *(self.vision.hidden_states or ()),
                   *self.vision.deepstack]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
        return sum(storages.values())  # features can be a view of the last hidden state


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per sample, up to and including EOS
    texts: list[str] | None  # decoded answers (stop strings cut), when a tokenizer was given
    visual_tokens: torch.Tensor  # (B, L) visual tokens entering each decoder layer
    kept_patches: list[list[int]]  # original patch ids of the visual tokens the last layer saw
    timings: dict[str, float]  # ms per stage: vision, pruner, prefill, decode
    logits: list[torch.Tensor] = field(default_factory=list)  # (B, V) per step, when asked
    images: EncodedImages | None = None  # the vision output it computed, when asked (return_images)

    @property
    def equivalent_tokens(self) -> torch.Tensor:
        """``(B,)`` layer-averaged visual tokens: the honest budget of a multi-stage method."""
        return self.visual_tokens.float().mean(-1)


@dataclass
class Prefill:
    logits: torch.Tensor  # (B, V) next-token logits at the end of the prompt
    cache: DynamicCache
    groups: list[Group]
    group_of_layer: list[int]
    layout: TokenLayout
    visual_tokens: torch.Tensor


@dataclass
class _PrefillRun:
    """What one prefill carries from layer to layer: the cache, the layer groups, the current
    group's mask and rotary embeddings, and the signals a later stage may ask for."""

    cache: DynamicCache
    visual_tokens: torch.Tensor  # (B, layers): visual tokens entering each layer
    sample_keys: SampleKeys
    input_ids: torch.Tensor | None = None  # the prompt as given (the instruction text's source)
    groups: list[Group] = field(default_factory=list)
    group_of_layer: list[int] = field(default_factory=list)
    group: Group | None = None  # the open group; None until the first layer and after each stage
    mask: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    n_visual: torch.Tensor | None = None
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    method_state: dict = field(default_factory=dict)  # shared by the stages of one prefill


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


class PruningEngine:
    def __init__(self, model: nn.Module, tokenizer=None):
        self.model = model.eval()
        self.adapter = adapter_for(model)
        self.tokenizer = tokenizer
        # SDPA masks causally by itself when given no mask; eager attention applies only the mask
        # it is given (an additive one), so it always gets one. Other kernels take masks in other
        # forms (FlashAttention-2: a 2-D padding mask), which this engine does not build.
        implementation = self.adapter.decoder.config._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"PruningEngine runs the decoder layers itself with masks built for "
                f"{' or '.join(ATTENTION_IMPLEMENTATIONS)} attention; this model uses {implementation!r}. "
                "Load it with attn_implementation='sdpa' (prunebench's loaders do; on a GPU, SDPA runs "
                "FlashAttention kernels itself) or call model.set_attn_implementation('sdpa')."
            )
        self.eager = implementation == "eager"
        # the decoder layers' KV-cache argument: `past_key_values` up to transformers 5.24, `cache`
        # from 5.25 (the old name is deprecated there, removed in 5.40)
        parameters = inspect.signature(type(self.adapter.layers[0]).forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- public API -------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        method: Method | None = None,
        budget: Budget | str | int = "all",
        decode: DecodeConfig | None = None,
        return_logits: bool = False,
        clock: StageClock | None = None,
        image_inputs: dict[str, torch.Tensor] | None = None,
        images: EncodedImages | None = None,
        return_images: bool = False,
    ) -> Generation:
        """``image_inputs``: the processor outputs the backbone needs besides pixels
        (``adapter.image_keys``: ``image_sizes`` for LLaVA-NeXT, ``image_grid_thw`` for Qwen2-VL).
        ``images``: this batch's vision output from an earlier call (``return_images=True`` puts it
        in ``Generation.images``); the vision tower is then not run and ``timings`` has no
        ``vision`` entry. Otherwise the vision output is freed before decoding."""
        decode = decode or DecodeConfig()
        clock = clock or StageClock(self.device)
        encoded = None
        if images is None:
            images = self.encode_images(pixel_values, clock, image_inputs)
            encoded = images if return_images else None
        state = self.prefill(input_ids, attention_mask, pixel_values, method, Budget.parse(budget), clock, image_inputs,
                             images)
        del images
        tokens, logits = self.decode(state, decode, clock, return_logits)
        texts = self._texts(tokens, decode.stop) if self.tokenizer is not None else None
        kept = [row[row >= 0].tolist() for row in state.layout.visual_id]
        return Generation(
            tokens=tokens,
            texts=texts,
            visual_tokens=state.visual_tokens,
            kept_patches=kept,
            timings=clock.summary(),
            logits=logits,
            images=encoded,
        )

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, clock: StageClock | None = None,
                      image_inputs: dict[str, torch.Tensor] | None = None) -> EncodedImages:
        """Vision tower and projector, timed as the ``vision`` stage."""
        adapter = self.adapter
        with (clock or StageClock(self.device, enabled=False))("vision"):
            vision = adapter.encode_images(pixel_values, **adapter.image_inputs(image_inputs or {}))
            return EncodedImages(vision, adapter.embed_images(vision))

    @torch.inference_mode()
    def score_continuation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        target: torch.Tensor,
        method: Method | None = None,
        budget: Budget | str | int = "all",
        clock: StageClock | None = None,
        image_inputs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """Log-probabilities of ``target`` (1-D ids) after the prompt, teacher-forced through the
        same pruned prefill and KV cache as generation (pruning sees the prompt only, never the
        answer). One prompt. Returns (per-token logprobs, whether greedy decoding gives target,
        visual tokens per layer)."""
        if input_ids.shape[0] != 1:
            raise ValueError("score_continuation takes one prompt at a time")
        clock = clock or StageClock(self.device)
        state = self.prefill(input_ids, attention_mask, pixel_values, method, Budget.parse(budget), clock, image_inputs)
        logits, logprobs, greedy = state.logits, [], True
        for i, token in enumerate(target.tolist()):
            logprobs.append(logits.float().log_softmax(-1)[0, token])
            greedy = greedy and int(logits.argmax(-1)) == token
            if i + 1 < len(target):
                with clock("decode"):
                    logits = self.decode_step(state, target[i : i + 1])
        return torch.stack(logprobs), greedy, state.visual_tokens

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        method: Method | None,
        budget: Budget,
        clock: StageClock,
        image_inputs: dict[str, torch.Tensor] | None = None,
        images: EncodedImages | None = None,
    ) -> Prefill:
        """The prompt through the decoder, pruning at each stage of the method's schedule.

        Steps: lay out the batch and schedule the stages; embed the prompt with the images in their
        slots; then for each stage point (pre-LLM, then before each decoder layer) run the method's
        stage if one is due, open a new layer group after a stage, run the layer, and add the
        layer's DeepStack injection at the visual tokens still present (Qwen3-VL, layers 0-2).
        ``images``: the batch's vision output when the caller has it (see :meth:`generate`)."""
        adapter = self.adapter
        _check_left_padded(attention_mask)
        image_inputs = adapter.image_inputs(image_inputs or {})
        positions = adapter.positions(input_ids, attention_mask, **image_inputs)
        layout = TokenLayout.from_inputs(attention_mask, input_ids == adapter.image_token_id, positions)
        stages = self._schedule(method, budget, layout.n_visual)
        images = images or self.encode_images(pixel_values, clock, image_inputs)
        hidden = self._embed_prompt(input_ids, layout, images)

        run = _PrefillRun(
            cache=DynamicCache(config=adapter.decoder.config),
            visual_tokens=torch.zeros(len(layout.n_visual), adapter.num_layers, dtype=torch.long, device=self.device),
            # what seeds a method's per-sample generator: the sample's prompt and image, read on first use
            sample_keys=SampleKeys(input_ids, layout.valid, lambda: adapter.sample_pixels(pixel_values, **image_inputs)),
            input_ids=input_ids,
        )
        pending = list(stages)
        for index in range(-1, adapter.num_layers):
            at = PRE_LLM if index < 0 else index
            if pending and pending[0][0].layer == at:
                with clock("pruner"):
                    layout, hidden = self._run_stage(run, pending.pop(0), method, images, layout, hidden, index,
                                                     keep_built=not budget.floor)
                run.group = None  # the layers after a stage see another sequence: a new group
            if index < 0:
                continue
            with clock("prefill"):
                if run.group is None:
                    self._open_group(run, layout, hidden, index)
                hidden = self._run_layer(run, layout, hidden, index)
                if index < len(images.vision.deepstack):
                    hidden = _add_deepstack(layout, hidden, images.vision.deepstack[index])
        with clock("prefill"):
            logits = adapter.lm_head(adapter.decoder.norm(hidden[:, -1:]))[:, -1]
        return Prefill(logits, run.cache, run.groups, run.group_of_layer, layout, run.visual_tokens.cpu())

    def _embed_prompt(self, input_ids: torch.Tensor, layout: TokenLayout, images: EncodedImages) -> torch.Tensor:
        """Token embeddings with each image's projected features in its image-token slots."""
        hidden = self.adapter.embed(input_ids)
        self._check_image_tokens(layout, images.vision.counts)
        packed = torch.cat([images.embeds[b, :n] for b, n in enumerate(images.vision.counts)])
        hidden[layout.visual] = packed.to(hidden.dtype)  # a fresh tensor; 3x faster than masked_scatter on CPU
        return hidden

    def _run_stage(self, run: _PrefillRun, stage_rows: list[Stage], method: Method, images: EncodedImages,
                   layout: TokenLayout, hidden: torch.Tensor, index: int,
                   keep_built: bool = True) -> tuple[TokenLayout, torch.Tensor]:
        """One pruning stage: the method selects from the signals it asks for; the layout keeps
        (or merges) the selected visual tokens of every sample. ``keep_built=False`` (the floor
        control) drops the tokens a method builds, so exactly its kept ones go on."""
        ctx = StageContext(
            stage=stage_rows[0],
            keep=[s.keep for s in stage_rows],
            adapter=self.adapter,
            vision=images.vision,
            image_embeds=images.embeds,
            layout=layout,
            hidden=hidden,
            layer_inputs={**run.layer_inputs, index: hidden} if index >= 0 else {},
            cache=run.cache,
            sample_keys=run.sample_keys,
            seed=getattr(method, "seed", 0),
            state=run.method_state,
            input_ids=run.input_ids,
            tokenizer=self.tokenizer,
        )
        selection = method.select(ctx)
        keep = normalise_keep(selection.keep, layout.n_visual, ctx.keep, method.name)
        built = sum(t.shape[1] for t in (selection.leading, selection.merged) if t is not None)
        if built == 0 and min(len(row) for row in keep) == 0:  # a stage may keep 0 tokens only if it builds some
            raise MethodError(f"method {method.name!r} left a sample with no visual token (kept 0, built none)")
        if not keep_built:
            return layout.prune(hidden, keep, None, method.positions)
        return layout.prune(hidden, keep, selection.merged, method.positions, selection.leading)

    def _open_group(self, run: _PrefillRun, layout: TokenLayout, hidden: torch.Tensor, index: int) -> None:
        """Layers from ``index`` to the next stage share one padding mask and one set of positions."""
        group = Group(index, layout.valid.clone(), layout.next_position(), padded=not bool(layout.valid.all()))
        run.groups.append(group)
        mask = _prefill_mask(layout.valid) if group.padded or self.eager else None
        run.mask = self._as_attention_mask(mask, hidden.dtype)
        run.position_embeddings = self.adapter.decoder.rotary_emb(hidden, layout.positions)
        run.n_visual = layout.visual.sum(-1)
        run.group = group

    def _run_layer(self, run: _PrefillRun, layout: TokenLayout, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """Decoder layer ``index`` on the current sequence, filling its KV cache."""
        run.group_of_layer.append(len(run.groups) - 1)
        run.visual_tokens[:, index] = run.n_visual
        run.layer_inputs = {index: hidden}  # the input of the layer just run stays reachable
        return self.adapter.layers[index](
            hidden,
            attention_mask=run.mask,
            position_embeddings=run.position_embeddings,
            position_ids=_text_positions(layout.positions),
            use_cache=True,
            **{self.cache_argument: run.cache},
        )

    # -- decode -----------------------------------------------------------------------------
    def decode(self, state: Prefill, cfg: DecodeConfig, clock: StageClock, keep_logits: bool = False):
        """Greedy or sampled decoding from a prefill, until EOS / stop string / max_new_tokens."""
        batch = state.logits.shape[0]
        eos = _as_set(cfg.eos_token_id)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool)
        logits = state.logits
        kept_logits = []
        for step in range(cfg.max_new_tokens):
            if keep_logits:
                kept_logits.append(logits.float().cpu())
            next_token = _pick(logits, cfg, generator)
            for b, tok in enumerate(next_token.tolist()):
                if not done[b]:
                    tokens[b].append(tok)
                    done[b] = tok in eos or self._hit_stop(tokens[b], cfg.stop)
            if bool(done.all()) or step == cfg.max_new_tokens - 1:
                break
            with clock("decode"):
                logits = self.decode_step(state, next_token)
        return tokens, kept_logits

    def decode_step(self, state: Prefill, token: torch.Tensor) -> torch.Tensor:
        """One token per sample through every layer group; returns the next-token logits."""
        adapter = self.adapter
        hidden = adapter.embed(token[:, None])
        masks, rotary = [], []
        for group in state.groups:
            group.valid = torch.cat([group.valid, group.valid.new_ones(len(token), 1)], dim=1)
            masks.append(self._as_attention_mask(group.valid[:, None, None, :] if group.padded else None, hidden.dtype))
            rotary.append(adapter.decoder.rotary_emb(hidden, group.next_position[:, None]))
            group.next_position = group.next_position + 1
        for index, layer in enumerate(adapter.layers):
            g = state.group_of_layer[index]
            hidden = layer(
                hidden,
                attention_mask=masks[g],
                position_embeddings=rotary[g],
                position_ids=None if state.layout.multimodal else state.groups[g].next_position[:, None] - 1,
                use_cache=True,
                **{self.cache_argument: state.cache},
            )
        return adapter.lm_head(adapter.decoder.norm(hidden))[:, -1]

    # -- helpers ----------------------------------------------------------------------------
    def _as_attention_mask(self, allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """A boolean keep-mask as the layers' attention takes it: as is for SDPA, additive
        (0 where allowed, the dtype's minimum elsewhere) for eager attention."""
        if allowed is None or not self.eager:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    def _schedule(self, method: Method | None, budget: Budget, n_visual: list[int]) -> list[list[Stage]]:
        """Per-stage rows of per-sample stages, validated against the model."""
        if method is None or budget.is_all and method.stage == "none":
            return []
        per_sample = []
        for n in n_visual:
            try:
                per_sample.append(method.stages(n, budget, self.adapter.num_layers))
            except BudgetError as err:
                raise BudgetError(f"method {method.name!r}: {err}") from None
        layers = {tuple(s.layer for s in stages) for stages in per_sample}
        if len(layers) != 1:
            raise MethodError(f"method {method.name!r} scheduled different layers per sample: {layers}")
        for n, stages in zip(n_visual, per_sample):
            check_stages(method, stages, n, self.adapter.num_layers)
        return [list(row) for row in zip(*per_sample)]

    def _check_image_tokens(self, layout: TokenLayout, image_counts: list[int]) -> None:
        counts = layout.n_visual
        if counts != image_counts:
            raise ValueError(
                f"each prompt needs exactly one image, with one image token per visual token; got image-token "
                f"counts {counts} for {len(image_counts)} images of {image_counts} tokens (multi-image prompts "
                "are not supported yet)"
            )

    def _hit_stop(self, tokens: list[int], stop: tuple[str, ...]) -> bool:
        if not stop or self.tokenizer is None:
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stop)

    def _texts(self, tokens: list[list[int]], stop: tuple[str, ...]) -> list[str]:
        texts = []
        for row in tokens:
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for s in stop:
                text = text.split(s, 1)[0]
            texts.append(text.strip())
        return texts


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    """The engine lays a batch out with every prompt ending in the last column (left padding, as
    the bridge and HF generate use); a right-padded row would have its padding read as its last
    token."""
    mask = attention_mask.bool()
    bad = (mask[:, :-1] & ~mask[:, 1:]).any(-1) | ~mask.any(-1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"PruningEngine takes left-padded batches (padding before each prompt, its last token in the "
            f"last column); attention_mask rows {rows} have padding after a token or no token at all. "
            "Tokenize with tokenizer.padding_side = 'left'."
        )


def _add_deepstack(layout: TokenLayout, hidden: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's DeepStack after decoder layer ``i``: the model adds vision level ``i`` (``level``,
    ``(B, n_max, D)`` over the original visual tokens) to the layer's output at every image slot;
    here every visual token still present gets the row of its original visual id, so a pruned
    token's rows go with it. Tokens a method built (``MERGED``) get none: they have no row of
    their own, and the weights that would make one belong to the method."""
    ids = layout.visual_id
    rows = level.gather(1, ids.clamp(min=0)[..., None].expand(-1, -1, level.shape[-1]))
    return torch.where((ids >= 0)[..., None], hidden + rows.to(hidden.dtype), hidden)


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask over real keys, (B, 1, S, S) bool; padding queries attend to themselves."""
    seq = valid.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(seq, dtype=torch.bool, device=valid.device)
    return ((causal[None] & valid[:, None, :]) | eye[None])[:, None]


def _text_positions(positions: torch.Tensor) -> torch.Tensor | None:
    """The ``position_ids`` a decoder layer takes (for FlashAttention's packing checks): the 1-D
    ids, or None under M-RoPE, as Qwen2-VL's own text model passes for unpacked inputs."""
    return positions if positions.dim() == 2 else None


def _as_set(eos: int | list[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def _pick(logits: torch.Tensor, cfg: DecodeConfig, generator: torch.Generator) -> torch.Tensor:
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(cfg.temperature, 1e-5)
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).flatten()
