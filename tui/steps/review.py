"""The review step: the whole preset as YAML, the run's name, where to export it, and for a run over
several machines what each of them runs; then the run starts.

The export path and this machine's place among several are the step's own fields (not in the
preset). It needs the model's config and the checked data: a run starts from here.
"""

from __future__ import annotations

from engine.preset import Preset
from tui.draft import Draft
from tui.steps.base import FormField, Step


def default_export_path(draft: Draft) -> str:
    """``<run name or model name>-qlora.yaml`` in the current folder ."""
    from engine.runs import slug

    short = draft.preset.model.source.rstrip("/").split("/")[-1].replace("builtin:", "")
    return f"{draft.preset.output.name or slug(short + '-qlora')}.yaml"


def node_commands(preset: Preset, preset_path: str, master: str | None) -> list[str]:
    """What each machine of a multi-machine run types (``qlora-wizard --preset ... --node-rank R``);
    empty for one machine. ``master``: machine 0's HOST:PORT (a placeholder when not known yet)."""
    nodes = preset.distributed.nodes
    if nodes <= 1:
        return []
    import shlex

    where = master or "HOST:29500"
    return [f"qlora-wizard --preset {shlex.quote(preset_path)} --nodes {nodes} --node-rank {r} --master {where}"
            for r in range(nodes)]


REVIEW_FORM: tuple[FormField, ...] = (
    FormField("run name", "output.name", "str?", "empty: the model's name and the time", placeholder="model and time"),
)
"""The run's name (its folder under runs/)."""

STEP = Step("review", "Review", REVIEW_FORM, needs="data")
"""The review step: what it shows is the draft's preset itself."""
