"""AutoSelect's dropping training step feeds the LLM exactly what inference feeds it: the kept tokens'
projected features in order, the unselected ones gone, positions re-indexed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from prunebench.engine.adapters import adapter_for
from prunebench.engine.generate import DecodeConfig, PruningEngine
from prunebench.engine.method import PRE_LLM, Method, Selection, Stage
from prunebench.models.tiny import PROMPT_TEMPLATE, TinyLlavaSpec, build_tiny_llava
from prunebench.training.losses import autoselect_loss, decoder_inputs, drop_unselected, vision_features
from prunebench.training.selectors import build_selector
from prunebench.training.trainer import BuiltinQuestions, Collator, TrainConfig, drop_at

N, K = 64, 12  # 112 px images: 8 x 8 visual tokens


@pytest.fixture(scope="module")
def small():
    return build_tiny_llava(TinyLlavaSpec(image_size=112), seed=0)


@dataclass(kw_only=True)
class KeepGiven(Method):
    """Pre-LLM: keep the indices in ``KeepGiven.rows`` (one row per sample), re-indexed as AutoSelect."""

    name: ClassVar[str] = "keep-given"
    stage: ClassVar[str] = "pre"
    rows: ClassVar[list[torch.Tensor]] = []

    def schedule(self, n_visual, budget, num_layers):
        return [Stage(PRE_LLM, len(self.rows[0]))]

    def select(self, ctx) -> Selection:
        return Selection(keep=list(self.rows))


def layer0_input(engine: PruningEngine, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states, position ids, real-token mask) entering decoder layer 0 in the engine's prefill."""
    seen = {}

    def hook(module, args, kwargs):
        seen["hidden"], seen["positions"] = args[0].detach().clone(), kwargs["position_ids"].clone()

    handle = engine.adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], KeepGiven(), K,
                        DecodeConfig(max_new_tokens=1))
    finally:
        handle.remove()
    valid = torch.zeros(seen["hidden"].shape[:2], dtype=torch.bool)
    kept_len = inputs["attention_mask"].sum(-1) - (N - K)
    for b, n in enumerate(kept_len.tolist()):
        valid[b, -n:] = True  # left padded
    return seen["hidden"], seen["positions"], valid


def test_dropping_step_feeds_the_llm_what_inference_feeds_it(small):
    model, processor = small
    adapter = adapter_for(model)
    examples = [BuiltinQuestions(8)[i] for i in (0, 3, 5)]  # questions of different lengths
    batch = Collator(processor)(examples)
    keep = torch.stack([torch.randperm(N, generator=torch.Generator().manual_seed(b))[:K].sort().values
                        for b in range(3)])
    # training: drop the unselected tokens, project the kept features, contiguous positions
    features = vision_features(adapter, batch["pixel_values"])
    dropped = drop_unselected(batch, keep, adapter.image_token_id)
    with torch.no_grad():
        kept_features = features.gather(1, keep[..., None].expand(-1, -1, features.shape[-1]))
        hidden, positions = decoder_inputs(adapter, dropped, adapter.project(kept_features))
    # inference: the same prompts, left padded, through the engine's pre-LLM stage (re-indexed)
    prompts = [PROMPT_TEMPLATE.format(question=ex.question) for ex in examples]
    inputs = processor(images=[ex.image for ex in examples], text=prompts, return_tensors="pt", padding=True)
    KeepGiven.rows = list(keep)
    engine = PruningEngine(model, processor.tokenizer)
    seen_hidden, seen_positions, valid = layer0_input(engine, inputs)
    for b in range(3):
        n = int(valid[b].sum())
        torch.testing.assert_close(hidden[b, :n], seen_hidden[b, valid[b]], atol=0, rtol=0)
        assert positions[b, :n].tolist() == seen_positions[b, valid[b]].tolist() == list(range(n))
        # the prompt's text tokens are those of the inference prompt, image tokens cut to K
        image = dropped["input_ids"][b, :n] == adapter.image_token_id
        assert int(image.sum()) == K
        text = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        assert dropped["input_ids"][b, :n][~image].tolist() == text[text != adapter.image_token_id].tolist()
    # the answer and its labels follow the kept prompt, unchanged
    for b in range(3):
        assert dropped["labels"][b][dropped["labels"][b] != -100].tolist() == batch["labels"][b][batch["labels"][b] != -100].tolist()


def test_dropping_forward_keeps_features_exactly_and_trains_the_scorer(small):
    model, processor = small
    adapter = adapter_for(model)
    batch = Collator(processor)([BuiltinQuestions(8)[i] for i in range(2)])
    module = build_selector("autoselect", vision_width=32)
    features = vision_features(adapter, batch["pixel_values"])
    selected, keep = module(features, k=K, tau=0.5, generator=torch.Generator().manual_seed(0), drop=True)
    assert keep.shape == (2, K) and bool((keep.diff(dim=-1) > 0).all())
    torch.testing.assert_close(selected, features.gather(1, keep[..., None].expand(-1, -1, 32)), atol=0, rtol=0)
    loss, _ = autoselect_loss(module, adapter, batch, K, 0.5, torch.Generator().manual_seed(0), drop=True)
    loss.backward()
    assert module.scorer.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.denoiser.parameters())  # inference has no denoiser


def test_drop_share_is_deterministic_per_step(tmp_path):
    cfg = TrainConfig(selector="autoselect", out=str(tmp_path), drop=0.5)
    picks = [drop_at(cfg, step) for step in range(400)]
    assert picks == [drop_at(cfg, step) for step in range(400)] and 150 < sum(picks) < 250
    assert not any(drop_at(TrainConfig(selector="autoselect", out=str(tmp_path)), s) for s in range(50))
