"""Shared fixtures: a tiny random LLaVA (real architecture, toy width) and inputs made in code."""

from __future__ import annotations

import pytest
import torch
from support.models import QUESTIONS, make_images

from prunebench.engine.generate import PruningEngine
from prunebench.models.tiny import PROMPT_TEMPLATE, build_tiny_llava

# Toy-width models: one intra-op thread is fastest, and stays fast when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cpu_without_bf16_units(monkeypatch):
    """Runs default to bfloat16 on CPUs with bf16 units (models.cpu_dtype): tests see a CPU without
    them, so that their default precision (float32) does not depend on the host."""
    for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: False, raising=False)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of the random tiny LLaVA, SDPA attention, fp32."""
    return build_tiny_llava(seed=0)


@pytest.fixture(scope="session")
def tiny_eager():
    """(model, processor) of the same random tiny LLaVA under eager attention, fp32: the attention
    maps the official implementations read. Shared: no test may change the model."""
    return build_tiny_llava(seed=0, attn_implementation="eager")


@pytest.fixture(scope="session")
def eager(tiny_eager):
    """The model of ``tiny_eager``."""
    return tiny_eager[0]


@pytest.fixture(scope="session")
def engine(tiny) -> PruningEngine:
    model, processor = tiny
    return PruningEngine(model, processor.tokenizer)


@pytest.fixture(scope="session")
def batch(tiny):
    """Three prompts of different lengths, left padded, with three different images."""
    _, processor = tiny
    prompts = [PROMPT_TEMPLATE.format(question=q) for q in QUESTIONS]
    return processor(images=make_images(3), text=prompts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def reference(tiny, batch):
    """HF generate on the padded batch: tokens and per-step logits."""
    from support.references import MAX_NEW

    model, _ = tiny
    out = model.generate(
        **batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[:, batch["input_ids"].shape[1] :]
    return tokens, torch.stack(out.logits, 1)


