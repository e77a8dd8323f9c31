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


@pytest.mark.parametrize("kind", METHODS)
def test_without_a_checkpoint_the_error_says_how_to_train_one(kind, monkeypatch, tmp_path):
    monkeypatch.setattr("prunebench.models.loading.ASSETS", tmp_path)  # an install without the shipped checkpoints
    with pytest.raises(MethodError, match=f"{kind} needs a trained checkpoint: pass {kind}:ckpt=DIR; "
                                          f"train one with `prunebench train {kind} --model MODEL"):
        create_method(kind)


@pytest.mark.parametrize("kind", METHODS)
def test_the_shipped_checkpoint_is_refused_on_another_model(engine, batch, kind):
    if not (shipped_checkpoint(kind) / "config.json").is_file():
        pytest.skip("this install lacks the checkpoints shipped for builtin:tiny-llava")
    method = create_method(kind)  # no ckpt=: the one trained for builtin:tiny-llava (vision width 64)
    with pytest.raises(CheckpointError, match=f"{kind}: without ckpt= it uses the checkpoint shipped for "
                                              "builtin:tiny-llava, which does not fit this model \\(vision width 32\\)"):
        run(engine, batch, method, budget=64, max_new_tokens=1)


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
