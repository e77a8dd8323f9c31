"""What the engine refuses or adapts to: right-padded batches, and the decoder layers' cache
argument under the installed transformers."""

from __future__ import annotations

import inspect
import re
import warnings

import pytest
import torch
from support.models import run

from prunebench.engine.method import create_method


def right_padded(batch):
    """The same batch with every row's padding moved after its tokens."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for b in range(len(ids)):
        n = int(mask[b].sum())
        ids[b] = torch.cat([ids[b][mask[b].bool()], ids[b][~mask[b].bool()]])
        mask[b] = (torch.arange(len(mask[b])) < n).long()
    return {**batch, "input_ids": ids, "attention_mask": mask}


def test_right_padding_is_refused_naming_the_rows(engine, batch):
    padded = right_padded(batch)
    short = [b for b in range(3) if not bool(batch["attention_mask"][b].all())]
    assert short, "the fixture batch has padded rows"
    with pytest.raises(ValueError, match=rf"left-padded batches.*rows {re.escape(str(short))} .*padding_side = 'left'"):
        run(engine, padded, create_method("random"), budget=64, max_new_tokens=1)
    b = short[0]  # one right-padded prompt through the scoring path
    with pytest.raises(ValueError, match=r"left-padded batches.*rows \[0\] "):
        engine.score_continuation(padded["input_ids"][b : b + 1], padded["attention_mask"][b : b + 1],
                                  padded["pixel_values"][b : b + 1], torch.tensor([1]))


def test_a_row_without_tokens_is_refused(engine, batch):
    empty = {**batch, "attention_mask": batch["attention_mask"].clone()}
    empty["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have padding after a token or no token at all"):
        run(engine, empty, max_new_tokens=1)


def test_layers_get_the_cache_argument_this_transformers_names(engine, batch):
    """`cache=` from transformers 5.25 (`past_key_values=` is deprecated there, removed in 5.40);
    `past_key_values=` before. Either way the call raises no deprecation warning."""
    parameters = inspect.signature(type(engine.adapter.layers[0]).forward).parameters
    assert engine.cache_argument in parameters
    assert engine.cache_argument == ("cache" if "cache" in parameters else "past_key_values")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(engine, batch, create_method("fastv"), budget=64,
            max_new_tokens=3)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
