"""`prunebench list`: every method with its stage, options and defaults; models; tasks."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from prunebench.engine.method import available_methods
from prunebench.models.tiny import BUILTIN_RANDOM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="methods", choices=["methods", "models", "tasks", "all"],
                        help="what to list (default: methods)")


def method_table() -> Table:
    table = Table(title="methods", show_lines=False)
    table.add_column("name", style="bold")
    table.add_column("stage")
    table.add_column("options (defaults)")
    table.add_column("description")
    stages = {"pre": "pre-LLM", "llm": "in-LLM", "none": "-"}
    for name, cls in available_methods().items():
        options = ", ".join(f"{f.name}={_show(f.default)}" for f in cls.options())
        table.add_row(name, stages[cls.stage], options, cls.summary())
    return table


def builtin_defaults_table() -> Table:
    """What `prunebench run` runs on the built-in model without --methods, and why each setting."""
    from prunebench.run.harness import BUILTIN_DEFAULTS, DEFAULT_MODEL

    table = Table(title=f"default methods on {DEFAULT_MODEL} (4 decoder layers) and why")
    table.add_column("method", style="bold")
    table.add_column("why this setting")
    for spec, reason in BUILTIN_DEFAULTS.items():
        table.add_row(spec, reason)
    return table


def model_table() -> Table:
    table = Table(title="models")
    table.add_column("name", style="bold")
    table.add_column("what")
    from prunebench.models.loading import ARCHITECTURES, BACKBONES

    for name in BUILTIN_RANDOM:
        table.add_row(name, "LLaVA-1.5 geometry at toy width, random weights, built in code")
    for name in BACKBONES:
        table.add_row(name, "that family's structure at toy width, random weights, its own processor, built in code")
    table.add_row("<hub id | local dir>", f"a checkpoint of {', '.join(ARCHITECTURES)}; downloaded on demand "
                  "(HF_HUB_OFFLINE=1: the local cache only); --revision picks a branch, tag or commit")
    from prunebench.profiling.presets import preset_names

    for name in preset_names():
        table.add_row(name, "real geometry with random weights, for `prunebench profile` (config in prunebench/profiling/presets)")
    return table


def task_table() -> Table:
    from prunebench.run import taskspec

    table = Table(title="tasks (any lmms-eval task name also works)")
    table.add_column("name", style="bold")
    table.add_column("runs as")
    table.add_column("what")
    for name, gen in taskspec.GENERATED.items():
        table.add_row(name, f"lmms-eval `{gen.base}` on generated data", f"{gen.description} ({gen.size} samples)")
    for alias, task in taskspec.ALIASES.items():
        table.add_row(alias, task, "alias")
    for task in taskspec.PAPER_TASKS:
        table.add_row(task, task, "lmms-eval task used in pruning papers")
    return table


def main(args: argparse.Namespace) -> int:
    console = Console()
    if args.what in ("methods", "all"):
        console.print(method_table())
        console.print(builtin_defaults_table())
    if args.what in ("models", "all"):
        console.print(model_table())
    if args.what in ("tasks", "all"):
        console.print(task_table())
    return 0


def _show(value) -> str:
    return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)
