"""`prunebench profile`: where a pruned VLM spends its time, stage by stage, against the hardware.

Every method x budget runs the same synthetic batch (random token ids around one image-token
block, random pixels: speed does not depend on content) through the engine. On every backbone
but LLaVA-1.5 the visual tokens depend on the image's size (``--image-size``, default 672x672 px:
the largest anyres pinpoint of LLaVA-NeXT-7B, 2928 tokens; 576 tokens on Qwen2-VL, as LLaVA-1.5;
441 on Qwen3-VL; 1280 on InternVL3, 4 tiles + thumbnail); LLaVA-1.5 resizes every image to its
336 px grid. Then: ``warmup`` untimed
passes, then ``repeats`` timed ones of prefill + ``decode_tokens`` greedy tokens, interleaved
across the cells so that drifting device speed hits every cell alike. The engine's
StageClock splits a pass into disjoint spans::

    ttft   = [ vision | pruner | prefill ] + embedding and bookkeeping + first-token argmax
    decode = one span per decode step (the first token comes from the prefill)

``vision`` is the vision tower + projector; ``pruner`` the method's own work at each of its
stages (signals, select(), the token gather); ``prefill`` the decoder layers, final norm and LM
head, never the pruner. On CUDA a span is a pair of events read after one synchronisation per
pass; on CPU perf_counter. Inputs are on the device before timing starts. Reported: the median
over repeats and the min/max around it, per sample (a batch's time / its size) as in eval records.

Roofline: the prefill cannot beat max(FLOPs / peak FLOP/s, bytes / peak bandwidth), with the
peaks measured once per run on this device (a square matmul in the profiled dtype, a large
device-to-device copy). Bytes = decoder + LM-head weights read once + the KV cache written;
activation traffic is left out, so the bound is optimistic and the achieved fraction
(bound / measured prefill) honest. Decode gets the same treatment (weights + KV cache read per
step): the achieved bandwidth gpt-fast reports.
"""

from __future__ import annotations

import platform
import resource
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from prunebench.models.loading import BACKBONES as BUILTIN_BACKBONES
from prunebench.budget import Budget, BudgetError
from prunebench.engine.generate import DecodeConfig, PruningEngine
from prunebench.profiling.flops import (
    FORMULA,
    SMOLVLM,
    DecoderGeometry,
    anyres_crops,
    decode_flops_per_step,
    image_tokens,
    internvl_tiles,
    kv_cache_bytes,
    prefill_flops,
    qwen_patch_grid,
    roofline_ms,
    smolvlm_tiles,
    tile_side,
    vision_flops,
)
from prunebench.engine.method import Method, create_method, parse_method_list
from prunebench.models.tiny import BUILTIN_RANDOM
from prunebench.models.loading import cpu_dtype, load_model
from prunebench.profiling.presets import (
    PresetError,
    build_random_model,
    check_engine_support,
    preset_names,
    resolve_preset,
)
from prunebench.results import Record, RecordKey, ResultStore, cell_fields, provenance
from prunebench.engine.timing import StageClock
from prunebench.errors import UserError
from prunebench.report.tables import Column, Table, render

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STAGES = ("vision", "pruner", "prefill", "ttft", "decode_per_token")
IMAGE_AFTER = 35  # text tokens before the image: about LLaVA-1.5's system prompt + "USER:"
ROOFLINE_BYTES = "decoder + LM-head weights read once + KV cache written (activations not counted)"


@dataclass(frozen=True)
class ProfileSettings:
    batch_size: int = 1
    prompt_tokens: int = 64  # text tokens around the image
    warmup: int = 2
    repeats: int = 10
    decode_tokens: int = 16  # generated tokens per pass, the first one from the prefill
    image_size: tuple[int, int] = (672, 672)  # (height, width) px of the synthetic image


@dataclass(frozen=True)
class DevicePeaks:
    flops_per_s: float
    bytes_per_s: float


# -- inputs and one timed pass --------------------------------------------------------------------
def synthetic_batch(config, batch_size: int, prompt_tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 0,
                    image_size: tuple[int, int] = ProfileSettings.image_size) -> dict[str, torch.Tensor]:
    """``batch_size`` equal prompts of ``prompt_tokens`` random text tokens with one image block, and
    the vision inputs of one ``image_size`` (height, width) image each, shaped as the model's own
    processor shapes them: LLaVA-1.5 ``(B, 3, 336, 336)``; LLaVA-NeXT / OneVision ``(B, 1 + crops,
    3, S, S)`` with ``image_sizes``; Qwen-VL ``(B x patches, 3 x 2 x P x P)`` with
    ``image_grid_thw``; InternVL ``(B x tiles, 3, 448, 448)`` with ``image_tiles``; SmolVLM
    ``(B, tiles, 3, S, S)`` with ``pixel_attention_mask``."""
    image_token = config.image_token_id
    vocab = config.text_config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator)
    text[text == image_token] = (image_token + 1) % vocab
    head = min(IMAGE_AFTER, prompt_tokens)
    height, width = image_size
    image = torch.full((batch_size, image_tokens(config, height, width)), image_token)
    input_ids = torch.cat([text[:, :head], image, text[:, head:]], dim=1)
    vision = config.vision_config
    extra: dict[str, torch.Tensor] = {}
    if config.model_type == "llava":
        shape = (batch_size, vision.num_channels, vision.image_size, vision.image_size)
    elif config.model_type in ("llava_next", "llava_onevision"):
        shape = (batch_size, anyres_crops(config, height, width), vision.num_channels, vision.image_size, vision.image_size)
        extra["image_sizes"] = torch.tensor([[height, width]] * batch_size)
    elif config.model_type == "internvl":  # every image's tiles, one after the other
        tiles, side = internvl_tiles(config, height, width), tile_side(vision.image_size)
        shape = (batch_size * tiles, vision.num_channels, side, side)
        extra["image_tiles"] = torch.tensor([tiles] * batch_size)
    elif config.model_type in SMOLVLM:
        tiles = smolvlm_tiles(config, height, width)
        shape = (batch_size, tiles, vision.num_channels, vision.image_size, vision.image_size)
        extra["pixel_attention_mask"] = torch.ones(batch_size, tiles, vision.image_size, vision.image_size, dtype=torch.bool)
    else:  # Qwen-VL: the flattened patches of every image, one after the other
        rows, cols = qwen_patch_grid(config, height, width)
        shape = (batch_size * rows * cols, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2)
        extra["image_grid_thw"] = torch.tensor([[1, rows, cols]] * batch_size)
    pixels = torch.randn(*shape, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixels.to(device=device, dtype=dtype),
        **{key: value.to(device) for key, value in extra.items()},
    }


@torch.inference_mode()
def timed_pass(engine: PruningEngine, inputs: dict[str, torch.Tensor], method: Method, budget: Budget, decode_tokens: int) -> tuple[dict[str, float], torch.Tensor]:
    """One prefill + greedy decode; returns ms per stage and the visual tokens entering each layer."""
    clock = StageClock(engine.device)
    with clock("ttft"):
        state = engine.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], method, budget, clock,
                               engine.adapter.image_inputs(inputs))
        state.logits.argmax(-1)
    # the engine's own decode loop (a per-step host sync for EOS checks included, as in real use)
    engine.decode(state, DecodeConfig(max_new_tokens=decode_tokens, eos_token_id=None), clock, False)
    spans = clock.summary()
    times = {"vision": spans["vision"], "pruner": spans.get("pruner", 0.0), "prefill": spans["prefill"], "ttft": spans["ttft"]}
    if decode_tokens > 1:
        times["decode_per_token"] = spans["decode"] / (decode_tokens - 1)
    return times, state.visual_tokens


def summarise(passes: list[dict[str, float]]) -> dict[str, float]:
    """Median of each stage over the passes, with its min and max (``<stage>_min``/``_max``)."""
    out: dict[str, float] = {}
    for stage in passes[0]:
        values = [p[stage] for p in passes]
        out[stage] = statistics.median(values)
        out[f"{stage}_min"] = min(values)
        out[f"{stage}_max"] = max(values)
    return out


# -- the device ----------------------------------------------------------------------------------
def measure_peaks(device: torch.device, dtype: torch.dtype, matmul_size: int | None = None, copy_bytes: int | None = None, repeats: int | None = None) -> DevicePeaks:
    """Best-of-``repeats`` matmul FLOP/s (in ``dtype``) and copy bandwidth (read + write) here."""
    cuda = device.type == "cuda"
    n = matmul_size or (8192 if cuda else 2048)
    size = copy_bytes or ((1 << 30) if cuda else (1 << 28))
    repeats = repeats or (20 if cuda else 8)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    product = torch.empty_like(a)
    src = torch.ones(size // a.element_size(), device=device, dtype=dtype)
    dst = torch.empty_like(src)
    matmul_ms = _best_ms(lambda: torch.mm(a, b, out=product), device, repeats)
    copy_ms = _best_ms(lambda: dst.copy_(src), device, repeats)
    return DevicePeaks(flops_per_s=2 * n**3 / (matmul_ms / 1e3), bytes_per_s=2 * src.numel() * src.element_size() / (copy_ms / 1e3))


def _best_ms(work: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        work()
    best = float("inf")
    for _ in range(repeats):
        clock = StageClock(device)
        with clock("work"):
            work()
        best = min(best, clock.summary()["work"])
    return best


def reset_peak_memory(device: torch.device) -> str:
    """Open a new peak-memory window; returns what :func:`peak_memory_bytes` will then measure."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated"
    try:  # Linux: writing 5 resets the RSS high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return "process RSS high-water mark (VmHWM), reset per cell"
    except OSError:
        return "process RSS high-water mark since the process started (ru_maxrss)"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    model = platform.processor() or "CPU"
    if cpuinfo.exists():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), model)
    threads = torch.get_num_threads()
    return f"{model} ({threads} thread{'s' if threads > 1 else ''})"


def decoder_weight_bytes(engine: PruningEngine) -> int:
    """Bytes of the weights a prefill or decode step reads: decoder layers, final norm, LM head."""
    adapter = engine.adapter
    modules = (adapter.layers, adapter.decoder.norm, adapter.lm_head)
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


# -- one cell ------------------------------------------------------------------------------------
PER_SAMPLE_COSTS = ("tflops", "tflops_vision", "kv_cache_bytes", "prefill_bound_ms", "tflops_decode_per_token", "decode_bound_ms")


def batch_costs(engine: PruningEngine, tokens: list[list[int]], decode_steps: int, peaks: DevicePeaks,
                image_size: tuple[int, int] = ProfileSettings.image_size) -> dict[str, float]:
    """Analytic FLOPs, KV bytes and roofline bounds of one batch; ``tokens[b][l]`` per layer, one
    ``image_size`` image per sample."""
    config = engine.model.config
    geometry = DecoderGeometry.from_config(config)
    element = engine.model.dtype.itemsize
    weights = decoder_weight_bytes(engine)
    flops = prefill_flops(geometry, tokens)
    kv = kv_cache_bytes(geometry, tokens, element)
    costs = {
        "tflops": flops / 1e12,
        "tflops_vision": vision_flops(config, len(tokens), *image_size) / 1e12,
        "kv_cache_bytes": kv,
        "prefill_bound_ms": roofline_ms(flops, weights + kv, peaks.flops_per_s, peaks.bytes_per_s),
    }
    if decode_steps:
        # step t reads the weights and the cache of the prompt + t tokens (its own included)
        step_bytes = weights + statistics.mean(kv_cache_bytes(geometry, tokens, element, t) for t in range(1, decode_steps + 1))
        step_flops = decode_flops_per_step(geometry, tokens, decode_steps)
        costs |= {
            "tflops_decode_per_token": step_flops / 1e12,
            "decode_bytes_per_token": step_bytes,
            "decode_bound_ms": roofline_ms(step_flops, step_bytes, peaks.flops_per_s, peaks.bytes_per_s),
        }
    return costs


@dataclass
class Measured:
    """What the timed passes of one cell gave."""

    passes: list[dict[str, float]] = field(default_factory=list)
    visual: torch.Tensor | None = None  # (B, L) visual tokens entering each layer
    peak_memory: int = 0


def profile_cells(
    engine: PruningEngine,
    inputs: dict[str, torch.Tensor],
    cells: list[tuple[Method, Budget]],
    settings: ProfileSettings,
    peaks: DevicePeaks,
    model_name: str,
    on_repeat: Callable[[int], None] = lambda done: None,
) -> list[Record]:
    """Time every (method, budget) and attach its analytic costs: one ``kind="profile"`` record each.

    Every cell is warmed up, then the timed passes are interleaved (repeat r runs each cell once),
    so a device whose speed drifts (a shared CPU, a GPU warming up) drifts for all cells alike.
    """
    device = engine.device
    for method, budget in cells:
        for _ in range(settings.warmup):
            timed_pass(engine, inputs, method, budget, settings.decode_tokens)
    measured = [Measured() for _ in cells]
    memory_kind = ""
    for repeat in range(settings.repeats):
        for (method, budget), cell in zip(cells, measured):
            memory_kind = reset_peak_memory(device)
            times, cell.visual = timed_pass(engine, inputs, method, budget, settings.decode_tokens)
            cell.passes.append(times)
            cell.peak_memory = max(cell.peak_memory, peak_memory_bytes(device))
        on_repeat(repeat + 1)
    return [
        cell_record(engine, inputs, method, budget, cell, memory_kind, settings, peaks, model_name)
        for (method, budget), cell in zip(cells, measured)
    ]


def cell_record(
    engine: PruningEngine,
    inputs: dict[str, torch.Tensor],
    method: Method,
    budget: Budget,
    cell: Measured,
    memory_kind: str,
    settings: ProfileSettings,
    peaks: DevicePeaks,
    model_name: str,
) -> Record:
    """The record of one measured cell.

    Like eval records, times, FLOPs and KV bytes are per sample (the batch's divided by its size);
    the roofline fractions are the batch's, and peak memory is the process's.
    """
    device = engine.device
    stats = summarise(cell.passes)
    visual, peak_memory = cell.visual, cell.peak_memory

    n_visual = (inputs["input_ids"] == engine.adapter.image_token_id).sum(-1).cpu()
    text = inputs["attention_mask"].sum(-1).cpu() - n_visual
    tokens = (visual + text[:, None]).tolist()  # [sample][layer] tokens entering each layer
    batch = len(tokens)
    costs = batch_costs(engine, tokens, settings.decode_tokens - 1, peaks, settings.image_size)
    dynamic = engine.model.config.model_type != "llava"  # visual tokens depend on the image size
    image = "x".join(map(str, settings.image_size))
    timing = {name: ms / batch for name, ms in stats.items()}
    timing |= {name: value / batch for name, value in costs.items() if name in PER_SAMPLE_COSTS}
    timing |= {
        "prefill_tflops_per_s": costs["tflops"] / (stats["prefill"] / 1e3),
        "roofline_fraction": costs["prefill_bound_ms"] / stats["prefill"],
        "peak_memory_bytes": peak_memory,
    }
    if "decode_per_token" in stats:
        timing |= {
            "decode_roofline_fraction": costs["decode_bound_ms"] / stats["decode_per_token"],
            "decode_bandwidth_gbs": costs["decode_bytes_per_token"] / 1e9 / (stats["decode_per_token"] / 1e3),
        }
    return Record(
        key=RecordKey(
            model=model_name, method=method.spec(), budget=str(budget), task="profile",
            setting=f"{str(engine.model.dtype).removeprefix('torch.')},batch={batch},"
                    f"prompt={settings.prompt_tokens},decode={settings.decode_tokens},"
                    f"{f'image={image},' if dynamic else ''}{device_name(device)}",
        ),
        kind="profile",
        n_samples=settings.repeats * batch,
        **cell_fields(method, budget, kept=visual[:, -1].float().mean().item(), equivalent=visual.float().mean().item(),
                      original=n_visual.float().mean().item()),
        timing=timing,
        provenance=provenance(
            device=device_name(device),
            dtype=str(engine.model.dtype).removeprefix("torch."),
            command="",  # set by the caller, which knows the command line
            device_type=device.type,
            timer="cuda events" if device.type == "cuda" else "time.perf_counter",
            batch_size=batch,
            prompt_tokens=settings.prompt_tokens,
            sequence_tokens=int(inputs["input_ids"].shape[1]),
            **({"image_size": image} if dynamic else {}),
            warmup=settings.warmup,
            repeats=settings.repeats,
            decode_tokens=settings.decode_tokens,
            peak_tflops_per_s=peaks.flops_per_s / 1e12,
            peak_bandwidth_gbs=peaks.bytes_per_s / 1e9,
            peak_memory=memory_kind,
            flops_formula=FORMULA,
            roofline_bytes=ROOFLINE_BYTES,
            threads=torch.get_num_threads(),
        ),
    )


def plan_cells(methods: list[Method], budgets: list[Budget], n_visual: int, num_layers: int) -> list[tuple[Method, Budget]]:
    """The unpruned baseline first (speedups are against it), then every pruning method x budget.

    A method that never prunes (``stage == "none"``) is the baseline whatever the budget. A budget
    a method cannot meet on this image fails here, before any timing.
    """
    cells: list[tuple[Method, Budget]] = [(create_method("none"), Budget.all())]
    for method in methods:
        if method.stage == "none":
            continue
        for budget in budgets:
            try:
                method.schedule(n_visual, budget, num_layers)
            except BudgetError as err:
                raise BudgetError(f"method {method.spec()!r} at budget {budget}: {err}") from None
            cells.append((method, budget))
    return cells


# -- models --------------------------------------------------------------------------------------
def load_profile_model(name: str, random_weights: bool, device: torch.device, dtype: str) -> tuple[nn.Module, str, bool]:
    """(model, the model name records carry, random weights?) for a built-in, preset or checkpoint.

    ``random:tiny-llava``/``random:mid-llava`` and the tiny LLaVA-NeXT / Qwen-VL models
    (``random:tiny-llava-next``, ...) are built in code; a preset (``llava-1.5-7b``,
    ``random:llava-1.5-7b``, or the hub id it transcribes with ``--random-weights``) is built from
    its shipped config with random weights on the device; anything else loads real weights.
    """
    if name in BUILTIN_RANDOM or name in BUILTIN_BACKBONES:
        model, _ = load_model(name, device=str(device), dtype=dtype)
        return model, name, True
    preset = resolve_preset(name)
    if preset is not None and (random_weights or name.removeprefix("random:") == preset):
        check_engine_support(preset)
        return build_random_model(preset, device, DTYPES[dtype]), f"random:{preset}", True
    if random_weights or name.startswith("random:"):
        raise PresetError(
            f"no random-weight model {name!r}; valid choices: {', '.join([*BUILTIN_RANDOM, *BUILTIN_BACKBONES])}, "
            f"{', '.join(preset_names())}"
        )
    model, _ = load_model(name, device=str(device), dtype=dtype)
    return model, name, False


# -- the table -----------------------------------------------------------------------------------
def profile_table(records: list[Record]) -> Table:
    """One row per record; speedups against the unpruned baseline among them; times as
    ``median ±half-range`` ms over the timed passes."""
    base = next((r for r in records if r.key.method == "none" and r.key.budget == "all"), None)
    rows = {}
    for r in records:
        t = r.timing
        rows[(r.key.budget, r.key.method)] = {
            "visual/layer": r.visual_tokens["equivalent"],
            **{f"{label} ms": _spread(t, stage) if stage in t else None for stage, label in STAGE_LABELS.items()},
            "prefill x": base.timing["prefill"] / t["prefill"] if base else None,
            "TTFT x": base.timing["ttft"] / t["ttft"] if base else None,
            "TFLOPs": t["tflops"],
            "KV MiB": t["kv_cache_bytes"] / 2**20,
            "peak MiB": t["peak_memory_bytes"] / 2**20,
            "roofline %": 100 * t["roofline_fraction"],
        }
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["K", "method"])  # grouped by budget, as papers
    columns = {"visual/layer": Column("int"), **{f"{label} ms": Column("text") for label in STAGE_LABELS.values()},
               "prefill x": Column("number", 2), "TTFT x": Column("number", 2), "TFLOPs": Column("number", 4),
               "KV MiB": Column("number", 1), "peak MiB": Column("int"), "roofline %": Column("int")}
    return Table("profile", "prunebench profile", frame, columns)


STAGE_LABELS = {"vision": "vision", "pruner": "pruner", "prefill": "prefill", "ttft": "TTFT", "decode_per_token": "decode/tok"}


def _spread(timing: dict[str, float], stage: str) -> str:
    """``median ±half-range`` in ms."""
    half = (timing[f"{stage}_max"] - timing[f"{stage}_min"]) / 2
    return f"{timing[stage]:.2f} ±{half:.2f}"


def report_header(records: list[Record], model_name: str, command: str) -> str:
    p = records[0].provenance
    image = f" (one {p['image_size']} px image)" if "image_size" in p else ""
    return "\n".join([
        f"# prunebench profile: {model_name}",
        "",
        f"- command: `{command}`",
        f"- device: {p['device']} ({p['device_type']}, timer: {p['timer']}), dtype {p['dtype']}, batch {p['batch_size']}",
        (f"- prompt: {p['prompt_tokens']} text tokens + {records[0].visual_tokens['original']:.0f} visual tokens"
         f"{image}; "
         f"{p['warmup']} warm-up + {p['repeats']} timed passes per cell, interleaved; "
         f"{p['decode_tokens']} generated tokens per pass"),
        f"- measured peaks: {p['peak_tflops_per_s']:.3f} TFLOP/s matmul, {p['peak_bandwidth_gbs']:.1f} GB/s copy",
        f"- FLOPs: {p['flops_formula']}",
        f"- roofline bytes: {p['roofline_bytes']}; peak memory: {p['peak_memory']}",
        ("- roofline % = prefill bound / measured prefill; above 100 % the measured peaks understate the device "
         "(a busy, shared CPU does that)"),
        ("- per sample (a batch's figures / its size); times: median ±half-range over the timed passes, ms; "
         "x = speedup over the unpruned baseline"),
        "",
    ])


# -- the whole command ----------------------------------------------------------------------------
@dataclass
class ProfileRequest:
    """Everything `prunebench profile` needs; the command line fills it (prunebench.commands.profile)."""

    model: str = "random:mid-llava"
    methods: str = "none,random"
    budgets: str = "192,128,64"
    random_weights: bool = False
    dtype: str | None = None  # None: bfloat16 on CUDA; on CPU bfloat16 with bf16 units, else float32
    device: str | None = None  # None: cuda if available, else cpu
    settings: ProfileSettings = field(default_factory=ProfileSettings)
    threads: int | None = None
    results: str = "results"
    markdown: str | None = None  # also write the table with its settings here
    command: str = "prunebench profile"  # the command line that reproduces it, recorded in provenance


def profile(request: ProfileRequest, console: Console | None = None) -> list[Record]:
    """Time every cell, store its record, print the table (and write it with its settings)."""
    console = console or Console(stderr=True)
    device = torch.device(request.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {request.device}: this torch sees no CUDA device; use --device cpu")
    dtype = request.dtype or ("bfloat16" if device.type == "cuda" else cpu_dtype())
    if request.threads:
        torch.set_num_threads(request.threads)
    methods = [create_method(spec) for spec in parse_method_list(request.methods)]
    budgets = [Budget.parse(b) for b in request.budgets.split(",") if b.strip()]
    settings = request.settings
    store = ResultStore(request.results)
    store.check_writable()

    model, model_name, random_weights = load_profile_model(request.model, request.random_weights, device, dtype)
    engine = PruningEngine(model)
    inputs = synthetic_batch(model.config, settings.batch_size, settings.prompt_tokens, device, model.dtype,
                             image_size=settings.image_size)
    n_visual = int((inputs["input_ids"][0] == engine.adapter.image_token_id).sum())
    cells = plan_cells(methods, budgets, n_visual, engine.adapter.num_layers)
    peaks = measure_peaks(device, model.dtype)
    console.print(f"{device_name(device)}: {peaks.flops_per_s / 1e12:.3f} TFLOP/s matmul, "
                  f"{peaks.bytes_per_s / 1e9:.1f} GB/s copy (measured, {dtype})")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task(f"{len(cells)} cells x {settings.repeats} timed passes (after {settings.warmup} warm-up), "
                                "interleaved", total=settings.repeats)
        records = profile_cells(engine, inputs, cells, settings, peaks, model_name,
                                on_repeat=lambda done: progress.update(bar, completed=done))
    for record in records:
        record.provenance |= {"command": request.command, "random_weights": random_weights}
        store.write(record)
    table = profile_table(records)
    print(render(table, "md"))
    if request.markdown:
        Path(request.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(request.markdown).write_text(report_header(records, model_name, request.command) + "\n" + render(table, "md") + "\n")
    return records
