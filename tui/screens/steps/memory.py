"""The memory step: will it fit? The detected GPUs, the estimate by component, a bar against the
GPU's free memory with the guide's size x 1.2 figure for reference, updated on every change of
quantization, micro batch, sequence length, checkpointing or optimizer. With several GPUs the
estimate is per GPU for the strategy the run takes (DDP or FSDP), with what is sharded and what
each GPU holds whole, and the largest reference model each strategy fits on them. ``ctrl+f`` sets the fastest
checkpointing, micro batch and accumulation that fit (keeping the effective batch) and says why;
``ctrl+g`` fills the largest micro batch that fits."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, VerticalScroll
from textual.widgets import Input, Label, Static

from engine.errors import UserError
from engine.memory import COMPONENT_DESCRIPTIONS
from tui.format import gib, size
from tui.screens.steps.step import StepScreen
from tui.steps import step_ref
from tui.steps.memory import NO_GPU_LINE, fastest_fit_lines, gpu_line, memory_view, parse_gib


def memory_bar(total: int, budget: int | None, rule: int, width: int) -> Text:
    """The estimate as a bar against the budget, the guide's x1.2 figure marked with ``|``."""
    scale = max(total, budget or 0, rule, 1)
    cells = max(10, width)
    used = min(cells, round(cells * total / scale))
    room = cells if budget is None else round(cells * budget / scale)
    fits = budget is None or total <= budget
    bar = Text()
    for i in range(cells):
        if i < used:
            over = budget is not None and i >= room
            bar.append("█", "red" if over or not fits else "green")
        elif i < room:
            bar.append("░", "dim green")
        else:
            bar.append(" ")
    mark = min(cells - 1, round(cells * rule / scale))
    bar = bar[:mark] + Text("|", "bold yellow") + bar[mark + 1:]
    return bar


class MemoryScreen(StepScreen):
    """Training memory against the GPU."""

    STEP = "memory"

    BINDINGS = [
        Binding("ctrl+f", "fastest_fit", "Fastest fit",
                tooltip="Set checkpointing, micro batch and accumulation to the fastest that fit, keeping "
                        "the effective batch"),
        Binding("ctrl+g", "fill_batch", "Largest batch", tooltip="Set the largest micro batch that fits"),
    ]

    fastest = None
    """The last ``ctrl+f`` result (``engine.speed.FastestFit``), shown while the draft and the
    budget are as it left them."""
    fastest_for = None
    """(draft preset, typed budget) right after ``fastest`` was applied."""

    def compose_step(self) -> ComposeResult:
        yield Static(id="gpus")
        with Horizontal(classes="step-body"):
            with Grid(id="memory-form", classes="form") as form:
                form.border_title = "settings"
                yield from self.compose_fields()
                yield Label("GPU memory (GiB)")
                yield Input(placeholder="the GPU's free memory", id="budget", compact=True,
                            tooltip="Check against this much memory instead of the detected GPU's free memory")
            with VerticalScroll(id="estimate-box") as box:
                box.border_title = "estimated peak"
                yield Static(id="verdict")
                yield Static(id="bar")
                yield Static(id="fastest")
                yield Static(id="components")

    def on_mount(self) -> None:
        """Show the estimate."""
        super().on_mount()
        self.refresh_view()

    def _budget(self) -> int | None:
        return parse_gib(self.query_one("#budget", Input).value)

    @on(Input.Changed, "#budget")
    def _budget_changed(self) -> None:
        self.refresh_view()

    def refresh_step(self) -> None:
        """Recompute the estimate for the draft as it is now."""
        draft = self.draft
        gpus = self.query_one("#gpus", Static)
        if draft.gpus:
            gpus.update(Text("  ".join(gpu_line(g) for g in draft.gpus)))
        else:
            gpus.update(Text(f"{NO_GPU_LINE}; type its memory to check", "yellow"))
        verdict, bar, table = (self.query_one(f"#{n}", Static) for n in ("verdict", "bar", "components"))
        if not draft.model_ready:
            verdict.update(Text(f"read a model first ({step_ref('model')})", "yellow"))
            bar.update("")
            table.update("")
            return
        try:
            view = memory_view(draft, self._budget())
        except UserError as exc:
            verdict.update(Text(exc.one_line(), "bold red"))
            return
        est = view.estimate
        self.view = view
        badge, figures = view.verdict
        style = "bold black on green" if view.fits else "bold white on red"
        verdict.update(Text.assemble(*([(badge, style), " "] if badge else []), figures))
        width = max(20, self.query_one("#estimate-box").size.width - 4)
        # Several GPUs: the strategy, what is sharded and what each GPU holds whole (nothing for one).
        world = [Text(view.world_line, "bold cyan")] if view.world_line else []
        world += [Text(view.sharing, "dim")] if view.sharing else []
        lines = [*world, memory_bar(est.total_bytes, view.budget_bytes, est.inference_rule_bytes, width),
                 Text.assemble(("| ", "bold yellow"), "guide's rule, weights x 1.2: ",
                               (size(est.inference_rule_bytes), "bold"))]
        fit = view.fit
        if fit is not None:
            mb, sl = fit.max_micro_batch, fit.max_seq_len
            lines.append(Text.assemble(f"largest micro batch at {view.settings.seq_len:,}: ",
                                       (str(mb) if mb else "none fits", "bold"), (" ^g", "dim")))
            lines.append(Text.assemble("longest sequence at batch 1: ", (f"{sl:,}" if sl else "none", "bold")))
        if view.largest:
            lines.append(Text(view.largest))
        bar.update(Group(*lines))
        self._show_fastest()
        wide = width >= 70  # room for what each component is
        t = Table(box=None, show_header=False, padding=(0, 1), expand=False)
        t.add_column(no_wrap=True, min_width=19)
        t.add_column(justify="right", no_wrap=True, min_width=10)
        if wide:
            t.add_column(style="dim", overflow="ellipsis", no_wrap=True)
        for name, b in est.components.items():
            t.add_row(name.replace("_", " "), size(b), *([COMPONENT_DESCRIPTIONS.get(name, "")] if wide else []))
        t.add_row(Text("total", "bold"), Text(gib(est.total_bytes), "bold"),
                  *([f"torch reserved {gib(est.reserved_bytes)}"] if wide else []))
        below = [Text(view.context_line, "dim")] if view.budget_bytes is not None else []
        below.append(Text(view.kernels, "dim"))
        below += [Text(f"note: {note}", "italic") for note in est.notes]
        table.update(Group(t, *below))

    def _show_fastest(self) -> None:
        """What ``ctrl+f`` chose and why, while the draft is as it left it."""
        box = self.query_one("#fastest", Static)
        current = (self.draft.preset, self.query_one("#budget", Input).value)
        box.display = self.fastest is not None and self.fastest_for == current
        if not box.display:
            return
        head, *reasons = fastest_fit_lines(self.fastest)
        style = "bold green" if self.fastest.found else "bold red"
        why = Table.grid()
        why.add_column(no_wrap=True)
        why.add_column(ratio=1)
        for reason in reasons:
            why.add_row("  - ", reason.removeprefix("  - "))
        box.update(Group(Text(head, style), why))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """``ctrl+f`` and ``ctrl+g`` apply once there is a budget to fit."""
        if action in ("fill_batch", "fastest_fit"):
            view = getattr(self, "view", None)
            return True if self.draft.model_ready and view is not None and view.fit is not None else None
        return super().check_action(action, parameters)

    def action_fastest_fit(self) -> None:
        """Set the fastest checkpointing, micro batch and accumulation that fit, and show why."""
        try:
            result = self.draft.apply_fastest_fit(self._budget())
        except UserError as exc:
            self.notify(exc.one_line(), severity="warning")
            return
        self.fastest = result
        self.fastest_for = (self.draft.preset, self.query_one("#budget", Input).value)
        if result.found:
            self.notify(f"fastest that fits: {result.choice.words}")
        else:
            self.notify(result.reasons[0], severity="error", timeout=10)
        self.refresh_view()

    def action_fill_batch(self) -> None:
        """Set the largest micro batch that fits the budget."""
        view = getattr(self, "view", None)
        if view is None or view.fit is None:
            self.notify("no GPU memory to fit against: type it in the form", severity="warning")
            return
        mb = view.fit.max_micro_batch
        if not mb:
            self.notify(f"even micro batch 1 needs more than {gib(view.budget_bytes)}: shorten the sequence, "
                        "turn on checkpointing or pick an 8-bit optimizer", severity="error", timeout=10)
            return
        self.draft.set("training.micro_batch_size", mb)
        self.notify(f"micro batch {mb}: the largest that fits")
        self.refresh_view()
