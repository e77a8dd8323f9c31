"""A non-editable install ships methods/ and tasks/ inside the package, and the CLI finds them."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_methods_tasks_and_the_console_script(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("prunebench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "prunebench/methods/random.py" in names and "prunebench/methods/none.py" in names
    assert "prunebench/tasks/synthetic.py" in names and "prunebench/tasks/synth_gqa.yaml" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "prunebench = prunebench.commands.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # installed on its own (no repo on the path), the registry finds the shipped methods
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", ("import prunebench.engine.method as m, prunebench; print(prunebench.__file__); "
                                "print(sorted(m.available_methods()))")],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert out.splitlines()[0].startswith(str(target))
    assert "'none'" in out and "'random'" in out


def test_cpu_setup_requirements_are_lmms_evals_without_torchvision_plus_the_eval_pins():
    """setup.sh's CPU path installs lmms-eval with --no-deps, then this list: lmms-eval's own
    requirements minus torch / torchvision / timm, plus the `eval` extra's pins (filelock<4)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "lmms_eval_requirements.py")],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    names = {canonicalize_name(Requirement(line).name) for line in out}
    assert names.isdisjoint({"torch", "torchvision", "timm", "lmms-eval"})
    assert "filelock<4" in out
    assert any(line.startswith("transformers") for line in out)  # one of lmms-eval's own
    assert not any("extra ==" in line for line in out)
    assert 'filelock<4; extra == "eval"' in importlib.metadata.requires("prunebench")
