"""PyramidDrop: every stage's kept set equals the eager reference; keep-all is generate; batched =
alone; the budget schedule averages to K exactly."""

from __future__ import annotations

import pytest
import torch
from prunebench.methods.pyramiddrop import layer_averaged_counts
from support.models import run, single
from support.references import (
    EagerView,
    assert_batch_equals_each_alone,
    assert_keep_all_is_generate,
    eager_prefill,
    record_stages,
)

from prunebench.budget import Budget, BudgetError
from prunebench.engine.method import MethodError, create_method

TINY = "layers=1/2/3"


def last_token_stage(counts: dict[int, int]):
    """PyramidDrop's rule, the slow way: top tokens by the last token's head-mean attention in
    the stage layer itself."""

    def stage(view: EagerView):
        probs = view.attention(view.layer)[:, -1].mean(0)
        return probs[view.visual].topk(counts[view.layer]).indices.tolist(), None

    return stage


@pytest.mark.parametrize("spec,budget,counts", [
    (f"pyramiddrop:{TINY}", 192, (146, 37, 9)),
    (f"pyramiddrop:{TINY},ratios=0.5/0.25/0.125", "all", (288, 144, 72)),
    ("pyramiddrop:layers=2", 300, (24,)),
])
def test_every_stage_equals_eager_reference(tiny, engine, batch, eager, spec, budget, counts):
    _, processor = tiny
    method = create_method(spec)
    seen = record_stages(method)
    gen = run(engine, batch, method, budget=budget, max_new_tokens=1)
    stage_counts = dict(zip(method.layers, counts))
    for b in range(3):
        kept, logits = eager_prefill(eager, single(processor, b), dict.fromkeys(method.layers, last_token_stage(stage_counts)),
                                     "reindex")
        assert [stage[b] for stage in seen] == kept
        assert gen.kept_patches[b] == kept[-1]
        torch.testing.assert_close(gen.logits[0][b], logits, atol=1e-4, rtol=0)
    assert gen.visual_tokens.tolist() == [[576] * method.layers[0] + [c for c, span in zip(counts, spans(method)) for _ in range(span)]] * 3


def spans(method, num_layers: int = 4) -> list[int]:
    return [b - a for a, b in zip(method.layers, [*method.layers[1:], num_layers])]


@pytest.mark.parametrize("budget", [145, 160, 192, 300, 575, "40%"])
def test_budget_schedule_averages_to_k(engine, batch, budget):
    gen = run(engine, batch, create_method(f"pyramiddrop:{TINY}"), budget=budget, max_new_tokens=1)
    k = budget if isinstance(budget, int) else 231  # ceil(0.4 * 576)
    assert gen.equivalent_tokens.tolist() == [k] * 3
    counts = gen.visual_tokens[0].tolist()
    assert counts[0] == 576 and counts == sorted(counts, reverse=True)


def test_paper_ratios_average_270_on_llava_geometry():
    method = create_method("pyramiddrop:ratios=0.5/0.25/0.125")
    stages = method.schedule(576, Budget.parse("all"), 32)
    assert [(s.layer, s.keep) for s in stages] == [(8, 288), (16, 144), (24, 72)]
    assert (8 * 576 + 8 * 288 + 8 * 144 + 8 * 72) / 32 == 270


@pytest.mark.parametrize("k", [145, 160, 192, 250, 400, 576])
def test_llava_budgets_are_exact_geometric_schedules(k):
    counts = layer_averaged_counts(576, k, (8, 16, 24), 32)
    assert (8 * 576 + 8 * sum(counts)) / 32 == k
    assert 576 >= counts[0] >= counts[1] >= counts[2] >= 1
    if 5 <= counts[1] < 576:  # roughly geometric: each stage keeps a similar fraction of the previous one
        ratios = [a / b for a, b in zip(counts, (576, *counts))]
        assert max(ratios[:2]) - min(ratios[:2]) < 0.1


def test_a_budget_below_the_first_stage_floor_names_the_fix():
    with pytest.raises(BudgetError, match="K=128 is below 144.8.*layers 0..7 of 32.*`layers` option"):
        layer_averaged_counts(576, 128, (8, 16, 24), 32)
    assert (2 * 576 + sum(s * c for s, c in zip((4, 6, 20), layer_averaged_counts(576, 64, (2, 6, 12), 32)))) / 32 == 64


@pytest.mark.parametrize("spec", [f"pyramiddrop:{TINY}", "pyramiddrop:layers=2"])
def test_keep_all_reproduces_generate(tiny, engine, batch, spec):
    assert_keep_all_is_generate(tiny[0], engine, batch, create_method(spec))


@pytest.mark.parametrize("spec,budget", [(f"pyramiddrop:{TINY}", 192), (f"pyramiddrop:{TINY},ratios=0.5/0.25/0.125", "all")])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget)


def test_stages_beyond_the_model_are_a_clear_error(engine, batch):
    with pytest.raises(MethodError, match="stage layer 24 is outside this 4-layer decoder"):
        run(engine, batch, create_method("pyramiddrop"), budget=300, max_new_tokens=1)
    with pytest.raises(MethodError, match="outside this 32-layer decoder"):
        create_method("pyramiddrop:layers=8/16/40").schedule(576, Budget.parse("64"), 32)


@pytest.mark.parametrize("spec,message", [
    ("pyramiddrop:layers=3/2", "strictly increasing"),
    ("pyramiddrop:layers=-1/2", ">= 0"),
    ("pyramiddrop:ratios=0.5/0.25", "2 ratios for 3 stage layers"),
    ("pyramiddrop:ratios=0.25/0.5/0.1", "non-increasing"),
])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(MethodError, match=message):
        create_method(spec)
