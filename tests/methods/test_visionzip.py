"""VisionZip: the kept patches and merged tokens equal a slow reference built from the eager CLIP
tower's own attention maps and keys; keep-all is exact; batching changes nothing; K is honest."""

from __future__ import annotations

import pytest
import torch
from prunebench.methods.visionzip import split_budget
from support.models import run, single
from support.references import (
    MAX_NEW,
    assert_batch_equals_each_alone,
    assert_matches,
    eos_of,
)

from prunebench.budget import BudgetError
from prunebench.engine.adapters import BackboneError, LlavaAdapter
from prunebench.engine.method import MethodError, create_method

N = 576


@pytest.fixture(scope="module")
def eager_vision(batch, eager):
    """Eager CLIP tower of the same tiny model: attention maps, hidden states, and the keys of
    layer -2 captured from its k_proj as the forward runs."""
    model = eager
    block = LlavaAdapter(model).vision_layers[-2]
    captured = []
    handle = block.self_attn.k_proj.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        out = model.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    handle.remove()
    (keys,) = captured
    keys = keys.view(*keys.shape[:2], model.config.vision_config.num_attention_heads, -1)  # (B, T, H, d)
    return model, out.attentions[-2], out.hidden_states[-2], keys


def slow_visionzip(attn, hidden, keys, n_dominant, n_ctx, cls=True):
    """One image, the obvious way. attn (H, T, T), hidden (T, d_v), keys (T, H, d); T = 1 + N.
    Returns (kept patch ids sorted, merged tokens in vision space as a list)."""
    n = hidden.shape[0] - 1
    score = [float(attn[:, 0, 1 + j].sum()) for j in range(n)]
    dominant = sorted(sorted(range(n), key=lambda j: -score[j])[:n_dominant])
    rest = [j for j in range(n) if j not in set(dominant)]
    merged = [hidden[0]] if cls else []
    if n_ctx:
        step = max(1, len(rest) // n_ctx)
        targets = rest[::step][:n_ctx]
        key = {j: keys[1 + j].mean(0) for j in rest}
        groups = {t: [] for t in targets}
        for j in rest:
            if j in groups:
                continue
            sims = [float(key[j] @ key[t] / (key[j].norm() * key[t].norm())) for t in targets]
            groups[targets[max(range(len(targets)), key=lambda i: sims[i])]].append(j)
        for t in targets:
            mean = torch.stack([hidden[1 + j] for j in groups[t]]).mean(0) if groups[t] else 0.0
            merged.append(hidden[1 + t] + mean)
    return dominant, merged


def recording(spec: str):
    """The method, and the list its Selections are appended to."""
    method, seen = create_method(spec), []
    inner = method.select

    def select(ctx):
        seen.append(inner(ctx))
        return seen[-1]

    method.select = select
    return method, seen


def test_published_splits_and_derivation():
    assert split_budget(64, None, True) == (53, 10)  # 54 dominant = CLS + 53 patches
    assert split_budget(128, None, True) == (107, 20)
    assert split_budget(192, None, True) == (161, 30)
    assert split_budget(100, None, True) == (83, 16)  # round(100 * 5 / 32) = 16
    assert split_budget(64, None, False) == (54, 10)
    assert split_budget(64, 0, True) == (63, 0)
    with pytest.raises(BudgetError, match="dominant patches"):
        split_budget(1, None, True)


@pytest.mark.parametrize(
    "spec,k,n_ctx,cls",
    [("visionzip", 64, 10, True), ("visionzip", 192, 30, True), ("visionzip", 100, 16, True),
     ("visionzip:cls=false", 128, 20, False), ("visionzip:contextual=0", 64, 0, True),
     ("visionzip:contextual=40", 96, 40, True)],
)
def test_equals_slow_reference_from_eager_clip(tiny, engine, batch, eager_vision, spec, k, n_ctx, cls):
    eager, attn, hidden, keys = eager_vision
    method, seen = recording(spec)
    gen = run(engine, batch, method, budget=k, max_new_tokens=1)
    (selection,) = seen
    n_dominant = k - n_ctx - int(cls)
    assert gen.visual_tokens.tolist() == [[k] * engine.adapter.num_layers] * 3
    for b in range(3):
        dominant, merged = slow_visionzip(attn[b], hidden[b], keys[b], n_dominant, n_ctx, cls)
        assert gen.kept_patches[b] == dominant
        assert len(dominant) == n_dominant
        built = [t for t in (selection.leading, selection.merged) if t is not None]  # CLS leads
        if merged:
            with torch.no_grad():
                expected = eager.model.multi_modal_projector(torch.stack(merged))
            torch.testing.assert_close(torch.cat(built, dim=1)[b], expected, atol=1e-5, rtol=1e-5)
        else:
            assert not built


def test_llm_sees_cls_then_kept_patches_then_contextual(tiny, engine, batch, eager_vision):
    """End to end: the first logits equal the LLM run by hand on [text, CLS, kept patches,
    contextual tokens, text] with contiguous positions (the official order)."""
    model, processor = tiny
    _, attn, hidden, keys = eager_vision
    gen = run(engine, batch, create_method("visionzip"), budget=64, max_new_tokens=1)
    lm = model.model.language_model
    for b in range(3):
        inputs = single(processor, b)
        ids = inputs["input_ids"][0]
        dominant, merged = slow_visionzip(attn[b], hidden[b], keys[b], 53, 10)
        with torch.no_grad():
            patches = model.model.multi_modal_projector(hidden[b, 1:][dominant])
            extra = model.model.multi_modal_projector(torch.stack(merged))
            image = (ids == model.config.image_token_id).nonzero().flatten()
            text = lm.embed_tokens(ids)
            embeds = torch.cat([text[: image[0]], extra[:1], patches, extra[1:], text[image[-1] + 1 :]])[None]
            out = lm(inputs_embeds=embeds)
            logits = model.lm_head(out.last_hidden_state[:, -1])[0]
        torch.testing.assert_close(gen.logits[0][b], logits, atol=1e-4, rtol=0)


def test_keep_all_reproduces_generate(tiny, engine, batch, reference):
    eos = eos_of(tiny[0])
    gen = run(engine, batch, create_method("visionzip"), budget="all", max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, reference, eos)
    assert gen.visual_tokens.tolist() == [[N] * engine.adapter.num_layers] * 3
    assert gen.kept_patches == [list(range(N))] * 3


@pytest.mark.parametrize("spec,budget", [("visionzip", 64), ("visionzip:cls=false", "25%")])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget, max_new_tokens=6)


def test_bad_settings_are_clear_errors(engine, batch):
    with pytest.raises(MethodError, match="negative index"):
        create_method("visionzip:layer=1")
    with pytest.raises(MethodError, match="contextual=-1"):
        create_method("visionzip:contextual=-1")
    with pytest.raises(BudgetError, match="visionzip"):
        run(engine, batch, create_method("visionzip"), budget=1, max_new_tokens=1)
    with pytest.raises(MethodError, match="projector consumes"):  # the tiny model reads layer -2
        run(engine, batch, create_method("visionzip:layer=-3"), budget=64, max_new_tokens=1)
    with pytest.raises(BackboneError, match="after the projector's feature layer"):  # the tower stops there
        run(engine, batch, create_method("visionzip:layer=-1"), budget=64, max_new_tokens=1)
