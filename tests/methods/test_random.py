"""The `random` method: seeded, exact count, original order."""

from __future__ import annotations

from support.models import make_images, run

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


def test_the_same_question_on_other_images_draws_other_tokens(tiny, engine):
    """The seed mixes in the image's pixels, not only the prompt: one question asked of three
    images keeps three different sets; the same image again keeps the same set."""
    from prunebench.models.tiny import PROMPT_TEMPLATE

    _, processor = tiny
    prompt = PROMPT_TEMPLATE.format(question="what color is the circle ?")
    images = make_images(3, seed=7)
    inputs = processor(images=[*images, images[0]], text=[prompt] * 4, return_tensors="pt", padding=True)
    kept = run(engine, inputs, create_method("random"), budget=64, max_new_tokens=1).kept_patches
    assert kept[0] != kept[1] and kept[0] != kept[2] and kept[1] != kept[2]
    assert kept[3] == kept[0]


def test_fraction_budget(engine, batch):
    gen = run(engine, batch, create_method("random"), budget="0.25", max_new_tokens=1)
    assert gen.visual_tokens.tolist() == [[144] * 4] * 3
