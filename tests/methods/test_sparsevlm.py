"""SparseVLM: every stage (raters, scores, recycling) equals a slow eager reference, v1.5 and v2.0;
keep-all is generate; batched = alone; counts follow the published and derived schedules."""

from __future__ import annotations

import math

import pytest
import support.methods  # noqa: F401  (registers the test methods)
import torch
from prunebench.methods.sparsevlm import dpc_knn_merge
from support.methods import Probe
from support.models import run, single
from support.references import (
    EagerView,
    assert_batch_equals_each_alone,
    assert_keep_all_is_generate,
    eager_prefill,
    record_stages,
)

from prunebench.budget import Budget
from prunebench.engine.method import MethodError, create_method

TINY = "layers=0/1/2"


def plain_dpc_knn(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """DPC-kNN as the paper describes it, one token at a time (no tie-breaking noise)."""
    n = len(x)
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(x.shape[1]) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:clusters]) / clusters) for row in dist]
    farthest = max(max(row) for row in dist)
    to_denser = [min([dist[i][j] for j in range(n) if density[j] > density[i]], default=farthest) for i in range(n)]
    score = [to_denser[i] * density[i] for i in range(n)]
    centres = sorted(range(n), key=lambda i: -score[i])[:clusters]
    members = {c: [] for c in centres}
    for i in range(n):
        nearest = centres[0] if i not in centres else i
        if i not in centres:
            for c in centres:
                if dist[c][i] < dist[nearest][i]:
                    nearest = c
        members[nearest].append(i)
    return torch.stack([x[members[c]].mean(0) for c in centres])


def positional(view_positions: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, rotary, head_dim: int) -> torch.Tensor:
    """(R, C) logit of rotated all-ones q and k: 2 * sum_j cos(w_j * (p_q - p_k)) / sqrt(d)."""
    delta = (view_positions[rows][:, None] - view_positions[cols][None]).float()
    return 2 * torch.cos(delta[..., None] * rotary.inv_freq).sum(-1) * rotary.attention_scaling / math.sqrt(head_dim)


def reference_stages(model, *, layers, counts, version, recycle, heads=None):
    """SparseVLM's stages for ``eager_prefill``: raters from the input embeddings (before layer 0),
    then, after each scoring layer, top-k by the raters' attention and DPC-kNN recycling."""
    lm = model.model.language_model
    raters: list[int] = []

    def after_image(view: EagerView) -> torch.Tensor:
        return torch.arange(int(view.visual[-1]) + 1, len(view.hidden))

    def pick_raters(view: EagerView):
        image, text = view.hidden[view.visual], view.hidden[after_image(view)]
        relevance = torch.softmax(image @ text.T, dim=-1).mean(0)
        raters.extend(j for j in range(len(relevance)) if relevance[j] > relevance.mean())
        return list(range(len(view.visual))), None

    def prune(view: EagerView):
        scoring = view.layer - 1
        rows, cols = after_image(view)[raters], view.visual
        probs = view.attention(scoring)[:, rows][:, :, cols]  # (H, R, n)
        if version == "2.0":
            probs = probs / positional(view.positions, rows, cols, lm.rotary_emb, lm.layers[0].self_attn.head_dim)
            best_heads = sorted(range(len(probs)), key=lambda h: -float(probs[h].sum()))[:heads]
            probs = probs[best_heads]
        score = probs.mean(0).mean(0)
        kept = score.topk(counts[view.layer]).indices.tolist()
        if not recycle:
            return kept, None
        deleted = sorted(set(range(len(cols))) - set(kept))
        best = sorted(deleted, key=lambda i: -float(score[i]))[: int(len(deleted) * 0.3) + 1]
        return kept, plain_dpc_knn(view.hidden[cols[best]], int(len(best) / 10) + 1)

    return {0: pick_raters, **{layer + 1: prune for layer in layers}}


CASES = [  # spec, budget
    (f"sparsevlm:{TINY}", 192),  # v1.5, published 300/200/110, recycling, re-indexed
    (f"sparsevlm:{TINY}", 150),  # v1.5, derived schedule
    (f"sparsevlm:{TINY},version=2.0,heads=2", 128),  # v2.0, published 238/108/60, original positions
    (f"sparsevlm:{TINY},version=2.0,heads=3,recycle=true", 96),
    ("sparsevlm:layers=1/2,recycle=false", 320),  # two stages, derived
]


@pytest.mark.parametrize("spec,budget", CASES)
def test_every_stage_equals_eager_reference(tiny, engine, batch, eager, spec, budget):
    _, processor = tiny
    method = create_method(spec)
    counts = {s.layer: s.keep for s in method.schedule(576, Budget.parse(budget), 4)}
    seen = record_stages(method)
    gen = run(engine, batch, method, budget=budget, max_new_tokens=1)
    for b in range(3):
        stages = reference_stages(eager, layers=method.layers, counts=counts, version=method.version,
                                  recycle=method.recycle, heads=method.heads)
        kept, logits = eager_prefill(eager, single(processor, b), stages, method.positions)
        assert [stage[b] for stage in seen] == kept
        torch.testing.assert_close(gen.logits[0][b], logits, atol=1e-4, rtol=0)


def recycled(deleted: int) -> int:
    return int((int(deleted * 0.3) + 1) / 10) + 1


@pytest.mark.parametrize("version,published", [("1.5", (300, 200, 110)), ("2.0", (300, 200, 118))])
def test_published_192_counts_with_and_without_recycling(engine, batch, version, published):
    gen = run(engine, batch, create_method(f"sparsevlm:{TINY},version={version},heads=2"), budget=192, max_new_tokens=1)
    counts, n = [576], 576
    for keep in published:
        n = keep + (recycled(n - keep) if version == "1.5" else 0)
        counts.append(n)
    assert gen.visual_tokens.tolist() == [counts] * 3
    assert version == "2.0" or counts == [576, 309, 204, 113]
    assert gen.equivalent_tokens.tolist() == [pytest.approx(sum(counts) / 4)] * 3


def test_published_schedules_on_llava_geometry():
    for version, expected in [("1.5", [(3, 300), (7, 200), (16, 110)]), ("2.0", [(3, 300), (7, 200), (16, 118)])]:
        stages = create_method(f"sparsevlm:version={version}").schedule(576, Budget.parse("192"), 32)
        assert [(s.layer, s.keep) for s in stages] == [(None, 576), *expected]
    v2 = create_method("sparsevlm:version=2.0").schedule(576, Budget.parse("192"), 32)
    assert (3 * 576 + 4 * 300 + 9 * 200 + 16 * 118) / 32 == 206.75  # what the engine will count for "192"
    derived = create_method("sparsevlm:published=false").schedule(576, Budget.parse("192"), 32)
    spans = (4, 9, 16)
    assert (3 * 576 + sum(s * st.keep for s, st in zip(spans, derived[1:]))) / 32 == 192
    assert v2[0].keep == 576


@pytest.mark.parametrize("budget", [150, 200, 250])
def test_derived_schedule_averages_to_k_without_recycling(engine, batch, budget):
    gen = run(engine, batch, create_method(f"sparsevlm:{TINY},recycle=false"), budget=budget, max_new_tokens=1)
    assert gen.equivalent_tokens.tolist() == [budget] * 3


def test_derived_schedule_with_recycling_adds_the_recycled_tokens(engine, batch):
    method = create_method(f"sparsevlm:{TINY}")
    kept = [s.keep for s in method.schedule(576, Budget.parse(150), 4)[1:]]
    gen = run(engine, batch, method, budget=150, max_new_tokens=1)
    counts, n = [576], 576
    for keep in kept:
        n = keep + recycled(n - keep)
        counts.append(n)
    assert (576 + sum(kept)) / 4 == 150
    assert gen.visual_tokens.tolist() == [counts] * 3


@pytest.mark.parametrize("spec", [f"sparsevlm:{TINY}", f"sparsevlm:{TINY},version=2.0,heads=2"])
def test_keep_all_reproduces_generate(tiny, engine, batch, spec):
    assert_keep_all_is_generate(tiny[0], engine, batch, create_method(spec))


@pytest.mark.parametrize("spec,budget", [(f"sparsevlm:{TINY}", 192), (f"sparsevlm:{TINY},version=2.0,heads=2", 128)])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget)


def test_dpc_knn_equals_plain_loops():
    generator = torch.Generator().manual_seed(0)
    for n, clusters in [(30, 4), (83, 9), (7, 1)]:
        x = torch.randn(n, 16, generator=generator)
        torch.testing.assert_close(dpc_knn_merge(x, clusters), plain_dpc_knn(x, clusters), atol=1e-6, rtol=0)


def test_dpc_knn_finds_separated_blobs():
    generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(10, 2, generator=generator) for c in centres])
    merged = dpc_knn_merge(x, 3)
    blob_means = torch.stack([x[i * 10 : (i + 1) * 10].mean(0) for i in range(3)])
    assert sorted(map(tuple, merged.round(decimals=4).tolist())) == sorted(map(tuple, blob_means.round(decimals=4).tolist()))


def test_positional_logits_signal(tiny, engine, batch):
    model, _ = tiny
    lm = model.model.language_model
    rows = torch.tensor([[580, 585, 591]] * 3)
    Probe.hook, Probe.seen = (lambda ctx: (ctx.positional_logits(1, rows), ctx.layout.positions.clone())), []
    run(engine, batch, create_method("test-probe:layer=2"), max_new_tokens=1)
    ((logits, positions),) = Probe.seen
    for b in range(3):
        expected = positional(positions[b], rows[b], torch.arange(positions.shape[1]), lm.rotary_emb,
                              lm.layers[0].self_attn.head_dim)
        torch.testing.assert_close(logits[b], expected, atol=1e-4, rtol=0)


def test_stages_beyond_the_model_and_too_many_heads_are_clear_errors(engine, batch):
    with pytest.raises(MethodError, match="scoring layer 15 leaves no later layer to prune in this 4-layer decoder"):
        run(engine, batch, create_method("sparsevlm"), budget=192, max_new_tokens=1)
    with pytest.raises(MethodError, match="leaves no later layer"):
        create_method("sparsevlm:layers=2/6/31").schedule(576, Budget.parse("192"), 32)
    with pytest.raises(MethodError, match="heads=14 but layer 0 has 4 attention heads"):
        run(engine, batch, create_method(f"sparsevlm:{TINY},version=2.0"), budget=192, max_new_tokens=1)


@pytest.mark.parametrize("spec,message", [
    ("sparsevlm:layers=6/2", "strictly increasing"),
    ("sparsevlm:version=3", "must be one of 1.5, 2.0"),
    ("sparsevlm:recycle_top=0", r"\(0, 1\]"),
])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(MethodError, match=message):
        create_method(spec)


def test_version_sets_recycling_and_positions():
    v1, v2 = create_method("sparsevlm"), create_method("sparsevlm:version=2.0")
    assert (v1.recycle, v1.positions, v2.recycle, v2.positions) == (True, "reindex", False, "original")
    assert create_method("sparsevlm:version=2.0,recycle=true,positions=reindex").positions == "reindex"


@pytest.mark.parametrize("spec,canonical", [
    ("sparsevlm", "sparsevlm"),
    ("sparsevlm:version=2.0", "sparsevlm:version=2.0"),
    ("sparsevlm:recycle=true,positions=reindex", "sparsevlm"),
    ("sparsevlm:version=2.0,recycle=true", "sparsevlm:recycle=True,version=2.0"),
    ("sparsevlm:recycle=false,heads=8", "sparsevlm:heads=8,recycle=False"),
])
def test_spec_is_canonical_and_round_trips(spec, canonical):
    method = create_method(spec)
    assert method.spec() == canonical
    assert create_method(canonical) == method
