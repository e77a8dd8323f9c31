"""Real model geometries with random weights: speed can be profiled with no download.

Each ``<name>.json`` here is the ``config.json`` of the checkpoint named in its
``_name_or_path``, transcribed with the decoder's widths written out (the hub files leave
Llama's defaults implicit); where the checkpoint's own file was not at hand, ``_sources`` names
the copies the geometry comes from, and anything they do not give is left to transformers'
defaults (a value that does not change the shapes: rotary base, tied embeddings). Random
weights give the real shapes and therefore the real timings; they give no meaningful answers.

    llava-1.5-7b        llava-hf/llava-1.5-7b-hf                 CLIP-L/336 (576 tokens) + Vicuna-7B
    llava-next-7b       llava-hf/llava-v1.6-vicuna-7b-hf         anyres, up to 2928 tokens + Vicuna-7B
    llava-onevision-7b  llava-hf/llava-onevision-qwen2-7b-ov-hf  SigLIP anyres_max_9 + Qwen2-7B
    qwen2-vl-7b         Qwen/Qwen2-VL-7B-Instruct                dynamic resolution, M-RoPE, Qwen2-7B
    qwen2.5-vl-7b       Qwen/Qwen2.5-VL-7B-Instruct              the same with a windowed vision tower
    qwen3-vl-8b         Qwen/Qwen3-VL-8B-Instruct                interleaved M-RoPE, DeepStack, Qwen3-8B
    internvl3-8b        OpenGVLab/InternVL3-8B-hf                InternViT-300M tiles (256 tokens each) + Qwen2.5-7B

InternVL3.5-8B and SmolVLM have no preset: the sources at hand give InternVL3.5-8B's decoder
(Qwen3-8B) but not its vision tower's widths, and neither SmolVLM-256M's vocabulary nor the 2B's
SigLIP widths and KV heads; ``prunebench profile`` runs their real checkpoints instead.

The engine and ``prunebench profile`` run all of them (prunebench/engine/adapters.py; the
profiler's synthetic inputs and the FLOPs model in prunebench/profiling/flops.py).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING, PretrainedConfig

from prunebench.engine.adapters import adapter_for

from prunebench.errors import UserError

PRESET_DIR = Path(__file__).parent


class PresetError(UserError, ValueError):
    """An unknown preset name."""


@cache
def _raw() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(PRESET_DIR.glob("*.json"))}


def preset_names() -> list[str]:
    return list(_raw())


def resolve_preset(name: str) -> str | None:
    """The preset for a preset name, ``random:<preset>``, or the hub id a preset transcribes."""
    name = name.removeprefix("random:")
    if name in _raw():
        return name
    return next((preset for preset, raw in _raw().items() if raw["_name_or_path"] == name), None)


def preset_config(name: str) -> PretrainedConfig:
    preset = resolve_preset(name)
    if preset is None:
        choices = ", ".join(f"{p} ({raw['_name_or_path']})" for p, raw in _raw().items())
        raise PresetError(f"no random-weight preset for {name!r}; valid choices: {choices}")
    raw = copy.deepcopy(_raw()[preset])  # a caller may change the config it gets: never the cached copy
    return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)


def build_random_model(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """The preset's transformers model with random weights, created directly on ``device``.

    ``device="meta"`` builds the module tree without allocating a single weight.
    """
    config = preset_config(name)
    model_class = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def check_engine_support(name: str) -> None:
    """Raise NotImplementedError if the preset's backbone cannot be profiled: the engine has no
    adapter for it, or the FLOPs model cannot count its visual tokens and vision tower.

    Asks the adapter registry and the FLOPs model themselves, on a weightless (meta) build, so
    nothing is allocated.
    """
    from prunebench.profiling.flops import image_tokens, vision_flops

    model = build_random_model(name, device="meta")
    try:
        adapter_for(model)
        image_tokens(model.config, 672, 672)
        vision_flops(model.config, 1, 672, 672)
    except NotImplementedError as err:
        preset = resolve_preset(name)
        raise NotImplementedError(
            f"preset {preset!r} ({type(model).__name__}) cannot be profiled: {err}. Its config ships in "
            f"prunebench/profiling/presets/{preset}.json; profiling it needs an adapter (prunebench/engine/adapters.py) and a "
            "FLOPs model (prunebench/profiling/flops.py) for its architecture."
        ) from None
