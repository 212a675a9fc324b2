"""The version: one number, in pyproject.toml, that the package and its command print."""

import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import captioner
from captioner.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


def test_version_is_pyprojects():
    declared = re.search(r'^version = "([^"]+)"', _pyproject(), re.MULTILINE).group(1)
    assert captioner.__version__ == declared


def test_python_m_captioner_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "captioner", "--version"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"captioner {captioner.__version__}"


def test_console_script_is_the_same_command(capsys):
    target = re.search(r'^captioner = "([^"]+)"', _pyproject(), re.MULTILINE).group(1)
    module, function = target.split(":")
    assert getattr(importlib.import_module(module), function) is main
    assert main([]) == 0  # no argument: the help, with the commands to run
    assert "python train.py experiment=quickstart" in capsys.readouterr().out


def test_version_without_installed_metadata(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    try:
        assert importlib.reload(captioner).__version__ == "0+unknown"
    finally:
        monkeypatch.undo()
        importlib.reload(captioner)
    assert captioner.__version__ != "0+unknown"
