"""The LoRA targets step: the model's own layer names with their sizes and the parameters LoRA adds
to each; shortcuts for query and value, all attention, all linear; rank, alpha and dropout; the
trainable parameters, their share of the model and the memory they add."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical
from textual.widgets import Button, SelectionList, Static
from textual.widgets.selection_list import Selection

from engine.errors import UserError
from tui.format import count, size
from tui.screens.steps.step import StepScreen
from tui.steps import step_ref
from tui.steps.targets import SHORTCUTS, lora_view, selected_targets, target_shortcuts, targets_value


class TargetsScreen(StepScreen):
    """Which layers get adapters, and how big."""

    STEP = "targets"

    def compose_step(self) -> ComposeResult:
        with Horizontal(classes="step-body"):
            with Vertical(id="targets-left"):
                layers = SelectionList[str](id="layers")
                layers.border_title = "layer  in>out x count  params  +LoRA"
                layers.border_subtitle = "space toggles"
                yield layers
                with Horizontal(id="shortcuts"):
                    for key, label in SHORTCUTS:
                        yield Button(label, id=f"only-{key}", compact=True)
            with Vertical(id="targets-right"):
                with Grid(id="lora-form", classes="form") as form:
                    form.border_title = "adapters"
                    yield from self.compose_fields()
                yield Static(id="lora-summary")

    def on_mount(self) -> None:
        """List the layers."""
        super().on_mount()
        self.refresh_view()

    def ready(self) -> bool:
        """A model with at least one layer chosen."""
        return super().ready() and bool(self.query_one("#layers", SelectionList).selected)

    def _fill_layers(self) -> None:
        """(Re)build the list for the draft's model; keeps it when the model is the same."""
        info = self.draft.info
        layers = self.query_one("#layers", SelectionList)
        if getattr(self, "_listed_for", None) == self.draft.info_key:
            return
        self._listed_for = self.draft.info_key
        chosen = set(selected_targets(self.draft))
        r = self.draft.preset.lora.r
        with self.prevent(SelectionList.SelectedChanged):
            layers.clear_options()
            width = max(len(t.name) for t in info.targets)
            for t in info.targets:
                label = Text.assemble((t.name.ljust(width), "bold"), f" {t.in_features:,}>{t.out_features:,}",
                                      (f" x{t.count}", "dim"), f"  {count(t.weight_params)}",
                                      (f"  +{count(t.lora_params(r))}", "cyan"))
                layers.add_option(Selection(label, t.name, t.name in chosen))

    def refresh_step(self) -> None:
        """Show the layers and what the adapters cost."""
        summary = self.query_one("#lora-summary", Static)
        if not self.draft.model_ready:
            summary.update(Text(f"read a model first ({step_ref('model')})", "yellow"))
            return
        if getattr(self, "_listed_r", None) != self.draft.preset.lora.r:
            self._listed_for = None  # the LoRA counts in the labels depend on r
            self._listed_r = self.draft.preset.lora.r
        self._fill_layers()
        selected = self.query_one("#layers", SelectionList).selected
        if not selected:
            summary.update(Text("pick at least one layer", "bold red"))
            return
        try:
            view = lora_view(self.draft)
        except UserError as exc:
            summary.update(Text(exc.one_line(), "bold red"))
            return
        p = self.draft.preset.lora
        summary.update(Text.assemble(
            "trainable ", (f"{view.trainable:,}", "bold cyan"), " parameters\n",
            (f"{100 * view.share:.3g} %", "bold"), f" of the model's {count(self.draft.info.params_total)}\n",
            "memory added ", (size(view.memory_bytes), "bold"), "\n",
            ("(adapters, their gradients, optimizer states)\n", "dim"),
            f"update scale alpha / r = {p.alpha / p.r:g}",
        ))

    @on(SelectionList.SelectedChanged, "#layers")
    def _selection(self, event: SelectionList.SelectedChanged) -> None:
        selected = list(event.selection_list.selected)
        if selected:
            self.draft.set("lora.targets", targets_value(self.draft.info, selected))
            self.set_error(None)
        else:
            self.set_error("pick at least one layer to adapt")
        self.refresh_view()

    @on(Button.Pressed, "#shortcuts Button")
    def _shortcut(self, event: Button.Pressed) -> None:
        self.choose((event.button.id or "").removeprefix("only-"))

    def choose(self, shortcut: str) -> None:
        """Select exactly one shortcut's layers (``qv``, ``attention`` or ``all``)."""
        if not self.draft.model_ready:
            return
        names = target_shortcuts(self.draft.info)[shortcut]
        self.draft.set("lora.targets", targets_value(self.draft.info, names))
        self._listed_for = None
        self.set_error(None)
        self.refresh_view()
