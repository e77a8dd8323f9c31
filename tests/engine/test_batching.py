"""A left-padded batch gives the same answers and the same kept tokens as each prompt alone
(engine-level cases; each method's own test file checks the method the same way)."""

from __future__ import annotations

import pytest
import support.methods  # noqa: F401  (registers the test methods)
from support.references import assert_batch_equals_each_alone


@pytest.mark.parametrize(
    "spec,budget",
    [("none", "all"), ("random", 64), ("random:positions=original", "25%"), ("test-lasttoken:layer=2", 64),
     ("test-lasttoken:layer=1,positions=original", 128), ("test-twostage", 192)],
)
def test_batch_of_three_equals_each_alone(tiny, engine, batch, spec, budget):
    _, processor = tiny
    assert_batch_equals_each_alone(engine, processor, batch, spec, budget, max_new_tokens=8)
