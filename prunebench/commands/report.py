"""`prunebench report`: the command line of prunebench.report.build."""

from __future__ import annotations

import argparse

from rich.console import Console

from prunebench.report.build import parse_formats, write_report
from prunebench.report.tables import FORMATS
from prunebench.results import ResultStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="results", help="results store folder (default: results)")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="model(s) to report, repeatable or comma-separated (default: every model in the store)",
    )
    parser.add_argument(
        "--limit", default=None, help="only records evaluated on this many samples per task ('full' = whole tasks)"
    )
    parser.add_argument(
        "--format",
        default=None,
        help="comma-separated from md,latex,csv,html (default with --out: all; without: none, i.e. rich tables only)",
    )
    parser.add_argument("--out", default=None, help="write tables and plots here, one subfolder per model")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired comparison of two method specs")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--stats", action="store_true", help="also print the statistics table on the console")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots with --out")
    parser.add_argument("--reference", action="store_true",
                        help="also compare each cell with the numbers papers publish for it (prunebench/references)")
    parser.add_argument("--strict", action="store_true",
                        help="refuse a store holding an unreadable record file (default: skip it with a warning)")


def main(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze wide tables into 80 columns
        console.width = max(console.width, 160)
    formats = parse_formats(args.format, tuple(FORMATS) if args.out else ())
    write_report(ResultStore(args.results), args.model, args.limit, formats, args.out,
                 tuple(args.compare) if args.compare else None, args.bootstrap, args.seed, args.stats,
                 not args.no_plots, console, args.reference, args.strict)
    return 0
