"""Qwen2-VL and Qwen2.5-VL through the engine: dynamic resolution (a different visual-token count
per image), M-RoPE positions, and the vision tower's merger as the projector."""

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
    reindexed,
    slow_reference,
)

from prunebench.budget import Budget
from prunebench.engine.method import create_method
from prunebench.engine.timing import StageClock


@pytest.fixture(scope="module", params=["qwen2-vl", "qwen2.5-vl"])
def qwen(request):
    return build_backbone(request.param)


@pytest.fixture(scope="module")
def qwen_reference(qwen):
    """HF generate on the padded batch (the model's own M-RoPE and rope deltas)."""
    batch = qwen.batch
    out = qwen.model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def counts(qwen) -> list[int]:
    return (qwen.batch["input_ids"] == qwen.model.config.image_token_id).sum(-1).tolist()


def test_images_of_different_sizes_give_different_token_counts(qwen):
    assert counts(qwen) == [12, 20, 16]  # 112x84, 140x112, 112x112 px -> (8x6, 10x8, 8x8) patches / 4


@pytest.mark.parametrize(
    "spec", ["none", "random", "test-strided:layer=-1", "test-strided:layer=2", "test-twostage:second=1.0"])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_keep_all_reproduces_generate(qwen, qwen_reference, spec, positions):
    """Both position policies leave M-RoPE ids untouched when nothing is dropped."""
    eos = eos_of(qwen.model)
    gen = run(qwen.engine, qwen.batch, create_method(spec, positions=positions), budget="all",
              max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, qwen_reference, eos)
    assert gen.visual_tokens.tolist() == [[n] * 4 for n in counts(qwen)]


@pytest.mark.parametrize("layer", [-1, 0, 2, 3])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_single_stage_equals_slow_reference(qwen, layer, positions):
    """A fraction budget keeps a different count per image; every prompt equals its no-cache
    reference with M-RoPE ids sliced (original) or rebuilt (reindex)."""
    gen = run(qwen.engine, qwen.batch, create_method(f"test-strided:layer={layer},offset=3", positions=positions),
              budget="40%", max_new_tokens=STEPS)
    for b, n in enumerate(counts(qwen)):
        k = Budget.parse("40%").resolve(n)
        tokens, logits = slow_reference(qwen.model, qwen.single(b), [(layer, pattern(n, k, 3))], positions)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)
        assert gen.visual_tokens[b].tolist() == [n] * max(layer, 0) + [k] * (4 - max(layer, 0))


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_two_stages_equal_slow_reference(qwen, positions):
    gen = run(qwen.engine, qwen.batch, create_method("test-twostage", positions=positions), budget="50%",
              max_new_tokens=STEPS)
    for b, n in enumerate(counts(qwen)):
        k = Budget.parse("50%").resolve(n)
        stages = [(1, pattern(n, k)), (3, pattern(k, max(1, k // 2)))]
        tokens, logits = slow_reference(qwen.model, qwen.single(b), stages, positions)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_kept_mrope_positions(qwen, positions):
    """At the second stage the layout holds, for every kept token, its original (t, h, w) ids
    under "original", and under "reindex" the slow token-by-token rebuild of them; decoding
    continues from the largest id + 1."""
    batch = qwen.batch
    method = create_method("test-twostage", positions=positions)
    select, seen = method.select, []
    method.select = lambda ctx: (seen.append(ctx.layout) if ctx.layer == 3 else None) or select(ctx)
    state = qwen.engine.prefill(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], method,
                                Budget.parse("50%"), StageClock(qwen.engine.device), qwen.engine.adapter.image_inputs(batch))
    (layout,) = seen
    assert layout.positions.shape[0] == 3
    original = qwen.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"],
                                               attention_mask=batch["attention_mask"])[0]
    image = batch["input_ids"] == qwen.model.config.image_token_id
    real = batch["attention_mask"].bool()
    for b, n in enumerate(counts(qwen)):
        kept = pattern(n, Budget.parse("50%").resolve(n))
        keep = real[b] & ~image[b]
        keep[image[b].nonzero().flatten()[kept]] = True
        expected = original[:, b, keep]
        if positions == "reindex":
            expected = reindexed(expected, image[b, keep])
        assert torch.equal(layout.positions[:, b, layout.valid[b]], expected)
        ids = layout.visual_id[b, layout.valid[b]]
        assert ids[ids >= 0].tolist() == kept.tolist()
        assert int(state.groups[1].next_position[b]) == int(expected.max()) + 1  # layers 1-2: this layout
    if positions == "original":  # text is never dropped: the unpruned prompt's max id + 1 everywhere
        for group in state.groups:
            assert group.next_position.tolist() == (original.amax((0, 2)) + 1).tolist()


@pytest.mark.parametrize("spec", ["fastv", "divprune", "pyramiddrop:layers=1/2/3", "dart",
                                  "sparsevlm:layers=0/1/2,version=2.0,heads=2"])
def test_batch_equals_each_alone(qwen, spec):
    """Samples keep different counts (a fraction of different N) and still equal their lone runs."""
    together = run(qwen.engine, qwen.batch, create_method(spec), budget="50%", max_new_tokens=4)
    for b in range(3):
        alone = run(qwen.engine, qwen.single(b), create_method(spec), budget="50%", max_new_tokens=4)
        assert alone.tokens[0] == together.tokens[b]
        assert alone.kept_patches[0] == together.kept_patches[b]
        assert alone.visual_tokens[0].tolist() == together.visual_tokens[b].tolist()
        torch.testing.assert_close(alone.logits[0][0], together.logits[0][b], atol=1e-4, rtol=0)


def test_single_row_attention_equals_eager(qwen):
    """ctx.attention recomputes rows with the decoder's M-RoPE: equal to the eager model's maps."""
    eager = build_backbone(qwen.name, attn_implementation="eager").model
    batch = qwen.batch
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    Probe.hook, Probe.seen = (lambda ctx: {layer: (ctx.attention(layer, rows="last", visual_only=False),
                                                   ctx.attention(layer, rows="last"), ctx.visual_index.clone(),
                                                   ctx.attention(layer, rows=ctx.visual_index[:, 1:4], visual_only=False))
                                           for layer in (1, 2)}), []
    run(qwen.engine, batch, create_method("test-probe:layer=2"), max_new_tokens=1)
    (seen,) = Probe.seen
    for layer, (full, visual, index, image_rows) in seen.items():
        torch.testing.assert_close(full, attentions[layer][:, :, -1:].float(), atol=1e-5, rtol=0)
        expected_rows = torch.stack([attentions[layer][b][:, index[b, 1:4]] for b in range(3)]).float()
        torch.testing.assert_close(image_rows, expected_rows, atol=1e-5, rtol=0)  # queries at (t, h, w) ids
        for b, n in enumerate(counts(qwen)):
            torch.testing.assert_close(visual[b, :, :, :n], attentions[layer][b, :, -1:, index[b, :n]].float(), atol=1e-5, rtol=0)


def test_vision_features_project_to_the_image_tokens(qwen):
    """Each visual token's features are its 2x2 patches' (un-windowed on Qwen2.5-VL): the merger
    maps them to exactly the tokens the LLM receives."""
    Probe.hook, Probe.seen = (lambda ctx: (ctx.project(ctx.vision_features), ctx.image_embeds, ctx.vision_features.shape)), []
    run(qwen.engine, qwen.batch, create_method("test-probe:layer=-1"), max_new_tokens=1)
    ((projected, embeds, shape),) = Probe.seen
    assert shape[-1] == 4 * 32  # four patches of the tiny tower's 32-wide features
    for b, n in enumerate(counts(qwen)):
        torch.testing.assert_close(projected[b, :n], embeds[b, :n], atol=1e-5, rtol=0)


def test_missing_grid_is_a_clear_error(qwen):
    batch = dict(qwen.batch)
    with pytest.raises(ValueError, match="image_grid_thw"):
        qwen.engine.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])


def test_every_method_runs_or_refuses(qwen, tmp_path):
    assert_every_method_runs_or_refuses(qwen, tmp_path, vision_width=4 * 32)


@pytest.mark.parametrize("preset,layers,params", [("qwen2-vl-7b", 28, 8.29e9), ("qwen2.5-vl-7b", 28, 8.29e9)])
def test_7b_presets_build_weightless_and_have_an_engine_adapter(preset, layers, params):
    from prunebench.engine.adapters import QwenVLAdapter, adapter_for
    from prunebench.profiling.presets import build_random_model

    model = build_random_model(preset, device="meta")
    adapter = adapter_for(model)
    assert isinstance(adapter, QwenVLAdapter) and adapter.num_layers == layers
    assert adapter.decoder.rotary_emb.mrope_section == [16, 24, 24]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.002)


@pytest.mark.parametrize("name,cls", [("random:tiny-qwen2-vl", "Qwen2VLForConditionalGeneration"),
                                      ("random:tiny-qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration"),
                                      ("random:tiny-llava-next", "LlavaNextForConditionalGeneration")])
def test_load_model_builds_the_tiny_backbones(name, cls):
    from prunebench.models.loading import load_model

    model, processor = load_model(name)
    assert type(model).__name__ == cls and processor.tokenizer.padding_side == "left"
