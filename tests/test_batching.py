"""A left-padded batch gives the same answers and the same kept tokens as each prompt alone."""

from __future__ import annotations

import pytest
import torch

import helpers_methods  # noqa: F401
from conftest import run, single
from prunebench.method import create_method


@pytest.mark.parametrize(
    "spec,budget",
    [("none", "all"), ("random", 64), ("random:positions=original", "25%"), ("test-lasttoken:layer=2", 64),
     ("test-lasttoken:layer=1,positions=original", 128), ("test-twostage", 192)],
)
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    together = run(engine, batch, create_method(spec), budget=budget, max_new_tokens=8)
    for b in range(3):
        alone = run(engine, single(processor, b), create_method(spec), budget=budget, max_new_tokens=8)
        assert alone.tokens[0] == together.tokens[b]
        assert alone.kept_patches[0] == together.kept_patches[b]
        assert alone.visual_tokens[0].tolist() == together.visual_tokens[b].tolist()
        torch.testing.assert_close(alone.logits[0][0], together.logits[0][b], atol=1e-4, rtol=0)
