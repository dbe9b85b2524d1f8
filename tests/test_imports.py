"""The engine is a library: it never loads a UI toolkit, and the command line starts light."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import engine
from conftest import ROOT, run_cli

UI_MODULES = ("textual", "rich", "questionary")


def _engine_modules() -> list[str]:
    return sorted(f"engine.{m.name}" for m in pkgutil.iter_modules(engine.__path__))


def test_every_engine_module_imports_without_ui_toolkits():
    code = (
        "import importlib, sys\n"
        f"for name in {_engine_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        f"bad = [m for m in {UI_MODULES!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"engine imported UI toolkits: {out.stdout.strip()}"


def test_engine_modules_do_not_import_torch_at_import_time():
    code = (
        "import importlib, sys\n"
        f"for name in {_engine_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, 'datasets' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_help_answers_without_loading_torch():
    code = (
        "import sys\n"
        "from tui.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "usage: qlora-wizard" in out.stdout
    assert out.stdout.strip().endswith("NO-TORCH")


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("inspect", "estimate", "lr", "runs", "resume", "attach", "--preset"):
        assert cmd in r.stdout
