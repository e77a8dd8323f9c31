"""`prunebench train`: schedules, data, the frozen-VLM objective, training, checkpoints, resume, CLI.

Training runs on a smaller tiny LLaVA (112 px images: 64 visual tokens, vision width 32) so a
few dozen optimizer steps take seconds on a CPU.
"""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest
import torch
from support.models import make_images

from prunebench.budget import BudgetError
from prunebench.commands import main as cli
from prunebench.engine.adapters import adapter_for
from prunebench.engine.generate import DecodeConfig, PruningEngine
from prunebench.engine.method import create_method
from prunebench.models.tiny import PROMPT_TEMPLATE, TinyLlavaSpec, build_tiny_llava
from prunebench.training import trainer as train_module
from prunebench.training.losses import autoselect_loss, vision_features, vlm_loss
from prunebench.training.selectors import CheckpointError, load_selector
from prunebench.training.trainer import (
    CAPTION_PROMPT,
    BuiltinQuestions,
    Collator,
    DataError,
    OptionError,
    StepBatches,
    TrainConfig,
    budget_at,
    build_module,
    lr_at,
    open_dataset,
    parse_budget_range,
    tau_at,
    train,
)

SMALL = TinyLlavaSpec(image_size=112)  # 8 x 8 = 64 visual tokens


@pytest.fixture(scope="module")
def small():
    return build_tiny_llava(SMALL, seed=0)


def config(tmp_path, **overrides) -> TrainConfig:
    options = {"selector": "autoselect", "out": str(tmp_path / "run"), "model": "test:small", "data": "synthetic:4",
               "steps": 4, "batch_size": 2, "budget": "16", "lr": 1e-3, "log_every": 1}
    options.update(overrides)
    return TrainConfig(**options)


# -- schedules and budgets --------------------------------------------------------------------


def test_temperature_and_learning_rate_schedules(tmp_path):
    cfg = config(tmp_path, steps=5000)
    assert cfg.tau_steps == 2000  # the paper's annealing length
    assert tau_at(cfg, 0) == pytest.approx(2.0)
    assert tau_at(cfg, 1000) == pytest.approx(1.05)  # the cosine's midpoint
    assert tau_at(cfg, 2000) == pytest.approx(0.1) and tau_at(cfg, 4000) == pytest.approx(0.1)
    taus = [tau_at(cfg, s) for s in range(0, 2001, 50)]
    assert all(a > b for a, b in itertools.pairwise(taus))
    assert lr_at(cfg, 0) == pytest.approx(1e-3) and lr_at(cfg, 2500) == pytest.approx(5e-4)
    assert config(tmp_path, steps=300).tau_steps == 300  # short runs still reach tau_end


def test_budget_fixed_or_sampled(tmp_path):
    assert parse_budget_range("64-192", 576) == (64, 192)
    assert parse_budget_range("25%", 576) == (144, 144)
    cfg = config(tmp_path, budget=None)
    assert cfg.budget == "64-192"  # default: K sampled per batch, one scorer for every budget
    draws = [budget_at(cfg, step, 576) for step in range(200)]
    assert min(draws) >= 64 and max(draws) <= 192 and len(set(draws)) > 50
    assert draws == [budget_at(cfg, step, 576) for step in range(200)]  # a function of (seed, step)
    assert {budget_at(config(tmp_path, budget="64"), s, 576) for s in range(20)} == {64}
    for bad in ("192-64", "0", "700", "lots"):
        with pytest.raises(BudgetError):
            parse_budget_range(bad, 576)


def test_step_batches_cover_each_epoch_and_split_across_processes():
    batches = list(StepBatches(10, 2, 0, 1, seed=0, start=0, stop=5))
    assert sorted(i for b in batches for i in b) == list(range(10))
    rank0 = list(StepBatches(10, 2, 0, 2, seed=0, start=0, stop=5))
    rank1 = list(StepBatches(10, 2, 1, 2, seed=0, start=0, stop=5))
    # two processes split the single-process order: rank 0 takes the first half of each global batch
    assert [i for pair in zip(rank0, rank1) for b in pair for i in b][:10] == [i for b in batches for i in b]
    assert list(StepBatches(10, 2, 0, 1, seed=0, start=3, stop=5)) == batches[3:]  # resumable


# -- data -------------------------------------------------------------------------------------


def test_synthetic_data_is_deterministic_and_in_vocabulary(small):
    _, processor = small
    data = BuiltinQuestions(20)
    assert data[3].answer == BuiltinQuestions(20)[3].answer
    assert list(data[3].image.getdata()) == list(BuiltinQuestions(20)[3].image.getdata())
    assert len({data[i].answer for i in range(20)}) > 5
    assert all(data[i].question.endswith("Answer the question using a single word or phrase.") for i in range(20))
    unk = processor.tokenizer.unk_token_id
    for i in range(20):
        assert unk not in processor.tokenizer(f"{data[i].question} {data[i].answer}")["input_ids"], data[i]


def test_collator_labels_only_the_answer(small):
    _, processor = small
    examples = [BuiltinQuestions(4)[i] for i in range(3)]
    batch = Collator(processor)(examples)
    tok = processor.tokenizer
    for row, ex in enumerate(examples):
        labelled = batch["labels"][row] != -100
        expected = tok(" " + ex.answer)["input_ids"] + [tok.eos_token_id]
        assert batch["input_ids"][row][labelled].tolist() == expected
        assert batch["labels"][row][labelled].tolist() == expected
        assert int(batch["attention_mask"][row].sum()) == int(labelled.sum()) + len(tok(PROMPT_TEMPLATE.format(question=ex.question))["input_ids"]) + 63
    assert int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 3 * 64


def test_jsonl_and_parquet_data(tmp_path):
    for i, image in enumerate(make_images(2, size=64)):
        image.save(tmp_path / f"img{i}.png")
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"image": "img0.png", "caption": "a red circle ."}) + "\n\n"
        + json.dumps({"image": "img1.png", "caption": "a blue square ."}) + "\n"
    )
    data = open_dataset(str(tmp_path / "train.jsonl"))
    assert len(data) == 2 and data[1].answer == "a blue square ." and data[1].question == CAPTION_PROMPT
    assert data[0].image.size == (64, 64)
    rows = [{"img": {"bytes": (tmp_path / "img0.png").read_bytes(), "path": None}, "question": "what ?", "answer": "yes"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "qa.parquet")
    qa = open_dataset(str(tmp_path / "qa.parquet"), columns={"image": "img"})
    assert (qa[0].question, qa[0].answer, qa[0].image.size) == ("what ?", "yes", (64, 64))


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        open_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "caption": "a"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        open_dataset(str(tmp_path / "bad.jsonl"))
    (tmp_path / "cols.jsonl").write_text('{"picture": "x.png", "words": "a"}\n')
    with pytest.raises(DataError, match=r"need an image column .*\['picture', 'words'\].*--columns"):
        open_dataset(str(tmp_path / "cols.jsonl"))
    data = open_dataset(str(tmp_path / "cols.jsonl"), columns={"image": "picture", "caption": "words"})
    with pytest.raises(DataError, match="row 0: cannot read image 'x.png'"):
        data[0]
    with pytest.raises(DataError, match="--columns caption=nope names no column"):
        open_dataset(str(tmp_path / "cols.jsonl"), columns={"image": "picture", "caption": "nope"})
    with pytest.raises(DataError, match="synthetic:N"):
        open_dataset("synthetic:many")


def test_hub_dataset_not_in_the_cache_fails_fast():
    with pytest.raises(DataError, match="not in the local cache.*hf download --repo-type dataset"):
        open_dataset("prunebench-tests/no-such-dataset-anywhere")


# -- the objective ----------------------------------------------------------------------------


def test_vlm_loss_equals_the_models_own_loss(small):
    """With the vision features unchanged, our frozen forward is the HF model's forward."""
    model, processor = small
    batch = Collator(processor)([BuiltinQuestions(4)[i] for i in range(3)])
    adapter = adapter_for(model)
    with torch.no_grad():
        ours = vlm_loss(adapter, batch, adapter.project(vision_features(adapter, batch["pixel_values"])))
        theirs = model(**batch).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def eval_loss(module, adapter, batch, k: int = 16, tau: float = 0.1) -> float:
    """Deterministic: the same gate noise every call."""
    with torch.no_grad():
        loss, _ = autoselect_loss(module, adapter, batch, k, tau, torch.Generator().manual_seed(123))
    return float(loss)


def test_training_lowers_the_loss_and_leaves_the_vlm_untouched(small, tmp_path):
    model, processor = small
    frozen = {name: t.clone() for name, t in model.state_dict().items()}
    cfg = config(tmp_path, data="synthetic:2", steps=25, tau_start=0.5, tau_end=0.1)
    batch = Collator(processor)([BuiltinQuestions(2)[i] for i in range(2)])
    adapter = adapter_for(model)
    before = eval_loss(build_module(cfg, 32, 64), adapter, batch)
    history = train(cfg, model, processor)
    after = eval_loss(load_selector(cfg.out, "autoselect"), adapter, batch)
    assert len(history) == 25 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert after < before - 0.1, (before, after)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, frozen[name]), f"frozen weight {name} changed"
    assert not any(p.requires_grad for p in model.parameters())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 26)) and log[-1]["k"] == 16


@pytest.mark.parametrize("backbone", ["llava-next", "qwen2-vl"])
def test_other_backbones_are_refused_before_any_output(backbone, tmp_path):
    from prunebench.models.backbones import build_tiny_llava_next, build_tiny_qwen2_vl

    model, processor = build_tiny_llava_next() if backbone == "llava-next" else build_tiny_qwen2_vl()
    with pytest.raises(OptionError, match=rf"{type(model).__name__} is not one.*not built"):
        train(config(tmp_path), model, processor)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "options",
    [{"gate": "vp", "gate_norm": "none"}, {"gate": "scale"}, {"gate": "gumbel_ste"},
     {"denoiser": "global"}, {"denoiser": "none"}, {"budget": "8-32", "width": 16, "depth": 1}],
)
def test_every_gate_and_denoiser_trains_and_infers(small, tmp_path, options):
    model, processor = small
    cfg = config(tmp_path, steps=2, **options)
    history = train(cfg, model, processor)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    trained = load_selector(cfg.out, "autoselect")
    fresh = build_module(cfg, 32, 64)
    assert not torch.equal(trained.scorer.head.weight, fresh.scorer.head.weight)
    for key, value in options.items():
        if key != "budget":
            assert getattr(trained.config, key) == value
    # inference: hard top-K of the trained scorer through the engine, nothing of the gate or denoiser
    engine = PruningEngine(model, processor.tokenizer)
    prompts = [PROMPT_TEMPLATE.format(question="what color is the circle ?")] * 2
    inputs = processor(images=make_images(2, size=112), text=prompts, return_tensors="pt", padding=True)
    gen = engine.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                          create_method(f"autoselect:ckpt={cfg.out}"), 12, DecodeConfig(max_new_tokens=2))
    with torch.no_grad():
        scores = trained.scores(adapter_for(model).encode_images(inputs["pixel_values"]).features)
    assert gen.kept_patches == [sorted(row.topk(12).indices.tolist()) for row in scores]


def test_gumbel_trains_on_features_only(small, tmp_path):
    model, processor = small
    cfg = config(tmp_path, selector="gumbel", budget=None, steps=20, lr=2e-3, data="synthetic:2")
    history = train(cfg, model, processor)
    assert history[0]["mse"] > history[-1]["mse"]
    assert all(0 <= h["kept"] <= 1 for h in history)
    trained = load_selector(cfg.out, "gumbel")
    assert trained.config.keep_floor == 0.25 and trained.config.n_tokens == 64  # default floor p = 25 %
    with pytest.raises(BudgetError, match="takes one value"):
        train(config(tmp_path / "x", selector="gumbel", budget="8-16"), model, processor)


class Crash(Exception):
    pass


def test_resume_continues_exactly(small, tmp_path, monkeypatch):
    """A run that dies after its step-2 checkpoint, resumed, ends bit-identical to an unbroken run."""
    model, processor = small
    options = {"steps": 5, "budget": "8-24", "save_every": 2}
    straight = train(config(tmp_path / "a", **options), model, processor)

    real_budget_at = train_module.budget_at

    def crash_in_step_4(cfg, step, n_tokens):
        if step == 3:
            raise Crash
        return real_budget_at(cfg, step, n_tokens)

    monkeypatch.setattr(train_module, "budget_at", crash_in_step_4)
    with pytest.raises(Crash):
        train(config(tmp_path / "b", **options), model, processor)
    monkeypatch.setattr(train_module, "budget_at", real_budget_at)
    resumed = train(config(tmp_path / "b", resume=True, **options), model, processor)
    assert [h["step"] for h in resumed] == [3, 4, 5]  # from the step-2 checkpoint; step 3 runs again
    assert resumed == straight[2:]  # same K, tau, lr and loss at every step
    a, b = load_selector(tmp_path / "a" / "run", "autoselect"), load_selector(tmp_path / "b" / "run", "autoselect")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert json.loads((tmp_path / "b" / "run" / "trainer_state.json").read_text())["step"] == 5
    log = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5]  # the step-3 entry of the crashed run was replaced


def test_gradient_checkpointing_changes_nothing_but_memory(small, tmp_path, monkeypatch):
    import transformers.modeling_utils

    model, processor = small
    plain = train(config(tmp_path / "a", steps=2), model, processor)
    calls = []
    real = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    checkpointed = train(config(tmp_path / "b", steps=2, gradient_checkpointing=True), model, processor)
    assert len(calls) == 2 * 4  # every decoder layer of the tiny LLaVA, each step
    for a, b in zip(plain, checkpointed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    a, b = load_selector(tmp_path / "a" / "run", "autoselect"), load_selector(tmp_path / "b" / "run", "autoselect")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=name)
    assert not model.training and not model.model.language_model.gradient_checkpointing  # left as found


def test_resume_guards(small, tmp_path):
    model, processor = small
    with pytest.raises(CheckpointError, match="holds no training state"):
        train(config(tmp_path, resume=True), model, processor)
    train(config(tmp_path, steps=1), model, processor)
    with pytest.raises(CheckpointError, match="already holds a training run .*--resume"):
        train(config(tmp_path, steps=2), model, processor)
    with pytest.raises(CheckpointError, match=r"different architecture .*'gate': \('vp', 'scale'\)"):
        train(config(tmp_path, steps=2, gate="scale", resume=True), model, processor)
    with pytest.raises(CheckpointError, match="already reached step 1; pass --steps > 1"):
        train(config(tmp_path, steps=1, resume=True), model, processor)
    with pytest.raises(OptionError, match="--batch-size must be positive"):
        config(tmp_path, batch_size=0)


# -- command line -----------------------------------------------------------------------------


def test_cli_trains_resumes_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "sel"
    base = ["train", "autoselect", "--model", "random:tiny-llava", "--data", "synthetic:2", "--batch-size", "1",
            "--budget", "64"]
    assert cli.main(base + ["--steps", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "optimizer.safetensors",
                                               "trainer_state.json", "log.jsonl"}
    assert cli.main(base + ["--steps", "2", "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    record = json.loads((out / "config.json").read_text())
    assert record["model"] == "random:tiny-llava" and record["config"]["vision_width"] == 32
    capsys.readouterr()
    assert cli.main(["train", "gumbel", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "g")]) == 2
    assert "none.jsonl': no such file" in capsys.readouterr().err
    assert cli.main(["train", "autoselect", "--model", "nobody/no-such-model", "--out", str(tmp_path / "m")]) == 2
    assert "not in the local cache" in capsys.readouterr().err
    assert cli.main(["train", "autoselect", "--steps", "0", "--out", str(tmp_path / "s")]) == 2
    assert "--steps must be positive" in capsys.readouterr().err
