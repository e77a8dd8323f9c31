"""`prunebench` command line: one subcommand per module, imported only when that subcommand runs
(so `prunebench report` does not pay for importing transformers).

Each subcommand module defines ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from prunebench.errors import UserError

# name -> (module, one-line help). A module that does not exist yet is reported as not built.
SUBCOMMANDS = {
    "run": ("prunebench.commands.run", "evaluate methods x budgets x tasks through lmms-eval"),
    "list": ("prunebench.commands.listing", "list methods (with stage and options), tasks and models"),
    "profile": ("prunebench.commands.profile", "time vision / pruner / prefill / decode, TFLOPs, KV cache"),
    "report": ("prunebench.commands.report", "accuracy-retention and speed tables (md, latex, csv) and plots"),
    "train": ("prunebench.commands.train", "train a learned selector (autoselect, gumbel)"),
    "reproduce": ("prunebench.commands.reproduce", "run a paper's protocol and compare with its published numbers"),
    "draw-task": ("prunebench.commands.draw_task", "write a generated task's evaluation set drawn with another --seed"),
}


def _load(name: str):
    module_name, _ = SUBCOMMANDS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return None


class UsageError(UserError):
    """A command line argparse cannot read (a missing value, a number that is not one)."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (UsageError) instead of the usage block and exit."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's time limit, `kill`): handled as Ctrl-C, so locks are released."""


def _terminate(signum, frame):
    raise Terminated


def build_parser(selected: str | None = None):
    """The parser, with the arguments of the ``selected`` subcommand (its module, or None)."""
    parser = Parser(
        prog="prunebench",
        description="Benchmark visual-token pruning methods for VLMs under one engine, one protocol, one timer.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = _load(name)
            if module is not None:
                module.add_arguments(sub)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input is one line on stderr and exit 2, Ctrl-C exit 130, SIGTERM 143."""
    argv = sys.argv[1:] if argv is None else list(argv)
    handles_term = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handles_term else None
    command = "prunebench"
    try:
        selected = next((a for a in argv if not a.startswith("-")), None)
        command = f"prunebench {selected}" if selected in SUBCOMMANDS else command
        parser, module = build_parser(selected if selected in SUBCOMMANDS else None)
        args, extra = parser.parse_known_args(argv)
        args.argv = argv  # recorded in results provenance
        if args.command is None:
            parser.print_help()
            return 2
        if module is None:
            print(f"prunebench {args.command}: not built yet (planned: {SUBCOMMANDS[args.command][1]}).", file=sys.stderr)
            return 2
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return int(module.main(args) or 0)
    except UserError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM); finished results are kept", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; finished results are kept", file=sys.stderr)
        return 130
    finally:
        if handles_term:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
