"""The slow, obvious references the engine and the methods are checked against, and the helpers
that compare the engine's output with them. A plain module (not a test module): import it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from conftest import run, single

from prunebench.method import Method, create_method

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


def slow_reference(model, inputs, stages, policy, steps=STEPS):
    """Greedy decoding with no KV cache, one prompt: every step re-runs the whole sequence,
    dropping visual tokens before the stage layers. ``stages``: [(layer or -1, kept indices into
    the visual tokens still present)]."""
    inner = model.model
    lm = inner.language_model
    ids = inputs["input_ids"][0]
    feats = inner.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                     vision_feature_select_strategy="default").pooler_output[0]
    prompt = lm.embed_tokens(ids)
    prompt[ids == model.config.image_token_id] = feats
    is_visual = ids == model.config.image_token_id
    generated, all_logits = [], []
    for _ in range(steps):
        extra = lm.embed_tokens(torch.tensor(generated, dtype=torch.long))
        hidden = torch.cat([prompt, extra])[None]
        visual = torch.cat([is_visual, torch.zeros(len(generated), dtype=torch.bool)])
        positions = torch.arange(hidden.shape[1])
        todo = list(stages)
        for layer_index in range(-1, len(lm.layers)):
            if todo and todo[0][0] == layer_index:
                _, kept = todo.pop(0)
                slots = visual.nonzero().flatten()
                keep = ~visual
                keep[slots[kept]] = True
                hidden, visual, positions = hidden[:, keep], visual[keep], positions[keep]
                if policy == "reindex":
                    positions = torch.arange(hidden.shape[1])
            if layer_index < 0:
                continue
            rotary = lm.rotary_emb(hidden, positions[None])
            hidden = lm.layers[layer_index](hidden, attention_mask=None, position_embeddings=rotary)
        logits = model.lm_head(lm.norm(hidden[:, -1]))[0]
        all_logits.append(logits)
        generated.append(int(logits.argmax()))
    return generated, torch.stack(all_logits)


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
