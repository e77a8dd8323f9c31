"""The registry, option parsing, budgets and the errors a user meets."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import support.methods  # noqa: F401  (registers the test methods)
from support.models import run

from prunebench.budget import Budget, BudgetError
from prunebench.engine.method import (
    Method,
    MethodError,
    available_methods,
    create_method,
    parse_method_list,
    register_method,
)


def test_builtin_methods_are_registered():
    methods = available_methods()
    assert {"none", "random"} <= set(methods)
    assert methods["random"].stage == "pre"
    assert "seed" in [f.name for f in methods["random"].options()]


def test_options_are_typed_and_canonical():
    method = create_method("test-strided:layer=3,offset=2,positions=original")
    assert (method.layer, method.offset, method.positions) == (3, 2, "original")
    assert method.spec() == "test-strided:layer=3,offset=2,positions=original"
    assert create_method("test-strided").spec() == "test-strided"
    assert create_method("test-twostage:layers=2/5").layers == (2, 5)


def test_method_list_syntax():
    assert parse_method_list("none,random:seed=2,positions=original,test-lasttoken") == [
        "none", "random:seed=2,positions=original", "test-lasttoken"]
    with pytest.raises(MethodError, match="before any method"):
        parse_method_list("seed=2,random")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nosuch", "unknown method 'nosuch'; valid choices: .*random"),
        ("random:seed", "malformed option 'seed'.*seed=0"),
        ("random:seed=abc", "random:seed='abc'.*expected an integer"),
        ("random:seed=1.5", "expected an integer"),
        ("random:colour=red", "has no option 'colour'; its options: .*seed=0"),
        ("random:positions=shuffled", "must be one of original, reindex"),
    ],
)
def test_bad_method_specs_name_the_valid_choices(spec, message):
    with pytest.raises(MethodError, match=message):
        create_method(spec)


@pytest.mark.parametrize(
    "text,tokens,fraction",
    [("64", 64, None), ("0.25", None, 0.25), ("25%", None, 0.25), ("all", -1, None)],
)
def test_budget_parsing(text, tokens, fraction):
    budget = Budget.parse(text)
    assert (budget.tokens, budget.fraction) == (tokens, fraction)


@pytest.mark.parametrize("text,message", [("0", "positive"), ("-3", "positive"), ("1.5", r"\(0, 1\]"),
                                          ("lots", "give a token count")])
def test_bad_budgets(text, message):
    with pytest.raises(BudgetError, match=message):
        Budget.parse(text)


def test_budget_larger_than_the_image_is_refused(engine, batch):
    with pytest.raises(BudgetError, match="K=600 exceeds the 576 visual tokens"):
        run(engine, batch, create_method("random"), budget=600)


def test_stage_beyond_the_last_layer_is_refused(engine, batch):
    with pytest.raises(MethodError, match="valid: 0..3"):
        run(engine, batch, create_method("test-lasttoken:layer=9"), budget=64)


def test_a_method_keeping_the_wrong_count_is_caught(engine, batch):
    @register_method
    @dataclasses.dataclass(kw_only=True)
    class Greedy(Method):
        name: ClassVar[str] = "test-greedy"
        stage: ClassVar[str] = "pre"

        def select(self, ctx):
            import torch

            from prunebench.engine.method import Selection
            return Selection(keep=torch.arange(ctx.uniform_keep + 1).repeat(ctx.batch_size, 1))

    with pytest.raises(MethodError, match="kept 65 tokens of sample 0; its schedule says 64"):
        run(engine, batch, create_method("test-greedy"), budget=64)


def test_a_stage_may_keep_no_token_only_if_it_builds_some(engine, batch):
    """Keep 0 is a schedule for methods that replace every token (pool); keeping and building
    nothing would leave the LLM without the image."""
    import torch

    from prunebench.engine.method import PRE_LLM, Selection, Stage

    @register_method
    @dataclasses.dataclass(kw_only=True)
    class Nothing(Method):
        name: ClassVar[str] = "test-nothing"
        stage: ClassVar[str] = "pre"
        build: int = 0

        def schedule(self, n_visual, budget, num_layers):
            return [Stage(PRE_LLM, 0)]

        def select(self, ctx):
            built = ctx.visual_hidden()[:, : self.build] if self.build else None
            return Selection(keep=torch.empty(ctx.batch_size, 0, dtype=torch.long), merged=built)

    with pytest.raises(MethodError, match="left a sample with no visual token"):
        run(engine, batch, create_method("test-nothing"), budget=64)
    gen = run(engine, batch, create_method("test-nothing:build=3"), budget=64, max_new_tokens=1)
    assert gen.visual_tokens.tolist() == [[3] * engine.adapter.num_layers] * 3 and gen.kept_patches == [[], [], []]


def test_register_requires_a_dataclass_with_a_name():
    class NotADataclass(Method):
        name: ClassVar[str] = "x"
        stage: ClassVar[str] = "pre"

    with pytest.raises(TypeError, match="must be a dataclass"):
        register_method(NotADataclass)
