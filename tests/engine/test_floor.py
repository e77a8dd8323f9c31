"""The floor control (budget ``floor``): one visual token after each in-LLM stage, the method's own
top pick, nothing built; the layers before the first stage see every token."""

from __future__ import annotations

import pytest
import torch
from support.models import run, single
from support.references import EagerView, eager_prefill, record_stages

from prunebench.budget import Budget, BudgetError
from prunebench.engine.method import MethodError, create_method


def test_floor_budget_parses_and_prints():
    floor = Budget.parse("floor")
    assert floor == Budget.floor_control() and str(floor) == "floor" and floor.resolve(576) == 1
    assert not floor.is_all and Budget.parse("1") != floor
    with pytest.raises(BudgetError, match="floor budget keeps one token"):
        Budget(tokens=2, floor=True)


def test_fastv_floor_is_fastv_at_one_token(engine, batch):
    floor = run(engine, batch, create_method("fastv"), budget="floor", max_new_tokens=2)
    one = run(engine, batch, create_method("fastv"), budget=1, max_new_tokens=2)
    assert floor.tokens == one.tokens and floor.kept_patches == one.kept_patches
    assert floor.visual_tokens.tolist() == [[576, 576, 1, 1]] * 3


def test_pyramiddrop_floor_keeps_its_top_token_at_every_stage(tiny, engine, batch, eager):
    """Against the eager reference: the last instruction token's head-mean attention in the stage
    layer itself, top 1 at layer 1, then the lone survivor at layers 2 and 3."""
    _, processor = tiny
    method = create_method("pyramiddrop:layers=1/2/3")
    seen = record_stages(method)
    gen = run(engine, batch, method, budget="floor", max_new_tokens=1)

    def top_one(view: EagerView):
        probs = view.attention(view.layer)[:, -1].mean(0)
        return probs[view.visual].topk(1).indices.tolist(), None

    for b in range(3):
        kept, logits = eager_prefill(eager, single(processor, b), dict.fromkeys((1, 2, 3), top_one), "reindex")
        assert [stage[b] for stage in seen] == kept and len(kept[0]) == 1
        assert gen.kept_patches[b] == kept[-1]
        torch.testing.assert_close(gen.logits[0][b], logits, atol=1e-4, rtol=0)
    assert gen.visual_tokens.tolist() == [[576, 1, 1, 1]] * 3


def test_sparsevlm_floor_adds_no_recycled_tokens(engine, batch):
    method = create_method("sparsevlm:layers=0/1/2")
    seen = record_stages(method)
    gen = run(engine, batch, method, budget="floor", max_new_tokens=1)
    assert gen.visual_tokens.tolist() == [[576, 1, 1, 1]] * 3
    # the method still builds its recycled tokens (-2) at the first stage; the engine drops them
    assert any(-2 in row for row in seen[1]) and all(len(p) == 1 and p[0] >= 0 for p in gen.kept_patches)
    # its one token is the top of the ranking the same stage keeps at a larger budget
    ranked = create_method("sparsevlm:layers=0/1/2,recycle=false")
    ranked_seen = record_stages(ranked)
    run(engine, batch, ranked, budget=64, max_new_tokens=1)  # published: 66 after the first stage
    assert all(set(p) <= set(r) for p, r in zip(gen.kept_patches, ranked_seen[1]))


def test_dart_floor_is_dart_at_k1_its_pivots(engine, batch):
    floor = run(engine, batch, create_method("dart"), budget="floor", max_new_tokens=1)
    one = run(engine, batch, create_method("dart"), budget=1, max_new_tokens=1)
    assert floor.kept_patches == one.kept_patches and all(len(p) == 4 for p in floor.kept_patches)
    assert floor.visual_tokens.tolist() == [[576, 576, 4, 4]] * 3


def test_floor_of_a_pre_llm_method_is_refused(engine, batch):
    with pytest.raises(MethodError, match="control for in-LLM methods"):
        run(engine, batch, create_method("random"), budget="floor", max_new_tokens=1)
