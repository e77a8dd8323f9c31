"""LLaVA-NeXT through the engine: anyres (base image + crops, unpadded, one newline token per row),
so each image gives its own visual-token count, newlines included; a budget is the total kept."""

from __future__ import annotations

import pytest
import support.methods  # noqa: F401  (registers the test methods)
import torch
from support.methods import Probe, pattern
from support.models import build_backbone, run
from support.references import (
    MAX_NEW,
    STEPS,
    assert_every_method_runs_or_refuses,
    assert_matches,
    eos_of,
    slow_reference,
)

from prunebench.budget import Budget
from prunebench.engine.method import MethodError, create_method


@pytest.fixture(scope="module")
def nxt():
    return build_backbone("llava-next")


@pytest.fixture(scope="module")
def next_reference(nxt):
    batch = nxt.batch
    out = nxt.model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def counts(nxt) -> list[int]:
    return (nxt.batch["input_ids"] == nxt.model.config.image_token_id).sum(-1).tolist()


def test_visual_tokens_are_base_plus_unpadded_crops_plus_newlines(nxt):
    """56x100 px -> 2 crops side by side, unpadded to 4 x 8 (+4 newlines) after the 16 base tokens;
    112x60 -> 2 stacked crops, 8 x 4 (+8 newlines); 80x80 -> 2 x 2 crops, 8 x 8 (+8)."""
    assert counts(nxt) == [16 + 32 + 4, 16 + 32 + 8, 16 + 64 + 8]


@pytest.mark.parametrize("spec", ["none", "random", "test-strided:layer=-1", "test-strided:layer=2",
                                  "test-twostage:second=1.0"])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_keep_all_reproduces_generate(nxt, next_reference, spec, positions):
    eos = eos_of(nxt.model)
    gen = run(nxt.engine, nxt.batch, create_method(spec, positions=positions), budget="all",
              max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, next_reference, eos)
    assert gen.visual_tokens.tolist() == [[n] * 4 for n in counts(nxt)]


@pytest.mark.parametrize("layer", [-1, 0, 2])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_single_stage_equals_slow_reference(nxt, layer, positions):
    """Budget K = total visual tokens kept per image (newlines count like any other token)."""
    k = 40
    gen = run(nxt.engine, nxt.batch, create_method(f"test-strided:layer={layer},offset=2", positions=positions),
              budget=k, max_new_tokens=STEPS)
    for b, n in enumerate(counts(nxt)):
        tokens, logits = slow_reference(nxt.model, nxt.single(b), [(layer, pattern(n, k, 2))], positions)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)
        assert gen.visual_tokens[b].tolist() == [n] * max(layer, 0) + [k] * (4 - max(layer, 0))


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_two_stages_equal_slow_reference(nxt, positions):
    gen = run(nxt.engine, nxt.batch, create_method("test-twostage", positions=positions), budget="50%",
              max_new_tokens=STEPS)
    for b, n in enumerate(counts(nxt)):
        k = Budget.parse("50%").resolve(n)
        stages = [(1, pattern(n, k)), (3, pattern(k, max(1, k // 2)))]
        tokens, logits = slow_reference(nxt.model, nxt.single(b), stages, positions)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec,budget", [("fastv", 40), ("divprune", 40), ("pyramiddrop:layers=1/2/3", "50%"),
                                         ("dart", 40), ("sparsevlm:layers=0/1/2,version=2.0,heads=2", "50%")])
def test_batch_equals_each_alone(nxt, spec, budget):
    together = run(nxt.engine, nxt.batch, create_method(spec), budget=budget, max_new_tokens=4)
    for b in range(3):
        alone = run(nxt.engine, nxt.single(b), create_method(spec), budget=budget, max_new_tokens=4)
        assert alone.tokens[0] == together.tokens[b]
        assert alone.kept_patches[0] == together.kept_patches[b]
        assert alone.visual_tokens[0].tolist() == together.visual_tokens[b].tolist()
        torch.testing.assert_close(alone.logits[0][0], together.logits[0][b], atol=1e-4, rtol=0)


def test_single_row_attention_equals_eager(nxt):
    eager = build_backbone("llava-next", attn_implementation="eager").model
    batch = nxt.batch
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    Probe.hook, Probe.seen = (lambda ctx: {layer: ctx.attention(layer, rows="last", visual_only=False) for layer in (1, 2)}), []
    run(nxt.engine, batch, create_method("test-probe:layer=2"), max_new_tokens=1)
    (seen,) = Probe.seen
    for layer, probs in seen.items():
        torch.testing.assert_close(probs, attentions[layer][:, :, -1:].float(), atol=1e-5, rtol=0)


def test_image_embeds_are_the_packed_tokens(nxt):
    """The engine's image tokens are the model's own packed features: newline rows included."""
    batch = nxt.batch
    with torch.no_grad():
        packed = nxt.model.model.get_image_features(pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                                                    vision_feature_layer=-2, vision_feature_select_strategy="default").pooler_output
    Probe.hook, Probe.seen = (lambda ctx: ctx.image_embeds.clone()), []
    run(nxt.engine, batch, create_method("test-probe:layer=-1"), max_new_tokens=1)
    (embeds,) = Probe.seen
    for b, row in enumerate(packed):
        torch.testing.assert_close(embeds[b, : len(row)], row, atol=0, rtol=0)
    newline = nxt.model.model.image_newline
    assert all(bool((row == newline).all(-1).any()) for row in packed)


def test_vision_signals_refuse_with_the_reason(nxt):
    Probe.hook, Probe.seen = (lambda ctx: ctx.cls_attention()), []
    with pytest.raises(MethodError, match="image_newline tokens"):
        run(nxt.engine, nxt.batch, create_method("test-probe:layer=-1"), max_new_tokens=1)


def test_missing_image_sizes_is_a_clear_error(nxt):
    batch = nxt.batch
    with pytest.raises(ValueError, match="image_sizes"):
        nxt.engine.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])


def test_every_method_runs_or_refuses(nxt, tmp_path):
    assert_every_method_runs_or_refuses(nxt, tmp_path, vision_width=32)


def test_7b_preset_builds_weightless_and_has_an_engine_adapter():
    from prunebench.engine.adapters import LlavaNextAdapter, adapter_for
    from prunebench.profiling.presets import build_random_model

    adapter = adapter_for(build_random_model("llava-next-7b", device="meta"))
    assert isinstance(adapter, LlavaNextAdapter) and adapter.num_layers == 32
    with pytest.raises(ValueError, match="vary per image"):
        _ = adapter.visual_tokens_per_image
