"""The built-in offline benchmark: generated tasks (deterministic, disjoint from training data,
lmms-eval's own prompts) and the shipped tiny LLaVA (loads offline, answers, runs end to end)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from prunebench.tasks import synthetic as world
from rich.console import Console

from prunebench.engine.adapters import LlavaAdapter
from prunebench.models.loading import ASSETS, BUILTIN_TRAINED, load_model
from prunebench.models.tiny import BUILTIN_SPEC, PROMPT_TEMPLATE
from prunebench.run.taskspec import GENERATED
from prunebench.training.recipe import Recipe, Trainer, _causal_only, train


def _digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps({k: v for k, v in row.items() if k != "image"}).encode())
        h.update(row["image"]["bytes"])
    return h.hexdigest()


@pytest.mark.parametrize("task", world.TASKS)
def test_generators_are_deterministic(task):
    assert _digest(world.task_rows(task, 12, seed=3)) == _digest(world.task_rows(task, 12, seed=3))
    assert _digest(world.task_rows(task, 12, seed=3)) != _digest(world.task_rows(task, 12, seed=4))


def test_every_built_in_task_is_registered_with_a_fixed_evaluation_set():
    assert set(GENERATED) == set(world.TASKS)
    for spec in GENERATED.values():
        assert spec.size >= 500


def test_evaluation_sets_do_not_overlap_the_training_data():
    def image_hash(scene):
        return hashlib.sha256(world.render(scene).tobytes()).hexdigest()

    evaluation = {image_hash(world.task_sample(task, GENERATED[task].seed, i).scene)
                  for task in world.TASKS for i in range(GENERATED[task].size)}
    training = {image_hash(world.training_example(0, i)[0]) for i in range(3000)}
    training |= {image_hash(world.vision_scene(0, i)) for i in range(500)}
    training |= {image_hash(world.existence_example(0, i)[0]) for i in range(1000)}
    training |= {image_hash(world.position_example(0, i, relation_share=0.5)[0]) for i in range(1000)}
    training |= {image_hash(world.quota_example(0, i)[0]) for i in range(1000)}
    assert len(evaluation) > 0.99 * sum(g.size for g in GENERATED.values())  # scenes are not degenerate
    assert not evaluation & training


def test_questions_are_well_posed():
    for i in range(200):
        sample = world.task_sample("synth-gqa", 7, i)
        scene = sample.scene
        if sample.kind == "colour":
            (target,) = [s for s in scene.shapes if s.shape in sample.question]
            assert target.colour == sample.answer
        elif sample.kind == "count":
            shape = sample.question.split()[2][:-1]
            assert sample.answer == str(scene.count(shape))
        elif sample.kind == "relation":
            assert sample.answer in ("left", "right")
    answers = [world.task_sample("synth-pope", 7, i).answer for i in range(100)]
    assert answers.count("yes") == answers.count("no") == 50
    for i in range(50):
        sample = world.task_sample("synth-textvqa", 7, i)
        assert sample.answer == sample.scene.text.string


def test_glyphs_are_distinct_and_one_patch_each():
    patterns = list(world.FONT.values())
    assert len(set(patterns)) == len(patterns)
    assert all(len(rows) == 4 and all(len(r) == 3 for r in rows) for rows in (p.split() for p in patterns))


def test_patch_labels_name_what_is_drawn_there():
    text = world.Text("42", x=40, y=20, ink=(0, 0, 0))
    shape = world.Shape("red", "square", (8, 8, 15, 15))
    scene = world.Scene((230, 230, 230), (shape,), text)
    labels = world.patch_labels(scene)
    chars = list(world.CHARACTERS)
    assert labels["char"][5, 10] == chars.index("4") + 1 and labels["char"][5, 11] == chars.index("2") + 1
    assert (labels["string"][5, 10:12] == world.STRINGS.index("42") + 1).all()
    assert (labels["count"][2:4, 2:4] == 1).all() and labels["count"].astype(bool).sum() == 4
    assert (labels["colour"][2:4, 2:4] == list(world.COLOURS).index("red") + 1).all()
    assert (labels["shape"][2:4, 2:4] == world.SHAPES.index("square") + 1).all()
    assert labels["shape"].astype(bool).sum() == 4 + 2  # nothing else is labelled
    pixels = np.asarray(world.render(scene))
    assert (pixels[20:24, 40:43] != 230).any() and (pixels[9:15, 9:15] == world.COLOURS["red"]).all()


@pytest.mark.parametrize("task", world.TASKS)
def test_training_prompts_are_what_lmms_eval_builds(task):
    from lmms_eval import utils

    from prunebench.run.taskspec import manager_for

    base = GENERATED[task].base
    (row,) = world.task_rows(task, 1, seed=1)
    config = utils.load_yaml_config(manager_for([task])._task_index[base]["yaml_path"])
    doc = {"question": row["question"], "answer": row["answer"]}
    expected = config["doc_to_text"](doc, config["lmms_eval_specific_kwargs"]["default"])
    assert world.prompt_text(task, row["question"]) == expected


def test_a_run_of_generated_tasks_indexes_only_what_it_needs():
    """Indexing all ~3,000 lmms-eval task files takes seconds; generated tasks need theirs and POPE's."""
    from prunebench.run.taskspec import manager_for

    manager = manager_for(list(world.TASKS))
    assert {gen.base for gen in GENERATED.values()} <= set(manager.all_tasks)
    assert "gqa" not in manager.all_tasks and len(manager.all_tasks) < 20


# -- the shipped model -------------------------------------------------------------------------------
needs_shipped = pytest.mark.skipif(
    not (BUILTIN_TRAINED["builtin:tiny-llava"] / "model.safetensors").is_file(), reason="shipped weights absent")


@needs_shipped
def test_shipped_model_loads_offline_with_llava_geometry(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_model("builtin:tiny-llava")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    inputs = processor(images=[world.render(world.task_sample("synth-pope", 1, 0).scene)],
                       text=[PROMPT_TEMPLATE.format(question="hi")], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    size = sum(p.stat().st_size for p in BUILTIN_TRAINED["builtin:tiny-llava"].iterdir())
    assert size <= 25 * 2**20


@pytest.fixture(scope="module")
def shipped_score():
    """``score(task, method, budget)``: (correct answers, [(output, answer)]) of the shipped model on
    a task's first 24 evaluation questions; the model loads once and each cell runs once."""
    from prunebench.engine.generate import DecodeConfig, PruningEngine
    from prunebench.engine.method import create_method

    model, processor = load_model("builtin:tiny-llava")
    engine = PruningEngine(model, processor)

    @functools.cache
    def score(task: str, method: str, budget: str) -> tuple[int, list]:
        samples = [world.task_sample(task, GENERATED[task].seed, i) for i in range(24)]
        prompts = [PROMPT_TEMPLATE.format(question=world.prompt_text(task, s.question)) for s in samples]
        inputs = processor(images=[world.render(s.scene) for s in samples], text=prompts, return_tensors="pt",
                           padding=True)
        out = engine.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                              create_method(method), budget, DecodeConfig(max_new_tokens=3))
        answers = [(text.strip(), s.answer) for text, s in zip(out.texts, samples)]
        return sum(text == answer for text, answer in answers), answers

    return score


@needs_shipped
@pytest.mark.parametrize("task", world.TASKS)
def test_shipped_model_answers_most_questions_unpruned(task, shipped_score):
    correct, answers = shipped_score(task, "none", "all")
    assert correct >= 18, answers


@needs_shipped
@pytest.mark.parametrize("task", world.TASKS)
def test_random_pruning_to_64_tokens_loses_every_task(task, shipped_score):
    unpruned, _ = shipped_score(task, "none", "all")
    random64, _ = shipped_score(task, "random", "64")
    assert random64 <= unpruned - 6, (unpruned, random64)


@needs_shipped
def test_default_methods_are_every_method_and_need_no_arguments_on_the_shipped_model():
    from prunebench.engine.method import (
        available_methods,
        create_method,
        parse_method_list,
    )
    from prunebench.run.harness import DEFAULT_MODEL, default_methods

    shipped = {name for name, cls in available_methods().items() if cls.__module__.startswith("prunebench.methods.")}
    on_builtin = [create_method(spec) for spec in parse_method_list(default_methods(DEFAULT_MODEL))]
    assert sorted(m.name for m in on_builtin) == sorted(shipped)
    elsewhere = {create_method(spec).name for spec in parse_method_list(default_methods("llava-hf/llava-1.5-7b-hf"))}
    # autoselect / gumbel need a checkpoint for that model; cdpruner needs CLIP's text tower (another
    # checkpoint) and pool a mode chosen per backbone; vispruner is not in the list for other models yet
    assert elsewhere == shipped - {"autoselect", "gumbel", "cdpruner", "pool", "vispruner"}


@needs_shipped
@pytest.mark.parametrize("selector", ["autoselect", "gumbel"])
def test_shipped_selectors_keep_the_text_that_random_pruning_loses(selector, shipped_score):
    """No ckpt=: the checkpoint trained for the shipped model; at K = 64 it must find the printed
    string (2-3 of 576 patches) that random pruning mostly drops."""
    random64, _ = shipped_score("synth-textvqa", "random", "64")
    learned64, answers = shipped_score("synth-textvqa", selector, "64")
    assert learned64 >= random64 + 6, (random64, learned64, answers)


@needs_shipped
def test_default_run_covers_every_built_in_task_on_the_shipped_model(tmp_path, capfd):
    pytest.importorskip("lmms_eval")
    from prunebench.commands.main import main
    from prunebench.results import ResultStore

    assert main(["run", "--methods", "none,random", "--budgets", "64", "--limit", "2", "--max-new-tokens", "3",
                 "--results", str(tmp_path)]) == 0
    assert "Postprocessing" not in capfd.readouterr().err  # lmms-eval's own bars stay hidden
    records = list(ResultStore(tmp_path).records())
    assert {(r.key.task, r.key.method) for r in records} == {(t, m) for t in world.TASKS for m in ("none", "random")}
    assert {r.key.model for r in records} == {"builtin:tiny-llava"} and all(r.n_samples == 2 for r in records)


# -- the training recipe --------------------------------------------------------------------------
def test_first_training_turn_is_the_evaluation_prompt():
    trainer = Trainer(Recipe(probes=3), console=None)
    scene, turns = world.training_example(0, 1)
    ids, labels = trainer._encode(turns[:2])
    prompt = PROMPT_TEMPLATE.format(question=turns[0][0])
    expected = trainer.processor(images=[world.render(scene)], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    assert ids[: len(expected)] == expected
    answer = trainer.tokenizer(turns[0][1])["input_ids"] + [trainer.tokenizer.eos_token_id]
    assert labels[len(expected): len(expected) + len(answer)] == answer
    assert all(label == -100 for label in labels[: len(expected)])


def test_language_stage_resumes_from_a_saved_handover(tmp_path):
    recipe = Recipe(vision_steps=2, vision_batch=2, existence_steps=1, reader_steps=1, side_steps=0, comparison_steps=0,
                    quota_steps=0, projector_steps=1, language_steps=1, language_batch=2, turns=2, probes=3, eval_every=1, threads=1)
    first = train(recipe, tmp_path / "a", handover=tmp_path / "handover")
    before = [entry["stage"] for entry in first.log if entry["stage"] != "language"]
    # the language stage's own settings may change; the weights it starts from are the saved ones
    again = replace(recipe, language_steps=2, language_data="quota", language_quotas=(1, 1, 1, 1))
    resumed = train(again, tmp_path / "b", from_handover=tmp_path / "handover")
    assert [entry["stage"] for entry in resumed.log] == before + ["language", "language"]
    with pytest.raises(ValueError, match="existence_steps 1 \\(this recipe: 2\\)"):
        train(replace(recipe, existence_steps=2), tmp_path / "c", from_handover=tmp_path / "handover")
    with pytest.raises(FileNotFoundError, match="--handover"):
        train(recipe, tmp_path / "d", from_handover=tmp_path / "a")


def test_string_start_marks_the_first_character_in_labels_and_targets():
    scene = world.Scene((230, 230, 230), (), world.Text("47", x=40, y=40, ink=(0, 0, 0)))
    starts = world.string_starts(scene).reshape(-1)
    char = world.patch_labels(scene)["char"].reshape(-1)
    assert sorted(starts[char > 0].tolist()) == [0, 1] and set(starts[char == 0].tolist()) == {-1}
    assert char[starts == 1].tolist() == [world.CHARACTERS.index("4") + 1]
    marked = Trainer(Recipe(string_start=True), Console(quiet=True))
    plain = Trainer(Recipe(string_start=False), Console(quiet=True))
    embeddings = plain.model.get_input_embeddings().weight.detach()
    with_mark, _ = marked._word_targets([scene], embeddings, marked._column_code(embeddings))
    without, _ = plain._word_targets([scene], embeddings, plain._column_code(embeddings))
    differs = (with_mark[0] - without[0]).norm(dim=-1) > 1e-6
    assert differs.nonzero()[:, 0].tolist() == (torch.from_numpy(starts) == 1).nonzero()[:, 0].tolist()


def test_neighbour_heads_start_out_attending_to_the_left_and_right_patch():
    from prunebench.training.recipe import _init_neighbour_heads, _init_positions_2d

    trainer = Trainer(Recipe(), Console(quiet=True))
    tower = trainer.model.model.vision_tower
    inner = getattr(tower, "vision_model", tower)
    grid = trainer.grid
    _init_positions_2d(inner.embeddings.position_embedding.weight, grid)
    attention = inner.encoder.layers[0].self_attn
    _init_neighbour_heads(attention)
    blank = world.Scene((230, 230, 230), (), None)
    with torch.no_grad():  # eager attention probabilities of the first layer, by hand
        x = inner.pre_layrnorm(inner.embeddings(trainer._pixels([blank])))
        x = inner.encoder.layers[0].layer_norm1(x)[0]
        heads, dim = attention.num_heads, attention.head_dim
        q = attention.q_proj(x).view(-1, heads, dim).transpose(0, 1)
        k = attention.k_proj(x).view(-1, heads, dim).transpose(0, 1)
        weights = (q @ k.transpose(1, 2) / dim**0.5).softmax(-1)[:, 1:, 1:]  # patches only (CLS dropped)
    target = torch.arange(grid * grid)
    column = target % grid
    hits = {}
    for head, shift, valid in ((0, -1, column > 0), (1, 1, column < grid - 1), (2, -1, column > 0)):
        hits[head] = float((weights[head].argmax(-1) == target + shift)[valid].float().mean())
    # near the top-left corner the embeddings' mean (cos 0 = 1) skews the layer norm: a few patches miss
    assert hits[0] > 0.9 and hits[1] > 0.9
    assert float(weights[0][column > 0, (target - 1)[column > 0]].mean()) > 0.5
    assert hits[2] < 0.1  # the other heads keep their random start


def test_recipe_trains_saves_and_loads(tmp_path):
    recipe = Recipe(vision_steps=2, vision_batch=2, existence_steps=1, reader_steps=1, side_steps=1,
                    comparison_steps=1, quota_steps=1, projector_steps=2, language_steps=2, language_batch=2,
                    turns=2, probes=3, eval_every=1, threads=1)
    trainer = train(recipe, tmp_path / "tiny")
    stages = [entry["stage"] for entry in trainer.log]
    assert stages == ["vision", "vision", "existence", "reader", "side", "comparison", "quota", "projector",
                      "projector", "language", "language"]
    assert all(np.isfinite(entry["loss"]) for entry in trainer.log)
    assert "accuracy" in trainer.log[-1]
    log = json.loads((tmp_path / "tiny" / "training_log.json").read_text())
    assert log["recipe"]["language_steps"] == 2
    curve = (tmp_path / "tiny" / "learning_curve.md").read_text()
    assert "| step | loss | min |" in curve and curve.count("\n| 1 |") + curve.count("\n| 2 |") == 2
    assert "1 + 1 + 1 + 1 + 1 reader steps (existence / reader / side / comparison / quota)" in curve
    from transformers import LlavaForConditionalGeneration

    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "tiny")
    for (name, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.config.vision_config.image_size == BUILTIN_SPEC.image_size


def test_caption_lists_objects_in_reading_order_and_comes_last():
    scene = world.Scene((230, 230, 230), (world.Shape("red", "square", (40, 8, 47, 15)),
                                          world.Shape("blue", "circle", (8, 8, 15, 15))),
                        world.Text("cat", x=4, y=60, ink=(0, 0, 0)))
    assert world.caption(scene) == "blue circle , red square , cat"
    scene, turns = world.training_example(0, 7)
    assert turns[-1] == (world.CAPTION_PROMPT, world.caption(scene))
    assert all(prompt != world.CAPTION_PROMPT for prompt, _ in turns[:-1])


def test_existence_examples_ask_balanced_well_posed_pope_questions():
    for i in range(20):
        scene, turns = world.existence_example(0, i)
        assert world.existence_example(0, i) == (scene, turns)
        assert turns[-1] == (world.CAPTION_PROMPT, world.caption(scene)) and len(turns) == 7
        here = {(s.colour, s.shape) for s in scene.shapes}
        answers = []
        for prompt, answer in turns[:-1]:
            colour, shape = prompt.split(" in the image?")[0].split()[-2:]
            assert answer == ("yes" if (colour, shape) in here else "no"), prompt
            answers.append(answer)
        assert answers.count("yes") == answers.count("no") == 3


def test_position_examples_ask_one_well_posed_side_or_relation_question():
    kinds = []
    for i in range(60):
        scene, turns = world.position_example(0, i, relation_share=0.5)
        assert world.position_example(0, i, relation_share=0.5) == (scene, turns) and len(turns) == 1
        (prompt, answer), = turns
        question = prompt.split("\n")[0]
        if "of the image" in question:
            kinds.append("side")
            assert (question, answer) in world.side_questions(scene)
            (obj,) = [s for s in scene.shapes if f"the {s.colour} {s.shape} on" in question]
            assert answer == ("left" if obj.centre_x < world.SIZE / 2 else "right")
        else:
            kinds.append("relation")
            assert (question, answer) in world.gqa_questions(scene)["relation"]
    assert 15 < kinds.count("side") < 45
    assert all("of the image" in world.position_example(0, i, relation_share=0.0)[1][0][0] for i in range(20))


def _quota_kinds(scene: world.Scene, turns: list[tuple[str, str]]) -> list[str]:
    """The QUOTA_KINDS kind of every question of a quota conversation, each answer checked."""
    assert turns[-1] == (world.CAPTION_PROMPT, world.caption(scene))
    gqa = {q: a for options in world.gqa_questions(scene).values() for q, a in options}
    gqa.update(world.side_questions(scene))
    kinds = []
    for prompt, answer in turns[:-1]:
        question = prompt.split("\n")[0]
        if question.startswith("Is there"):
            colour, shape = question.split(" in the image?")[0].split()[-2:]
            here = {(s.colour, s.shape) for s in scene.shapes}
            assert answer == ("yes" if (colour, shape) in here else "no")
            kinds.append("existence")
        elif question.lower() == "what is written in the image?":
            assert answer == scene.text.string
            kinds.append("text")
        else:
            assert gqa[question] == answer, question
            kinds.append("position" if answer in ("left", "right") else "other")
    return kinds


def test_quota_examples_ask_every_kind_with_right_answers():
    asked = {kind: 0 for kind in world.QUOTA_KINDS}
    for i in range(40):
        scene, turns = world.quota_example(0, i)
        assert world.quota_example(0, i) == (scene, turns) and len(turns) == 7
        for kind in _quota_kinds(scene, turns):
            asked[kind] += 1
    assert min(asked.values()) >= 20, asked


def test_quota_examples_follow_their_quotas_and_number_share():
    numbers, strings = 0, 0
    for i in range(40):
        scene, turns = world.quota_example(0, i, quotas=(3, 3, 0, 0), numbers=1.0)
        kinds = _quota_kinds(scene, turns)
        if scene.text is None:  # reading falls back to colour / shape / count
            assert kinds.count("existence") == 3 and kinds.count("other") == 3
        else:
            assert sorted(kinds) == ["existence"] * 3 + ["text"] * 3
            strings += 1
            numbers += scene.text.string.isdigit()
    assert strings >= 15 and numbers == strings
    with pytest.raises(ValueError):
        world.quota_example(0, 0, quotas=(2, 2, 2))


def test_command_line_sets_every_training_stage(monkeypatch, tmp_path):
    import argparse

    from prunebench.commands import train as train_module

    parser = argparse.ArgumentParser()
    train_module.add_arguments(parser)
    flags = [f"--{stage}-steps={i + 1}" for i, stage in enumerate(train_module.TINY_LLAVA_STAGES)]
    seen = {}
    monkeypatch.setattr("prunebench.training.recipe.train", lambda recipe, out, **handover: seen.update(recipe=recipe, out=out, **handover))
    assert train_module.main(parser.parse_args(["tiny-llava", "--out", str(tmp_path), *flags])) == 0
    for i, stage in enumerate(train_module.TINY_LLAVA_STAGES):
        assert getattr(seen["recipe"], f"{stage}_steps") == i + 1


def test_default_recipe_is_the_one_the_shipped_model_was_trained_with():
    from dataclasses import asdict

    from prunebench.training.recipe import RECIPES

    logged = json.loads((ASSETS / "tiny-llava" / "training_log.json").read_text())["recipe"]
    default = json.loads(json.dumps(asdict(RECIPES["default"])))  # as logged: tuples become lists
    assert default == logged


def test_alignment_weighs_characters_apart_from_shapes_and_background():
    from prunebench.training.recipe import _alignment_weights

    scene = world.Scene((230, 230, 230), (world.Shape("red", "square", (40, 8, 47, 15)),),
                        world.Text("cat", x=4, y=60, ink=(0, 0, 0)))
    labels = world.patch_labels(scene)
    shown = torch.from_numpy(labels["shape"].reshape(1, -1) > 0)
    weights = _alignment_weights([scene], shown, text_weight=25.0)[0]
    char = torch.from_numpy(labels["char"].reshape(-1) > 0)
    assert int(char.sum()) == 3 and set(weights[char].tolist()) == {25.0}
    assert set(weights[shown[0] & ~char].tolist()) == {5.0} and set(weights[~shown[0]].tolist()) == {1.0}


def test_recipe_refuses_unknown_language_conversations():
    with pytest.raises(ValueError, match="'captions'; valid choices: mix, quota"):
        Recipe(language_data="captions")
    with pytest.raises(ValueError, match="language_quotas"):
        Recipe(language_quotas=(2, 2, 2))


def test_neighbour_character_targets():
    from prunebench.training.recipe import _neighbour_chars

    scene = world.Scene((230, 230, 230), (world.Shape("red", "square", (8, 8, 15, 15)),),
                        world.Text("42", x=40, y=20, ink=(0, 0, 0)))
    char = torch.from_numpy(world.patch_labels(scene)["char"].reshape(1, -1))
    out = _neighbour_chars(char, 24)
    four, two = 5 * 24 + 10, 5 * 24 + 11
    code = {c: world.CHARACTERS.index(c) + 1 for c in "42"}
    assert out["char_left"][0, four] == 0 and out["char_right"][0, four] == code["2"]
    assert out["char_left"][0, two] == code["4"] and out["char_right"][0, two] == 0
    others = torch.ones(576, dtype=torch.bool)
    others[[four, two]] = False
    assert (out["char_left"][0, others] == -1).all() and (out["char_right"][0, others] == -1).all()


def test_projector_targets_are_label_word_embeddings():
    trainer = Trainer(Recipe(probes=3, string_start=False), console=None)  # the mark: test_string_start_...
    scene = world.Scene((230, 230, 230), (world.Shape("red", "square", (8, 8, 15, 15)),),
                        world.Text("42", x=40, y=20, ink=(0, 0, 0)))
    embeddings = torch.randn(len(trainer.tokenizer), 8)
    code = torch.randn(576, 8)
    target, shown = trainer._word_targets([scene], embeddings, code)
    ids = trainer.tokenizer.convert_tokens_to_ids
    square = 2 * 24 + 2  # row 2, column 2: a corner of the square
    torch.testing.assert_close(target[0, square], embeddings[ids(["red", "square", "1"])].sum(0) + code[square])
    four, two = 5 * 24 + 10, 5 * 24 + 11  # "42": one character per patch, in reading order
    torch.testing.assert_close(target[0, four], embeddings[ids(["text", "4"])].sum(0) + code[four])
    torch.testing.assert_close(target[0, two], embeddings[ids(["text", "2"])].sum(0) + code[two])
    torch.testing.assert_close(target[0, 0], embeddings[ids("<image>")] + code[0])
    assert int(shown.sum()) == 4 + 2 and shown[0, square] and shown[0, two] and not shown[0, 0]


def test_right_padded_batches_train_without_the_padding_mask():
    """The language stage drops the padding mask of right-padded batches (SDPA's causal kernel is
    faster): the loss and its gradients must be the masked ones."""
    trainer = Trainer(Recipe(probes=3), console=None)
    examples = [world.quota_example(0, i, turns=2) for i in range(3)]
    batch = trainer._batch([turns for _, turns in examples], [scene for scene, _ in examples])
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # really padded
    assert _causal_only(batch["attention_mask"]) is None
    losses, grads = [], []
    for mask in (batch["attention_mask"], None):
        trainer.model.zero_grad()
        loss = trainer.model(**batch | {"attention_mask": mask}).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(trainer.model.lm_head.weight.grad.clone())
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])
    left = batch["attention_mask"].flip(1)  # left padding: the mask is needed
    assert _causal_only(left) is left


def test_patch_owners_are_cached_read_only():
    scene = world.task_sample("synth-gqa", seed=0, index=3).scene
    owners = world.patch_owners(scene)
    assert world.patch_owners(scene) is owners and not owners.flags.writeable
    with pytest.raises(ValueError):
        owners[0, 0] = 1


def test_thinned_loss_with_every_patch_is_the_models_own_loss():
    trainer = Trainer(Recipe(probes=3), console=None)
    examples = [world.training_example(0, i, turns=2) for i in range(2)]
    scenes = [scene for scene, _ in examples]
    batch = trainer._batch([turns for _, turns in examples], scenes)
    with torch.no_grad():
        own = trainer.model(**batch).loss
        thinned = trainer._thinned_loss(batch, scenes, fraction=1.0, step=0)
        fewer = trainer._thinned_loss(batch, scenes, fraction=0.0, step=0)
    torch.testing.assert_close(thinned, own, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(fewer, own)  # background patches really were dropped


def test_thinned_loss_at_reindexed_positions_is_the_compacted_sequences_loss():
    """``reindex``: the kept tokens as one contiguous sequence (the engine's "reindex" policy), the
    same as the decoder's own loss on that sequence with its default positions."""
    trainer = Trainer(Recipe(probes=3), console=None)
    scene, turns = world.training_example(0, 3, turns=2)
    batch = trainer._batch([turns], [scene])
    adapter = LlavaAdapter(trainer.model)
    with torch.no_grad():
        loss = trainer._thinned_loss(batch, [scene], fraction=0.0, step=0, reindex=torch.tensor([True]))
        original = trainer._thinned_loss(batch, [scene], fraction=0.0, step=0, reindex=torch.tensor([False]))
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        image = (ids == adapter.image_token_id).nonzero()[:, 0]
        shown = torch.from_numpy(world.patch_labels(scene)["shape"].reshape(-1) > 0)
        visual = adapter.project(adapter.encode_images(batch["pixel_values"]).features)[0, shown]
        embeds = torch.cat([adapter.embed(ids[: image[0]]), visual, adapter.embed(ids[image[-1] + 1:])])
        kept_labels = torch.cat([labels[: image[0]], torch.full((len(visual),), -100), labels[image[-1] + 1:]])
        logits = trainer.model.model.language_model(inputs_embeds=embeds[None]).last_hidden_state
        logits = trainer.model.lm_head(logits)[0, :-1]
        reference = F.cross_entropy(logits[kept_labels[1:] != -100], kept_labels[1:][kept_labels[1:] != -100])
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(loss, original)  # the positions really changed
