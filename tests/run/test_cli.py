"""The `prunebench` command line."""

from __future__ import annotations

import subprocess
import sys

from prunebench.commands import main as cli


def test_list_shows_every_method_with_stage_and_options(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for needle in ("random", "pre-LLM", "seed=0", "none", "positions=reindex"):
        assert needle in out


def test_list_tasks_shows_aliases_and_generated_tasks(capsys):
    assert cli.main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    assert "synth-textvqa" in out and "textvqa_val" in out and "mmbench_en_dev_static" in out


def test_a_subcommand_that_is_not_built_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "later", ("prunebench.not_a_module", "something planned"))
    assert cli.main(["later"]) == 2
    assert "not built yet" in capsys.readouterr().err


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "run" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "prunebench", "list"], capture_output=True, text=True, check=True)
    assert "random" in out.stdout


def test_ctrl_c_while_a_subcommand_imports_is_one_line(monkeypatch, tmp_path, capsys):
    (tmp_path / "slow_to_import.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "later", ("slow_to_import", "a subcommand interrupted while importing"))
    assert cli.main(["later"]) == 130
    assert capsys.readouterr().err == "interrupted; finished results are kept\n"


def test_sigterm_is_handled_as_ctrl_c_and_the_handler_restored(monkeypatch, tmp_path, capsys):
    import signal

    (tmp_path / "terminated.py").write_text(
        "import os, signal\n"
        "def add_arguments(parser):\n    pass\n"
        "def main(args):\n    os.kill(os.getpid(), signal.SIGTERM)\n    raise AssertionError('not reached')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "later", ("terminated", "a subcommand ended by SIGTERM"))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["later"]) == 143
    assert capsys.readouterr().err == "terminated (SIGTERM); finished results are kept\n"
    assert signal.getsignal(signal.SIGTERM) is before
