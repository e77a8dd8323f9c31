"""The `random` method: seeded, exact count, original order."""

from __future__ import annotations

from support.models import run

from prunebench.engine.method import create_method


def test_same_seed_same_tokens_and_exact_count(engine, batch):
    first = run(engine, batch, create_method("random:seed=3"), budget=64, max_new_tokens=1)
    second = run(engine, batch, create_method("random:seed=3"), budget=64, max_new_tokens=1)
    other = run(engine, batch, create_method("random:seed=4"), budget=64, max_new_tokens=1)
    assert first.kept_patches == second.kept_patches
    assert first.kept_patches != other.kept_patches
    for kept in first.kept_patches:
        assert len(kept) == 64
        assert kept == sorted(kept)  # original order
        assert len(set(kept)) == 64 and 0 <= min(kept) and max(kept) < 576
    # different prompts draw different sets (the seed mixes in each sample's tokens)
    assert first.kept_patches[0] != first.kept_patches[1]


def test_fraction_budget(engine, batch):
    gen = run(engine, batch, create_method("random"), budget="0.25", max_new_tokens=1)
    assert gen.visual_tokens.tolist() == [[144] * 4] * 3
