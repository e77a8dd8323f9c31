"""`prunebench run` end to end on the tiny LLaVA-NeXT and Qwen2-VL, through lmms-eval's `pope` on
local images of different sizes (so each sample has its own visual-token count)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from statistics import mean

import pytest
import torch
from PIL import Image

from prunebench.budget import Budget
from prunebench.commands.main import main
from prunebench.engine.generate import PruningEngine
from prunebench.models.loading import load_model
from prunebench.results import ResultStore
from prunebench.run.lmms_bridge import PrunedVLM

pytest.importorskip("lmms_eval")

SIZES = [(112, 84), (84, 168), (224, 224), (300, 40)]  # (height, width) px of docs 0..3


@pytest.fixture(scope="module")
def pope_file(tmp_path_factory) -> Path:
    """POPE-format parquet (built-in synth-pope questions) whose four images have different sizes."""
    import datasets
    from prunebench.tasks.synthetic import task_dataset, task_rows

    rows = task_rows("synth-pope", len(SIZES), seed=5)
    for row, (height, width) in zip(rows, SIZES):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(row["image"]["bytes"])).resize((width, height)).save(buffer, format="PNG")
        row["image"] = {"bytes": buffer.getvalue(), "path": None}
    path = tmp_path_factory.mktemp("data") / "pope.parquet"
    datasets.Dataset.from_list(rows, features=task_dataset("synth-pope", 1, seed=5).features).to_parquet(str(path))
    return path


@pytest.fixture
def contexts(monkeypatch) -> dict[str, str]:
    """The prompt text lmms-eval hands the bridge for each question (recorded as the run goes)."""
    seen: dict[str, str] = {}
    real = PrunedVLM._prompt

    def recording(self, context: str) -> str:
        seen[context.split("\n")[0]] = context
        return real(self, context)

    monkeypatch.setattr(PrunedVLM, "_prompt", recording)
    return seen


def run_args(results: Path, pope: Path, model: str, budgets: str, methods: str = "none,random") -> list[str]:
    return ["run", "--model", model, "--tasks", "pope", "--task-data", f"pope={pope}", "--methods", methods,
            "--budgets", budgets, "--limit", str(len(SIZES)), "--max-new-tokens", "3", "--results", str(results)]


def reference(model_name: str, pope: Path, contexts: dict[str, str]) -> tuple[list[int], list[str]]:
    """Per doc: the visual tokens its prompt holds, and the model's own greedy answer (HF generate)."""
    import datasets

    model, processor = load_model(model_name)
    bridge = PrunedVLM(PruningEngine(model, processor.tokenizer), processor, None, Budget.all())
    counts, answers = [], []
    for doc in datasets.Dataset.from_parquet(str(pope)):
        prompt = bridge._prompt(contexts[doc["question"]])
        inputs = processor(images=[doc["image"].convert("RGB")], text=[prompt], return_tensors="pt")
        counts.append(int((inputs["input_ids"] == model.config.image_token_id).sum()))
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return counts, answers


@pytest.mark.parametrize("model_name,budget", [("random:tiny-qwen2-vl", "25%"), ("random:tiny-llava-next", "20"),
                                               ("random:tiny-qwen3-vl", "25%"), ("random:tiny-smolvlm", "25%"),
                                               ("random:tiny-llava-onevision", "25%")])
def test_run_accounts_visual_tokens_per_sample_and_keep_all_is_generate(tmp_path, pope_file, contexts, model_name, budget):
    assert main(run_args(tmp_path, pope_file, model_name, budget)) == 0
    store = ResultStore(tmp_path)
    recs = {(r.key.method, r.key.budget): r for r in store.records()}
    assert set(recs) == {("none", "all"), ("random", budget)}
    counts, answers = reference(model_name, pope_file, contexts)
    assert len(set(counts)) == len(SIZES)  # every image its own count
    kept = [Budget.parse(budget).resolve(n) for n in counts]
    for key, per_doc in ((("none", "all"), counts), (("random", budget), kept)):
        rec = recs[key]
        assert rec.n_samples == len(SIZES) and rec.primary_metric == "pope_accuracy"
        samples = store.samples(rec.key)
        assert [s["doc_id"] for s in samples] == [0, 1, 2, 3]
        assert [s["visual_tokens"] for s in samples] == [[n] * 4 for n in per_doc]
        assert rec.visual_tokens["original"] == pytest.approx(mean(counts))
        assert rec.visual_tokens["mean_kept"] == pytest.approx(mean(per_doc))
    assert any(answers)  # the comparison below has words to compare
    assert [s["output"] for s in store.samples(recs["none", "all"].key)] == answers


def test_an_image_below_an_absolute_budget_fails_naming_it_and_keeps_finished_records(tmp_path, pope_file, capsys):
    """K=60 is within the tiny LLaVA-NeXT's largest image (88 tokens) but above docs 1 and 3 (52, 40)."""
    assert main(run_args(tmp_path, pope_file, "random:tiny-llava-next", "60")) == 2
    err = capsys.readouterr().err
    assert re.search(r"pope doc \d \(\d+ visual tokens\).*K=60 exceeds the \d+ visual tokens", err), err
    store = ResultStore(tmp_path)
    assert [(r.key.method, r.key.budget) for r in store.records()] == [("none", "all")]  # the finished baseline stays
    assert not list(tmp_path.glob("*/*/*.lock"))


@pytest.mark.parametrize("model_name,change,message", [
    ("random:tiny-llava-next", ["--budgets", "89"], r"up to 88 visual tokens per image.*K=89 exceeds"),
    ("random:tiny-qwen2-vl", ["--budgets", "65"], r"up to 64 visual tokens per image.*K=65 exceeds"),
    ("random:tiny-qwen2-vl", ["--methods", "none,pyramiddrop"], r"pyramiddrop at budget .*outside this 4-layer decoder"),
])
def test_budgets_no_image_can_meet_fail_before_any_work(tmp_path, pope_file, capsys, model_name, change, message):
    args = run_args(tmp_path, pope_file, model_name, "16")
    args[args.index(change[0]) + 1] = change[1]
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.glob("*/*/*.json"))


@pytest.mark.parametrize("model_name", ["random:tiny-qwen2-vl", "random:tiny-llava-next", "random:tiny-qwen3-vl",
                                        "random:tiny-smolvlm"])
def test_loglikelihood_keep_all_is_the_models_own_log_probability(model_name):
    """lmms-eval's loglikelihood path with the backbone's image inputs: unpruned, the summed
    log-probability of the continuation equals the model's own teacher-forced forward pass."""
    from lmms_eval.api.instance import Instance

    model, processor = load_model(model_name)
    image = Image.new("RGB", (84, 168), (200, 30, 30))
    lm = PrunedVLM(PruningEngine(model, processor.tokenizer), processor, None, Budget.all())
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    question, answer = "is there a red square ?", "yes there is"
    request = Instance(request_type="loglikelihood", idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1},
                       arguments=(question, answer, lambda doc: [doc["image"]], 0, "t", "test"))
    ((total, _),) = lm.loglikelihood([request])
    prompt = lm._prompt(question)
    target = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    inputs = processor(images=[image], text=[f"{prompt} {answer}"], return_tensors="pt")
    assert inputs["input_ids"][0, -len(target):].tolist() == target
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -len(target) - 1 : -1].float().log_softmax(-1)
    expected = float(logits[torch.arange(len(target)), torch.tensor(target)].sum())
    assert total == pytest.approx(expected, abs=1e-4)
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert lm.stats[("t", 0)].visual_tokens == [n] * 4


def test_a_method_the_backbone_cannot_serve_is_refused_before_any_work_when_listed(tmp_path, pope_file, capsys):
    """VisionZip needs the vision tower's CLS attention, which SmolVLM's tower does not have."""
    assert main(run_args(tmp_path, pope_file, "random:tiny-smolvlm", "25%", methods="none,visionzip")) == 2
    err = capsys.readouterr().err
    assert "method 'visionzip' cannot run on random:tiny-smolvlm" in err and "no CLS token" in err
    assert not list(tmp_path.glob("*/*/*.json"))


def test_default_methods_leave_out_those_the_backbone_cannot_serve():
    """From the default list such a method is left out, saying why; the rest are kept in order."""
    from prunebench.engine.method import create_method
    from prunebench.run.servable import servable_methods

    model, processor = load_model("random:tiny-smolvlm")
    engine = PruningEngine(model, processor.tokenizer)
    methods = [create_method(spec) for spec in ("none", "random", "visionzip", "fastv", "divprune:space=vision")]
    notes = []
    kept = servable_methods(methods, engine, processor, "random:tiny-smolvlm", listed=False, note=notes.append)
    assert [m.spec() for m in kept] == ["none", "random", "fastv", "divprune:space=vision"]
    assert len(notes) == 1 and notes[0].startswith("skipped visionzip") and "no CLS token" in notes[0]


def test_pool_resize_runs_the_model_on_the_shrunk_image(tmp_path, pope_file, contexts):
    """pool:mode=resize through `prunebench run` on the tiny Qwen2-VL: each image is shrunk to at most
    half its visual tokens before the processor; the record counts the tokens of the shrunk image per
    layer and the original image's as `original`, and each answer is the model's own greedy answer on
    the shrunk image."""
    import datasets

    from prunebench.engine.method import create_method
    from prunebench.run.lmms_bridge import visual_tokens_at

    assert main(run_args(tmp_path, pope_file, "random:tiny-qwen2-vl", "50%", methods="none,pool:mode=resize")) == 0
    store = ResultStore(tmp_path)
    rec = next(r for r in store.records() if r.key.method == "pool:mode=resize")
    model, processor = load_model("random:tiny-qwen2-vl")
    bridge = PrunedVLM(PruningEngine(model, processor.tokenizer), processor, None, Budget.all())
    tokens_at, method = visual_tokens_at(processor), create_method("pool:mode=resize")
    originals, shrunk, answers = [], [], []
    for doc in datasets.Dataset.from_parquet(str(pope_file)):
        image = doc["image"].convert("RGB")
        small = method.resize_image(image, Budget.parse("50%"), tokens_at)
        inputs = processor(images=[small], text=[bridge._prompt(contexts[doc["question"]])], return_tensors="pt")
        originals.append(tokens_at(image.height, image.width))
        shrunk.append(int((inputs["input_ids"] == model.config.image_token_id).sum()))
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert all(s <= Budget.parse("50%").resolve(n) for s, n in zip(shrunk, originals))
    samples = store.samples(rec.key)
    assert [s["visual_tokens"] for s in samples] == [[n] * 4 for n in shrunk]
    assert rec.visual_tokens["original"] == pytest.approx(mean(originals))
    assert [s["output"] for s in samples] == answers
