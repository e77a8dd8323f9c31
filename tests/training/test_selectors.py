"""The trainable selector modules: LapSum soft top-K, gates, denoisers, Gumbel autoencoder, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prunebench.training.selectors import (
    AutoSelect,
    AutoSelectConfig,
    Block,
    CheckpointError,
    CheckpointScorer,
    build_selector,
    lapsum_topk,
    load_selector,
    save_selector,
)


def reference_lapsum(scores: list[float], k: float, tau: float) -> list[float]:
    """The slow obvious way: Laplace CDF in plain floats, the offset by 200 bisection steps."""

    def cdf(x: float) -> float:
        return 0.5 * math.exp(x) if x <= 0 else 1.0 - 0.5 * math.exp(-x)

    lo, hi = min(scores) - 100 * tau, max(scores) + 100 * tau
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(cdf((s - mid) / tau) for s in scores) > k:
            lo = mid
        else:
            hi = mid
    return [cdf((s - (lo + hi) / 2) / tau) for s in scores]


# -- LapSum -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [5.0, 2.0, 0.5, 0.1, 1e-3])
@pytest.mark.parametrize("k", [1, 7, 64, 575])
def test_lapsum_sums_to_k_and_matches_the_reference(tau, k):
    scores = torch.randn(3, 576, generator=torch.Generator().manual_seed(k)) * 3
    alpha = lapsum_topk(scores, k, tau)
    assert alpha.shape == scores.shape and alpha.dtype == scores.dtype
    torch.testing.assert_close(alpha.sum(-1), torch.full((3,), float(k)), atol=1e-4, rtol=0)
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    expected = torch.tensor(reference_lapsum(scores[1].tolist(), k, tau))
    torch.testing.assert_close(alpha[1], expected, atol=1e-5, rtol=0)


def test_lapsum_per_row_k_and_keep_all():
    scores = torch.randn(3, 50)
    alpha = lapsum_topk(scores, torch.tensor([1, 20, 50]), 0.5)
    torch.testing.assert_close(alpha.sum(-1), torch.tensor([1.0, 20.0, 50.0]), atol=1e-4, rtol=0)
    assert bool((alpha[2] == 1).all())
    with pytest.raises(ValueError, match="k must lie in 1..50"):
        lapsum_topk(scores, 51, 0.5)
    with pytest.raises(ValueError, match="tau must be positive"):
        lapsum_topk(scores, 5, 0.0)


def test_lapsum_is_monotone_in_the_score():
    scores = torch.randn(2, 300) * 4
    alpha = lapsum_topk(scores, 40, 0.3)
    order = scores.argsort(-1)
    ranked = alpha.gather(-1, order)
    assert bool((ranked[:, 1:] >= ranked[:, :-1]).all())


@pytest.mark.parametrize("tau", [2.0, 0.1, 1e-4])
def test_lapsum_gradients_are_finite_and_exact(tau):
    scores = (torch.randn(2, 200) * 50).requires_grad_()  # wide spread: most weights saturate
    alpha = lapsum_topk(scores, 30, tau)
    (alpha * torch.randn_like(alpha)).sum().backward()
    assert bool(torch.isfinite(scores.grad).all())
    # sum(alpha) = K for every score: the gradient of the sum is zero (the offset moves with s)
    scores.grad = None
    lapsum_topk(scores, 30, tau).sum().backward()
    assert scores.grad.abs().max() < 1e-4
    # the implicit gradient of the offset against finite differences
    x = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: lapsum_topk(s, 4, 0.7), (x,))


def test_lapsum_small_tau_gives_hard_top_k():
    scores = torch.randn(4, 576, generator=torch.Generator().manual_seed(1))
    alpha = lapsum_topk(scores, 64, 1e-5)
    hard = torch.zeros_like(scores).scatter(-1, scores.topk(64).indices, 1.0)
    torch.testing.assert_close(alpha, hard, atol=1e-4, rtol=0)


# -- blocks, gates, denoisers -----------------------------------------------------------------


def test_diagonal_attention_equals_full_attention_under_an_identity_mask():
    torch.manual_seed(0)
    block = Block(16, 2, attention="diagonal")
    x = torch.randn(2, 10, 16)
    h = block.norm1(x)
    q, k, v = (t.view(2, 10, 2, 8).transpose(1, 2) for t in block.qkv(h).chunk(3, -1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(~torch.eye(10, dtype=torch.bool), float("-inf"))
    mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 16)
    expected = x + block.out(mixed)
    expected = expected + block.mlp(block.norm2(expected))
    torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=0)
    # and unlike global attention, a token's output ignores the other tokens
    y = x.clone()
    y[:, 1:] = torch.randn(2, 9, 16)
    torch.testing.assert_close(block(y)[:, 0], block(x)[:, 0])
    full = Block(16, 2, attention="full")
    full.load_state_dict(block.state_dict())
    assert not torch.allclose(full(y)[:, 0], full(x)[:, 0])


def features(batch: int = 2, n: int = 40, width: int = 16, scale: float = 5.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, n, width, generator=g) * scale + torch.randn(width, generator=g)


@pytest.mark.parametrize("gate_norm", ["channel", "none"])
@pytest.mark.parametrize("denoiser", ["diagonal", "global", "none"])
def test_keep_all_is_the_identity_at_initialisation(gate_norm, denoiser):
    """alpha = 1 everywhere: the vp gate passes x unchanged; the denoiser starts as the identity."""
    module = build_selector("autoselect", vision_width=16, gate_norm=gate_norm, denoiser=denoiser)
    x = features()
    out, alpha = module(x, k=40, tau=0.5)
    assert bool((alpha == 1).all())
    torch.testing.assert_close(out, x, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("gate_norm", ["channel", "none"])
def test_vp_gate_replaces_dropped_tokens_by_noise(gate_norm):
    module = build_selector("autoselect", vision_width=16, gate_norm=gate_norm, denoiser="none")
    x = features()
    out, alpha = module(x, k=5, tau=1e-6, generator=torch.Generator().manual_seed(9))
    kept = alpha > 0.5
    assert kept.sum(-1).tolist() == [5, 5]
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    if gate_norm == "channel":  # unit noise in standardised units, mapped back to each channel's scale
        flat = x.flatten(0, 1)
        eps = eps * flat.std(0) + flat.mean(0)
    torch.testing.assert_close(out[kept], x[kept], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out[~kept], eps[~kept], atol=1e-3, rtol=1e-4)


def test_scale_gate_multiplies_by_the_soft_weights():
    module = build_selector("autoselect", vision_width=16, gate="scale", denoiser="none")
    x = features()
    out, alpha = module(x, k=10, tau=0.7)
    torch.testing.assert_close(out, alpha[..., None] * x)
    assert 0 < float(alpha.detach().min()) and float(alpha.detach().max()) < 1


def test_gumbel_ste_gate_is_hard_forward_soft_backward():
    module = build_selector("autoselect", vision_width=16, gate="gumbel_ste", denoiser="none")
    x = features()
    out, mask = module(x, k=10, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert sorted(torch.unique(mask.detach()).tolist()) == [0.0, 1.0]
    assert mask.sum(-1).tolist() == [10.0, 10.0]
    torch.testing.assert_close(out, mask[..., None] * x)
    out.square().sum().backward()
    grads = [p.grad for p in module.scorer.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


@pytest.mark.parametrize("gate", ["vp", "scale", "gumbel_ste"])
@pytest.mark.parametrize("denoiser", ["diagonal", "global", "none"])
def test_every_gate_and_denoiser_passes_finite_gradients_to_the_scorer(gate, denoiser):
    module = build_selector("autoselect", vision_width=16, gate=gate, denoiser=denoiser)
    with torch.no_grad():  # leave the identity init so every branch matters
        for p in module.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out, _ = module(features(), k=8, tau=0.3, generator=torch.Generator().manual_seed(1))
    (out * torch.randn_like(out)).sum().backward()
    head = module.scorer.head.weight.grad
    assert head is not None and bool(torch.isfinite(head).all()) and float(head.abs().sum()) > 0


def test_config_validation_names_the_choices():
    with pytest.raises(ValueError, match="unknown gate 'soft'; valid choices: vp, scale, gumbel_ste"):
        AutoSelectConfig(vision_width=16, gate="soft")
    with pytest.raises(ValueError, match="unknown denoiser 'deep'; valid choices: diagonal, global, none"):
        AutoSelectConfig(vision_width=16, denoiser="deep")
    with pytest.raises(ValueError, match="width 30 is not divisible by heads 4"):
        AutoSelect(AutoSelectConfig(vision_width=16, width=30, heads=4))
    assert AutoSelectConfig(vision_width=1024).heads == 16  # the paper's 16 heads at width 1024


# -- Gumbel autoencoder -----------------------------------------------------------------------


def test_gumbel_autoencoder_mask_and_loss():
    module = build_selector("gumbel", vision_width=16, n_tokens=40, keep_floor=0.3)
    x = features()
    recon, keep = module(x, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape
    assert sorted(torch.unique(keep.detach()).tolist()) == [0.0, 1.0]
    total, mse, kept = module.loss(x, recon, keep)
    torch.testing.assert_close(mse, ((recon - x) ** 2).mean())
    torch.testing.assert_close(kept, keep.mean())
    torch.testing.assert_close(total, mse + max(kept, torch.tensor(0.3)))
    total.backward()
    assert float(module.selector.head.weight.grad.abs().sum()) > 0  # reaches the selector through the STE
    assert float(module.mask_embedding.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="built for 40 tokens, got 39"):
        module(x[:, :39], tau=0.5)


# -- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,config", [("autoselect", {"vision_width": 16, "denoiser": "global"}),
                                         ("gumbel", {"vision_width": 16, "n_tokens": 40})])
def test_save_load_round_trip(tmp_path, kind, config):
    module = build_selector(kind, **config)
    save_selector(tmp_path, module, {"model": "random:tiny-llava"})
    loaded = load_selector(tmp_path, kind)
    assert loaded.config == module.config
    for (name, a), (_, b) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(loaded.scores(features()), module.scores(features()), atol=0, rtol=0)
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["kind"] == kind and record["model"] == "random:tiny-llava"


@pytest.fixture
def saved(tmp_path):
    save_selector(tmp_path, build_selector("autoselect", vision_width=16))
    return tmp_path


def test_missing_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist; train one with `prunebench train autoselect"):
        load_selector(tmp_path / "nope", "autoselect")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_selector(tmp_path, "autoselect")
    monkeypatch.setattr("prunebench.models.loading.ASSETS", tmp_path)  # an install without the shipped checkpoints
    with pytest.raises(CheckpointError, match="needs a trained checkpoint: pass gumbel:ckpt=DIR"):
        CheckpointScorer("gumbel", None)


def test_corrupt_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_selector(saved, "autoselect")


def test_wrong_kind(saved):
    with pytest.raises(CheckpointError, match="holds a 'autoselect' checkpoint, not 'gumbel'"):
        load_selector(saved, "gumbel")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_weights(saved, damage):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00not a safetensors file" * 9, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_selector(saved, "autoselect")
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        CheckpointScorer("autoselect", str(saved))  # caught when a method is created


def test_weights_from_another_architecture(saved, tmp_path):
    other = tmp_path / "other"
    save_selector(other, build_selector("autoselect", vision_width=16, depth=3))
    (saved / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"does not match its config.json: missing \[\], unexpected \['scorer.blocks.2"):
        load_selector(saved, "autoselect")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors; the checkpoint is incomplete"):
        load_selector(saved, "autoselect")


def test_wrong_vision_width(saved):
    scorer = CheckpointScorer("autoselect", str(saved))
    with pytest.raises(CheckpointError, match="trained on vision features 16 wide .*are 32 wide"):
        scorer.module(torch.device("cpu"), 32)
    assert scorer.module(torch.device("cpu"), 16).config.vision_width == 16
