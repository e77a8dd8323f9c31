"""Keep-all is exact: every stage of the engine reproduces the model's own greedy generate."""

from __future__ import annotations

import pytest
import torch

import helpers_methods  # noqa: F401  (registers the test methods)
from conftest import run, single
from prunebench.method import create_method

MAX_NEW = 6


@pytest.fixture(scope="module")
def reference(tiny, batch):
    """HF generate on the padded batch: tokens and per-step logits."""
    model, _ = tiny
    out = model.generate(
        **batch, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    tokens = out.sequences[:, batch["input_ids"].shape[1] :]
    return tokens, torch.stack(out.logits, 1)


def assert_matches(gen, reference):
    tokens, logits = reference
    assert [row[:MAX_NEW] for row in gen.tokens] == tokens.tolist()
    ours = torch.stack(gen.logits, 1)
    assert ours.shape == logits.shape
    torch.testing.assert_close(ours, logits.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "spec",
    ["none", "random", "test-strided:layer=-1", "test-strided:layer=0", "test-strided:layer=1", "test-strided:layer=2",
     "test-twostage:second=1.0", "test-lasttoken:layer=2"],
)
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_keep_all_reproduces_generate(engine, batch, reference, spec, positions):
    method = create_method(spec, positions=positions)
    gen = run(engine, batch, method, budget="all", max_new_tokens=MAX_NEW)
    assert_matches(gen, reference)
    n = batch["input_ids"].eq(engine.adapter.image_token_id).sum(-1)
    assert gen.visual_tokens.tolist() == [[int(v)] * engine.adapter.num_layers for v in n]


def test_keep_all_single_prompt_matches_generate(tiny, engine):
    model, processor = tiny
    inputs = single(processor, 1)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    gen = run(engine, inputs, create_method("test-strided:layer=1"), budget="all", max_new_tokens=MAX_NEW)
    assert_matches(gen, (out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, 1)))


def test_eos_stops_and_is_kept(engine, batch, reference):
    tokens, _ = reference
    eos = int(tokens[0, 2])  # pretend the third greedy token of sample 0 is EOS
    gen = run(engine, batch, None, eos_token_id=eos, max_new_tokens=MAX_NEW)
    first = tokens[0].tolist().index(eos)
    assert gen.tokens[0] == tokens[0, : first + 1].tolist()
    for b in (1, 2):
        row = tokens[b].tolist()
        expected = row[: row.index(eos) + 1] if eos in row else row
        assert gen.tokens[b] == expected


def test_stop_string_cuts_text(engine, batch, reference):
    tokens, _ = reference
    tok = engine.tokenizer
    full = run(engine, batch, None, max_new_tokens=MAX_NEW).texts[0]
    stop_word = tok.decode([int(tokens[0, 3])])
    gen = run(engine, batch, None, stop=(stop_word,), max_new_tokens=MAX_NEW)
    assert stop_word not in gen.texts[0]
    assert full.startswith(gen.texts[0])
    assert len(gen.tokens[0]) <= 4


def test_sampling_is_seeded(engine, batch):
    a = run(engine, batch, None, do_sample=True, seed=7, temperature=1.5, max_new_tokens=8)
    b = run(engine, batch, None, do_sample=True, seed=7, temperature=1.5, max_new_tokens=8)
    c = run(engine, batch, None, do_sample=True, seed=8, temperature=1.5, max_new_tokens=8)
    greedy = run(engine, batch, None, max_new_tokens=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    cold = run(engine, batch, None, do_sample=True, seed=7, temperature=1e-6, max_new_tokens=8)
    assert cold.tokens == greedy.tokens
    topk1 = run(engine, batch, None, do_sample=True, seed=3, top_k=1, max_new_tokens=8)
    assert topk1.tokens == greedy.tokens
