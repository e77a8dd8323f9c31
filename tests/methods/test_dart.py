"""DART: the kept set equals the official algorithm written as plain loops; keep-all is generate;
batched = alone; kept counts follow the official arithmetic; the final-norm signal."""

from __future__ import annotations

import pytest
import support.methods  # noqa: F401  (registers the test methods)
import torch
import torch.nn.functional as F
from support.methods import Probe
from support.models import run, single
from support.references import (
    assert_batch_equals_each_alone,
    assert_keep_all_is_generate,
    slow_reference,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from prunebench.budget import Budget, BudgetError
from prunebench.engine.method import MethodError, create_method


def reference_keep(model, inputs, layer: int, budget: int, pivot_image: int = 4, pivot_text: int = 4) -> list[int]:
    """DART on one prompt, the plain way: key L1 norms of layer K-1 (rotary applied) pick the
    pivots, then each pivot, in the order Python iterates the set of pivot positions, takes the
    budget // 8 remaining image tokens least cosine-similar to it (final-normed hidden states
    entering layer K). Returns kept patch ids."""
    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        hidden_states = model(**inputs, output_hidden_states=True).hidden_states
        block = lm.layers[layer - 1]
        normed_in = block.input_layernorm(hidden_states[layer - 1])
        keys = block.self_attn.k_proj(normed_in).view(1, len(ids), -1, block.self_attn.head_dim).transpose(1, 2)
        cos, sin = lm.rotary_emb(normed_in, torch.arange(len(ids))[None])
        keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
        l1 = keys[0].transpose(0, 1).reshape(len(ids), -1).abs().sum(-1).tolist()
        states = lm.norm(hidden_states[layer])[0]
    image = [i for i, t in enumerate(ids.tolist()) if t == model.config.image_token_id]
    after = [i for i in range(image[-1] + 1, len(ids))]
    image_pivots = sorted(image, key=lambda i: -l1[i])[:pivot_image]
    text_pivots = sorted(after, key=lambda i: -l1[i])[:pivot_text]
    per_pivot = budget // (pivot_image + pivot_text)
    chosen = set(image_pivots + text_pivots)
    remaining = set(image) - set(image_pivots)
    for pivot in list(set(image_pivots + text_pivots)):
        candidates = list(remaining)
        similarity = {j: float(F.cosine_similarity(states[pivot], states[j], dim=0)) for j in candidates}
        picks = sorted(candidates, key=lambda j: similarity[j])[:per_pivot]
        chosen.update(picks)
        remaining.difference_update(picks)
    chosen.difference_update(text_pivots)
    return sorted(i - image[0] for i in chosen)


@pytest.mark.parametrize("layer,budget", [(2, 64), (1, 128), (3, 30)])
def test_kept_set_equals_plain_reference(tiny, engine, batch, layer, budget):
    model, processor = tiny
    gen = run(engine, batch, create_method(f"dart:layer={layer}"), budget=budget, max_new_tokens=1)
    for b in range(3):
        assert gen.kept_patches[b] == reference_keep(model, single(processor, b), layer, budget)


def test_pivot_counts_are_options(tiny, engine, batch):
    model, processor = tiny
    gen = run(engine, batch, create_method("dart:pivot_image=2,pivot_text=6"), budget=64, max_new_tokens=1)
    for b in range(3):
        assert gen.kept_patches[b] == reference_keep(model, single(processor, b), 2, 64, pivot_image=2, pivot_text=6)
    assert [len(p) for p in gen.kept_patches] == [2 + 8 * 8] * 3


def test_answers_equal_slow_reference_with_original_positions(tiny, engine, batch):
    model, processor = tiny
    gen = run(engine, batch, create_method("dart"), budget=64, max_new_tokens=4)
    for b in range(3):
        kept = reference_keep(model, single(processor, b), 2, 64)
        tokens, logits = slow_reference(model, single(processor, b), [(2, torch.tensor(kept))], "original", steps=4)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget,kept", [(64, 68), (128, 132), (100, 100), (30, 28), (4, 4), (576, 576), ("all", 576)])
def test_kept_counts_follow_the_official_arithmetic(engine, batch, budget, kept):
    """pivot_image + 8 * (K // 8): the image pivots come on top of the budget, as officially."""
    gen = run(engine, batch, create_method("dart"), budget=budget, max_new_tokens=1)
    assert gen.visual_tokens.tolist() == [[576, 576, kept, kept]] * 3
    assert gen.equivalent_tokens.tolist() == [pytest.approx((2 * 576 + 2 * kept) / 4)] * 3
    assert [len(p) for p in gen.kept_patches] == [kept] * 3


def test_keep_all_reproduces_generate(tiny, engine, batch):
    assert_keep_all_is_generate(tiny[0], engine, batch, create_method("dart"))


@pytest.mark.parametrize("spec,budget", [("dart", 64), ("dart:layer=3,positions=reindex", 96)])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget)


def test_final_norm_signal_is_the_decoders_norm(tiny, engine, batch):
    model, _ = tiny
    Probe.hook, Probe.seen = (lambda ctx: (ctx.final_norm(ctx.layer_input(2)), ctx.layout.valid.clone())), []
    run(engine, batch, create_method("test-probe:layer=2"), max_new_tokens=1)
    (normed, valid), = Probe.seen
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[2]
        expected = model.model.language_model.norm(hidden)
    torch.testing.assert_close(normed[valid], expected[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec,message", [("dart:layer=0", "K >= 1"), ("dart:pivot_image=0,pivot_text=0", "one > 0"),
                                          ("dart:pivot_text=-1", ">= 0")])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(MethodError, match=message):
        create_method(spec)


def test_too_many_image_pivots_is_a_budget_error():
    with pytest.raises(BudgetError, match="600 image pivots exceed the 576"):
        create_method("dart:pivot_image=600").schedule(576, Budget(tokens=64), 32)
