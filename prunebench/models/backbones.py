"""LLaVA-NeXT and Qwen2-VL / Qwen2.5-VL: tiny random models built in code, and the Qwen-VL inputs.

Tiny models share the word-level tokenizer made in code (``models.build_tokenizer``); Qwen2-VL
adds its vision special tokens here. Qwen2-VL's HF processor class insists on a video processor,
which needs torchvision, so :class:`QwenVLInputs` builds the inputs from the PIL image processor
and the tokenizer the way the processor does (each ``<|image_pad|>`` becomes one token per merged
2x2 patch; ``mm_token_type_ids`` marks them).

    random:tiny-llava-next   anyres over 56 px crops (16 tokens each) + Llama, GQA
    random:tiny-qwen2-vl     dynamic resolution (112 x 84 px -> 12 tokens) + Qwen2 with M-RoPE
    random:tiny-qwen2.5-vl   the same with Qwen2.5-VL's windowed vision tower
"""

from __future__ import annotations

import torch
from transformers import (
    BatchFeature,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from prunebench.models.tiny import build_tokenizer

NEXT_PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_PROMPT_TEMPLATE = "USER: " + QWEN_IMAGE + "\n{question} ASSISTANT:"
QWEN_SPECIAL_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]

# tiny geometry: toy widths, the real structure (GQA decoder, CLS-led CLIP, 2x2 merger)
NEXT_CROP = 56  # CLIP input side: 4 x 4 patches of 14 px per crop
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
QWEN_PIXELS = (28 * 28 * 4, 28 * 28 * 64)  # min/max pixels: 4..64 visual tokens per image


def _text_config(tokenizer, cls=LlamaConfig, **extra):
    return cls(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


def _finish(model, tokenizer, attn_implementation: str):
    """fp32, the attention kernel asked for, and a wider random init so that different inputs give
    different greedy answers (as ``models.build_tiny_llava`` does)."""
    model = model.to(torch.float32)
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 1.5 / param.shape[1] ** 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


# -- LLaVA-NeXT ------------------------------------------------------------------------------------
def build_tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, processor): a random-weight LLaVA-NeXT (anyres, image_newline) at toy width."""
    tokenizer = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=NEXT_CROP, patch_size=14, projection_dim=32,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=_text_config(tokenizer), image_grid_pinpoints=NEXT_PINPOINTS,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = _finish(LlavaNextForConditionalGeneration(config), tokenizer, attn_implementation)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": NEXT_CROP}, crop_size={"height": NEXT_CROP, "width": NEXT_CROP},
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    )
    return model, processor


# -- Qwen2-VL / Qwen2.5-VL -----------------------------------------------------------------------
class QwenVLInputs:
    """A processor for Qwen2-VL, Qwen2.5-VL and Qwen3-VL made of the PIL image processor and a tokenizer.

    ``__call__(images=, text=)`` returns ``input_ids``, ``attention_mask``, ``pixel_values``
    (all images' flattened patches), ``image_grid_thw`` and ``mm_token_type_ids``, as
    ``Qwen2VLProcessor`` does; each prompt holds one ``<|image_pad|>`` per image.
    """

    image_token = "<|image_pad|>"

    def __init__(self, image_processor, tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **_) -> BatchFeature:
        if text is None or images is None:
            raise ValueError("QwenVLInputs needs both images and text (one image per prompt)")
        prompts = [text] if isinstance(text, str) else list(text)
        images = images if isinstance(images, (list, tuple)) else [images]
        if [p.count(self.image_token) for p in prompts] != [1] * len(prompts) or len(images) != len(prompts):
            raise ValueError(
                f"each prompt needs exactly one {self.image_token} and one image; got {len(prompts)} prompts "
                f"with {[p.count(self.image_token) for p in prompts]} image tokens and {len(images)} images"
            )
        vision = self.image_processor(images=list(images), return_tensors="pt")
        unit = self.image_processor.merge_size**2
        expanded = [
            p.replace(self.image_token, self.image_token * int(grid.prod() // unit))
            for p, grid in zip(prompts, vision["image_grid_thw"])
        ]
        encoded = self.tokenizer(expanded, return_tensors="pt", padding=padding)
        ids = encoded["input_ids"]
        return BatchFeature({
            "input_ids": ids,
            "attention_mask": encoded["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
            "mm_token_type_ids": (ids == self.image_token_id).int(),
        })

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def build_tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa", version: str = "2"):
    """(model, inputs builder): a random-weight Qwen2-VL (``version="2"``) or Qwen2.5-VL
    (``"2.5"``: windowed vision tower, full attention in its last block) at toy width."""
    if version not in ("2", "2.5"):
        raise ValueError(f"unknown Qwen-VL version {version!r}; valid choices: 2, 2.5")
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    # head_dim 16: M-RoPE sections (temporal, height, width) over its 8 frequency pairs
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    token_ids = {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }
    if version == "2":
        text = _text_config(tokenizer, Qwen2VLTextConfig, rope_parameters=rope)
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 4, "num_heads": 2, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2}
        config, model_class = Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision, **token_ids), Qwen2VLForConditionalGeneration
    else:
        text = _text_config(tokenizer, Qwen2_5_VLTextConfig, rope_parameters=rope)
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_heads": 2,
                  "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                  "fullatt_block_indexes": [1]}
        config, model_class = Qwen2_5_VLConfig(text_config=text.to_dict(), vision_config=vision, **token_ids), Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = _finish(model_class(config), tokenizer, attn_implementation)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_PIXELS[0], max_pixels=QWEN_PIXELS[1])
    return model, QwenVLInputs(image_processor, tokenizer)
