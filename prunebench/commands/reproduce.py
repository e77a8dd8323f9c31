"""`prunebench reproduce NAME`: run a paper protocol (prunebench.run.reproduce), then print how the
measured numbers compare with the published ones (prunebench.report.reference)."""

from __future__ import annotations

import argparse
import shlex

from rich.console import Console
from rich.table import Table as RichTable

from prunebench.run.reproduce import (
    RECIPES,
    check_needs,
    describe,
    get_recipe,
    make_plan,
    measured_estimate,
    meta_engine,
    parameters,
    require,
    roofline_estimate,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help=f"the recipe: {', '.join(RECIPES)}")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the cells, the downloads and the GPU time, and run nothing (offline, no weights)")
    parser.add_argument("--results", default="results", help="results store (default: results)")
    parser.add_argument("--tasks", default=None, help="run a subset of the recipe's tasks (comma-separated)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N samples of each task (a smoke run; the papers use full splits)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates of the intervals (default 2000)")


def main(args: argparse.Namespace) -> int:
    console = Console()
    if args.list:
        console.print(recipe_table())
        return 0
    recipe = get_recipe(args.name)
    plan = make_plan(recipe, args.tasks, args.limit, args.results)
    from prunebench.results import ResultStore

    store = ResultStore(args.results)
    engine = meta_engine(recipe)
    needs = check_needs(plan)
    if args.dry_run:
        estimates = [e for e in (measured_estimate(plan, store), roofline_estimate(plan, engine)) if e is not None]
        print(describe(plan, parameters(engine), needs, estimates))
        return 0
    require(plan, needs, parameters(engine) * 2 / 1e9)
    from prunebench.commands.main import main as cli

    for argv in plan.run_commands():
        console.print(f"[bold]prunebench {shlex.join(argv)}[/]", soft_wrap=True)
        code = cli(argv)
        if code:
            return code
    from prunebench.report.reference import reference_table
    from prunebench.report.tables import print_table

    records = [r for r in store.records() if r.kind == "eval" and r.key.model == recipe.model
               and r.key.limit == plan.limit and r.key.task in plan.tasks]
    print_table(reference_table(records, store, n_boot=args.bootstrap, compared_only=True), console)
    limit = "" if plan.limit is None else f" --limit {plan.limit}"
    console.print(f"every published cell, with why the others are not compared: prunebench report --results "
                  f"{args.results} --model {recipe.model}{limit} --reference", soft_wrap=True)
    return 0


def recipe_table() -> RichTable:
    table = RichTable(title="recipes (prunebench reproduce NAME)")
    for column in ("name", "model", "tasks", "runs (methods @ budgets)", "what"):
        table.add_column(column)
    for recipe in RECIPES.values():
        runs = "; ".join(f"{methods} @ {budgets}" for methods, budgets in recipe.runs)
        table.add_row(recipe.name, recipe.model, ", ".join(recipe.tasks), runs, recipe.description)
    return table
