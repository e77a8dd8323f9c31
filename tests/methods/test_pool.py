"""Pool: the pooled tokens equal plain averages over each cell's window (float64 loops); the LLM
sees exactly them in the image's place; keep-all is exact; batching changes nothing; the K -> grid
map; the resize mode's image sizes; refusals per backbone."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from prunebench.methods.pool import largest_size_within, pool_grid
from support.models import build_backbone, run, single
from support.references import (
    MAX_NEW,
    assert_batch_equals_each_alone,
    assert_matches,
    eos_of,
)

from prunebench.budget import Budget
from prunebench.engine.method import MethodError, create_method
from prunebench.run.lmms_bridge import visual_tokens_at

SIDE = 24  # the tiny LLaVA's 336 px / 14 px patches


def slow_pool(tokens: torch.Tensor, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """``(rows * cols, d)`` row-major tokens -> ``(h * w, d)``: cell (i, j) averages grid rows
    floor(i rows / h) .. ceil((i + 1) rows / h) - 1, and the same for columns, in float64."""
    grid = tokens.double().reshape(rows, cols, -1)
    out = []
    for i in range(h):
        for j in range(w):
            r0, r1 = (i * rows) // h, math.ceil((i + 1) * rows / h)
            c0, c1 = (j * cols) // w, math.ceil((j + 1) * cols / w)
            cell = [grid[r, c] for r in range(r0, r1) for c in range(c0, c1)]
            out.append(sum(cell) / len(cell))
    return torch.stack(out)


def recording(spec: str):
    method, seen = create_method(spec), []
    inner = method.select

    def select(ctx):
        seen.append(inner(ctx))
        return seen[-1]

    method.select = select
    return method, seen


@pytest.fixture(scope="module")
def features(tiny, batch):
    """Per image: (projected embeddings, vision features), from HF's own LLaVA feature path."""
    model, _ = tiny
    with torch.no_grad():
        projected = model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output
        hidden = model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
    return {"projected": torch.stack(list(projected)), "vision": hidden[:, 1:]}


def test_budgets_map_to_grids():
    assert [pool_grid(k, "fit", 24, 24) for k in (64, 128, 192, 144, 96, 72)] == [
        (8, 8), (8, 16), (12, 16), (12, 12), (8, 12), (8, 9)]
    assert pool_grid(97, "fit", 24, 24) == (8, 12)  # prime: the largest 2:1-or-squarer grid below it
    assert pool_grid(500, "fit", 24, 24) == (22, 22)  # 20 x 25 would be wider than the grid
    assert pool_grid(128, "fit", 30, 10) == (16, 8)  # within a tall grid, the tall way round
    assert [pool_grid(k, "square", 24, 24) for k in (64, 128, 192)] == [(8, 8), (11, 11), (13, 13)]


@pytest.mark.parametrize("spec,k,grid", [("pool", 64, (8, 8)), ("pool", 192, (12, 16)), ("pool:grid=square", 128, (11, 11)),
                                         ("pool:space=vision", 128, (8, 16)), ("pool", 35, (5, 7))])
def test_pooled_tokens_equal_window_averages(tiny, engine, batch, features, spec, k, grid):
    model, _ = tiny
    method, seen = recording(spec)
    gen = run(engine, batch, method, budget=k, max_new_tokens=1)
    (selection,) = seen
    h, w = grid
    assert gen.visual_tokens.tolist() == [[h * w] * engine.adapter.num_layers] * 3
    assert gen.kept_patches == [[], [], []]  # every token the LLM sees is built
    space = "vision" if "vision" in spec else "projected"
    for b in range(3):
        expected = slow_pool(features[space][b], SIDE, SIDE, h, w)
        if space == "vision":
            with torch.no_grad():
                expected = model.model.multi_modal_projector(expected.float()).double()
        torch.testing.assert_close(selection.merged[b].double(), expected, atol=1e-5, rtol=1e-5)


def test_llm_sees_the_pooled_grid_in_the_image_slot(tiny, engine, batch, features):
    """End to end: the first logits equal the LLM run by hand on [text, 8 x 8 pooled tokens, text]
    with contiguous positions."""
    model, processor = tiny
    gen = run(engine, batch, create_method("pool"), budget=64, max_new_tokens=1)
    lm = model.model.language_model
    for b in range(3):
        ids = single(processor, b)["input_ids"][0]
        image = (ids == model.config.image_token_id).nonzero().flatten()
        with torch.no_grad():
            text = lm.embed_tokens(ids)
            pooled = slow_pool(features["projected"][b], SIDE, SIDE, 8, 8).float()
            embeds = torch.cat([text[: image[0]], pooled, text[image[-1] + 1 :]])[None]
            logits = model.lm_head(lm(inputs_embeds=embeds).last_hidden_state[:, -1])[0]
        torch.testing.assert_close(gen.logits[0][b], logits, atol=1e-4, rtol=0)


def test_keep_all_pools_onto_the_grid_itself_and_reproduces_generate(tiny, engine, batch, reference):
    eos = eos_of(tiny[0])
    gen = run(engine, batch, create_method("pool"), budget="all", max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, reference, eos)
    assert gen.visual_tokens.tolist() == [[SIDE * SIDE] * engine.adapter.num_layers] * 3


@pytest.mark.parametrize("spec,budget", [("pool", 64), ("pool:space=vision,grid=square", "25%")])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget, max_new_tokens=6)


def test_resize_finds_the_largest_image_within_the_budget():
    """On the tiny Qwen2-VL processor: the chosen size gives at most K tokens and one pixel more on
    the long side gives more than K; the aspect ratio stays."""
    backbone = build_backbone("qwen2-vl")
    tokens_at = visual_tokens_at(backbone.processor)
    for height, width in [(280, 420), (336, 168), (112, 112)]:
        n = tokens_at(height, width)
        for k in sorted({max(4, n // 4), max(4, n // 2), n - 1}):
            h, w = largest_size_within(height, width, k, tokens_at)
            assert tokens_at(h, w) <= k
            scale = (max(h, w) + 1) / max(height, width)
            assert tokens_at(max(1, round(height * scale)), max(1, round(width * scale))) > k
            assert abs(h / w - height / width) < 0.05 * height / width + 1 / min(h, w)


def test_resize_mode_hands_the_processor_a_smaller_image():
    backbone = build_backbone("qwen2-vl")
    tokens_at = visual_tokens_at(backbone.processor)
    image = Image.new("RGB", (420, 280), (10, 200, 30))
    method = create_method("pool:mode=resize")
    small = method.resize_image(image, Budget.parse(40), tokens_at)
    assert tokens_at(small.height, small.width) <= 40 < tokens_at(image.height, image.width)
    assert method.resize_image(image, Budget.parse(tokens_at(280, 420)), tokens_at) is image  # K = all of it
    assert method.resizes_images and not create_method("pool").resizes_images  # tokens mode acts in the engine


def test_refusals_and_honest_counts(tiny, engine, batch):
    with pytest.raises(MethodError, match="only positions=reindex"):
        create_method("pool:positions=original")
    with pytest.raises(MethodError, match="the engine alone cannot resize"):
        run(engine, batch, create_method("pool:mode=resize"), budget=64, max_new_tokens=1)
    _, processor = tiny
    with pytest.raises(MethodError, match="576 visual tokens for this image at any smaller size"):
        create_method("pool:mode=resize").resize_image(Image.new("RGB", (336, 336)), Budget.parse(64), visual_tokens_at(processor))
    gen = run(engine, batch, create_method("pool"), budget=500, max_new_tokens=1)  # no 500-cell grid fits: 22 x 22
    assert gen.visual_tokens.tolist() == [[484] * engine.adapter.num_layers] * 3


@pytest.mark.parametrize("name,message", [("llava-next", "no single 2-D grid on this backbone: LLaVA-NeXT"),
                                          ("qwen2-vl", "use pool:mode=resize"), ("qwen2.5-vl", "use pool:mode=resize")])
def test_token_mode_refuses_backbones_without_one_fixed_grid(name, message):
    backbone = build_backbone(name)
    with pytest.raises(MethodError, match=message):
        run(backbone.engine, backbone.batch, create_method("pool"), budget="50%", max_new_tokens=1)


def test_run_bridge_pools_in_the_engine_on_fixed_grids(tiny, engine):
    """Through the lmms-eval bridge (prunebench run), tokens mode reaches the engine at its budget:
    the LLM sees the pooled 8 x 8 grid, for generation and for log-likelihoods alike."""
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance

    from prunebench.run.lmms_bridge import PrunedVLM

    _, processor = tiny
    lm = PrunedVLM(engine, processor, create_method("pool"), Budget.parse(64))
    lm.task_dict = {"t": {"test": [{"image": Image.new("RGB", (60, 40), (200, 30, 30))}]}}
    visual = lambda doc: [doc["image"]]
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    lm.generate_until([Instance(request_type="generate_until", idx=0, metadata=meta,
                                arguments=("what color ?", {"max_new_tokens": 2}, visual, 0, "t", "test"))])
    assert lm.stats[("t", 0)].visual_tokens == [64] * engine.adapter.num_layers
    assert lm.stats[("t", 0)].n_visual == SIDE * SIDE
    lm.loglikelihood([Instance(request_type="loglikelihood", idx=0, metadata=meta,
                               arguments=("what color ?", "red", visual, 0, "t", "test"))])
    assert lm.stats[("t", 0)].visual_tokens == [64] * engine.adapter.num_layers
