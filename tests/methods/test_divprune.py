"""DivPrune: the kept set equals a plain Python greedy max-min loop over the tokens; keep-all is
exact; batching changes nothing; the kept count is K."""

from __future__ import annotations

import pytest
import torch
from prunebench.methods.divprune import max_min_diverse
from support.models import run
from support.references import (
    MAX_NEW,
    assert_batch_equals_each_alone,
    assert_matches,
    eos_of,
)

from prunebench.engine.method import create_method

N = 576


def slow_divprune(features: torch.Tensor, k: int) -> list[int]:
    """One image, the obvious way: distances as Python floats, every score recomputed from scratch."""
    unit = features / features.norm(dim=-1, keepdim=True)
    dist = (1.0 - unit @ unit.T).tolist()
    n = len(dist)
    # first pick: the token whose nearest other token is farthest (2nd smallest of its column)
    first = [sorted(dist[i][j] for i in range(n))[1] for j in range(n)]
    picks = [max(range(n), key=lambda j: first[j])]
    while len(picks) < k:
        best, best_score = None, float("-inf")
        for j in range(n):
            if j in picks:
                continue
            score = min(dist[s][j] for s in picks)
            if score > best_score:
                best, best_score = j, score
        picks.append(best)
    return sorted(picks)


@pytest.fixture(scope="module")
def features(tiny, batch):
    """Per image: (projected embeddings, vision features), from HF's own LLaVA feature path."""
    model, _ = tiny
    with torch.no_grad():
        projected = model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
    return {"projected": projected, "vision": hidden[:, 1:]}


@pytest.mark.parametrize("space,k", [("projected", 16), ("projected", 48), ("vision", 32)])
def test_equals_plain_python_greedy_loop(engine, batch, features, space, k):
    gen = run(engine, batch, create_method(f"divprune:space={space}"), budget=k, max_new_tokens=1)
    for b in range(3):
        assert gen.kept_patches[b] == slow_divprune(features[space][b].reshape(N, -1), k)
    assert gen.visual_tokens.tolist() == [[k] * engine.adapter.num_layers] * 3


def test_keep_all_reproduces_generate(tiny, engine, batch, reference):
    eos = eos_of(tiny[0])
    gen = run(engine, batch, create_method("divprune"), budget="all", max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, reference, eos)
    assert gen.kept_patches == [list(range(N))] * 3


@pytest.mark.parametrize("budget,k", [(64, 64), ("12.5%", 72)])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, budget, k):
    _, processor = tiny
    gen = assert_batch_equals_each_alone(engine, processor, batch, "divprune", budget, max_new_tokens=6)
    assert gen.visual_tokens.tolist() == [[k] * 4] * 3


def test_duplicate_tokens_are_never_picked_twice():
    """Identical tokens (distance 0) would tie at score 0; the picks stay distinct."""
    base = torch.randn(1, 4, 8)
    features = torch.cat([base, base, base], dim=1)  # 12 tokens, 4 distinct directions
    picks = max_min_diverse(features, 8)[0].tolist()
    assert len(set(picks)) == 8
    assert len({p % 4 for p in picks[:4]}) == 4  # all 4 directions come before any repeat
