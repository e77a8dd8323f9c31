"""FastV: the kept set is the top of layer K-1's eager attention from the last token; keep-all
is the model's own generate; batched = alone; counts follow budget and ratio."""

from __future__ import annotations

import pytest
import torch
from support.models import run, single
from support.references import (
    assert_batch_equals_each_alone,
    assert_keep_all_is_generate,
    slow_reference,
)

from prunebench.engine.method import MethodError, create_method


@pytest.fixture(scope="module")
def eager_attentions(batch, eager):
    """Attention maps of the unpruned tiny model under eager attention (the official way)."""
    with torch.no_grad():
        return eager(**batch, output_attentions=True).attentions


def reference_keep(attentions, batch, layer: int, k: int, image_token: int) -> list[list[int]]:
    """Per sample: the k image patches with the largest head-averaged attention from the last
    token in layer K-1, in patch order."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        image_slots = (batch["input_ids"][b] == image_token).nonzero().flatten()
        scores = attentions[layer - 1][b, :, -1, image_slots].mean(0)
        out.append(sorted(scores.topk(k).indices.tolist()))
    return out


@pytest.mark.parametrize("layer,budget,k", [(1, 64, 64), (2, 64, 64), (3, 192, 192), (2, "25%", 144)])
def test_kept_set_equals_eager_reference(engine, batch, eager_attentions, layer, budget, k):
    gen = run(engine, batch, create_method(f"fastv:layer={layer}"), budget=budget, max_new_tokens=1)
    assert gen.kept_patches == reference_keep(eager_attentions, batch, layer, k, engine.adapter.image_token_id)


def test_ratio_with_budget_all_keeps_the_official_count(engine, batch, eager_attentions):
    gen = run(engine, batch, create_method("fastv:ratio=0.75"), budget="all", max_new_tokens=1)
    assert gen.kept_patches == reference_keep(eager_attentions, batch, 2, int(576 * 0.25), engine.adapter.image_token_id)


def test_answers_equal_slow_reference_with_original_positions(tiny, engine, batch, eager_attentions):
    """The kept set, fed to a cache-free decoder that drops the tokens before layer K and keeps
    original position ids, gives the engine's answers."""
    model, processor = tiny
    gen = run(engine, batch, create_method("fastv"), budget=64, max_new_tokens=4)
    for b, kept in enumerate(reference_keep(eager_attentions, batch, 2, 64, engine.adapter.image_token_id)):
        tokens, logits = slow_reference(model, single(processor, b), [(2, torch.tensor(kept))], "original", steps=4)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec", ["fastv", "fastv:ratio=0", "fastv:layer=3,positions=reindex"])
def test_keep_all_reproduces_generate(tiny, engine, batch, spec):
    assert_keep_all_is_generate(tiny[0], engine, batch, create_method(spec))


@pytest.mark.parametrize("spec,budget", [("fastv", 64), ("fastv:layer=1,ratio=0.5", "all")])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget)


@pytest.mark.parametrize(
    "spec,budget,kept",
    [("fastv", 64, 64), ("fastv:ratio=0.5", 64, 64), ("fastv:ratio=0.5", "all", 288), ("fastv:ratio=0.75", "all", 144),
     ("fastv", "all", 576), ("fastv", "50%", 288)],
)
def test_counts_follow_budget_then_ratio(engine, batch, spec, budget, kept):
    method = create_method(spec)
    gen = run(engine, batch, method, budget=budget, max_new_tokens=1)
    expected = [576] * method.layer + [kept] * (4 - method.layer)
    assert gen.visual_tokens.tolist() == [expected] * 3
    assert gen.equivalent_tokens.tolist() == [pytest.approx(sum(expected) / 4)] * 3
    assert [len(p) for p in gen.kept_patches] == [kept] * 3


@pytest.mark.parametrize("spec,message", [("fastv:layer=0", "K >= 1"), ("fastv:ratio=1", r"\[0, 1\)"),
                                          ("fastv:ratio=-0.1", r"\[0, 1\)")])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(MethodError, match=message):
        create_method(spec)


def test_a_layer_beyond_the_model_is_refused(engine, batch):
    with pytest.raises(MethodError, match="4 decoder layers"):
        run(engine, batch, create_method("fastv:layer=4"), budget=64, max_new_tokens=1)
