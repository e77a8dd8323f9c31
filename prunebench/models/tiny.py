"""Tiny random LLaVAs built entirely in code, with a word-level tokenizer made in code.

``random:tiny-llava`` is a LLaVA-1.5-shaped model (CLIP at 336 px / patch 14 = 576 visual tokens,
MLP projector, Llama decoder with grouped-query attention) at toy width, with random weights: it
needs no download, so tests and demos run anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

try:  # transformers >= 5.x: the PIL backend by name (the default one needs torchvision)
    from transformers import CLIPImageProcessorPil
except ImportError:  # earlier 5.x releases: the default processor is the PIL/numpy one
    from transformers import CLIPImageProcessor as CLIPImageProcessorPil

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# Lower-case words (the tokenizer lower-cases its input): LLaVA's roles, the built-in tasks'
# questions and answers (tasks/synthetic.py), and some general words.
WORDS = ["user", "assistant", ":", ".", ",", "?", "!", "'", "a", "an", "the", "is", "are", "of", "in", "on", "to", "and", "or", "what", "which", "where", "how", "many", "color", "colour", "shape", "left", "right", "top", "bottom", "above", "below", "next", "there", "yes", "no", "red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "pink", "brown", "circle", "square", "triangle", "circles", "squares", "triangles", "star", "cross", "object", "objects", "image", "picture", "word", "number", "text", "written", "read", "say", "does", "do", "any", "count", "answer", "question", "with", "using", "single", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "zero", "describe", "this", "that", "it", "small", "large", "big", "tiny", "please", "short", "phrase", "cat", "dog", "sun", "car", "bus", "box", "cup", "hat", "pen", "key", "map", "egg", "fox", "owl", "bee", "cow", "pig", "bat", "ant", "jar"] + [str(n) for n in range(10, 100)]
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def build_tokenizer(named: dict[str, str] | None = None, special: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a fixed vocabulary (no files, no download).

    ``named``: extra special tokens a processor reads by name (``tokenizer.<name>`` and
    ``tokenizer.<name>_id``, as InternVL's processor reads ``context_image_token``); ``special``:
    more special tokens (image markers), each one id, never split."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + WORDS + CHARACTERS:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", **(named or {})},
        padding_side="left",
    )
    added = [t for t in [*(named or {}).values(), *special] if t not in SPECIAL_TOKENS]
    if added:
        tokenizer.add_tokens(list(dict.fromkeys(added)), special_tokens=True)
    return tokenizer


@dataclass(frozen=True)
class TinyLlavaSpec:
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 336
    patch_size: int = 14
    text_width: int = 64
    text_layers: int = 4
    text_heads: int = 4
    kv_heads: int = 2  # grouped-query attention, so the engine's GQA path is exercised
    text_mlp: int = 128


def tiny_llava_config(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_width,
        intermediate_size=spec.vision_width * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_width,
    )
    text = LlamaConfig(
        hidden_size=spec.text_width,
        intermediate_size=spec.text_mlp,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def build_processor(tokenizer: PreTrainedTokenizerFast, spec: TinyLlavaSpec) -> LlavaProcessor:
    size = spec.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def build_tiny_llava(spec: TinyLlavaSpec | None = None, seed: int = 0, attn_implementation: str = "sdpa"):
    """A random-weight tiny LLaVA with its processor; deterministic for a given seed."""
    spec = spec or TinyLlavaSpec()
    tokenizer = build_tokenizer()
    config = tiny_llava_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.set_attn_implementation(attn_implementation)
    # widen the random init a little so different inputs give different greedy answers
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 1.5 / param.shape[1] ** 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), build_processor(tokenizer, spec)


# A mid-size stand-in for CPU measurements: LLaVA-1.5's token geometry (576 visual tokens) with
# an 8-layer, 1024-wide decoder (MHA, Llama MLP ratio), so prefill costs are dominated by the LLM.
MIDSIZE = TinyLlavaSpec(
    vision_width=256, vision_layers=4, vision_heads=4, text_width=1024, text_layers=8, text_heads=16,
    kv_heads=16, text_mlp=2816,
)
# The built-in trained model's geometry (prunebench/training/recipe.py trains it): LLaVA-1.5's 576 visual
# tokens from 96-px images and 4-px patches; 3 CLIP layers so that the projector's input
# (hidden_states[-2], as LLaVA-1.5) has two layers behind it; 4 decoder layers so FastV's default
# K=2 fits.
BUILTIN_SPEC = TinyLlavaSpec(
    vision_width=64, vision_layers=3, vision_heads=4, image_size=96, patch_size=4, text_width=128,
    text_layers=4, text_heads=4, kv_heads=4, text_mlp=512,
)
BUILTIN_RANDOM = {"random:tiny-llava": TinyLlavaSpec(), "random:mid-llava": MIDSIZE}
