"""Loading models by name: the built-in trained model, tiny random ones, hub ids and local paths.

Hub ids load as transformers loads them: downloaded on demand when online, from the local cache
only with ``HF_HUB_OFFLINE=1`` or an unreachable hub (then a missing one fails within seconds,
naming what to run on a connected machine; see :mod:`prunebench.models.hub`). Weights are
created straight on the target device in the target dtype (``device_map``), so a 7B model on a
GPU never has a full-precision copy in CPU memory. Remote code runs only when asked for; the
supported families are native to transformers and need none.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    SmolVLMForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from prunebench.errors import ModelNotFoundError, UserError
from prunebench.models import backbones, families, hub
from prunebench.models.tiny import (
    BUILTIN_RANDOM,
    BUILTIN_SPEC,
    build_processor,
    build_tiny_llava,
    build_tokenizer,
)

ASSETS = Path(__file__).parent / "assets"
# trained models shipped with prunebench (prunebench/training/recipe.py trains them)
BUILTIN_TRAINED = {"builtin:tiny-llava": ASSETS / "tiny-llava"}
# tiny random backbones of every supported family, built in code
BACKBONES = {**backbones.BUILTIN, **families.BUILTIN}


def _qwen_inputs(name: str, **kwargs) -> backbones.QwenVLInputs:
    """Qwen2-VL / 2.5-VL / 3-VL inputs from a checkpoint's image processor and tokenizer; the chat
    template is the tokenizer's, else the processor's own file."""
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    template = tokenizer.chat_template or _processor_chat_template(name, **kwargs)
    return backbones.QwenVLInputs(Qwen2VLImageProcessorPil.from_pretrained(name, **kwargs), tokenizer, template)


def _processor_chat_template(name: str, **kwargs) -> str | None:
    import json

    from transformers.utils import cached_file

    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False, **kwargs)
        if path is not None:
            text = Path(path).read_text()
            return text if filename.endswith(".jinja") else json.loads(text)["chat_template"]
    return None


# architecture a checkpoint declares -> (its model class, how its processor loads)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": (LlavaForConditionalGeneration, LlavaProcessor.from_pretrained),
    "LlavaNextForConditionalGeneration": (LlavaNextForConditionalGeneration, LlavaNextProcessor.from_pretrained),
    "LlavaOnevisionForConditionalGeneration": (
        LlavaOnevisionForConditionalGeneration, families.image_only(LlavaOnevisionProcessor).from_pretrained),
    "Qwen2VLForConditionalGeneration": (Qwen2VLForConditionalGeneration, _qwen_inputs),
    "Qwen2_5_VLForConditionalGeneration": (Qwen2_5_VLForConditionalGeneration, _qwen_inputs),
    "Qwen3VLForConditionalGeneration": (Qwen3VLForConditionalGeneration, _qwen_inputs),
    "InternVLForConditionalGeneration": (InternVLForConditionalGeneration, families.image_only(InternVLProcessor).from_pretrained),
    "Idefics3ForConditionalGeneration": (Idefics3ForConditionalGeneration, Idefics3Processor.from_pretrained),
    "SmolVLMForConditionalGeneration": (SmolVLMForConditionalGeneration, families.SmolVLMImageProcessor.from_pretrained),
}


class UnsupportedModelError(UserError, ValueError):
    """A checkpoint of an architecture prunebench has no adapter for."""


def load_model(name: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
               trust_remote_code: bool = False):
    """(model, processor) for a built-in name (``builtin:``, ``random:``), a hub id or a local
    directory. ``revision``: a hub branch, tag or commit; ``trust_remote_code``: let a checkpoint
    run its own Python code (off unless asked)."""
    torch_dtype = _dtype(dtype)
    if name in BACKBONES:
        model, processor = BACKBONES[name]()
        return model.to(device=device, dtype=torch_dtype), processor
    if name in BUILTIN_RANDOM:
        model, processor = build_tiny_llava(BUILTIN_RANDOM[name])
        return model.to(device=device, dtype=torch_dtype), processor
    if name in BUILTIN_TRAINED:
        return load_builtin(name, device, torch_dtype)
    if name.startswith("builtin:"):
        raise ModelNotFoundError(f"unknown built-in model {name!r}; valid choices: {', '.join(BUILTIN_TRAINED)}")
    if name.startswith("random:"):
        raise ModelNotFoundError(f"unknown random model {name!r}; valid choices: {', '.join([*BUILTIN_RANDOM, *BACKBONES])}")
    return load_pretrained(name, device, torch_dtype, revision, trust_remote_code)


def load_pretrained(name: str, device: str, dtype: torch.dtype, revision: str | None = None, trust_remote_code: bool = False):
    """A checkpoint of a supported architecture from a local directory or the hub."""
    local = os.path.isdir(name)
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):  # a path, not an owner/name id
        raise ModelNotFoundError(f"cannot load local directory {name!r}: no such directory")
    offline = None if local else hub.offline_reason()
    kwargs = hub.pretrained_kwargs(revision, trust_remote_code, offline)
    what = "local directory" if local else "hub id"
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except OSError as err:  # not cached / not on the hub / no config.json
        if local:
            raise ModelNotFoundError(f"cannot load local directory {name!r}: {err.__class__.__name__}: {err}") from None
        raise hub.unavailable(name, what, offline, err, revision) from None
    except ValueError as err:  # an unknown model type (remote code not allowed) or an invalid id
        raise ModelNotFoundError(f"cannot load {what} {name!r}: {str(err).splitlines()[0]}") from None
    architecture = (config.architectures or [type(config).__name__])[0]
    if architecture not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{name!r} is a {architecture}, which prunebench has no adapter for; supported architectures: "
            f"{', '.join(ARCHITECTURES)} (InternVL loads from its transformers conversion, e.g. OpenGVLab/InternVL3-8B-hf)"
        )
    model_class, load_processor = ARCHITECTURES[architecture]
    try:
        model = model_class.from_pretrained(name, config=config, dtype=dtype, device_map=device,
                                            attn_implementation="sdpa", **kwargs)
        processor = load_processor(name, **kwargs)
    except OSError as err:
        raise hub.unavailable(name, what, offline, err, revision) from None
    except ImportError as err:  # a processor needing an optional package (SmolVLM2's: num2words)
        raise UserError(f"cannot load the processor of {name!r}: {err}") from None
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), processor


def load_builtin(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A trained model shipped in prunebench/assets; its tokenizer and processor are built in code
    (the same as at training time), so loading needs no files beyond the weights and config."""
    directory = BUILTIN_TRAINED[name]
    if not (directory / "model.safetensors").is_file():
        raise ModelNotFoundError(
            f"{name}: no weights in {directory}; this install lacks the shipped model. Train it with "
            f"`prunebench train tiny-llava --out {directory}` (30-65 minutes on 2 CPU cores)"
        )
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = model.config.text_config.pad_token_id
    return model.to(device).eval(), build_processor(build_tokenizer(), BUILTIN_SPEC)


def cpu_dtype() -> str:
    """The precision CPU runs use unless told: bfloat16 where the CPU multiplies it natively (AMX or
    AVX512-BF16: the built-in model's decoder forward is 2.2x faster than in float32 on an AMX Xeon),
    float32 elsewhere (without those units bfloat16 is emulated, 5x slower than float32)."""
    native = getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return "bfloat16" if any(check is not None and check() for check in native) else "float32"


def _dtype(name: str) -> torch.dtype:
    choices = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in choices:
        raise UserError(f"unknown dtype {name!r}; valid choices: {', '.join(choices)}")
    return choices[name]
