"""VisPruner: the kept set equals a plain-loop reference built from the eager CLIP tower's own
attention maps and features (the official rounds, with the odd-length fix); keep-all is exact;
batching changes nothing; refusals per backbone."""

from __future__ import annotations

import pytest
import torch
from prunebench.methods.vispruner import important_and_diverse, remove_duplicates
from support.models import build_backbone, run
from support.references import (
    MAX_NEW,
    assert_batch_equals_each_alone,
    assert_matches,
    eos_of,
)

from prunebench.engine.method import MethodError, create_method

N = 576


@pytest.fixture(scope="module")
def eager_vision(batch, eager):
    """The eager CLIP tower's CLS attention (heads averaged) and layer -2 patch features."""
    with torch.no_grad():
        out = eager.model.vision_tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    return out.attentions[-2][:, :, 0, 1:].double().mean(1), out.hidden_states[-2][:, 1:].double()


@pytest.fixture(scope="module")
def engine_scores(engine, batch, eager_vision):
    """The CLS attention the method ranks by, as the engine recomputes it (SDPA model, float32). It
    equals eager CLIP's to 1e-6, but patches deep in the ranking differ by ~1e-10, where float
    rounding decides their order, and the even/odd rounds depend on that order: the model-level
    reference therefore takes these scores, and the eager features."""
    adapter = engine.adapter
    with torch.no_grad():
        vision = adapter.encode_images(batch["pixel_values"])
        scores = adapter.vision_attention(vision, -2, rows=torch.tensor([0]))[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(scores.double(), eager_vision[0], atol=1e-6, rtol=0)
    return scores.double()


def slow_vispruner(scores, features, k: int, important: float = 0.5) -> list[int]:
    """One image, the obvious way: scores (N,) CLS attention, features (N, d); float64."""
    n = features.shape[0]
    score = scores.tolist()
    order = sorted(range(n), key=lambda i: -score[i])  # stable: ties keep patch order
    n_imp = int(k * important)
    kept, residual, n_div = order[:n_imp], order[n_imp:], k - n_imp
    unit = features / features.norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).tolist()
    while n_div > 0:
        even, odd = residual[0::2], residual[1::2]
        drop = min(8, len(residual) - n_div, len(even))  # official: min(8, len - n_div)
        if drop <= 0:
            break
        dup = [max(cos[e][o] for o in odd) for e in even]
        rank = sorted(range(len(even)), key=lambda i: -dup[i])
        residual = [even[i] for i in rank[drop:]] + odd
    return sorted(kept + (residual if n_div > 0 else []))


@pytest.mark.parametrize("spec,k,important", [
    ("vispruner", 64, 0.5),
    ("vispruner", 66, 0.5),  # N - K/2 odd: the official code fails here
    ("vispruner:important=0.75", 128, 0.75),
])
def test_equals_plain_loop_reference_on_the_model(engine, batch, eager_vision, engine_scores, spec, k, important):
    gen = run(engine, batch, create_method(spec), budget=k, max_new_tokens=1)
    assert gen.visual_tokens.tolist() == [[k] * engine.adapter.num_layers] * 3
    for b in range(3):
        assert gen.kept_patches[b] == slow_vispruner(engine_scores[b], eager_vision[1][b], k, important)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_plain_loop_reference_on_random_tokens(seed):
    """Many budgets and splits, including every short-list case, on 75 random tokens."""
    generator = torch.Generator().manual_seed(seed)
    scores, features = torch.rand(2, 75, generator=generator), torch.randn(2, 75, 12, generator=generator)
    for important in (0.0, 0.25, 0.5, 0.75, 1.0):
        for k in (1, 2, 3, 7, 10, 17, 30, 31, 50, 74, 75):
            keep = important_and_diverse(scores, features, k, important)
            for b in range(2):
                assert sorted(keep[b].tolist()) == slow_vispruner(scores[b].double(), features[b].double(), k, important)


def test_rounds_reach_the_target_from_any_length():
    """Every residual length and target gives exactly `target` distinct tokens (the official shapes
    fail for odd lengths)."""
    torch.manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(2, 41, 6), dim=-1)
    for length in (1, 2, 7, 8, 9, 17, 40, 41):
        for target in range(1, length + 1):
            residual = torch.stack([torch.randperm(41)[:length] for _ in range(2)])
            out = remove_duplicates(unit, residual, target)
            assert out.shape == (2, target)
            assert all(len(set(row.tolist())) == target and set(row.tolist()) <= set(r.tolist()) for row, r in zip(out, residual))


def official_shapes(unit, residual, target):
    """The official round as shaped at Theia-4869/VisPruner@aefa01a: survivors indexed with a
    ``R // 2 - r`` wide row index, which raises (or broadcasts wrongly) when R is odd."""
    while target > 0:
        length = residual.shape[1]
        drop = min(8, length - target)
        if drop <= 0:
            break
        even, odd = unit.gather(1, residual[:, 0::2, None].expand(-1, -1, unit.shape[-1])), unit.gather(
            1, residual[:, 1::2, None].expand(-1, -1, unit.shape[-1]))
        survivors = (even @ odd.transpose(1, 2)).amax(-1).sort(dim=-1, descending=True, stable=True).indices[:, drop:]
        rows = torch.arange(residual.shape[0])[:, None].expand(-1, length // 2 - drop)
        residual = torch.cat([residual[:, 0::2][rows, survivors], residual[:, 1::2]], dim=1)
    return residual


def test_where_the_official_shapes_run_the_fix_changes_nothing():
    torch.manual_seed(1)
    unit = torch.nn.functional.normalize(torch.randn(2, 200, 8), dim=-1)
    ran = 0
    for length in (60, 61, 100, 101, 150, 151):
        for target in range(1, length, 3):
            residual = torch.stack([torch.randperm(200)[:length] for _ in range(2)])
            try:
                official = official_shapes(unit, residual, target)
            except (IndexError, RuntimeError):
                continue  # odd lengths: the official shapes fail
            if official.shape[1] == target and all(row.unique().numel() == target for row in official):
                assert torch.equal(official, remove_duplicates(unit, residual, target))
                ran += 1
    assert ran > 50


def test_keep_all_reproduces_generate(tiny, engine, batch, reference):
    eos = eos_of(tiny[0])
    gen = run(engine, batch, create_method("vispruner"), budget="all", max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
    assert_matches(gen, reference, eos)
    assert gen.kept_patches == [list(range(N))] * 3


@pytest.mark.parametrize("spec,budget", [("vispruner", 64), ("vispruner:important=0.75", "12.5%")])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget, max_new_tokens=6)


def test_bad_settings_are_clear_errors(engine, batch):
    with pytest.raises(MethodError, match="important=1.5 must lie in"):
        create_method("vispruner:important=1.5")
    with pytest.raises(MethodError, match="negative index"):
        create_method("vispruner:layer=1")
    with pytest.raises(MethodError, match="projector consumes"):
        run(engine, batch, create_method("vispruner:layer=-3"), budget=64, max_new_tokens=1)


@pytest.mark.parametrize("name,message", [("llava-next", "not available on this backbone: LLaVA-NeXT"),
                                          ("qwen2-vl", "no CLS token, and the official code has no Qwen-VL path"),
                                          ("qwen2.5-vl", "no CLS token, and the official code has no Qwen-VL path")])
def test_refuses_backbones_without_clip_cls_signals(name, message):
    backbone = build_backbone(name)
    with pytest.raises(MethodError, match=message):
        run(backbone.engine, backbone.batch, create_method("vispruner"), budget="50%", max_new_tokens=1)
