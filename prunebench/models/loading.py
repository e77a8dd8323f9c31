"""Loading models by name: the built-in trained model, tiny random ones, hub ids and local paths.

Hub ids load as transformers loads them: downloaded on demand when online, from the local cache
only with ``HF_HUB_OFFLINE=1`` or an unreachable hub (then a missing one fails within seconds,
naming what to run on a connected machine; see :mod:`prunebench.models.hub`). Weights are
created straight on the target device in the target dtype (``device_map``), so a 7B model on a
GPU never has a full-precision copy in CPU memory. Remote code runs only when asked for; the
supported families are native to transformers and need none. The families beyond LLaVA-1.5 are
imported when used: their processors need newer transformers releases than the engine does.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, LlavaForConditionalGeneration

from prunebench.errors import ModelNotFoundError, UserError
from prunebench.models import hub
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
# tiny random backbones of every supported family: name -> (module of prunebench.models, builder, arguments)
BACKBONES = {
    "random:tiny-llava-next": ("backbones", "build_tiny_llava_next", {}),
    "random:tiny-qwen2-vl": ("backbones", "build_tiny_qwen2_vl", {"version": "2"}),
    "random:tiny-qwen2.5-vl": ("backbones", "build_tiny_qwen2_vl", {"version": "2.5"}),
    "random:tiny-qwen3-vl": ("families", "build_tiny_qwen3_vl", {}),
    "random:tiny-internvl3": ("families", "build_tiny_internvl", {"version": "3"}),
    "random:tiny-internvl3.5": ("families", "build_tiny_internvl", {"version": "3.5"}),
    "random:tiny-llava-onevision": ("families", "build_tiny_llava_onevision", {}),
    "random:tiny-smolvlm": ("families", "build_tiny_smolvlm", {"version": "1"}),
    "random:tiny-smolvlm2": ("families", "build_tiny_smolvlm", {"version": "2"}),
}
# the architectures a checkpoint may declare (each has an engine adapter), and how its processor loads
ARCHITECTURES = (
    "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
    "InternVLForConditionalGeneration", "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration",
)


def build_backbone(name: str):
    """(model, processor) of a tiny random backbone of ``BACKBONES``."""
    module, builder, kwargs = BACKBONES[name]
    return getattr(importlib.import_module(f"prunebench.models.{module}"), builder)(**kwargs)


def load_processor(architecture: str, name: str, **kwargs):
    """The processor of a checkpoint: the family's own class, images only where its video processor
    would need torchvision (a CPU install has none); Qwen-VL inputs built from the image processor
    and the tokenizer (``backbones.QwenVLInputs``)."""
    from prunebench.models import backbones, families

    if architecture.startswith("Qwen"):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        template = tokenizer.chat_template or _processor_chat_template(name, **kwargs)
        return backbones.QwenVLInputs(Qwen2VLImageProcessorPil.from_pretrained(name, **kwargs), tokenizer, template)
    processor_class = {
        "LlavaForConditionalGeneration": transformers.LlavaProcessor,
        "LlavaNextForConditionalGeneration": transformers.LlavaNextProcessor,
        "LlavaOnevisionForConditionalGeneration": families.image_only(transformers.LlavaOnevisionProcessor),
        "InternVLForConditionalGeneration": families.image_only(transformers.InternVLProcessor),
        "Idefics3ForConditionalGeneration": transformers.Idefics3Processor,
        "SmolVLMForConditionalGeneration": families.SmolVLMImageProcessor,
    }[architecture]
    return processor_class.from_pretrained(name, **kwargs)


def _processor_chat_template(name: str, **kwargs) -> str | None:
    """A checkpoint's processor-level chat template (``chat_template.jinja`` / ``.json``), if any."""
    from transformers.utils import cached_file

    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    for filename in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False, **kwargs)
        if path is not None:
            text = Path(path).read_text()
            return text if filename.endswith(".jinja") else json.loads(text)["chat_template"]
    return None


class UnsupportedModelError(UserError, ValueError):
    """A checkpoint of an architecture prunebench has no adapter for."""


def load_model(name: str, device: str = "cpu", dtype: str = "float32", revision: str | None = None,
               trust_remote_code: bool = False):
    """(model, processor) for a built-in name (``builtin:``, ``random:``), a hub id or a local
    directory. ``revision``: a hub branch, tag or commit; ``trust_remote_code``: let a checkpoint
    run its own Python code (off unless asked)."""
    torch_dtype = _dtype(dtype)
    if name in BACKBONES:
        model, processor = build_backbone(name)
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
    if local:
        check_local_config(Path(name))
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
    if local:
        check_local_weights(Path(name))
    try:
        model = getattr(transformers, architecture).from_pretrained(
            name, config=config, dtype=dtype, device_map=device, attn_implementation="sdpa", **kwargs)
        processor = load_processor(architecture, name, **kwargs)
    except OSError as err:
        raise hub.unavailable(name, what, offline, err, revision) from None
    except ImportError as err:  # a processor needing an optional package (SmolVLM2's: num2words)
        raise UserError(f"cannot load the processor of {name!r}: {err}") from None
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), processor


def check_local_config(directory: Path) -> None:
    """A local model folder's config.json exists and parses (else one line, not a misreport as a
    missing download)."""
    config = directory / "config.json"
    if not config.is_file():
        raise ModelNotFoundError(f"local directory {str(directory)!r} has no config.json: not a Hugging Face model folder")
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{config} is not a valid model config ({err}); restore or re-download the model") from None
    if not isinstance(data, dict):
        raise UserError(f"{config} is not a valid model config (not a JSON object); restore or re-download the model")


def check_local_weights(directory: Path) -> None:
    """A local model folder holds safetensors weights whose headers read."""
    from safetensors import SafetensorError, safe_open

    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise UserError(f"local directory {str(directory)!r} has no *.safetensors weights (prunebench loads "
                        "safetensors only, never pickled .bin files)")
    for weights in shards:
        try:
            with safe_open(weights, "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{weights} is corrupt or not a safetensors file ({err}); restore or re-download it") from None


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


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; valid choices: {', '.join(DTYPES)}")
    return DTYPES[name]
