"""InternVL 3 / 3.5, LLaVA-OneVision, Qwen3-VL and SmolVLM: tiny random models built in code, and
the image-only processors their checkpoints load with.

Each builder returns ``(model, processor)``: random weights at toy width with the family's real
structure, its own HF processor class (real image processor at small sizes, the word-level
tokenizer of ``models.tiny`` with the family's special tokens) and a chat template, so prompts
go through ``apply_chat_template`` as with a real checkpoint. Nothing is read or downloaded.

    random:tiny-internvl3        InternViT (CLS) -> pixel shuffle 0.5 -> LN-MLP -> Qwen2; 56 px tiles of
                                 16 tokens, up to 12 tiles + a thumbnail (InternVL's processor default)
    random:tiny-internvl3.5      the same on a Qwen3 decoder (q/k norms)
    random:tiny-llava-onevision  SigLIP -> MLP -> anyres_max_4 packing (feature interpolation when the
                                 crop grid exceeds 4 crops' worth of tokens) -> Qwen2
    random:tiny-qwen3-vl         ViT (2-D RoPE) -> 2x2 merger + DeepStack from 3 vision blocks into
                                 decoder layers 0-2 -> Qwen3 with interleaved M-RoPE
    random:tiny-smolvlm          Idefics3ForConditionalGeneration (the class SmolVLM-256M/500M/2B load as):
                                 SigLIP on 48 px tiles (+ a global image) -> pixel shuffle 2 -> Llama
    random:tiny-smolvlm2         the same model under SmolVLMForConditionalGeneration (SmolVLM2)

Every processor of these families insists on a video processor, and theirs need torchvision,
which a CPU install lacks: :func:`image_only` subclasses the processor without one (images
only; the processor's own prompt expansion stays).
"""

from __future__ import annotations

import inspect

import torch
from transformers import (
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    Qwen2Config,
    Qwen3Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen3_vl.configuration_qwen3_vl import (
    Qwen3VLTextConfig,
    Qwen3VLVisionConfig,
)
from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

from prunebench.models.backbones import QWEN_SPECIAL_TOKENS, QwenVLInputs
from prunebench.models.tiny import build_tokenizer

INTERNVL_PROMPT_TEMPLATE = "USER: <IMG_CONTEXT>\n{question} ASSISTANT:"
ONEVISION_PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
QWEN3_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN3_PROMPT_TEMPLATE = "USER: " + QWEN3_IMAGE + "\n{question} ASSISTANT:"
SMOLVLM_PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

# tiny geometry (the real one in brackets)
INTERNVL_TILE, INTERNVL_PATCH = 56, 7  # 8x8 patches, pixel shuffle 0.5 -> 16 tokens a tile [448, 14: 256]
ONEVISION_TILE, ONEVISION_PATCH = 56, 14  # 16 tokens a crop [384, 14: 729]
ONEVISION_PINPOINTS = [[ONEVISION_TILE * i, ONEVISION_TILE * j] for i in range(1, 4) for j in range(1, 4)]  # [1..6 x 1..6]
ONEVISION_ASPECT = "anyres_max_4"  # [anyres_max_9]; 4 lets a 3x3 grid trigger the interpolation
QWEN3_PATCH = 16  # x 2 merge: one token per 32 x 32 px, as the real model
QWEN3_PIXELS = (32 * 32 * 4, 32 * 32 * 64)  # min / max pixels: 4..64 tokens an image
SMOLVLM_TILE, SMOLVLM_PATCH, SMOLVLM_SCALE = 48, 8, 2  # 6x6 patches -> 9 tokens a tile [512, 16, 4: 64]
SMOLVLM_LONGEST_EDGE = 4 * SMOLVLM_TILE  # SmolVLM's rule: the image's longest edge is resized to 4 tiles
SMOLVLM_ROWS = 4  # <row_r_col_c> markers for r, c in 1..4 (longest edge / tile)


def _chat_template(image: str) -> str:
    """``ROLE: <image block>\\ntext ... ASSISTANT:``, LLaVA's layout with the family's image block."""
    return (
        "{% for message in messages %}{{ message['role'] | upper }}: {% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image + "\n{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


def image_only(processor_class):
    """``processor_class`` without a video processor (images only). ``ProcessorMixin`` takes its
    sub-processors and the settings it saves from ``__init__``'s signature, which here is the
    parent's less ``video_processor`` (none is loaded or built), and the settings it loads
    (``image_seq_length``, ``num_image_tokens``, ...) from the parent's parameters; saved, it names
    the original class."""
    parent = inspect.signature(processor_class.__init__)
    settings = [name for name in parent.parameters if name not in ("self", "video_processor", "args", "kwargs")]

    class ImageOnly(processor_class):
        def __init__(self, image_processor, tokenizer, chat_template=None, **kwargs):
            processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        @staticmethod
        def validate_init_kwargs(processor_config, valid_kwargs):
            return processor_class.validate_init_kwargs(processor_config, [*valid_kwargs, *settings])

    ImageOnly.__init__.__signature__ = parent.replace(
        parameters=[p for p in parent.parameters.values() if p.name != "video_processor"])
    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


class SmolVLMImageProcessor(image_only(SmolVLMProcessor)):
    """SmolVLM2's processor, images only; a flat list of one image per prompt is nested per prompt
    (Idefics3's processor does that itself; SmolVLM's expects a list per prompt)."""

    def __call__(self, images=None, text=None, **kwargs):
        if isinstance(images, (list, tuple)) and not isinstance(text, str) and text is not None \
                and len(images) == len(text) and not any(isinstance(i, (list, tuple)) for i in images):
            images = [[image] for image in images]
        return super().__call__(images=images, text=text, **kwargs)


def _finish(model, tokenizer, attn_implementation: str):
    """fp32, the attention kernel asked for, a wider random init (different inputs give different
    greedy answers, as the other tiny builders) and generation ids."""
    model = model.to(torch.float32)
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0.0, 1.5 / param.shape[1] ** 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def _text(tokenizer, cls=LlamaConfig, **extra):
    return cls(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra,
    )


# -- InternVL 3 / 3.5 -------------------------------------------------------------------------------
def build_tiny_internvl(version: str = "3", seed: int = 0, attn_implementation: str = "sdpa"):
    """InternVL3 (Qwen2 decoder) or InternVL3.5 (``version="3.5"``: Qwen3, q/k norms) at toy width."""
    if version not in ("3", "3.5"):
        raise ValueError(f"unknown InternVL version {version!r}; valid choices: 3, 3.5")
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = build_tokenizer(named)
    per_tile = (INTERNVL_TILE // INTERNVL_PATCH) ** 2 // 4
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=INTERNVL_TILE, patch_size=INTERNVL_PATCH)
    text = _text(tokenizer, Qwen2Config) if version == "3" else _text(tokenizer, Qwen3Config, head_dim=16)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
                            image_seq_length=per_tile, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = _finish(InternVLForConditionalGeneration(config), tokenizer, attn_implementation)
    images = GotOcr2ImageProcessorPil(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, crop_to_patches=True,
                                      min_patches=1, max_patches=12)
    processor = image_only(InternVLProcessor)(images, tokenizer, image_seq_length=per_tile,
                                             chat_template=_chat_template("<IMG_CONTEXT>"))
    return model, processor


# -- LLaVA-OneVision ------------------------------------------------------------------------------
def build_tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa"):
    tokenizer = build_tokenizer({"video_token": "<video>"})
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=ONEVISION_TILE, patch_size=ONEVISION_PATCH, vision_use_head=False)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=_text(tokenizer, Qwen2Config), image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id, vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio=ONEVISION_ASPECT,
    )
    torch.manual_seed(seed)
    model = _finish(LlavaOnevisionForConditionalGeneration(config), tokenizer, attn_implementation)
    images = LlavaOnevisionImageProcessorPil(size={"height": ONEVISION_TILE, "width": ONEVISION_TILE},
                                             image_grid_pinpoints=ONEVISION_PINPOINTS)
    processor = image_only(LlavaOnevisionProcessor)(
        images, tokenizer, num_image_tokens=(ONEVISION_TILE // ONEVISION_PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio=ONEVISION_ASPECT, chat_template=_chat_template("<image>"),
    )
    return model, processor


# -- Qwen3-VL --------------------------------------------------------------------------------------
def build_tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa"):
    """Qwen3-VL at toy width: 4 vision blocks, DeepStack taps after blocks 1, 2, 3 (real: 8, 16, 24
    of 27) feeding decoder layers 0, 1, 2; interleaved M-RoPE over head_dim 16 ([4, 2, 2] frequency
    pairs, the real [24, 20, 20] layout in miniature)."""
    tokenizer = build_tokenizer(special=tuple(QWEN_SPECIAL_TOKENS))
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    text = _text(tokenizer, Qwen3VLTextConfig, head_dim=16, rope_parameters=rope)
    vision = Qwen3VLVisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=QWEN3_PATCH,
                                 spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                 num_position_embeddings=64, deepstack_visual_indexes=[1, 2, 3])
    config = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = _finish(Qwen3VLForConditionalGeneration(config), tokenizer, attn_implementation)
    images = Qwen2VLImageProcessorPil(patch_size=QWEN3_PATCH, merge_size=2, temporal_patch_size=2,
                                      min_pixels=QWEN3_PIXELS[0], max_pixels=QWEN3_PIXELS[1],
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return model, QwenVLInputs(images, tokenizer, chat_template=_chat_template(QWEN3_IMAGE))


# -- SmolVLM ---------------------------------------------------------------------------------------
def build_tiny_smolvlm(version: str = "1", seed: int = 0, attn_implementation: str = "sdpa"):
    """SmolVLM at toy width: ``version="1"`` builds ``Idefics3ForConditionalGeneration`` (what the
    SmolVLM-256M/500M/2B checkpoints load as), ``"2"`` ``SmolVLMForConditionalGeneration``
    (SmolVLM2); the two modelling files are the same model. Both take Idefics3's processor, which
    lays out prompts as SmolVLM's does and needs neither torchvision nor num2words."""
    if version not in ("1", "2"):
        raise ValueError(f"unknown SmolVLM version {version!r}; valid choices: 1, 2")
    markers = tuple(f"<row_{r}_col_{c}>" for r in range(1, SMOLVLM_ROWS + 1) for c in range(1, SMOLVLM_ROWS + 1))
    tokenizer = build_tokenizer(special=("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *markers))
    per_tile = (SMOLVLM_TILE // SMOLVLM_PATCH) ** 2 // SMOLVLM_SCALE**2
    vision_cls, config_cls, model_cls = (
        (Idefics3VisionConfig, Idefics3Config, Idefics3ForConditionalGeneration) if version == "1"
        else (SmolVLMVisionConfig, SmolVLMConfig, SmolVLMForConditionalGeneration)
    )
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=SMOLVLM_TILE, patch_size=SMOLVLM_PATCH)
    config = config_cls(vision_config=vision, text_config=_text(tokenizer), scale_factor=SMOLVLM_SCALE,
                        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = _finish(model_cls(config), tokenizer, attn_implementation)
    images = Idefics3ImageProcessorPil(size={"longest_edge": SMOLVLM_LONGEST_EDGE},
                                       max_image_size={"longest_edge": SMOLVLM_TILE}, do_image_splitting=True)
    processor = Idefics3Processor(images, tokenizer, image_seq_len=per_tile, chat_template=_chat_template("<image>"))
    return model, processor
