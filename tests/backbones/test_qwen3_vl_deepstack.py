"""Qwen3-VL's DeepStack under pruning: vision levels added to the outputs of decoder layers 0-2 at
the image slots. The engine adds each kept token's own rows (by its original visual index), so
a pruned token's rows leave with it; tokens a method built get none."""

from __future__ import annotations

import pytest
import support.methods  # noqa: F401  (registers the test methods)
import torch
from support.methods import pattern
from support.models import build_backbone, run
from support.references import STEPS, slow_reference

from prunebench.budget import Budget
from prunebench.engine.generate import _add_deepstack
from prunebench.engine.method import create_method
from prunebench.engine.sequence import MERGED, TEXT, TokenLayout


@pytest.fixture(scope="module")
def qwen3():
    return build_backbone("qwen3-vl")


def counts(backbone) -> list[int]:
    return (backbone.batch["input_ids"] == backbone.model.config.image_token_id).sum(-1).tolist()


def test_the_tiny_model_injects_into_layers_0_to_2(qwen3):
    visual = qwen3.model.model.visual
    assert visual.deepstack_visual_indexes == [1, 2, 3] and len(visual.deepstack_merger_list) == 3


@pytest.mark.parametrize("stages", [
    "pre",  # pruned before layer 0: the dropped tokens never get their rows
    "at1",  # after layer 0's injection, before layers 1 and 2 inject
    "at3",  # after every injection
    "two",  # at layers 1 and 2: the second stage drops tokens that got layer 1's rows
])
@pytest.mark.parametrize("positions", ["original", "reindex"])
def test_pruning_equals_the_reference_and_deepstack_counts(qwen3, stages, positions):
    """The engine equals a no-cache reference that adds DeepStack rows token by token; the
    reference without DeepStack is far off, so the comparison sees the injection."""
    spec = {"pre": "test-strided:layer=-1,offset=1", "at1": "test-strided:layer=1,offset=1",
            "at3": "test-strided:layer=3,offset=1", "two": "test-twostage:layers=1/2"}[stages]
    gen = run(qwen3.engine, qwen3.batch, create_method(spec, positions=positions), budget="50%", max_new_tokens=STEPS)
    for b, n in enumerate(counts(qwen3)):
        k = Budget.parse("50%").resolve(n)
        plan = {"pre": [(-1, pattern(n, k, 1))], "at1": [(1, pattern(n, k, 1))], "at3": [(3, pattern(n, k, 1))],
                "two": [(1, pattern(n, k)), (2, pattern(k, max(1, k // 2)))]}[stages]
        tokens, logits = slow_reference(qwen3.model, qwen3.single(b), plan, positions)
        ours = torch.stack([step[b] for step in gen.logits])
        assert gen.tokens[b] == tokens
        torch.testing.assert_close(ours, logits, atol=1e-4, rtol=0)
        _, without = slow_reference(qwen3.model, qwen3.single(b), plan, positions, deepstack=False)
        assert float((ours[0] - without[0].detach()).abs().max()) > 0.05


def test_the_deepstack_step_adds_each_kept_tokens_own_row_and_nothing_to_built_tokens():
    """After pruning (visual ids 3 and 1 kept, one merged token built) the step adds level row 3
    and row 1 at their slots, leaves text, padding and the merged token as they were."""
    torch.manual_seed(0)
    valid = torch.tensor([[False, True, True, True, True, True]])
    visual_id = torch.tensor([[TEXT, TEXT, 1, 3, MERGED, TEXT]])
    layout = TokenLayout(valid=valid, visual_id=visual_id, positions=torch.arange(6)[None])
    hidden, level = torch.randn(1, 6, 8), torch.randn(1, 5, 8)
    out = _add_deepstack(layout, hidden, level)
    expected = hidden.clone()
    expected[0, 2] += level[0, 1]
    expected[0, 3] += level[0, 3]
    assert torch.equal(out, expected)
