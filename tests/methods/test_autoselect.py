"""The learned selectors at inference, through the engine: `autoselect` and `gumbel` methods."""

from __future__ import annotations

import pytest
import torch
from support.models import run
from support.references import MAX_NEW, assert_batch_equals_each_alone

from prunebench.engine.method import MethodError, create_method
from prunebench.training.selectors import (
    CheckpointError,
    build_selector,
    save_selector,
    shipped_checkpoint,
)

METHODS = ["autoselect", "gumbel"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A saved module of each kind for the tiny LLaVA (vision width 32, 576 tokens), seeded init."""
    root = tmp_path_factory.mktemp("selectors")
    torch.manual_seed(0)
    modules = {"autoselect": build_selector("autoselect", vision_width=32),
               "gumbel": build_selector("gumbel", vision_width=32, n_tokens=576)}
    for kind, module in modules.items():
        save_selector(root / kind, module, {"model": "random:tiny-llava"})
    return {kind: (str(root / kind), module.eval()) for kind, module in modules.items()}


def reference_keep(model, pixel_values, module, k: int) -> list[list[int]]:
    """Independently: CLIP penultimate layer without CLS -> scorer -> top-K, in patch order."""
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        scores = module.scores(hidden)
    return [sorted(row.topk(k).indices.tolist()) for row in scores]


@pytest.mark.parametrize("kind", METHODS)
def test_keep_all_reproduces_generate(tiny, engine, batch, checkpoints, kind):
    model, _ = tiny
    out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    gen = run(engine, batch, create_method(f"{kind}:ckpt={checkpoints[kind][0]}"), budget="all", max_new_tokens=MAX_NEW)
    assert [row[:MAX_NEW] for row in gen.tokens] == out.sequences[:, batch["input_ids"].shape[1]:].tolist()
    torch.testing.assert_close(torch.stack(gen.logits, 1), torch.stack(out.logits, 1).float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", METHODS)
@pytest.mark.parametrize("budget", [64, 192])
def test_keeps_the_top_k_of_the_checkpoint(tiny, engine, batch, checkpoints, kind, budget):
    model, _ = tiny
    ckpt, module = checkpoints[kind]
    gen = run(engine, batch, create_method(f"{kind}:ckpt={ckpt}"), budget=budget, max_new_tokens=1)
    assert gen.kept_patches == reference_keep(model, batch["pixel_values"], module, budget)
    assert gen.visual_tokens.tolist() == [[budget] * 4] * 3
    assert len({tuple(k) for k in gen.kept_patches}) == 3  # question-agnostic, but the images differ


@pytest.mark.parametrize("kind", METHODS)
def test_batch_of_three_equals_each_alone(tiny, engine, batch, checkpoints, kind):
    _, processor = tiny
    method = create_method(f"{kind}:ckpt={checkpoints[kind][0]}")
    assert_batch_equals_each_alone(engine, processor, batch, method, "25%", max_new_tokens=6)


def test_round_trip_through_a_new_directory_selects_the_same(tiny, engine, batch, checkpoints, tmp_path):
    ckpt, module = checkpoints["autoselect"]
    save_selector(tmp_path, module)
    first = run(engine, batch, create_method(f"autoselect:ckpt={ckpt}"), budget=64, max_new_tokens=4)
    second = run(engine, batch, create_method(f"autoselect:ckpt={tmp_path}"), budget=64, max_new_tokens=4)
    assert first.kept_patches == second.kept_patches and first.tokens == second.tokens


def test_spec_and_options(checkpoints):
    ckpt = checkpoints["gumbel"][0]
    method = create_method(f"gumbel:ckpt={ckpt}")
    assert method.stage == "pre" and method.spec() == f"gumbel:ckpt={ckpt}"


@pytest.mark.parametrize("spec", ["gumbel", "autoselect:shipped=sampled-k"])
def test_without_a_checkpoint_the_error_says_how_to_train_one(spec, monkeypatch, tmp_path):
    kind = spec.partition(":")[0]
    monkeypatch.setattr("prunebench.models.loading.ASSETS", tmp_path)  # an install without the shipped checkpoints
    with pytest.raises(MethodError, match=f"{kind} needs a trained checkpoint: pass {kind}:ckpt=DIR; "
                                          f"train one with `prunebench train {kind} --model MODEL"):
        create_method(spec)
    with pytest.raises(MethodError, match="at the run's budget; this install has none. Train one with `prunebench "
                                          "train autoselect --model builtin:tiny-llava"):
        create_method("autoselect")


@pytest.mark.parametrize("spec,variant", [("gumbel", None), ("autoselect", "k64"), ("autoselect:shipped=sampled-k", "sampled-k")])
def test_the_shipped_checkpoint_is_refused_on_another_model(engine, batch, spec, variant):
    kind = spec.partition(":")[0]
    if not (shipped_checkpoint(kind, variant) / "config.json").is_file():
        pytest.skip("this install lacks the checkpoints shipped for builtin:tiny-llava")
    method = create_method(spec)  # no ckpt=: one trained for builtin:tiny-llava (vision width 64)
    with pytest.raises(CheckpointError, match=f"{kind}: without ckpt= it uses the checkpoint shipped for "
                                              "builtin:tiny-llava, which does not fit this model \\(vision width 32\\)"):
        run(engine, batch, method, budget=64, max_new_tokens=1)


@pytest.fixture
def shipped(tmp_path, monkeypatch, tiny):
    """An install whose builtin:tiny-llava AutoSelect checkpoints fit the tiny test model: per-budget
    ones for K = 64 and 128 and the sampled-K one, each a differently seeded module."""
    monkeypatch.setattr("prunebench.models.loading.ASSETS", tmp_path)
    modules = {}
    for seed, variant in enumerate(["k64", "k128", "sampled-k"]):
        torch.manual_seed(seed)
        modules[variant] = build_selector("autoselect", vision_width=32).eval()
        save_selector(tmp_path / f"autoselect-tiny-llava-{variant}", modules[variant], {"model": "builtin:tiny-llava"})
    return modules


def test_the_shipped_checkpoint_is_the_one_trained_at_the_runs_budget(tiny, engine, batch, shipped):
    model, _ = tiny
    for budget, variant in [(64, "k64"), (128, "k128")]:
        gen = run(engine, batch, create_method("autoselect"), budget=budget, max_new_tokens=1)
        assert gen.kept_patches == reference_keep(model, batch["pixel_values"], shipped[variant], budget)
    sampled = run(engine, batch, create_method("autoselect:shipped=sampled-k"), budget=64, max_new_tokens=1)
    assert sampled.kept_patches == reference_keep(model, batch["pixel_values"], shipped["sampled-k"], 64)
    assert sampled.kept_patches != run(engine, batch, create_method("autoselect"), budget=64, max_new_tokens=1).kept_patches
    everything = run(engine, batch, create_method("autoselect"), budget="all", max_new_tokens=1)
    assert everything.kept_patches == [list(range(576))] * 3  # budget all needs no checkpoint


def test_a_budget_without_a_shipped_checkpoint_is_refused_before_any_work(engine, batch, shipped):
    from prunebench.budget import Budget

    method = create_method("autoselect")
    with pytest.raises(CheckpointError, match=r"at the run's budget \(K = 100\); they ship for K = 64, 128\. Train one "
                                              r"with `prunebench train autoselect --model builtin:tiny-llava .*--budget 100 --drop 0.5 "
                                              r"--out DIR` and pass autoselect:ckpt=DIR, or use autoselect:shipped=sampled-k"):
        method.schedule(576, Budget.parse("100"), 4)  # what `prunebench run` checks before any cell
    with pytest.raises(MethodError, match="shipped= picks among the checkpoints shipped"):
        create_method("autoselect:shipped=sampled-k,ckpt=/somewhere")


def test_bad_checkpoints_are_refused_with_clear_errors(engine, batch, checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory .*nowhere' does not exist"):
        create_method(f"autoselect:ckpt={tmp_path / 'nowhere'}")
    with pytest.raises(CheckpointError, match="holds a 'gumbel' checkpoint, not 'autoselect'"):
        create_method(f"autoselect:ckpt={checkpoints['gumbel'][0]}")
    wide = tmp_path / "wide"
    save_selector(wide, build_selector("autoselect", vision_width=48), {"model": "llava-other"})
    method = create_method(f"autoselect:ckpt={wide}")
    with pytest.raises(CheckpointError, match="trained on vision features 48 wide \\(llava-other\\); this model's "
                                              "vision features are 32 wide"):
        run(engine, batch, method, budget=64, max_new_tokens=1)
    broken = tmp_path / "broken"
    save_selector(broken, build_selector("autoselect", vision_width=32))
    (broken / "model.safetensors").write_bytes(b"\x01" * 64)
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        create_method(f"autoselect:ckpt={broken}")
