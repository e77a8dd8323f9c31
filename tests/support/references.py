"""The slow, obvious references the engine and the methods are checked against, and the helpers
that compare the engine's output with them. A plain module (not a test module): import it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prunebench.engine.method import Method, create_method
from support.models import run, single

MAX_NEW = 6  # new tokens for the keep-all-is-generate checks
STEPS = 5  # decode steps of slow_reference


def until_eos(row: list[int], eos: set[int]) -> list[int]:
    """HF pads a finished row; the engine stops at (and keeps) the EOS."""
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1]
    return row


def assert_matches(gen, reference, eos):
    tokens, logits = reference
    expected = [until_eos(row, eos) for row in tokens.tolist()]
    assert gen.tokens == expected
    for b, row in enumerate(expected):  # logits of every step the sample was still generating
        ours = torch.stack([step[b] for step in gen.logits[: len(row)]])
        torch.testing.assert_close(ours, logits[b, : len(row)].float(), atol=1e-4, rtol=0)


def eos_of(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)


def assert_keep_all_is_generate(model, engine, batch, method) -> None:
    """Budget "all" through ``method``'s stages gives the model's own greedy generate."""
    out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    eos = eos_of(model)
    gen = run(engine, batch, method, budget="all", max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, (out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.logits, 1)), eos)
    assert gen.visual_tokens.tolist() == [[576] * engine.adapter.num_layers] * batch["input_ids"].shape[0]


def decoder_of(model):
    """The decoder a VLM keeps its layers in (SmolVLM: ``text_model``)."""
    inner = model.model
    return inner.text_model if hasattr(inner, "text_model") else inner.language_model


def prompt_of(model, inputs) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One prompt's LLM input embeddings ``(S, D)``, position ids ``(P, S)`` (P = 3 under M-RoPE)
    and Qwen3-VL's DeepStack rows (per injected layer ``(n_visual, D)``; none elsewhere), from the
    model's own image features and rope index."""
    inner = model.model
    ids = inputs["input_ids"][0]
    kind = type(model).__name__
    positions = torch.arange(len(ids))[None]
    deepstack = []
    if kind == "InternVLForConditionalGeneration":
        feats = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.flatten(0, 1)
    elif kind == "LlavaOnevisionForConditionalGeneration":
        feats = torch.cat(list(inner.get_image_features(pixel_values=inputs["pixel_values"],
                                                        image_sizes=inputs["image_sizes"]).pooler_output))
    elif kind in ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"):
        feats = torch.cat(list(inner.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output))
    elif kind == "Qwen3VLForConditionalGeneration":
        out = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        feats = torch.cat(list(out.pooler_output))
        deepstack = [torch.cat(list(level)) for level in out.deepstack_features]
        positions = inner.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])[0][:, 0]
    elif kind == "LlavaForConditionalGeneration":
        feats = inner.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                         vision_feature_select_strategy="default").pooler_output[0]
    elif kind == "LlavaNextForConditionalGeneration":
        feats = torch.cat(list(inner.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], vision_feature_layer=-2,
            vision_feature_select_strategy="default").pooler_output))
    else:  # Qwen2-VL family
        feats = torch.cat(list(inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
        positions = inner.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"])[0][:, 0]
    prompt = decoder_of(model).embed_tokens(ids)
    prompt[ids == model.config.image_token_id] = feats
    return prompt, positions, deepstack


def slow_reference(model, inputs, stages, policy, steps=STEPS, deepstack: bool = True):
    """Greedy decoding with no KV cache, one prompt: every step re-runs the whole sequence,
    dropping visual tokens before the stage layers. ``stages``: [(layer or -1, kept indices into
    the visual tokens still present)]. Generated tokens continue from the prompt's largest
    position id + 1. "reindex": contiguous ids; under M-RoPE each run of text continues from the
    token before it and kept image tokens keep their offsets from the image's start id.
    Qwen3-VL: after decoder layer i < 3, each visual token still present gets DeepStack level i's
    row of its original visual index added, token by token (``deepstack=False`` leaves it out)."""
    lm = decoder_of(model)
    ids = inputs["input_ids"][0]
    prompt, prompt_positions, levels = prompt_of(model, inputs)
    levels = levels if deepstack else []
    is_visual = ids == model.config.image_token_id
    generated, all_logits = [], []
    for _ in range(steps):
        extra = lm.embed_tokens(torch.tensor(generated, dtype=torch.long))
        hidden = torch.cat([prompt, extra])[None]
        visual = torch.cat([is_visual, torch.zeros(len(generated), dtype=torch.bool)])
        patch = torch.full(visual.shape, -1)
        patch[visual] = torch.arange(int(visual.sum()))
        after = prompt_positions.max() + 1 + torch.arange(len(generated))
        positions = torch.cat([prompt_positions, after.expand(len(prompt_positions), -1)], dim=1)
        todo = list(stages)
        for layer_index in range(-1, len(lm.layers)):
            if todo and todo[0][0] == layer_index:
                _, kept = todo.pop(0)
                slots = visual.nonzero().flatten()
                keep = ~visual
                keep[slots[kept]] = True
                hidden, visual, patch, positions = hidden[:, keep], visual[keep], patch[keep], positions[:, keep]
                if policy == "reindex":
                    positions = reindexed(positions, visual)
            if layer_index < 0:
                continue
            rotary = lm.rotary_emb(hidden, positions[:, None] if len(positions) == 3 else positions)
            hidden = lm.layers[layer_index](hidden, attention_mask=None, position_embeddings=rotary)
            if layer_index < len(levels):
                hidden = hidden.clone()
                for slot in range(hidden.shape[1]):
                    if patch[slot] >= 0:
                        hidden[0, slot] = hidden[0, slot] + levels[layer_index][patch[slot]]
        logits = model.lm_head(lm.norm(hidden[:, -1]))[0]
        all_logits.append(logits)
        generated.append(int(logits.argmax()))
    return generated, torch.stack(all_logits)


def reindexed(positions: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(P, S) ids after "reindex", written the slow way, token by token."""
    if len(positions) == 1:
        return torch.arange(positions.shape[1])[None]
    out = positions.clone()
    # image runs: offsets from the run's smallest id, shifted to continue the text before them
    i, cursor = 0, 0
    while i < positions.shape[1]:
        if visual[i]:
            j = i
            while j < positions.shape[1] and visual[j]:
                j += 1
            run = positions[:, i:j]
            out[:, i:j] = run - run.min() + cursor
            cursor = int(out[:, i:j].max()) + 1
            i = j
        else:
            out[:, i] = cursor
            cursor += 1
            i += 1
    return out


@dataclass
class EagerView:
    """What a reference stage sees: the sequence entering ``layer`` and eager attention maps."""

    model: torch.nn.Module
    layer: int
    hidden: torch.Tensor  # (S, D)
    patch: torch.Tensor  # (S,) patch id, -1 text, -2 merged
    positions: torch.Tensor  # (S,)
    recorded: dict[int, torch.Tensor]  # layer -> (H, S, S) probs of its last run

    @property
    def visual(self) -> torch.Tensor:
        return (self.patch != -1).nonzero().flatten()

    def attention(self, layer: int) -> torch.Tensor:
        """(H, S, S) eager softmax attention of ``layer`` over the current sequence."""
        if layer == self.layer:  # not run yet: run its attention alone on the current input
            lm = self.model.model.language_model
            block = lm.layers[layer]
            rotary = lm.rotary_emb(self.hidden[None], self.positions[None])
            block.self_attn(block.input_layernorm(self.hidden[None]), position_embeddings=rotary,
                            attention_mask=causal(len(self.hidden)))
        return self.recorded[layer]


def causal(seq: int) -> torch.Tensor:
    return torch.full((seq, seq), float("-inf")).triu(1)[None, None]


def eager_prefill(model, inputs, stages: dict[int, Callable[[EagerView], tuple[list[int], torch.Tensor | None]]],
                  policy: str):
    """The official way, slowly: one prompt, eager attention, no cache, layer by layer. Before each
    layer in ``stages`` its callback returns (kept indices into the current visual tokens, merged
    tokens or None); merged tokens go right after the kept image tokens. Returns the patch ids
    kept at each stage (-2 for merged ones) and the next-token logits."""
    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    image = ids == model.config.image_token_id
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output[0]
        hidden = lm.embed_tokens(ids).clone()
        hidden[image] = features
        patch = torch.full_like(ids, -1)
        patch[image] = torch.arange(int(image.sum()))
        positions = torch.arange(len(ids))
        recorded: dict[int, torch.Tensor] = {}
        hooks = [block.self_attn.register_forward_hook(
            lambda module, args, out, i=i: recorded.__setitem__(i, out[1][0].float()))
            for i, block in enumerate(lm.layers)]
        kept_per_stage = []
        try:
            for i, block in enumerate(lm.layers):
                if i in stages:
                    view = EagerView(model, i, hidden, patch, positions, recorded)
                    kept, merged = stages[i](view)
                    hidden, patch, positions = rebuild(view, kept, merged, policy)
                    kept_per_stage.append(sorted(patch[patch != -1].tolist()))
                rotary = lm.rotary_emb(hidden[None], positions[None])
                hidden = block(hidden[None], attention_mask=causal(len(hidden)), position_embeddings=rotary)[0]
        finally:
            for hook in hooks:
                hook.remove()
        logits = model.lm_head(lm.norm(hidden[-1]))
    return kept_per_stage, logits


def rebuild(view: EagerView, kept, merged, policy: str):
    visual = view.visual
    keep = view.patch == -1
    keep[visual[torch.as_tensor(kept, dtype=torch.long)]] = True
    order = keep.nonzero().flatten()
    hidden, patch, positions = view.hidden[order], view.patch[order], view.positions[order]
    if merged is not None and len(merged):
        cut = int((order <= visual[-1]).sum())
        last = view.positions[visual[-1]]
        hidden = torch.cat([hidden[:cut], merged, hidden[cut:]])
        patch = torch.cat([patch[:cut], torch.full((len(merged),), -2), patch[cut:]])
        positions = torch.cat([positions[:cut], last.repeat(len(merged)), positions[cut:]])
    if policy == "reindex":
        positions = torch.arange(len(hidden))
    return hidden, patch, positions


def record_stages(method) -> list[list[list[int]]]:
    """Spy on ``method.select``: per stage, per sample, the sorted patch ids it keeps (-2 for each
    merged token, kept or new)."""
    seen = []
    select = method.select

    def spy(ctx):
        selection = select(ctx)
        new = [] if selection.merged is None else [-2] * selection.merged.shape[1]
        seen.append([sorted(ctx.patch_ids[b][torch.as_tensor(k)].tolist() + new) for b, k in enumerate(selection.keep)])
        return selection

    method.select = spy
    return seen


def assert_batch_equals_each_alone(engine, processor, batch, method: str | Method, budget, max_new_tokens: int = 4):
    """The left-padded batch of three gives, for every prompt, the tokens, kept patches, per-layer
    visual counts and first-step logits of that prompt run alone. Returns the batched Generation."""
    def make() -> Method:
        return create_method(method) if isinstance(method, str) else method

    together = run(engine, batch, make(), budget=budget, max_new_tokens=max_new_tokens)
    for b in range(len(together.tokens)):
        alone = run(engine, single(processor, b), make(), budget=budget, max_new_tokens=max_new_tokens)
        assert alone.tokens[0] == together.tokens[b]
        assert alone.kept_patches[0] == together.kept_patches[b]
        assert alone.visual_tokens[0].tolist() == together.visual_tokens[b].tolist()
        torch.testing.assert_close(alone.logits[0][0], together.logits[0][b], atol=1e-4, rtol=0)
    return together


# -- every method on every backbone ----------------------------------------------------------------
NO_FEATURES = "vision features are not available on this backbone"
ENGINE_CANNOT_RESIZE = "the engine alone cannot resize"  # pool:mode=resize acts before the processor (prunebench run)
NEXT_REFUSES = {  # LLaVA-NeXT: newline tokens have no vision feature; CLIP runs per crop
    "divprune:space=vision": NO_FEATURES,
    "visionzip": "not available on this backbone: LLaVA-NeXT",
    "vispruner": "not available on this backbone: LLaVA-NeXT",
    "autoselect": NO_FEATURES,
    "gumbel": NO_FEATURES,
    "pool": "no single 2-D grid on this backbone: LLaVA-NeXT",
    "pool:mode=resize": ENGINE_CANNOT_RESIZE,
}
QWEN_REFUSES = {  # Qwen2-VL's vision tower has no CLS token; built tokens carry no M-RoPE ids
    "visionzip": "no CLS token",
    "vispruner": "no CLS token",
    "pool": "use pool:mode=resize",
    "pool:mode=resize": ENGINE_CANNOT_RESIZE,
}
NO_GRID = "no single 2-D grid on this backbone"
ONEVISION_REFUSES = {  # as NeXT: newline tokens and interpolated grid tokens have no vision feature
    "divprune:space=vision": NO_FEATURES,
    "visionzip": "not available on this backbone: LLaVA-OneVision",
    "vispruner": "not available on this backbone: LLaVA-OneVision",
    "autoselect": NO_FEATURES,
    "gumbel": NO_FEATURES,
    "pool": NO_GRID,
    "pool:mode=resize": ENGINE_CANNOT_RESIZE,
}
TILED_REFUSES = {"pool": NO_GRID, "pool:mode=resize": ENGINE_CANNOT_RESIZE}  # tiles: one grid per tile, not per image
REFUSES = {
    "llava-next": NEXT_REFUSES,
    "llava-onevision": ONEVISION_REFUSES,
    "internvl3": {"visionzip": "InternVL's vision tower runs per tile", "vispruner": "InternVL's vision tower runs per tile",
                  **TILED_REFUSES},  # a token is a 2x2 block of patches
    "internvl3.5": {"visionzip": "InternVL's vision tower runs per tile",
                    "vispruner": "InternVL's vision tower runs per tile", **TILED_REFUSES},
    "smolvlm": {"visionzip": "no CLS token", "vispruner": "no CLS token", **TILED_REFUSES},
    "smolvlm2": {"visionzip": "no CLS token", "vispruner": "no CLS token", **TILED_REFUSES},
}
MIXED_BATCH_REFUSES = {"sparsevlm": "recycling needs the same schedule"}  # v1.5 recycles per batch


def assert_every_method_runs_or_refuses(backbone, tmp_path, vision_width: int) -> None:
    """Every registered method, at budget 50% on the backbone's batch of differently sized images,
    either runs (each sample's last layers see at most half its tokens, plus built ones) or
    raises a MethodError naming why. The list must cover the registry."""
    import pytest

    from prunebench.engine.method import MethodError, available_methods
    from prunebench.training.selectors import build_selector, save_selector

    torch.manual_seed(0)
    for kind in ("autoselect", "gumbel"):
        save_selector(tmp_path / kind, build_selector(kind, vision_width=vision_width, **({"n_tokens": 16} if kind == "gumbel" else {})))
    specs = ["none", "random", "divprune", "divprune:space=vision", "fastv", "pyramiddrop:layers=1/2/3", "dart",
             "sparsevlm:layers=0/1/2", "sparsevlm:layers=0/1/2,version=2.0,heads=2", "visionzip", "vispruner",
             "cdpruner:text=llm", "pool", "pool:mode=resize",
             f"autoselect:ckpt={tmp_path / 'autoselect'}", f"gumbel:ckpt={tmp_path / 'gumbel'}"]
    registered = {name for name in available_methods() if not name.startswith("test-")}
    assert registered <= {spec.partition(":")[0] for spec in specs}, "a registered method has no backbone check"
    refuses = REFUSES.get(backbone.name, QWEN_REFUSES)
    n = (backbone.batch["input_ids"] == backbone.model.config.image_token_id).sum(-1)
    for spec in specs:
        reason = refuses.get(spec.partition(":ckpt")[0])
        if reason is not None:
            with pytest.raises(MethodError, match=reason):
                run(backbone.engine, backbone.batch, create_method(spec), budget="50%", max_new_tokens=2)
            continue
        inputs, counts = backbone.batch, n
        try:
            gen = run(backbone.engine, inputs, create_method(spec), budget="50%", max_new_tokens=2)
        except MethodError as err:  # allowed only where a mixed batch cannot be served at once
            assert spec.partition(":")[0] in MIXED_BATCH_REFUSES and "version=2.0" not in spec, (spec, err)
            assert MIXED_BATCH_REFUSES[spec.partition(":")[0]] in str(err)
            inputs, counts = backbone.single(0), n[:1]
            gen = run(backbone.engine, inputs, create_method(spec), budget="50%", max_new_tokens=2)
        assert all(len(row) == 2 for row in gen.tokens), spec
        if spec != "none":
            last = gen.visual_tokens[:, -1]
            assert (last < counts).all() and (last >= 1).all(), (spec, last.tolist(), counts.tolist())
