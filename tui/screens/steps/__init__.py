"""The wizard's step screens, one file each, over their shared base (:mod:`.step`): each renders its
step's declaration from :mod:`tui.steps` and adds its special widgets.

:data:`SCREENS` maps each step's name to its screen class (the class's ``STEP``); the app installs
one screen per step from it.
"""

from __future__ import annotations

from tui.screens.steps.data import DataScreen
from tui.screens.steps.hyper import HyperScreen
from tui.screens.steps.memory import MemoryScreen
from tui.screens.steps.model import ModelScreen
from tui.screens.steps.review import ReviewScreen
from tui.screens.steps.step import StepScreen, StepsBar
from tui.screens.steps.targets import TargetsScreen

__all__ = ["SCREENS", "StepScreen", "StepsBar"]

SCREENS: dict[str, type[StepScreen]] = {
    cls.STEP: cls for cls in (ModelScreen, MemoryScreen, TargetsScreen, DataScreen, HyperScreen, ReviewScreen)
}
"""The screen class of each step, by the step's name (``tui.steps.STEPS``; a test checks it covers them)."""
