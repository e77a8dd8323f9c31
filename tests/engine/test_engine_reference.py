"""Pruning equals the slow obvious computation, and signals equal eager attention."""

from __future__ import annotations

import pytest
import support.methods  # noqa: F401  (registers the test methods)
import torch
from support.methods import Probe, pattern
from support.models import run, single
from support.references import STEPS, slow_reference

from prunebench.engine.method import create_method


@pytest.mark.parametrize("layer", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_single_stage_equals_slow_reference(tiny, engine, batch, layer, positions):
    model, processor = tiny
    k = 64
    gen = run(engine, batch, create_method(f"test-strided:layer={layer},offset=5", positions=positions), budget=k,
              max_new_tokens=STEPS)
    for b in range(3):
        tokens, logits = slow_reference(model, single(processor, b), [(layer, pattern(576, k, 5))], positions)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)
    expected = [576] * max(layer, 0) + [k] * (4 - max(layer, 0))
    assert gen.visual_tokens.tolist() == [expected] * 3


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_two_stages_equal_slow_reference(tiny, engine, batch, positions):
    model, processor = tiny
    gen = run(engine, batch, create_method("test-twostage", positions=positions), budget=96, max_new_tokens=STEPS)
    stages = [(1, pattern(576, 96)), (3, pattern(96, 48))]
    for b in range(3):
        tokens, logits = slow_reference(model, single(processor, b), stages, positions)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)
    assert gen.visual_tokens.tolist() == [[576, 96, 96, 48]] * 3
    assert gen.equivalent_tokens.tolist() == [pytest.approx((576 + 96 + 96 + 48) / 4)] * 3
    assert all(len(p) == 48 for p in gen.kept_patches)


@pytest.mark.parametrize("lead", [False, True])
def test_built_tokens_enter_after_or_before_the_kept_ones(tiny, engine, batch, lead):
    """A built token is one more visual token: the first logits equal the LLM fed by hand with
    [text, kept patches, built token, text] (or the built token first), and batch = each alone."""
    model, processor = tiny
    spec = f"test-merge:lead={lead}"
    gen = run(engine, batch, create_method(spec), budget=65, max_new_tokens=STEPS)
    assert gen.visual_tokens.tolist() == [[65] * 4] * 3
    assert all(len(p) == 64 for p in gen.kept_patches)  # the built token has no patch id
    lm = model.model.language_model
    kept = pattern(576, 64)
    dropped = torch.ones(576, dtype=torch.bool)
    dropped[kept] = False
    for b in range(3):
        inputs = single(processor, b)
        alone = run(engine, inputs, create_method(spec), budget=65, max_new_tokens=STEPS)
        assert alone.tokens[0] == gen.tokens[b]
        ids = inputs["input_ids"][0]
        with torch.no_grad():
            image = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                                   vision_feature_select_strategy="default").pooler_output[0]
            built = image[dropped].mean(0, keepdim=True)
            visual = [built, image[kept]] if lead else [image[kept], built]
            slots = (ids == model.config.image_token_id).nonzero().flatten()
            text = lm.embed_tokens(ids)
            embeds = torch.cat([text[: slots[0]], *visual, text[slots[-1] + 1 :]])[None]
            logits = model.lm_head(lm(inputs_embeds=embeds).last_hidden_state[:, -1])[0]  # already normed
        torch.testing.assert_close(gen.logits[0][b], logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def eager_outputs(batch, eager):
    """The same tiny model under eager attention, with every attention map returned."""
    with torch.no_grad():
        lm = eager(**batch, output_attentions=True)
        vision = eager.model.vision_tower(batch["pixel_values"], output_attentions=True)
    return lm.attentions, vision.attentions


@pytest.mark.parametrize("stage_layer", [1, 2, 3])
def test_single_row_attention_equals_eager(engine, batch, eager_outputs, stage_layer):
    attentions, _ = eager_outputs
    text_rows = torch.tensor([[590, 585, 591]] * 3)  # text slots at the end of every prompt

    def hook(ctx):
        out = {}
        for layer in (stage_layer - 1, stage_layer):
            out[layer] = (
                ctx.attention(layer, rows="last", visual_only=False),
                ctx.attention(layer, rows=text_rows, visual_only=False),
                ctx.attention(layer, rows="last", visual_only=True),
                ctx.visual_index.clone(),
            )
        return out

    Probe.hook, Probe.seen = hook, []
    run(engine, batch, create_method(f"test-probe:layer={stage_layer}"), max_new_tokens=1)
    (seen,) = Probe.seen
    for layer, (last, rows, visual, index) in seen.items():
        eager = attentions[layer].float()
        torch.testing.assert_close(last, eager[:, :, -1:], atol=1e-5, rtol=0)
        expected_rows = torch.stack([eager[b][:, text_rows[b]] for b in range(3)])
        torch.testing.assert_close(rows, expected_rows, atol=1e-5, rtol=0)
        expected_visual = torch.stack([eager[b, :, -1:, index[b]] for b in range(3)])
        torch.testing.assert_close(visual, expected_visual, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [0, -2, -1])
def test_cls_attention_equals_eager(engine, batch, eager_outputs, layer):
    _, vision_attentions = eager_outputs
    Probe.hook, Probe.seen = (lambda ctx: ctx.cls_attention(layer)), []
    run(engine, batch, create_method("test-probe:layer=-1"), max_new_tokens=1)
    (cls,) = Probe.seen
    torch.testing.assert_close(cls, vision_attentions[layer][:, :, 0, 1:].float(), atol=1e-5, rtol=0)


def test_attention_of_an_unreachable_layer_is_a_clear_error(engine, batch):
    Probe.hook, Probe.seen = (lambda ctx: ctx.attention(0)), []
    with pytest.raises(ValueError, match="available layers: \\[2\\]|available layers"):
        run(engine, batch, create_method("test-probe:layer=3"), max_new_tokens=1)
