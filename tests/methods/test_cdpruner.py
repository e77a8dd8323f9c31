"""CDPruner: the kept set equals a plain-loop float64 greedy MAP of the conditional DPP, with the
relevance rebuilt independently (LLM embeddings of the prompt's text; or a tiny CLIP checkpoint
made in code, its text tower run by hand on the raw question); each greedy pick maximises the
determinant; keep-all is exact; batching changes nothing; refusals per backbone."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from prunebench.methods.cdpruner import EXHAUSTED, conditional_dpp, instruction
from support.models import QUESTIONS, build_backbone, run
from support.references import (
    MAX_NEW,
    assert_batch_equals_each_alone,
    assert_matches,
    eos_of,
)

from prunebench.engine.method import MethodError, create_method
from prunebench.errors import ModelNotFoundError
from prunebench.models.tiny import build_tokenizer

N = 576


def slow_greedy_map(kernel: list[list[float]], k: int, fallback: list[float]) -> list[int]:
    """Greedy MAP of a DPP, one token at a time on Python floats: pick the largest remaining gain,
    append its Cholesky row, lower every gain; once the best gain is <= EXHAUSTED, the rest go by
    descending ``fallback``. Returns the picks in order."""
    n = len(kernel)
    gains = [kernel[i][i] for i in range(n)]
    rows: list[list[float]] = []
    picks: list[int] = []
    spent = False
    for _ in range(k):
        free = [i for i in range(n) if i not in picks]
        best = max(free, key=lambda i: (gains[i], -i))
        spent = spent or gains[best] <= EXHAUSTED
        if spent:
            picks.append(max(free, key=lambda i: (fallback[i], -i)))
            continue
        root = math.sqrt(gains[best])
        row = [(kernel[best][i] - sum(r[best] * r[i] for r in rows)) / root for i in range(n)]
        rows.append(row)
        picks.append(best)
        gains = [g - e * e for g, e in zip(gains, row)]
    return picks


def slow_cdpruner(projected: torch.Tensor, raw_relevance: list[float], k: int, theta: float | None = None) -> list[int]:
    """One image: min-max the relevance, build diag(r) S diag(r) from the projected tokens' cosines,
    run the greedy loop; kept patches sorted."""
    low, high = min(raw_relevance), max(raw_relevance)
    r = [(x - low + 1e-6) / (high - low) for x in raw_relevance]
    if theta is not None:
        r = [math.exp(theta / (2 * (1 - theta)) * x) for x in r]
    unit = projected.double() / projected.double().norm(dim=-1, keepdim=True)
    cos = (unit @ unit.T).tolist()
    n = len(r)
    kernel = [[r[i] * cos[i][j] * r[j] for j in range(n)] for i in range(n)]
    return sorted(slow_greedy_map(kernel, k, r))


def cosines(tokens: torch.Tensor, query: torch.Tensor) -> list[float]:
    """Cosine of each row of ``tokens`` (N, d) with ``query`` (d,), float64, one at a time."""
    q = query.double()
    return [float(t.double() @ q / (t.double().norm() * q.norm())) for t in tokens]


@pytest.fixture(scope="module")
def projected(tiny, batch):
    """``(3, N, D)`` projected tokens from HF's own LLaVA feature path."""
    model, _ = tiny
    with torch.no_grad():
        out = model.model.get_image_features(
            pixel_values=batch["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output
    return torch.stack(list(out))


@pytest.fixture(scope="module")
def llm_relevance_raw(tiny, batch, projected):
    """Per image: cosine of each projected token with the mean input embedding of its prompt's text
    tokens (padding and image tokens excluded)."""
    model, _ = tiny
    out = []
    with torch.no_grad():
        for b in range(3):
            ids = batch["input_ids"][b][batch["attention_mask"][b].bool()]
            text = ids[ids != model.config.image_token_id]
            mean = model.get_input_embeddings()(text).double().mean(0)
            out.append(cosines(projected[b], mean))
    return out


@pytest.mark.parametrize("spec,k,theta", [("cdpruner:text=llm", 16, None), ("cdpruner:text=llm", 48, None),
                                          ("cdpruner:text=llm,theta=0.5", 32, 0.5)])
def test_llm_relevance_equals_plain_loop_reference(engine, batch, projected, llm_relevance_raw, spec, k, theta):
    gen = run(engine, batch, create_method(spec), budget=k, max_new_tokens=1)
    assert gen.visual_tokens.tolist() == [[k] * engine.adapter.num_layers] * 3
    for b in range(3):
        assert gen.kept_patches[b] == slow_cdpruner(projected[b], llm_relevance_raw[b], k, theta)


def test_each_greedy_pick_maximises_the_determinant():
    """The fast updates are the greedy MAP: pick t is the token whose addition gives the largest
    det(L_S), checked by brute force on random kernels."""
    generator = torch.Generator().manual_seed(0)
    for seed in range(3):
        features = torch.randn(2, 12, 8, generator=generator)
        relevance = torch.rand(2, 12, generator=generator) + 0.1
        mask = torch.ones(2, 12, dtype=torch.bool)
        picks = conditional_dpp(features, relevance, mask, 6)
        unit = torch.nn.functional.normalize(features.double(), dim=-1)
        kernel = relevance.double()[:, :, None] * unit @ unit.transpose(1, 2) * relevance.double()[:, None, :]
        for b in range(2):
            chosen: list[int] = []
            for pick in picks[b].tolist():
                dets = {j: float(torch.det(kernel[b][chosen + [j]][:, chosen + [j]])) for j in range(12) if j not in chosen}
                assert dets[pick] == pytest.approx(max(dets.values()), rel=1e-4), seed
                chosen.append(pick)


def test_rank_exhaustion_falls_back_to_relevance_without_repeats():
    """40 tokens in 5 dimensions: after 5 picks every gain is ~0 (the official code then takes the
    square root of a non-positive number and repeats tokens); the rest follow relevance."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 40, 5, generator=generator)
    relevance = torch.rand(1, 40, generator=generator)
    picks = conditional_dpp(features, relevance, torch.ones(1, 40, dtype=torch.bool), 12)[0].tolist()
    assert len(set(picks)) == 12
    unit = torch.nn.functional.normalize(features[0].double(), dim=-1)
    r = relevance[0].double()
    kernel = (r[:, None] * (unit @ unit.T) * r[None]).tolist()
    assert picks == slow_greedy_map(kernel, 12, r.tolist())
    rest = [j for j in sorted(range(40), key=lambda j: -float(r[j])) if j not in picks[:5]]
    assert picks[5:] == rest[:7]


def test_padded_batch_of_different_counts_equals_each_alone():
    """Images with different token counts (Qwen-VL, LLaVA-NeXT) and different K in one padded batch."""
    generator = torch.Generator().manual_seed(4)
    features, relevance = torch.randn(2, 30, 6, generator=generator), torch.rand(2, 30, generator=generator)
    mask = torch.arange(30)[None] < torch.tensor([[30], [21]])
    both = conditional_dpp(features, relevance * mask, mask, 9)
    alone = conditional_dpp(features[1:, :21], relevance[1:, :21], mask[1:, :21], 7)
    assert both[1, :7].tolist() == alone[0].tolist() and max(both[1, :7].tolist()) < 21


def test_instruction_is_the_question_without_template_and_format_suffix():
    assert instruction("\nWhat is it?\nAnswer the question using a single word or phrase. ASSISTANT:") == "What is it?"
    assert instruction("what color is the circle ? assistant :") == "what color is the circle ?"  # tiny tokenizer's decode
    assert instruction("Question?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.") == (
        "Question?\nA. x\nB. y")


# -- the official relevance: CLIP's text tower ------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel whose vision width (32) matches the tiny LLaVA's tower, with the
    tiny word-level tokenizer, saved as safetensors: what cdpruner:clip= loads."""
    from transformers import CLIPConfig, CLIPModel

    def save(width: int):
        tokenizer = build_tokenizer()
        config = CLIPConfig(
            text_config={"vocab_size": len(tokenizer), "hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": tokenizer.eos_token_id,
                         "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                         "projection_dim": 16},
            vision_config={"hidden_size": width, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "image_size": 28, "patch_size": 14, "projection_dim": 16},
            projection_dim=16,
        )
        torch.manual_seed(1)
        model = CLIPModel(config)
        with torch.no_grad():  # a non-trivial final norm, so that the test sees it applied
            model.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
            model.vision_model.post_layernorm.bias.normal_(0, 0.1)
        directory = tmp_path_factory.mktemp(f"clip{width}")
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory

    return save(32), save(16)


def clip_relevance_raw(directory, eager_hidden, question: str) -> list[float]:
    """-(cosine of CLIP image and text embeddings), chunk-averaged, computed from a separately
    loaded CLIPModel: patch states -> post_layernorm -> visual_projection; the question tokenized
    whole and cut into 77-token chunks padded with id 0 / mask 0."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(directory).double().eval()
    ids = AutoTokenizer.from_pretrained(directory)(question)["input_ids"]
    chunks = [ids[i : i + 77] for i in range(0, len(ids), 77)]
    with torch.no_grad():
        image = model.visual_projection(model.vision_model.post_layernorm(eager_hidden.double()))
        texts = []
        for chunk in chunks:
            padded = torch.tensor([chunk + [0] * (77 - len(chunk))])
            mask = torch.tensor([[1] * len(chunk) + [0] * (77 - len(chunk))])
            texts.append(model.text_projection(model.text_model(input_ids=padded, attention_mask=mask).pooler_output)[0])
    return [-sum(c for c in (cosines(image[i : i + 1], t)[0] for t in texts)) / len(texts) for i in range(image.shape[0])]


@pytest.fixture(scope="module")
def vision_states(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        return model.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]


@pytest.mark.parametrize("k", [24, 40])
def test_clip_relevance_equals_plain_loop_reference(engine, batch, projected, vision_states, clip_dir, k):
    gen = run(engine, batch, create_method(f"cdpruner:clip={clip_dir[0]}"), budget=k, max_new_tokens=1)
    for b in range(3):
        raw = clip_relevance_raw(clip_dir[0], vision_states[b], QUESTIONS[b])
        assert gen.kept_patches[b] == slow_cdpruner(projected[b], raw, k)


def test_clip_text_chunks_of_a_long_instruction(clip_dir):
    """Over 77 tokens, the text is encoded in chunks whose embeddings the relevance averages."""
    from transformers import AutoTokenizer, CLIPModel

    from prunebench.models.clip_text import load_clip_space

    question = " ".join(itertools.islice(itertools.cycle(["what", "color", "is", "the", "red", "circle", "?"]), 160))
    space = load_clip_space(str(clip_dir[0]))
    embeds = space.text_embeds(question)
    ids = AutoTokenizer.from_pretrained(clip_dir[0])(question)["input_ids"]
    assert embeds.shape == (math.ceil(len(ids) / 77), 16)
    model = CLIPModel.from_pretrained(clip_dir[0]).eval()
    last = ids[154:]
    with torch.no_grad():
        pooled = model.text_model(input_ids=torch.tensor([last + [0] * (77 - len(last))]),
                                  attention_mask=torch.tensor([[1] * len(last) + [0] * (77 - len(last))])).pooler_output
    torch.testing.assert_close(embeds[2], model.text_projection(pooled)[0], atol=1e-5, rtol=1e-5)


def test_keep_all_reproduces_generate(tiny, engine, batch, reference, clip_dir):
    eos = eos_of(tiny[0])
    for spec in ("cdpruner:text=llm", f"cdpruner:clip={clip_dir[0]}"):
        gen = run(engine, batch, create_method(spec), budget="all", max_new_tokens=MAX_NEW, eos_token_id=list(eos) or None)
        assert_matches(gen, reference, eos)
        assert gen.kept_patches == [list(range(N))] * 3


@pytest.mark.parametrize("spec,budget", [("cdpruner:text=llm", 64), ("cdpruner:text=llm,theta=0.5", "12.5%"), ("clip", 48)])
def test_batch_of_three_equals_each_alone(tiny, engine, batch, clip_dir, spec, budget):
    _, processor = tiny
    spec = f"cdpruner:clip={clip_dir[0]}" if spec == "clip" else spec
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget, max_new_tokens=6)


def test_the_clip_checkpoint_keys_the_records(clip_dir):
    """Its files change what is selected, so their contents belong to a record's key."""
    files = {path.name for path in create_method(f"cdpruner:clip={clip_dir[0]}").input_files()}
    assert {"model.safetensors", "config.json"} <= files
    assert create_method("cdpruner:text=llm").input_files() == []


def test_bad_settings_are_clear_errors(engine, batch, clip_dir, tmp_path):
    with pytest.raises(ModelNotFoundError, match="cannot load the CLIP checkpoint .*download it first"):
        create_method(f"cdpruner:clip={tmp_path / 'absent'}")
    with pytest.raises(MethodError, match="theta=1.0 must lie in"):
        create_method("cdpruner:text=llm,theta=1")
    with pytest.raises(MethodError, match="has vision width 16, this tower 32"):
        run(engine, batch, create_method(f"cdpruner:clip={clip_dir[1]}"), budget=64, max_new_tokens=1)


@pytest.mark.parametrize("name,message", [("llava-next", "vision features are not available on this backbone"),
                                          ("qwen2-vl", "no CLIP text space"), ("qwen2.5-vl", "no CLIP text space")])
def test_clip_relevance_refuses_backbones_without_a_clip_tower(clip_dir, name, message):
    backbone = build_backbone(name)
    with pytest.raises(MethodError, match=message):
        run(backbone.engine, backbone.batch, create_method(f"cdpruner:clip={clip_dir[1]}"), budget="50%", max_new_tokens=1)
