"""Shared fixtures: a tiny random LLaVA (real architecture, toy width) and inputs made in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from prunebench.engine import PruningEngine
from prunebench.models import PROMPT_TEMPLATE, build_tiny_llava

QUESTIONS = [
    "what color is the circle ?",
    "how many objects are there ?",
    "is there a red square on the left of the image ? answer yes or no .",
]


def make_images(n: int, seed: int = 0, size: int = 336) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# Toy-width models: one intra-op thread is fastest, and stays fast when the cores are shared.
torch.set_num_threads(1)


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
    from references import MAX_NEW  # here, not at the top: references imports conftest

    model, _ = tiny
    out = model.generate(
        **batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[:, batch["input_ids"].shape[1] :]
    return tokens, torch.stack(out.logits, 1)


def single(processor, index: int):
    """Prompt ``index`` of the batch on its own (no padding)."""
    prompt = PROMPT_TEMPLATE.format(question=QUESTIONS[index])
    return processor(images=make_images(3)[index : index + 1], text=[prompt], return_tensors="pt")


def run(engine: PruningEngine, inputs, method=None, budget="all", **decode):
    from prunebench.engine import DecodeConfig

    decode.setdefault("max_new_tokens", 6)
    return engine.generate(
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        method=method,
        budget=budget,
        decode=DecodeConfig(**decode),
        return_logits=True,
    )
