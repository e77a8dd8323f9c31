"""InternVL 3 / 3.5, LLaVA-OneVision, Qwen3-VL and SmolVLM through the engine, on tiny random models
with their own processors: three images of different sizes (so three visual-token counts), left
padded. Keep-all is the model's own generate; pruning equals a no-cache slow reference; a batch
equals each prompt alone; every method runs or refuses with its reason."""

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

FAMILIES = ["internvl3", "internvl3.5", "llava-onevision", "qwen3-vl", "smolvlm"]
# visual tokens of the three images (support.models.FAMILIES gives their sizes):
COUNTS = {
    "internvl3": [16, 48, 80],  # 1 tile; 2 tiles + thumbnail; 4 tiles + thumbnail, 16 tokens a tile
    "internvl3.5": [16, 48, 80],
    "llava-onevision": [52, 56, 88],  # 16 base + unpadded grid + a newline per row (88: a 3x3 grid interpolated to 8x8)
    "qwen3-vl": [12, 16, 15],  # one token per 32x32 px: 4x3, 4x4, 3x5
    "smolvlm": [117, 81, 153],  # 9 tokens a tile: 3x4, 2x4 and 4x4 tiles, + the global image
    "smolvlm2": [117, 81, 153],
}
VISION_WIDTH = {"internvl3": 4 * 32, "internvl3.5": 4 * 32, "llava-onevision": 32, "qwen3-vl": 4 * 32,
                "smolvlm": 4 * 32, "smolvlm2": 4 * 32}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return build_backbone(request.param)


@pytest.fixture(scope="module")
def family_reference(family):
    batch = family.batch
    out = family.model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)


def counts(backbone) -> list[int]:
    return (backbone.batch["input_ids"] == backbone.model.config.image_token_id).sum(-1).tolist()


def test_visual_tokens_per_image(family):
    assert counts(family) == COUNTS[family.name]
    assert family.batch["attention_mask"][:, 0].tolist().count(0) >= 1  # left padded


@pytest.mark.parametrize("spec", ["none", "random", "test-strided:layer=-1", "test-strided:layer=2",
                                  "test-twostage:second=1.0"])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_keep_all_reproduces_generate(family, family_reference, spec, positions):
    eos = eos_of(family.model)
    gen = run(family.engine, family.batch, create_method(spec, positions=positions), budget="all",
              max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, family_reference, eos)
    assert gen.visual_tokens.tolist() == [[n] * 4 for n in counts(family)]


def test_smolvlm2_keep_all_reproduces_generate():
    """SmolVLM2's class (the same model as Idefics3's under another name) through the same adapter."""
    smol2 = build_backbone("smolvlm2")
    out = smol2.model.generate(**smol2.batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    eos = eos_of(smol2.model)
    gen = run(smol2.engine, smol2.batch, create_method("test-strided:layer=2"), budget="all", max_new_tokens=MAX_NEW,
              eos_token_id=list(eos) or None)
    assert_matches(gen, (out.sequences[:, smol2.batch["input_ids"].shape[1]:], torch.stack(out.logits, 1)), eos)


@pytest.mark.parametrize("layer", [-1, 0, 2])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_single_stage_equals_slow_reference(family, layer, positions):
    """A fraction budget keeps a different count per image; each prompt equals its no-cache
    reference (Qwen3-VL's DeepStack rows follow the kept tokens in the reference too)."""
    gen = run(family.engine, family.batch, create_method(f"test-strided:layer={layer},offset=3", positions=positions),
              budget="40%", max_new_tokens=STEPS)
    for b, n in enumerate(counts(family)):
        k = Budget.parse("40%").resolve(n)
        tokens, logits = slow_reference(family.model, family.single(b), [(layer, pattern(n, k, 3))], positions)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)
        assert gen.visual_tokens[b].tolist() == [n] * max(layer, 0) + [k] * (4 - max(layer, 0))


@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_two_stages_equal_slow_reference(family, positions):
    gen = run(family.engine, family.batch, create_method("test-twostage", positions=positions), budget="50%",
              max_new_tokens=STEPS)
    for b, n in enumerate(counts(family)):
        k = Budget.parse("50%").resolve(n)
        stages = [(1, pattern(n, k)), (3, pattern(k, max(1, k // 2)))]
        tokens, logits = slow_reference(family.model, family.single(b), stages, positions)
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(torch.stack([step[b] for step in gen.logits]), logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec,budget", [("fastv", 12), ("random", "50%"), ("divprune", "50%"), ("pyramiddrop:layers=1/2/3", "50%"),
                                         ("dart", 12), ("sparsevlm:layers=0/1/2,version=2.0,heads=2", "50%")])
def test_batch_equals_each_alone(family, spec, budget):
    """Per-image budgets: K visual tokens of every image (tiles, newlines, global view included)."""
    together = run(family.engine, family.batch, create_method(spec), budget=budget, max_new_tokens=4)
    for b in range(3):
        alone = run(family.engine, family.single(b), create_method(spec), budget=budget, max_new_tokens=4)
        assert alone.tokens[0] == together.tokens[b]
        assert alone.kept_patches[0] == together.kept_patches[b]
        assert alone.visual_tokens[0].tolist() == together.visual_tokens[b].tolist()
        torch.testing.assert_close(alone.logits[0][0], together.logits[0][b], atol=1e-4, rtol=0)


def test_single_row_attention_equals_eager(family):
    """ctx.attention rebuilds rows from the layer's q/k projections (q/k norms on Qwen3 decoders)
    and rotary embedding: equal to the eager model's maps."""
    eager = build_backbone(family.name, attn_implementation="eager").model
    batch = family.batch
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    Probe.hook, Probe.seen = (lambda ctx: {layer: ctx.attention(layer, rows="last", visual_only=False) for layer in (1, 2)}), []
    run(family.engine, batch, create_method("test-probe:layer=2"), max_new_tokens=1)
    (seen,) = Probe.seen
    for layer, probs in seen.items():
        torch.testing.assert_close(probs, attentions[layer][:, :, -1:].float(), atol=1e-5, rtol=0)


def test_image_embeds_are_the_models_own_and_features_project_onto_them(family):
    """The engine's visual tokens are the model's own image features, sample by sample; where a
    backbone offers pre-projector features, ``ctx.project`` maps them onto exactly those tokens."""
    from support.references import prompt_of

    Probe.hook, Probe.seen = (lambda ctx: (ctx.image_embeds.clone(), _try(lambda: ctx.project(ctx.vision_features)))), []
    run(family.engine, family.batch, create_method("test-probe:layer=-1"), max_new_tokens=1)
    ((embeds, projected),) = Probe.seen
    for b, n in enumerate(counts(family)):
        single = family.single(b)
        prompt, _, _ = prompt_of(family.model, single)
        own = prompt[single["input_ids"][0] == family.model.config.image_token_id]
        torch.testing.assert_close(embeds[b, :n], own, atol=1e-5, rtol=0)
        if family.name != "llava-onevision":
            torch.testing.assert_close(projected[b, :n], own, atol=1e-5, rtol=0)
    if family.name == "llava-onevision":
        assert isinstance(projected, MethodError) and "image_newline" in str(projected)


def _try(compute):
    try:
        return compute()
    except MethodError as err:
        return err


@pytest.mark.parametrize("name", ["llava-onevision", "smolvlm", "internvl3", "qwen3-vl"])
def test_vision_tower_signals_refuse_with_the_reason(name):
    backbone = build_backbone(name)
    Probe.hook, Probe.seen = (lambda ctx: ctx.cls_attention()), []
    reason = {"llava-onevision": "no CLS token and runs per crop", "smolvlm": "no CLS token",
              "internvl3": "runs per tile", "qwen3-vl": "no CLS token"}[name]
    with pytest.raises(MethodError, match=reason):
        run(backbone.engine, backbone.batch, create_method("test-probe:layer=-1"), max_new_tokens=1)


@pytest.mark.parametrize("name", [*FAMILIES, "smolvlm2"])
def test_every_method_runs_or_refuses(name, tmp_path):
    backbone = build_backbone(name)
    assert_every_method_runs_or_refuses(backbone, tmp_path, vision_width=VISION_WIDTH[name])


def test_smolvlm_keeps_its_tile_markers_when_pruning():
    """SmolVLM's visual tokens come in one run per tile with <row_r_col_c> / <global-img> markers
    between them: text, never dropped, kept in place (their original positions, in order) between
    the kept visual tokens."""
    smol = build_backbone("smolvlm")
    batch = smol.single(1)
    ids = batch["input_ids"][0]
    tokenizer = smol.processor.tokenizer
    assert all(int((ids == tokenizer.convert_tokens_to_ids(t)).sum()) == 1 for t in ("<row_1_col_1>", "<row_2_col_4>", "<global-img>"))
    method = create_method("test-strided:layer=1", positions="original")
    state = smol.engine.prefill(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], method,
                                Budget.parse(20), _clock(), smol.engine.adapter.image_inputs(batch))
    layout = state.layout
    text = ids != smol.model.config.image_token_id
    kept_text = layout.valid[0] & (layout.visual_id[0] == -1)
    assert layout.positions[0, kept_text].tolist() == text.nonzero().flatten().tolist()
    kept_visual = layout.visual_id[0][layout.visual_id[0] >= 0]
    assert kept_visual.tolist() == pattern(81, 20).tolist()
    image_slots = (~text).nonzero().flatten()
    assert layout.positions[0, layout.visual_id[0] >= 0].tolist() == image_slots[kept_visual].tolist()


def _clock():
    from prunebench.engine.timing import StageClock

    return StageClock("cpu", enabled=False)


@pytest.mark.parametrize("name,cls", [("random:tiny-internvl3", "InternVLForConditionalGeneration"),
                                      ("random:tiny-internvl3.5", "InternVLForConditionalGeneration"),
                                      ("random:tiny-llava-onevision", "LlavaOnevisionForConditionalGeneration"),
                                      ("random:tiny-qwen3-vl", "Qwen3VLForConditionalGeneration"),
                                      ("random:tiny-smolvlm", "Idefics3ForConditionalGeneration"),
                                      ("random:tiny-smolvlm2", "SmolVLMForConditionalGeneration")])
def test_load_model_builds_the_tiny_families(name, cls):
    from prunebench.models.loading import load_model

    model, processor = load_model(name)
    assert type(model).__name__ == cls and processor.tokenizer.padding_side == "left"
    assert processor.chat_template  # prompts go through the family's own template


@pytest.mark.parametrize("name", ["random:tiny-internvl3", "random:tiny-llava-onevision", "random:tiny-qwen3-vl",
                                  "random:tiny-smolvlm"])
def test_lmms_eval_prompts_go_through_the_models_chat_template(name):
    """The lmms-eval bridge writes each question with the processor's own chat template (the
    family's image block included) and encodes it with the processor: the image tokens it hands
    the engine are those the processor expands for that image."""
    pytest.importorskip("lmms_eval")
    from support.models import make_image

    from prunebench.engine.generate import PruningEngine
    from prunebench.models.loading import load_model
    from prunebench.run.lmms_bridge import PrunedVLM

    model, processor = load_model(name)
    bridge = PrunedVLM(PruningEngine(model, processor.tokenizer), processor, None, Budget.all())
    prompt = bridge._prompt("<image>\nis there a cat ?")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is there a cat ?"}]}]
    assert prompt == processor.apply_chat_template(messages, add_generation_prompt=True)
    image = make_image(90, 120, 0)
    inputs = bridge._encode([prompt], [image])
    expected = processor(images=[image], text=[prompt], return_tensors="pt")
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) > 0
