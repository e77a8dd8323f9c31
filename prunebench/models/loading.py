"""Loading models by name: the built-in trained model, tiny random ones, hub ids and local paths."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from prunebench.errors import ModelNotFoundError, UserError
from prunebench.models.tiny import BUILTIN_RANDOM, BUILTIN_SPEC, build_processor, build_tiny_llava, build_tokenizer

ASSETS = Path(__file__).parent / "assets"
# trained models shipped with prunebench (prunebench/training/recipe.py trains them)
BUILTIN_TRAINED = {"builtin:tiny-llava": ASSETS / "tiny-llava"}


def load_model(name: str, device: str = "cpu", dtype: str = "float32"):
    """(model, processor) for ``random:tiny-llava``, a hub id, or a local directory."""
    torch_dtype = _dtype(dtype)
    from prunebench.models import backbones  # LLaVA-NeXT and Qwen-VL: their processors need newer transformers

    if backbones.handles(name):
        return backbones.load(name, device, torch_dtype)
    if name in BUILTIN_RANDOM:
        model, processor = build_tiny_llava(BUILTIN_RANDOM[name])
        return model.to(device=device, dtype=torch_dtype), processor
    if name in BUILTIN_TRAINED:
        return load_builtin(name, device, torch_dtype)
    if name.startswith("builtin:"):
        raise ModelNotFoundError(f"unknown built-in model {name!r}; valid choices: {', '.join(BUILTIN_TRAINED)}")
    if name.startswith("random:"):
        raise ModelNotFoundError(f"unknown random model {name!r}; valid choices: {', '.join([*BUILTIN_RANDOM, *backbones.BUILTIN])}")
    kwargs = {"local_files_only": True}
    try:
        model = LlavaForConditionalGeneration.from_pretrained(name, dtype=torch_dtype, attn_implementation="sdpa", **kwargs)
        processor = LlavaProcessor.from_pretrained(name, **kwargs)
    except OSError as err:
        where = "local directory" if os.path.isdir(name) else "hub id"
        raise ModelNotFoundError(
            f"cannot load {where} {name!r}: it is not in the local cache ({err.__class__.__name__}). prunebench "
            f"loads weights from local files only: download it first (`hf download {name}`) into "
            f"HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}, or pass a local directory."
        ) from None
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


def load_builtin(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A trained model shipped in prunebench/models/assets; its tokenizer and processor are built in code
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
