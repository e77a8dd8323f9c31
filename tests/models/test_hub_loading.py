"""Hub ids load as transformers loads them: downloaded on demand when online, from the cache only
with HF_HUB_OFFLINE=1 or an unreachable hub, where a missing one fails at once saying what to do.

The hub is :class:`support.hub.FakeHub` behind huggingface_hub's HTTP client (its boundary);
transformers' loaders run for real and are only watched."""

from __future__ import annotations

import time

import pytest
import torch
import transformers
from huggingface_hub import constants
from support.hub import COMMIT, FakeHub
from support.models import QUESTIONS, make_image

from prunebench.engine.generate import DecodeConfig, PruningEngine
from prunebench.models import hub, loading
from prunebench.models.families import SMOLVLM_PROMPT_TEMPLATE, build_tiny_smolvlm
from prunebench.models.hub import HubUnavailableError

REPO = "someone/tiny-smolvlm"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache for this test, downloads allowed."""
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path / "hf" / "hub"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A SmolVLM checkpoint directory (Idefics3 class, as SmolVLM-256M-Instruct) and its model."""
    model, processor = build_tiny_smolvlm("1")
    root = tmp_path_factory.mktemp("repo")
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root, model, processor


@pytest.fixture
def fake_hub(checkpoint):
    fake = FakeHub({REPO: checkpoint[0]})
    fake.install()
    yield fake
    FakeHub.uninstall()


@pytest.fixture
def spy(monkeypatch):
    """The keyword arguments every ``from_pretrained`` of the SmolVLM model class receives (the call
    itself goes through unchanged)."""
    calls = []
    model_class = transformers.Idefics3ForConditionalGeneration
    real = model_class.from_pretrained.__func__

    def watched(cls, name, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(model_class, "from_pretrained", classmethod(watched))
    return calls


def go_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def answers(model, processor, n: int = 2) -> list[list[int]]:
    images = [make_image(60 + 20 * i, 100, i) for i in range(n)]
    inputs = processor(images=images, text=[SMOLVLM_PROMPT_TEMPLATE.format(question=q) for q in QUESTIONS[:n]],
                       return_tensors="pt", padding=True)
    engine = PruningEngine(model, processor.tokenizer)
    gen = engine.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"].to(model.dtype),
                          decode=DecodeConfig(max_new_tokens=4), image_inputs=engine.adapter.image_inputs(inputs))
    return gen.tokens


def test_online_a_hub_id_downloads_onto_the_device_in_the_dtype(cache, fake_hub, spy, checkpoint):
    model, processor = loading.load_model(REPO, device="cpu", dtype="bfloat16")
    (kwargs,) = spy
    assert "local_files_only" not in kwargs  # downloads allowed, as transformers does by default
    assert kwargs["device_map"] == "cpu" and kwargs["dtype"] == torch.bfloat16 and kwargs["trust_remote_code"] is False
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {f"{COMMIT}/config.json", f"{COMMIT}/model.safetensors"} <= set(fake_hub.downloads())
    assert any(path.name == "model.safetensors" for path in cache.rglob("*"))  # it is in the cache now
    assert type(processor).__name__ == "Idefics3Processor" and processor.tokenizer.padding_side == "left"
    _, original, original_processor = checkpoint
    assert answers(model.float(), processor) == answers(original, original_processor)  # the same weights


def test_a_revision_is_asked_for(cache, fake_hub, spy):
    loading.load_model(REPO, revision="v1.0")
    assert spy[0]["revision"] == "v1.0"
    asked = {path for method, path in fake_hub.requests if path.startswith(f"/api/models/{REPO}/revision/")}
    assert asked == {f"/api/models/{REPO}/revision/v1.0"}  # the model and its processor, at that revision


def test_offline_a_cached_model_loads_from_the_cache_only(cache, fake_hub, spy, monkeypatch):
    loading.load_model(REPO)
    go_offline(monkeypatch)
    fake_hub.requests.clear()
    model, _ = loading.load_model(REPO)
    assert spy[-1]["local_files_only"] is True and fake_hub.requests == []
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"


def test_offline_a_missing_model_fails_fast_naming_what_to_run(cache, fake_hub, monkeypatch):
    go_offline(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as caught:
        loading.load_model(REPO, revision="v2")
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    assert REPO in message and str(cache) in message and "HF_HUB_OFFLINE" in message
    assert f"`hf download {REPO} --revision v2`" in message and "connected machine" in message
    assert fake_hub.requests == []


def test_an_unreachable_hub_fails_fast(cache, checkpoint, monkeypatch):
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 0.1)
    fake = FakeHub({REPO: checkpoint[0]}, reachable=False)
    fake.install()
    try:
        start = time.perf_counter()
        with pytest.raises(HubUnavailableError, match=r"cannot be reached.*hf download someone/tiny-smolvlm"):
            loading.load_model(REPO)
        assert time.perf_counter() - start < 5
    finally:
        FakeHub.uninstall()


def test_an_unknown_repository_says_so(cache, fake_hub):
    with pytest.raises(HubUnavailableError, match=r"'someone/nothing-here' from the hub \(.*not a valid model identifier"):
        loading.load_model("someone/nothing-here")


def test_an_architecture_without_an_adapter_is_refused_naming_the_supported_ones(cache, tmp_path, checkpoint):
    import json
    import shutil

    repo = tmp_path / "other"
    shutil.copytree(checkpoint[0], repo)
    config = json.loads((repo / "config.json").read_text())
    (repo / "config.json").write_text(json.dumps({**config, "architectures": ["Idefics3Model"]}))
    with pytest.raises(loading.UnsupportedModelError, match="Idefics3Model.*supported architectures: .*InternVLForConditionalGeneration"):
        loading.load_model(str(repo))


def test_a_hub_dataset_downloads_on_demand_and_fails_fast_offline(cache, tmp_path, monkeypatch):
    import datasets

    from prunebench.training.trainer import DataError, open_dataset

    repo = tmp_path / "captions"
    repo.mkdir()
    rows = [{"image": {"bytes": _png(i), "path": None}, "caption": f"a picture {i}"} for i in range(3)]
    datasets.Dataset.from_list(rows, features=datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string")})).to_parquet(str(repo / "train.parquet"))
    fake = FakeHub({"someone/captions": repo})
    fake.install()
    try:
        data = open_dataset("someone/captions")
        assert len(data) == 3 and f"{COMMIT}/train.parquet" in fake.downloads()
        go_offline(monkeypatch)
        assert len(open_dataset("someone/captions")) == 3  # now cached
        with pytest.raises(DataError, match=r"someone/other.*not in the local cache.*hf download --repo-type dataset someone/other"):
            open_dataset("someone/other")
    finally:
        FakeHub.uninstall()


def _png(seed: int) -> bytes:
    import io

    buffer = io.BytesIO()
    make_image(16, 16, seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("builder,kwargs", [("build_tiny_qwen3_vl", {}), ("build_tiny_internvl", {"version": "3.5"}),
                                            ("build_tiny_llava_onevision", {}), ("build_tiny_smolvlm", {"version": "1"})])
def test_a_saved_checkpoint_of_each_family_loads_with_its_processor_and_chat_template(tmp_path, builder, kwargs):
    """From a local directory: the model class its config names, the processor without a video
    processor (no torchvision needed), the chat template the checkpoint ships (Qwen-VL: its own
    chat_template.jinja when the tokenizer has none)."""
    from prunebench.models import families

    model, processor = getattr(families, builder)(**kwargs)
    model.save_pretrained(tmp_path)
    if isinstance(processor, families.QwenVLInputs):
        processor.image_processor.save_pretrained(tmp_path)
        processor.tokenizer.save_pretrained(tmp_path)
        (tmp_path / "chat_template.jinja").write_text(processor.chat_template)
    else:
        processor.save_pretrained(tmp_path)
    loaded, loaded_processor = loading.load_model(str(tmp_path))
    assert type(loaded) is type(model) and loaded_processor.chat_template == processor.chat_template
    assert answers_of(loaded, loaded_processor) == answers_of(model, processor)


def answers_of(model, processor) -> list[list[int]]:
    from support.models import FAMILIES

    name = {"Qwen3VLForConditionalGeneration": "qwen3-vl", "InternVLForConditionalGeneration": "internvl3.5",
            "LlavaOnevisionForConditionalGeneration": "llava-onevision"}.get(type(model).__name__, "smolvlm")
    from prunebench.models import families

    template = getattr(families, FAMILIES[name][2])
    images = [make_image(h, w, i) for i, (h, w) in enumerate(FAMILIES[name][3][:2])]
    inputs = processor(images=images, text=[template.format(question=q) for q in QUESTIONS[:2]], return_tensors="pt",
                       padding=True)
    engine = PruningEngine(model, processor.tokenizer)
    return engine.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                           decode=DecodeConfig(max_new_tokens=4), image_inputs=engine.adapter.image_inputs(inputs)).tokens
