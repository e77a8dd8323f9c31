"""Visual tokens and vision FLOPs of the dynamic-resolution backbones (LLaVA-NeXT and OneVision
anyres, Qwen2/2.5/3-VL, InternVL tiles, SmolVLM tiles): against the processors, torch's FLOP
counter, hand counts of the 7-8B presets, and `prunebench profile` end to end on the tiny models."""

from __future__ import annotations

import pytest
import torch
from support.models import build_backbone, make_image
from support.tables import squeeze, table_row
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from prunebench.budget import Budget
from prunebench.commands import main as cli
from prunebench.engine.method import create_method
from prunebench.engine.timing import StageClock
from prunebench.models.backbones import (
    NEXT_PROMPT_TEMPLATE,
    QWEN_PROMPT_TEMPLATE,
    QwenVLInputs,
)
from prunebench.models.tiny import build_tokenizer
from prunebench.profiling import presets, profiler
from prunebench.profiling.flops import (
    DecoderGeometry,
    image_tokens,
    kv_cache_bytes,
    max_image_tokens,
    prefill_flops,
    qwen_windows,
    vision_flops,
)
from prunebench.profiling.presets import preset_config
from prunebench.results import ResultStore

CPU = torch.device("cpu")
PEAKS = profiler.DevicePeaks(flops_per_s=1e11, bytes_per_s=1e10)
# (height, width) px: wide, tall, square, extreme; on Qwen2.5-VL's tiny 2x2-token windows several are cut at the edges;
# 170x160 gives the tiny LLaVA-OneVision a 3x3 crop grid whose 12x12 tokens are interpolated to 8x8 (anyres_max_4)
SIZES = [(56, 100), (112, 60), (80, 80), (300, 40), (252, 168), (170, 160)]


@pytest.fixture(scope="module", params=["llava-next", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "internvl3", "internvl3.5",
                                        "llava-onevision", "smolvlm", "smolvlm2"])
def eager_backbone(request):
    """Eager attention: its matmuls are visible to FlopCounterMode (CPU SDPA is not)."""
    return build_backbone(request.param, attn_implementation="eager")


def count(backbone, height: int, width: int):
    inputs = backbone.processor(images=[make_image(height, width, 0)], text=[backbone.template.format(question="what")],
                                return_tensors="pt")
    return inputs, int((inputs["input_ids"] == backbone.model.config.image_token_id).sum())


@pytest.mark.parametrize("height,width", SIZES)
def test_visual_tokens_match_the_processor_and_the_engine(eager_backbone, height, width):
    inputs, n = count(eager_backbone, height, width)
    assert image_tokens(eager_backbone.model.config, height, width) == n
    with torch.inference_mode():
        vision = eager_backbone.engine.adapter.encode_images(
            inputs["pixel_values"], **eager_backbone.engine.adapter.image_inputs(inputs))
    assert vision.counts == [n]


@pytest.mark.parametrize("height,width", SIZES)
def test_vision_and_prefill_flops_equal_torchs_flop_counter(eager_backbone, height, width):
    """One pruned prefill under FlopCounterMode = vision_flops + prefill_flops of the tokens the
    engine reports per layer (random selects with no matmul of its own)."""
    inputs, n = count(eager_backbone, height, width)
    engine = eager_backbone.engine
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        state = engine.prefill(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                               create_method("random"), Budget.parse("50%"), StageClock("cpu", enabled=False),
                               engine.adapter.image_inputs(inputs))
    config = eager_backbone.model.config
    text = int(inputs["attention_mask"].sum()) - n
    tokens = (state.visual_tokens + text).tolist()
    expected = vision_flops(config, 1, height, width) + prefill_flops(DecoderGeometry.from_config(config), tokens)
    assert counter.get_total_flops() == expected


# -- the 7B presets, by hand -------------------------------------------------------------------------
def next_7b_processor() -> LlavaNextProcessor:
    """LLaVA-NeXT-7B's image geometry (336 px crops, its pinpoints) with the tokenizer made in code."""
    config = preset_config("llava-next-7b")
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                        image_grid_pinpoints=config.image_grid_pinpoints)
    return LlavaNextProcessor(image_processor=images, tokenizer=build_tokenizer(), patch_size=14,
                              vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)


@pytest.mark.parametrize("height,width,expected", [
    (336, 672, 576 + 24 * 48 + 24),  # pinpoint 336x672: base + 1x2 crops of 24x24, a newline per row
    (672, 672, 576 + 48 * 48 + 48),  # the largest: 2928
    (480, 640, None),  # a COCO-sized photo: unpadded rows
    (1000, 200, None),
])
def test_llava_next_7b_tokens(height, width, expected):
    config = preset_config("llava-next-7b")
    processor = next_7b_processor()
    prompt = NEXT_PROMPT_TEMPLATE.format(question="what")
    inputs = processor(images=[make_image(height, width, 1)], text=[prompt], return_tensors="pt")
    n = int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert image_tokens(config, height, width) == n
    if expected is not None:
        assert n == expected
    assert max_image_tokens(config) == 2928


def test_qwen2_vl_7b_tokens_follow_its_processor():
    """Qwen2-VL-7B's processor (default min/max pixels): 448x448 px -> 32x32 patches -> 256 tokens."""
    config = preset_config("qwen2-vl-7b")
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"], special_tokens=True)
    processor = QwenVLInputs(Qwen2VLImageProcessorPil(), tokenizer)
    for height, width in [(448, 448), (480, 640), (224, 896)]:
        inputs = processor(images=[make_image(height, width, 2)], text=[QWEN_PROMPT_TEMPLATE.format(question="what")])
        assert image_tokens(config, height, width) == int((inputs["input_ids"] == processor.image_token_id).sum())
        assert image_tokens(config, height, width) == int(inputs["image_grid_thw"].prod()) // 4
    assert image_tokens(config, 448, 448) == (448 // 14) ** 2 // 4 == 256
    assert max_image_tokens(config, processor.image_processor) == 28 * 28 * 1280 // 28**2  # max_pixels / (28 px)^2


def test_qwen2_vl_7b_vision_flops_by_hand():
    """448x448 px: P = 1024 patches, d = 1280, MLP 4d = 5120, merger 4d -> 4d -> 3584 on 256 tokens.
    MACs: patch embedding P x (3 x 2 x 14 x 14) x d; per block 4Pd^2 + 2P^2d + 2Pdm; 32 blocks."""
    p, d = 1024, 1280
    macs = p * 1176 * d + 32 * (4 * p * d * d + 2 * p * p * d + 2 * p * d * 5120) + 256 * (5120 * 5120 + 5120 * 3584)
    assert vision_flops(preset_config("qwen2-vl-7b"), 1, 448, 448) == 2 * macs
    assert 2 * macs / 1e12 == pytest.approx(1.486, abs=1e-3)


def test_qwen2_5_vl_7b_vision_flops_by_hand():
    """448x448 px: 16x16 merged tokens in 112 px windows of 4x4 tokens -> 16 windows of 64 patches;
    blocks 7, 15, 23, 31 attend over all 1024 patches, the other 28 within their window; gated MLP
    of 3420."""
    config = preset_config("qwen2.5-vl-7b")
    assert qwen_windows(config, 32, 32) == [64] * 16
    p, d = 1024, 1280
    attention = 28 * 2 * d * 16 * 64 * 64 + 4 * 2 * p * p * d
    macs = p * 1176 * d + 32 * (4 * p * d * d + 3 * p * d * 3420) + attention + 256 * (5120 * 5120 + 5120 * 3584)
    assert vision_flops(config, 1, 448, 448) == 2 * macs
    # an image that is not a whole number of windows: 644x476 px -> 23x17 merged tokens
    assert qwen_windows(config, 46, 34) == ([64] * 4 + [16]) * 5 + [48] * 4 + [12]


def test_llava_next_7b_vision_flops_are_clip_per_crop():
    """336x672 px: base + 2 crops through CLIP-L/336 (all 24 layers: HF's get_image_features runs
    them; LLaVA-1.5's engine stops at the feature layer, so compare with a config reading the last);
    the projector on all 3 x 576 features."""
    next_config, llava_config = preset_config("llava-next-7b"), preset_config("llava-1.5-7b")
    llava_config.vision_feature_layer = -1
    assert vision_flops(next_config, 1, 336, 672) == 3 * vision_flops(llava_config, 1)
    assert vision_flops(next_config, 2, 672, 672) == 10 * vision_flops(llava_config, 1)


def test_7b_decoder_costs_at_their_visual_tokens():
    """LLM prefill and KV cache at the preset's tokens: Qwen2-VL-7B (GQA, 4 x 128 KV width) at 256
    visual + 64 text tokens; LLaVA-NeXT-7B (MHA 4096) at 2928 + 64."""
    qwen = DecoderGeometry.from_config(preset_config("qwen2-vl-7b"))
    n = 256 + 64
    layer = n * 3584 * (3584 + 2 * 512) + n * 3584 * 3584 + 2 * n * n * 3584 + 3 * n * 3584 * 18944
    assert prefill_flops(qwen, [[n] * 28]) == 2 * 28 * layer + 2 * 3584 * 152064
    assert kv_cache_bytes(qwen, [[n] * 28], 2) == 2 * 28 * 512 * n * 2  # bf16: 18.4 MB
    llava_next = DecoderGeometry.from_config(preset_config("llava-next-7b"))
    n = 2928 + 64
    layer = 4 * n * 4096**2 + 2 * n * n * 4096 + 3 * n * 4096 * 11008  # MHA: 4nd^2 + 2n^2d + 3ndm
    assert prefill_flops(llava_next, [[n] * 32]) == 2 * 32 * layer + 2 * 4096 * 32064
    assert kv_cache_bytes(llava_next, [[n] * 32], 2) == 2 * 32 * 4096 * n * 2


# -- the 7-8B presets of the newer families, and SmolVLM's real geometry ---------------------------
def test_qwen3_vl_8b_tokens_follow_its_processor_and_vision_flops_by_hand():
    """Qwen3-VL-8B: one token per 32x32 px. 448x448 px: P = 784 patches of 16 px, d = 1152, MLP 4304,
    27 blocks; the merger and the 3 DeepStack mergers (4d -> 4d -> 4096) on the 196 tokens."""
    config = preset_config("qwen3-vl-8b")
    tokenizer = build_tokenizer(special=("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    processor = QwenVLInputs(Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2), tokenizer)
    for height, width in [(448, 448), (480, 640), (224, 896)]:
        inputs = processor(images=[make_image(height, width, 2)], text=[QWEN_PROMPT_TEMPLATE.format(question="what")])
        assert image_tokens(config, height, width) == int((inputs["input_ids"] == processor.image_token_id).sum())
    assert image_tokens(config, 448, 448) == 14 * 14
    p, d, wide = 784, 1152, 4 * 1152
    macs = p * 1536 * d + 27 * (4 * p * d * d + 2 * p * p * d + 2 * p * d * 4304) + 4 * 196 * (wide * wide + wide * 4096)
    assert vision_flops(config, 1, 448, 448) == 2 * macs


def test_internvl3_8b_tokens_follow_its_processor_and_vision_flops_by_hand():
    """InternVL3-8B: 448 px tiles of 256 tokens on the grid of 1..12 tiles closest to the image's
    aspect ratio, + a thumbnail when there are several. 448x896 px: 2 tiles + thumbnail, each
    InternViT-300M over 1 + 1024 tokens, the projector (4096 -> 3584 -> 3584) on 256."""
    from transformers import GotOcr2ImageProcessorPil, InternVLProcessor

    from prunebench.models.families import image_only

    config = preset_config("internvl3-8b")
    tokenizer = build_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    images = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12)
    processor = image_only(InternVLProcessor)(images, tokenizer, image_seq_length=256)
    for height, width in [(448, 448), (448, 896), (480, 640), (1000, 200), (1080, 1920)]:
        inputs = processor(images=[make_image(height, width, 3)], text=["USER: <IMG_CONTEXT>\nwhat ASSISTANT:"], return_tensors="pt")
        assert image_tokens(config, height, width) == int((inputs["input_ids"] == tokenizer.context_image_token_id).sum())
    assert image_tokens(config, 448, 896) == 3 * 256 and max_image_tokens(config, images) == 13 * 256
    seq, d = 1025, 1024
    tile = 1024 * 3 * 14 * 14 * d + 24 * (4 * seq * d * d + 2 * seq * seq * d + 2 * seq * d * 4096) + 256 * (4096 * 3584 + 3584 * 3584)
    assert vision_flops(config, 1, 448, 896) == 2 * 3 * tile


def test_llava_onevision_7b_tokens_follow_its_processor_and_vision_flops_by_hand():
    """LLaVA-OneVision-7B: 729 base tokens + the unpadded crop grid + a newline per row; a grid of
    more than 1.1^2 x 9 crops' worth is interpolated down (2304x2304 px: 162x162 -> 81x81)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from prunebench.models.families import image_only

    config = preset_config("llava-onevision-7b")
    images = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=config.image_grid_pinpoints)
    processor = image_only(LlavaOnevisionProcessor)(images, build_tokenizer(), num_image_tokens=729,
                                                     vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    for height, width in [(384, 768), (480, 640), (1000, 200), (2304, 2304)]:
        inputs = processor(images=[make_image(height, width, 4)], text=["USER: <image>\nwhat ASSISTANT:"], return_tensors="pt")
        assert image_tokens(config, height, width) == int((inputs["input_ids"] == processor.tokenizer.image_token_id).sum())
    assert image_tokens(config, 384, 768) == 729 + 27 * 54 + 27
    assert image_tokens(config, 2304, 2304) == 729 + 81 * 81 + 81
    d, m, big = 1152, 4304, 3584
    crop = 729 * 588 * d + 26 * (4 * 729 * d * d + 2 * 729 * 729 * d + 2 * 729 * d * m) + 729 * (d * big + big * big)
    assert vision_flops(config, 1, 384, 768) == 2 * 3 * crop  # base + 1x2 crops


def test_smolvlm_256m_geometry_tokens_follow_its_processor():
    """SmolVLM-256M's image geometry (512 px tiles, patch 16, pixel shuffle 4: 64 tokens a tile;
    longest edge 2048 px) with the decoder made small: the FLOPs model counts its tiles as
    Idefics3's processor cuts them."""
    from transformers import (
        Idefics3Config,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    config = Idefics3Config(vision_config={"image_size": 512, "patch_size": 16, "hidden_size": 768},
                            text_config={"model_type": "llama", "hidden_size": 64}, scale_factor=4)
    markers = tuple(f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5))
    tokenizer = build_tokenizer(special=("<fake_token_around_image>", "<global-img>", *markers))
    images = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    processor = Idefics3Processor(images, tokenizer, image_seq_len=64)
    for height, width in [(512, 512), (480, 640), (1000, 200), (300, 301)]:
        inputs = processor(images=[make_image(height, width, 5)], text=["USER: <image>\nwhat ASSISTANT:"], return_tensors="pt")
        assert image_tokens(config, height, width) == int((inputs["input_ids"] == tokenizer.image_token_id).sum())
    assert image_tokens(config, 480, 640) == (3 * 4 + 1) * 64 and max_image_tokens(config, images) == 17 * 64


# -- the profiler ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("llava-next-7b", (336, 672)), ("qwen2-vl-7b", (448, 448)), ("qwen2.5-vl-7b", (448, 448)),
                                       ("qwen3-vl-8b", (448, 448)), ("internvl3-8b", (448, 896)),
                                       ("llava-onevision-7b", (384, 768))])
def test_preset_profile_path_on_a_narrowed_copy(monkeypatch, name, size):
    """What `prunebench profile --model <preset> --random-weights` runs on a GPU (shipped config ->
    random weights on the device -> synthetic anyres / dynamic-resolution batch), on a copy narrowed
    to fit a CPU test: the visual tokens and vision FLOPs of the real image geometry."""
    real = presets.preset_config

    def narrow(preset):
        config = real(preset)
        config.text_config.update({"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32})
        if config.model_type in ("llava_next", "llava_onevision", "internvl"):
            config.vision_config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                         "num_attention_heads": 2})
        elif config.model_type == "qwen3_vl":
            config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": [8, 4, 4]}
            config.vision_config.update({"depth": 3, "num_heads": 2, "hidden_size": 32, "intermediate_size": 64,
                                         "out_hidden_size": 128, "deepstack_visual_indexes": [0, 1]})
        else:
            config.text_config.rope_parameters = {**config.text_config.rope_parameters, "mrope_section": [4, 6, 6]}
            wide = {"depth": 2, "num_heads": 2, "hidden_size": 32} | (
                {"intermediate_size": 64, "out_hidden_size": 128, "fullatt_block_indexes": [1]}
                if config.model_type == "qwen2_5_vl" else {"embed_dim": 32, "hidden_size": 128})
            config.vision_config.update(wide)
        return config

    monkeypatch.setattr(presets, "preset_config", narrow)
    model, model_name, random = profiler.load_profile_model(real(name)._name_or_path, True, CPU, "float32")
    assert (model_name, random) == (f"random:{name}", True)
    engine = profiler.PruningEngine(model)
    settings = profiler.ProfileSettings(batch_size=1, prompt_tokens=8, warmup=0, repeats=1, decode_tokens=2, image_size=size)
    inputs = profiler.synthetic_batch(model.config, 1, 8, CPU, model.dtype, image_size=size)
    cells = [(create_method("random"), Budget.parse(64))]
    (record,) = profiler.profile_cells(engine, inputs, cells, settings, PEAKS, model_name)
    n = {"llava-next-7b": 1752, "qwen2-vl-7b": 256, "qwen2.5-vl-7b": 256, "qwen3-vl-8b": 196,
         "internvl3-8b": 3 * 256, "llava-onevision-7b": 729 + 27 * 54 + 27}[name]
    assert record.visual_tokens["original"] == n == image_tokens(real(name), *size)
    assert record.timing["tflops_vision"] == pytest.approx(vision_flops(model.config, 1, *size) / 1e12)
    g = DecoderGeometry.from_config(model.config)
    assert record.timing["tflops"] == pytest.approx(prefill_flops(g, [[64 + 8] * 2]) / 1e12)
    assert record.provenance["image_size"] == "x".join(map(str, size)) and f"image={size[0]}x{size[1]}" in record.key.setting


@pytest.mark.parametrize("model", ["random:tiny-llava-next", "random:tiny-qwen2-vl", "random:tiny-qwen2.5-vl",
                                   "random:tiny-qwen3-vl", "random:tiny-internvl3.5", "random:tiny-llava-onevision",
                                   "random:tiny-smolvlm"])
def test_profile_cli_end_to_end_on_tiny_backbones(tmp_path, monkeypatch, capsys, model):
    real = profiler.measure_peaks
    monkeypatch.setattr(profiler, "measure_peaks", lambda device, dtype: real(device, dtype, 128, 1 << 20, 2))
    argv = ["profile", "--model", model, "--methods", "none,random", "--budgets", "25%,8", "--image-size", "140x112",
            "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--prompt-tokens", "8", "--results", str(tmp_path)]
    assert cli.main(argv) == 0
    records = {(r.key.method, r.key.budget): r for r in ResultStore(tmp_path).records()}
    assert set(records) == {("none", "all"), ("random", "25%"), ("random", "8")}
    config = profiler.load_profile_model(model, False, CPU, "float32")[0].config
    n = image_tokens(config, 140, 112)
    for (method, budget), record in records.items():
        kept = n if budget == "all" else Budget.parse(budget).resolve(n)
        assert record.visual_tokens["original"] == n and record.visual_tokens["mean_kept"] == kept
        assert record.timing["tflops_vision"] == pytest.approx(vision_flops(config, 1, 140, 112) / 1e12)
        assert record.provenance["image_size"] == "140x112" and "--image-size 140x112" in record.provenance["command"]
    assert table_row("8", "random", "8") in squeeze(capsys.readouterr().out)


def test_a_preset_without_a_flops_model_is_refused_clearly(monkeypatch):
    """A shipped config whose vision tower the FLOPs model does not know (SigLIP here) is refused,
    naming the architecture and what profiling it needs."""
    raw = presets._raw()
    siglip = dict(raw["llava-1.5-7b"], _name_or_path="someone/llava-siglip")
    siglip["vision_config"] = {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 224, "patch_size": 14}
    monkeypatch.setattr(presets, "_raw", lambda: {**raw, "llava-siglip": siglip})
    with pytest.raises(NotImplementedError, match="'llava-siglip'.*siglip_vision_model.*presets/llava-siglip.json"):
        presets.check_engine_support("llava-siglip")
