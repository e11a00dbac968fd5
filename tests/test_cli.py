"""What every entry point shares (s2g/cli.py), and how the project installs: user errors are one line and exit
code 2, the thread default is set before torch loads, no entry point edits sys.path, and the toy installs under a
namespaced name."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from s2g import cli

ROOT = Path(__file__).resolve().parent.parent


def test_user_errors_are_one_line_and_exit_2(capsys):
    cleaned = []
    with pytest.raises(SystemExit) as e:
        with cli.user_errors(cleanup=lambda: cleaned.append(1)):
            raise FileExistsError("out exists; outputs are never overwritten")
    assert e.value.code == 2 and cleaned == [1]
    assert capsys.readouterr().err == "error: out exists; outputs are never overwritten\n"

    class Wrapper(Exception):  # as Hydra's InstantiationException wraps what a loader raises
        pass

    with pytest.raises(SystemExit) as e:
        with cli.user_errors():
            try:
                raise ValueError("model.checkpoint: file not found: x")
            except ValueError as cause:
                raise Wrapper("Error in call to target") from cause
    assert e.value.code == 2 and capsys.readouterr().err == "error: model.checkpoint: file not found: x\n"
    with pytest.raises(KeyError):  # a bug is not the user's: its traceback stays
        with cli.user_errors(cleanup=lambda: cleaned.append(2)):
            raise KeyError("bug")
    assert cleaned == [1]


def _python(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], cwd="/", env={**base, **env}, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_importing_cli_sets_the_thread_default_unless_the_environment_has_one():
    code = "import os; from s2g import cli; print(os.environ['OMP_WAIT_POLICY'])"
    assert _python(code) == "PASSIVE"
    assert _python(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_the_toy_installs_as_s2g_toy_and_no_bare_toy_module():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "s2g").rglob("__init__.py")}
    assert set(project["packages"]) == packages | {"s2g_toy"}, "pyproject's package list is out of date"
    assert project["package-dir"] == {"s2g_toy": "toy"}
    # away from the repo root (which `python -m pytest` puts on the path), only the installed names import
    assert _python("import importlib.util as u; print(u.find_spec('toy'), u.find_spec('s2g_toy').origin)") == \
        f"None {ROOT / 'toy' / '__init__.py'}"


# Written in parallel with the change that removed the others; drop it from here once it imports s2g as installed.
NOT_YET: set[str] = set()


def test_no_entry_point_edits_sys_path():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    offenders = [f for f in files if not f.startswith("tests/") and f not in NOT_YET and (ROOT / f).is_file()
                 and any(edit in (ROOT / f).read_text() for edit in ("sys.path.insert", "sys.path.append"))]
    assert offenders == [], f"the package is installed (pip install -e .): import it, no sys.path edits: {offenders}"
