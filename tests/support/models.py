"""Inputs made in code and small runners shared by the tests: prompts, images, the engine's
generate on a processed batch, and tiny backbones with their engines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from prunebench.engine.generate import PruningEngine
from prunebench.models.tiny import PROMPT_TEMPLATE

QUESTIONS = [
    "what color is the circle ?",
    "how many objects are there ?",
    "is there a red square on the left of the image ? answer yes or no .",
]


def make_images(n: int, seed: int = 0, size: int = 336) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def single(processor, index: int):
    """Prompt ``index`` of the batch on its own (no padding)."""
    prompt = PROMPT_TEMPLATE.format(question=QUESTIONS[index])
    return processor(images=make_images(3)[index : index + 1], text=[prompt], return_tensors="pt")


def run(engine: PruningEngine, inputs, method=None, budget="all", **decode):
    from prunebench.engine.generate import DecodeConfig

    decode.setdefault("max_new_tokens", 6)
    return engine.generate(
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["pixel_values"],
        method=method,
        budget=budget,
        decode=DecodeConfig(**decode),
        return_logits=True,
        image_inputs=engine.adapter.image_inputs(inputs),
    )


# -- other backbones: LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL (tiny, random) -------------------------------


def make_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@dataclass
class Backbone:
    """A tiny model of one architecture with its processor and engine, and three prompts whose
    images have different sizes (so different visual-token counts on dynamic backbones)."""

    name: str
    model: torch.nn.Module
    processor: object
    template: str
    image_sizes: tuple[tuple[int, int], ...]

    def __post_init__(self):
        self.engine = PruningEngine(self.model, self.processor.tokenizer)

    def inputs(self, indices: list[int]):
        images = [make_image(*self.image_sizes[i], seed=i) for i in indices]
        text = [self.template.format(question=QUESTIONS[i]) for i in indices]
        return self.processor(images=images, text=text, return_tensors="pt", padding=True)

    @property
    def batch(self):
        return self.inputs([0, 1, 2])

    def single(self, index: int):
        return self.inputs([index])


# the newer families: builder, prompt template, (height, width) px of three images giving three
# different visual-token counts
FAMILIES = {
    "internvl3": ("build_tiny_internvl", {"version": "3"}, "INTERNVL_PROMPT_TEMPLATE", ((40, 40), (56, 100), (80, 80))),
    "internvl3.5": ("build_tiny_internvl", {"version": "3.5"}, "INTERNVL_PROMPT_TEMPLATE", ((40, 40), (56, 100), (80, 80))),
    "llava-onevision": ("build_tiny_llava_onevision", {}, "ONEVISION_PROMPT_TEMPLATE", ((56, 100), (112, 60), (170, 160))),
    "qwen3-vl": ("build_tiny_qwen3_vl", {}, "QWEN3_PROMPT_TEMPLATE", ((112, 84), (140, 112), (96, 160))),
    "smolvlm": ("build_tiny_smolvlm", {"version": "1"}, "SMOLVLM_PROMPT_TEMPLATE", ((56, 100), (40, 100), (80, 80))),
    "smolvlm2": ("build_tiny_smolvlm", {"version": "2"}, "SMOLVLM_PROMPT_TEMPLATE", ((56, 100), (40, 100), (80, 80))),
}


def build_backbone(name: str, attn_implementation: str = "sdpa") -> Backbone:
    if name in FAMILIES:
        from prunebench.models import families

        builder, kwargs, template, sizes = FAMILIES[name]
        model, processor = getattr(families, builder)(attn_implementation=attn_implementation, **kwargs)
        return Backbone(name, model, processor, getattr(families, template), sizes)
    from prunebench.models.backbones import (
        NEXT_PROMPT_TEMPLATE,
        QWEN_PROMPT_TEMPLATE,
        build_tiny_llava_next,
        build_tiny_qwen2_vl,
    )

    if name == "llava-next":
        model, processor = build_tiny_llava_next(attn_implementation=attn_implementation)
        return Backbone(name, model, processor, NEXT_PROMPT_TEMPLATE, ((56, 100), (112, 60), (80, 80)))
    version = {"qwen2-vl": "2", "qwen2.5-vl": "2.5"}[name]
    model, processor = build_tiny_qwen2_vl(attn_implementation=attn_implementation, version=version)
    return Backbone(name, model, processor, QWEN_PROMPT_TEMPLATE, ((112, 84), (140, 112), (112, 112)))
