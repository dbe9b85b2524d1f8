"""Shared fixtures: the real model configs in tests/fixtures, an isolated cache, a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "hf-configs"
"""Real config.json files of published models (one folder each) and their official parameter counts."""


@pytest.fixture(scope="session")
def hf_configs() -> Path:
    """The folder of real config.json files (one folder per model)."""
    return FIXTURES


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the demo model and tokenized-data cache of the tests away from the user's cache, offline."""
    cache = os.environ.get("QLORA_WIZARD_TEST_CACHE") or str(tmp_path_factory.mktemp("qw-cache"))
    os.environ["QLORA_WIZARD_CACHE"] = cache
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture(scope="session")
def demo_cache(_isolated_cache) -> Path:
    """The session's isolated qlora-wizard cache, with the demo model created in it."""
    from engine.demo import ensure_demo_model

    ensure_demo_model()
    return Path(os.environ["QLORA_WIZARD_CACHE"])


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `qlora-wizard ARGS` in a fresh interpreter, as a person would, and capture its output."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args],
        cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL if input is None else None, input=input,
    )
