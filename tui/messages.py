"""Messages the wizard's workers post to the app, which owns the draft and updates it in their handlers.

Workers run the slow engine calls (reading a model's config, checking and tokenizing the data,
probing GPUs, starting a run) off the UI thread and never touch the draft or a widget themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textual.message import Message


class ModelRead(Message):
    """A model's config was read."""

    def __init__(self, key: tuple, info: Any) -> None:
        super().__init__()
        self.key = key
        """(source, revision, trust_remote_code) the facts belong to."""
        self.info = info
        """``engine.modelinfo.ModelInfo``."""


class ModelFailed(Message):
    """Reading a model's config failed."""

    def __init__(self, key: tuple, error: str, needs_code: bool) -> None:
        super().__init__()
        self.key = key
        """(source, revision, trust_remote_code) that was tried."""
        self.error = error
        """One line saying what is wrong and what to do."""
        self.needs_code = needs_code
        """Whether the model needs its own code (the person may allow it)."""


class DataChecked(Message):
    """The data was checked and tokenized."""

    def __init__(self, key: str, report: Any) -> None:
        super().__init__()
        self.key = key
        """The draft's data fingerprint the report belongs to."""
        self.report = report
        """``tui.draft.DataReport``."""


class DataFailed(Message):
    """Checking the data failed."""

    def __init__(self, key: str, error: str) -> None:
        super().__init__()
        self.key = key
        """The draft's data fingerprint that was tried."""
        self.error = error
        """One line saying what is wrong and what to do."""


class GpusProbed(Message):
    """The GPUs were probed."""

    def __init__(self, gpus: list) -> None:
        super().__init__()
        self.gpus = gpus
        """``engine.gpu.GpuInfo`` per detected GPU."""


class RunStarted(Message):
    """The training process was started."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir
        """The new run's directory."""


class RunFailed(Message):
    """The run could not be started."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error
        """One line saying what is wrong."""
