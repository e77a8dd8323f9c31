"""Keep-all is exact: every stage of the engine reproduces the model's own greedy generate."""

from __future__ import annotations

import pytest
import support.methods  # noqa: F401  (registers the test methods)
import torch
from support.models import run, single
from support.references import MAX_NEW, assert_matches, eos_of, until_eos

from prunebench.engine.generate import DecodeConfig, PruningEngine
from prunebench.engine.method import create_method
from prunebench.models.tiny import build_tiny_llava


@pytest.mark.parametrize(
    "spec",
    ["none", "random", "test-strided:layer=-1", "test-strided:layer=0", "test-strided:layer=1", "test-strided:layer=2",
     "test-twostage:second=1.0", "test-lasttoken:layer=2"],
)
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_keep_all_reproduces_generate(tiny, engine, batch, reference, spec, positions):
    method = create_method(spec, positions=positions)
    eos = eos_of(tiny[0])
    gen = run(engine, batch, method, budget="all", max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, reference, eos)
    n = batch["input_ids"].eq(engine.adapter.image_token_id).sum(-1)
    assert gen.visual_tokens.tolist() == [[int(v)] * engine.adapter.num_layers for v in n]


def test_keep_all_single_prompt_matches_generate(tiny, engine):
    model, processor = tiny
    inputs = single(processor, 1)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    eos = eos_of(model)
    gen = run(engine, inputs, create_method("test-strided:layer=1"), budget="all", max_new_tokens=MAX_NEW,
              eos_token_id=list(eos) or None)
    assert_matches(gen, (out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)), eos)


@pytest.mark.parametrize("spec", ["none", "test-strided:layer=1"])
def test_eager_attention_gets_causal_masks(tiny, tiny_eager, batch, reference, spec):
    """Eager attention masks only with the mask it is given: the engine must hand it a causal
    (and, for the padded batch, padding) mask, or the prefill attends to later tokens."""
    model, processor = tiny_eager
    engine = PruningEngine(model, processor.tokenizer)
    eos = eos_of(tiny[0])
    gen = run(engine, batch, create_method(spec), budget="all", max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, reference, eos)


def test_other_attention_kernels_are_refused_clearly():
    model, _ = build_tiny_llava(seed=1)
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="uses 'flash_attention_2'.*attn_implementation='sdpa'"):
        PruningEngine(model)


def test_eos_stops_and_is_kept(engine, batch):
    free = run(engine, batch, None, max_new_tokens=MAX_NEW).tokens  # no EOS: always MAX_NEW tokens
    eos = free[0][2]  # pretend the third greedy token of sample 0 is EOS
    gen = run(engine, batch, None, eos_token_id=eos, max_new_tokens=MAX_NEW)
    assert gen.tokens == [until_eos(row, {eos}) for row in free]
    assert len(gen.tokens[0]) <= 3


def test_stop_string_cuts_text(engine, batch):
    free = run(engine, batch, None, max_new_tokens=MAX_NEW)
    words = [engine.tokenizer.decode([t], skip_special_tokens=True).strip() for t in free.tokens[0]]
    at = next(i for i, w in enumerate(words) if w and i >= 1)  # a real word, not the first token
    gen = run(engine, batch, None, stop=(words[at],), max_new_tokens=MAX_NEW)
    assert words[at] not in gen.texts[0]
    assert free.texts[0].startswith(gen.texts[0])
    assert len(gen.tokens[0]) <= at + 1


def test_sampling_is_seeded(engine, batch):
    a = run(engine, batch, None, do_sample=True, seed=7, temperature=1.5, max_new_tokens=8)
    b = run(engine, batch, None, do_sample=True, seed=7, temperature=1.5, max_new_tokens=8)
    c = run(engine, batch, None, do_sample=True, seed=8, temperature=1.5, max_new_tokens=8)
    greedy = run(engine, batch, None, max_new_tokens=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    cold = run(engine, batch, None, do_sample=True, seed=7, temperature=1e-6, max_new_tokens=8)
    assert cold.tokens == greedy.tokens
    topk1 = run(engine, batch, None, do_sample=True, seed=3, top_k=1, max_new_tokens=8)
    assert topk1.tokens == greedy.tokens


def test_score_continuation_equals_the_models_own_logprobs(tiny, engine):
    """Keep-all loglikelihood (lmms-eval's loglikelihood requests) = log-softmax of the model's own
    forward over prompt + continuation; pruning sees the prompt only."""
    model, processor = tiny
    inputs = single(processor, 0)
    target = processor.tokenizer("red circle", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    logprobs, greedy, visual = engine.score_continuation(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], target)
    ids = torch.cat([inputs["input_ids"], target[None]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"]).logits
    n = inputs["input_ids"].shape[1]
    expected = logits[0, n - 1 : n - 1 + len(target)].float().log_softmax(-1)
    torch.testing.assert_close(logprobs, expected[torch.arange(len(target)), target], atol=1e-4, rtol=0)
    assert greedy == bool((expected.argmax(-1) == target).all())
    assert visual.tolist() == [[576] * 4]
    # with pruning, the continuation is scored on the pruned prompt (a different but finite answer)
    pruned, _, visual = engine.score_continuation(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], target,
        method=create_method("random"), budget=64)
    assert visual.tolist() == [[64] * 4] and torch.isfinite(pruned).all()


def test_vision_tower_stops_at_the_projectors_feature_layer(tiny):
    """The adapter runs CLIP only up to ``vision_feature_layer`` (-2): the features are HF's
    ``hidden_states[-2]``, the last layer never runs, and asking for a state past it is a clear error."""
    from prunebench.engine.adapters import BackboneError, LlavaAdapter

    model, processor = tiny
    adapter = LlavaAdapter(model)
    pixels = single(processor, 0)["pixel_values"]
    calls = []
    hook = adapter.vision_layers[-1].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.inference_mode():
            vision = adapter.encode_images(pixels)
    finally:
        hook.remove()
    with torch.inference_mode():
        reference = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert calls == []
    torch.testing.assert_close(vision.features, reference[-2][:, 1:], rtol=0, atol=0)
    for index in (0, 1, -2, -3):
        torch.testing.assert_close(adapter.vision_hidden(vision, index), reference[index], rtol=0, atol=0)
    with pytest.raises(BackboneError, match="after the projector's feature layer"):
        adapter.vision_hidden(vision, -1)
    with pytest.raises(BackboneError, match="has 3"):
        adapter.vision_hidden(vision, 3)


@pytest.mark.parametrize("spec", ["none", "random", "fastv", "sparsevlm:layers=0/1/2", "pyramiddrop:layers=0/1/2", "dart", "visionzip", "divprune",
                                  "test-strided:layer=-1"])
def test_a_kept_vision_output_gives_the_same_generation(tiny, engine, batch, spec):
    """The run cache passes a batch's vision output back for later cells: every method must give
    the same tokens, logits and kept patches as when the tower runs (no method may change it)."""
    method = create_method(spec)
    assert run(engine, batch, method, budget=64).images is None  # freed before decoding unless asked
    first = engine.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], method=method, budget=64,
        decode=DecodeConfig(max_new_tokens=6), return_logits=True, return_images=True,
    )
    images = first.images
    snapshot = [t.clone() for t in (images.embeds, *images.vision.hidden_states)]
    for _ in range(2):
        again = engine.generate(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], method=method, budget=64,
            decode=DecodeConfig(max_new_tokens=6), return_logits=True, images=images,
        )
        assert again.tokens == first.tokens and again.kept_patches == first.kept_patches
        for a, b in zip(again.logits, first.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert again.images is None and "vision" not in again.timings and "vision" in first.timings
    for kept, before in zip((images.embeds, *images.vision.hidden_states), snapshot):
        torch.testing.assert_close(kept, before, rtol=0, atol=0)
