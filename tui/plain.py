"""The wizard's six steps as plain line-by-line prompts: ``qlora-wizard plain``.

For terminals where the full-screen app misbehaves (a serial console, a screen reader, a
multiplexer that mangles the layout). It edits the same :class:`~tui.draft.Draft` and renders the
same step declarations as the full-screen wizard (:data:`tui.steps.STEPS`: each step's fields, with
the same choices, and what it needs done first), showing the same figures and checks (from the
steps' modules), asking one question at a time with questionary and printing plain lines, and it
ends the same way: an exported preset and a started run, followed by the console runner
(:func:`tui.console.follow_run`).

Enter keeps the value shown; ``?`` at a value prints the field's help; after each step a menu goes
on, goes back or jumps to any step. Ctrl-C (or the end of the input) at any question keeps the
draft in the cache and exits with status 130. No Textual import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import questionary
from rich.console import Console
from rich.text import Text

from engine.errors import EXIT_OK, EXIT_STOPPED, NeedsRemoteCode, UserError, first_line
from tui.draft import Draft, Services, choice_options, keep_draft, parse_field, shown
from tui.format import count, gib
from tui.steps import STEP_NAMES, STEPS, FormField, Step
from tui.steps.data import render_example
from tui.steps.hyper import METHOD_FORM, advice_lines, batch_words, lr_view
from tui.steps.memory import NO_GPU_LINE, fastest_fit_lines, fit_line, gpu_line, memory_view, parse_gib
from tui.steps.model import (
    INIT_FROM_HINT,
    INIT_FROM_TITLE,
    init_from_choices,
    init_from_value,
    init_from_values,
    model_facts,
    recent_models,
    stale_init_from,
    starting_runs,
)
from tui.steps.review import default_export_path, node_commands
from tui.steps.targets import SHORTCUTS, lora_view, selected_targets, target_shortcuts, targets_value

TRAINED_STYLE = "bold green"
"""How the tokens the model is trained on are shown on a terminal (they are also put between « »)."""

TRAINED_MARKS = ("«", "»")
"""Around the trained part of an example, so it shows without colour too."""

_FINISHED = "finished"
"""What the review step returns when the walk is over (a run started, or the person is done)."""

FAILED = object()
"""What :meth:`PlainWizard.attempt` returns when the call failed (and the error line was printed)."""


class PlainWizard:
    """One walk through the steps: the draft, the engine calls, and where the prompts read and draw."""

    def __init__(self, draft: Draft, services: Services, runs_dir: str | os.PathLike = "runs",
                 input: Any = None, output: Any = None) -> None:
        self.draft = draft
        """The preset being built and what is known about it."""
        self.services = services
        """The engine calls."""
        self.runs_dir = Path(runs_dir)
        """Where earlier runs are (for the recent models)."""
        self.io = {k: v for k, v in (("input", input), ("output", output)) if v is not None}
        """prompt_toolkit input and output for every prompt (the terminal when empty)."""
        self.console = Console(highlight=False, soft_wrap=True)
        """Where the lines go: sys.stdout as it is at each print (plain text when it is not a terminal)."""
        self.gpus_probed = False
        """Whether the GPUs have been looked for."""
        self.budget_bytes: int | None = None
        """GPU memory typed to check against, on a machine without a GPU."""
        self.run_dir: Path | None = None
        """The run started at the review step."""
        self.steps: dict[str, Callable[[Step], str | None]] = {
            "model": self.step_model, "memory": self.step_memory, "targets": self.step_targets,
            "data": self.step_data, "hyper": self.step_hyper, "review": self.step_review,
        }
        """Each step's prompts by the step's name (``tui.steps.STEPS``): the walk asks them through this.
        Each takes its step's declaration and returns the step to go to next (None: ask), or the end."""

    # ---- output and questions ----------------------------------------------------------

    def say(self, *parts: str | Text | tuple[str, str]) -> None:
        """Print one line assembled from plain strings, Texts and (text, style) pairs."""
        self.console.print(Text.assemble(*parts))

    def error(self, message: str) -> None:
        """Print a problem as one ``error:`` line."""
        self.say(("error: ", "bold red"), message)

    def attempt(self, call: Callable[[], Any], what: str, passes: tuple[type[Exception], ...] = ()) -> Any:
        """``call()``'s result; when it raises, one ``error:`` line and :data:`FAILED`. The line is a
        UserError's own, or ``what: <first line>`` of any other exception: every failure is said in
        one line. Exceptions of the types in ``passes`` are raised on, for the caller to handle."""
        try:
            return call()
        except passes:
            raise
        except UserError as exc:
            self.error(exc.one_line())
        except Exception as exc:  # noqa: BLE001 - any failure is said in one line
            self.error(f"{what}: {first_line(exc)}")
        return FAILED

    def text(self, message: str, default: str = "") -> str:
        """Ask for a line of text; Enter keeps ``default``."""
        return questionary.text(message, default=default, **self.io).unsafe_ask().strip()

    def select(self, message: str, choices: list[tuple[str, str]] | tuple, default: str | None = None) -> str:
        """Ask for one of ``choices`` ((title, value) pairs); Enter takes the one pointed at (``default``)."""
        options = [questionary.Choice(title, value) for title, value in choices]
        return questionary.select(message, choices=options, default=default, **self.io).unsafe_ask()

    def confirm(self, message: str, default: bool) -> bool:
        """Ask yes or no; Enter takes ``default``."""
        return bool(questionary.confirm(message, default=default, **self.io).unsafe_ask())

    def ask_field(self, label: str, path: str, kind: str, default: Any = None,
                  shortcuts: dict[str, Callable[[], bool]] | None = None) -> None:
        """Ask one preset field until the draft takes it (a refused value is said, then asked again).
        An answer in ``shortcuts`` runs its action instead; the question is done when that returns True."""
        from engine.preset import field_help

        current = shown(self.draft.get(path) if default is None else default)
        while True:
            answer = self.text(label, current)
            if answer == "?":
                self.say(("  " + field_help(path), "dim"))
                continue
            if shortcuts and answer.lower() in shortcuts:
                if shortcuts[answer.lower()]():
                    return
                continue
            try:
                self.draft.set(path, parse_field(answer, kind, label))
                return
            except UserError as exc:
                self.error(exc.one_line())
                current = answer

    def ask_choice_field(self, label: str, path: str) -> None:
        """Ask a preset field that has a fixed set of values (the schema's)."""
        self.draft.set(path, self.select(label, choice_options(path), default=self.draft.get(path)))

    def ask_switch_field(self, question: str, path: str) -> None:
        """Ask an on/off preset field as a yes/no question; Enter keeps the draft's value."""
        self.draft.set(path, self.confirm(question, default=self.draft.get(path)))

    def ask_form_field(self, f: FormField) -> None:
        """Ask one field a step declares (the full-screen wizard shows it too), by its kind."""
        if f.is_switch:
            self.ask_switch_field(f.prompt, f.path)
        elif f.is_choice:
            self.ask_choice_field(f.prompt, f.path)
        else:
            self.ask_field(f.prompt, f.path, f.kind)

    # ---- the walk ----------------------------------------------------------------------

    def walk(self) -> Path | None:
        """Ask the steps, in order or as the person jumps, until a run starts (its directory) or they finish."""
        self.say(("qlora-wizard plain", "bold"), ": the wizard's six steps as questions. Enter keeps the value "
                 "shown, ? at a value prints its help, Ctrl-C keeps the draft and quits.")
        index = 0
        while True:
            step = STEPS[index]
            self.console.print()
            self.say((f"step {index + 1} of {len(STEPS)}: {step.title}", "bold underline"))
            goto = self.not_yet(step) or self.steps[step.name](step)
            if goto == _FINISHED:
                return self.run_dir
            index = STEP_NAMES.index(goto) if goto else self.next_step(index)

    def next_step(self, index: int) -> int:
        """After a step: go on to the next (the default), back to the previous, or to any other step."""
        choices = []
        for i, step in enumerate(STEPS):
            if i == index:
                continue
            verb = "continue to" if i == index + 1 else ("back to" if i == index - 1 else "go to")
            choices.append((f"{verb} {i + 1}. {step.title}", str(i)))
        return int(self.select("next", choices, default=str(index + 1)))

    def not_yet(self, step: Step) -> str | None:
        """The step to go to first (saying why) when what ``step`` needs (``Step.needs``: the model
        read, the data checked) is not done, else None; the data is checked here first when the
        step needs it and its settings changed since."""
        if step.needs == "data":
            self.ensure_data()
        missing = self.draft.first_missing(step.needs)
        if missing is None:
            return None
        self.say(("not yet: ", "yellow"), missing[1])
        return missing[0]

    # ---- the model step ----------------------------------------------------------------

    def step_model(self, step: Step) -> str | None:
        """Choose the model (typed, a shipped preset's or a recent one) and show what it is."""
        failed = False
        while True:
            if self.pick_model(failed) and (self.draft.model_ready or self.read_model()):
                break
            failed = True
        self.show_model()
        self.ask_init_from()
        return None

    def ask_init_from(self) -> None:
        """Offer the finished runs of this model to start from (``lora.init_from``), when there are any;
        a run picked for another model before goes back to fresh adapters, said."""
        note = stale_init_from(self.draft.preset)
        if note:
            self.draft.set("lora.init_from", None)
            self.say(note)
        runs = starting_runs(self.draft.preset.output.runs_dir, self.draft.preset.model.source)
        if not runs:
            return
        current = self.draft.preset.lora.init_from
        self.say((INIT_FROM_TITLE, "bold"), f": {INIT_FROM_HINT}")
        answer = self.select(INIT_FROM_TITLE, init_from_choices(runs, current),
                             default=init_from_value(runs, current))
        if (answer or None) != current:
            if self.attempt(lambda: self.draft.set_many(init_from_values(self.draft.preset, answer)),
                            f"cannot start from {answer}") is FAILED:
                return
        if answer:
            lora = self.draft.preset.lora
            self.say(f"starting from the adapter in {answer} (LoRA rank {lora.r}, alpha {lora.alpha:g})")

    def pick_model(self, failed: bool) -> bool:
        """Ask which model; False when nothing usable was given."""
        from engine.preset import shipped_presets

        current = self.draft.preset.model.source
        choices = [(f"{'try again' if failed else 'keep'}: {current}", "keep"),
                   ("type a model (a Hub id org/name, a model folder, a .gguf file, or builtin:tiny-llama)", "type")]
        try:
            recent = recent_models(self.runs_dir)
        except Exception:  # noqa: BLE001 - unreadable runs just mean no recent models
            recent = []
        choices += [(f"recent: {m}", f"model:{m}") for m in recent]
        choices += [(f"preset: {p.stem}", f"preset:{p}") for p in shipped_presets()]
        answer = self.select("model", choices, default="type" if failed else "keep")
        kind, _, value = answer.partition(":")
        if kind == "type":
            value = self.text("model (Hub id, model folder, .gguf file or builtin:tiny-llama)", current)
            if not value:
                self.error("type a Hub id (org/name), a model folder, a .gguf file, or builtin:tiny-llama")
                return False
        elif kind == "preset":
            try:
                self.draft.load_preset(value)
            except UserError as exc:
                self.error(exc.one_line())
                return False
            self.say(f"loaded the preset {Path(value).stem}", f": {self.draft.preset.description}"
                     if self.draft.preset.description else "")
            value = self.draft.preset.model.source
        elif kind == "keep":
            value = current
        self.draft.change_model(value)
        return True

    def allow_code(self) -> bool:
        """The person agreed to run the model's own code: pin a Hub model's revision to the commit it
        points to now, and trust it; False (said) when the commit cannot be told."""
        m = self.draft.preset.model
        revision = self.attempt(lambda: self.services.pin_revision(m.source, m.revision),
                                f"cannot pin the revision of {m.source}")
        if revision is FAILED:
            return False
        self.draft.allow_code(revision)
        if revision and revision != m.revision:
            self.say(f"its code is pinned to revision {revision}")
        return True

    def read_model(self) -> bool:
        """Read the draft's model config (asking before running a model's own code); False on a problem."""
        refused = False
        if self.draft.code_from_file is not None:
            # A preset file's trust_remote_code: true is not consent: ask before reading anything.
            self.say(("the preset says: ", "bold yellow"),
                     f"run the own Python code of {self.draft.code_from_file} (trust_remote_code: true)")
            if self.confirm("its code comes with the model and runs on this machine with your rights, already "
                            "when the model is read; run its code (only if you trust its authors)?", default=False):
                if not self.allow_code():
                    return False
            else:
                self.draft.refuse_code()
                refused = True
                self.say("reading it without its own code")
        while True:
            key = self.draft.model_key()
            slow = " (the demo model is created once, about 15 s)" if key[0].startswith("builtin:") else ""
            self.say((f"reading {key[0]}{slow} ...", "yellow"))
            try:
                info = self.attempt(lambda: self.services.inspect_model(*key), f"cannot read {key[0]}",
                                    passes=(NeedsRemoteCode,))
            except NeedsRemoteCode as exc:
                if refused:  # just said no to the preset's trust_remote_code: not asked twice
                    self.error(f"{exc.message}; it is not read without your consent")
                    return False
                # The hint names the command line's flag; here the question below is the way.
                self.say(("needs code: ", "bold yellow"), exc.message)
                if not self.confirm("its code comes with the model and runs on this machine with your rights; "
                                    "run its code (only if you trust its authors)?", default=False):
                    return False
                if not self.allow_code():
                    return False
                continue
            if info is FAILED:
                return False
            break
        note = self.draft.accept_model(key, info)
        if note:
            self.say(note)
        return True

    def show_model(self) -> None:
        """The model's facts, one per line."""
        info = self.draft.info
        self.say((info.source, "bold"))
        for label, value in model_facts(info):
            self.say(f"  {label:<18} {value}")
        for note in info.notes:
            self.say(("  note: ", "yellow"), note)

    # ---- the memory step ---------------------------------------------------------------

    def step_memory(self, step: Step) -> str | None:
        """Show the training memory against the GPU; ask the settings that move it until it fits or they
        stop (the micro batch last, the largest that fits as its default)."""
        self.show_gpus()
        self.show_memory()
        batch = step.field("training.micro_batch_size")
        while True:
            for f in step.fields:
                if f != batch:
                    self.ask_form_field(f)
            view = memory_view(self.draft, self.budget_bytes)
            default = None
            largest = view.fit.max_micro_batch if view.fit is not None else None
            if view.fits is False and largest:
                default = largest
                self.say(f"micro batch {self.draft.get('training.micro_batch_size')} does not fit; "
                         f"the default below is the largest that fits: {largest}")
            if view.fit is not None:
                self.ask_field(f"{batch.label} (f: the fastest that fit, with checkpointing and accumulation)",
                               batch.path, batch.kind, default=default, shortcuts={"f": self.apply_fastest_fit})
            else:
                self.ask_field(batch.prompt, batch.path, batch.kind, default=default)
            view = memory_view(self.draft, self.budget_bytes)
            self.say("now ", self.verdict(view))
            if view.fits is False and self.confirm("it does not fit: change the settings again?", default=True):
                self.show_memory()
                continue
            return None

    def apply_fastest_fit(self) -> bool:
        """Set the fastest checkpointing, micro batch and accumulation that fit and say what and why;
        False (said) when nothing fits or there is no memory to fit in."""
        try:
            result = self.draft.apply_fastest_fit(self.budget_bytes)
        except UserError as exc:
            self.error(exc.one_line())
            return False
        head, *reasons = fastest_fit_lines(result)
        self.say((head, "bold green" if result.found else "bold red"))
        for reason in reasons:
            self.say(reason)
        return result.found

    def show_gpus(self) -> None:
        """Look for GPUs (once) and say what was found; without one, ask what memory to check against."""
        if not self.gpus_probed:
            try:
                self.draft.gpus = list(self.services.probe_gpus())
            except Exception:  # noqa: BLE001 - no usable driver reads as no GPU
                self.draft.gpus = []
            self.gpus_probed = True
        for g in self.draft.gpus:
            self.say(gpu_line(g))
        if self.draft.gpus:
            return
        self.say((NO_GPU_LINE, "yellow"))
        shown = "" if self.budget_bytes is None else f"{self.budget_bytes / 2**30:g}"
        while True:
            answer = self.text("GPU memory in GiB to check against (empty to skip)", shown)
            try:
                self.budget_bytes = parse_gib(answer)
                return
            except UserError as exc:
                self.error(exc.one_line())
                shown = answer

    def verdict(self, view) -> Text:
        """FITS or DOES NOT FIT against the budget, or what it needs when there is none; and the budget."""
        badge, figures = view.verdict
        head = [(badge, "bold green" if view.fits else "bold red"), ": "] if badge else []
        return Text.assemble(*head, f"{figures}; {view.budget_name}")

    def show_memory(self):
        """The estimate by component, the total, the x1.2 rule, the verdict and the largest batch that fits."""
        from engine.memory import COMPONENT_DESCRIPTIONS

        view = memory_view(self.draft, self.budget_bytes)
        est, s = view.estimate, view.settings
        self.say(f"estimated peak for {s.quantization}, micro batch {s.micro_batch_size} x {s.seq_len:,} tokens, "
                 f"checkpointing {'on' if s.gradient_checkpointing else 'off'}, {s.optimizer}:")
        if view.world_line:  # several GPUs: the strategy, and what is sharded (nothing for one GPU)
            self.say((view.world_line, "bold cyan"))
            if view.sharing:
                self.say((view.sharing, "dim"))
        for name, size in est.components.items():
            self.say(f"  {name.replace('_', ' '):<20} {gib(size):>12}  ", (COMPONENT_DESCRIPTIONS.get(name, ""), "dim"))
        self.say(("  total", "bold"), " " * 15, (f"{gib(est.total_bytes):>12}", "bold"),
                 f"  torch reserved {gib(est.reserved_bytes)}")
        self.say(f"the guide's inference rule (weights on disk x 1.2): {gib(est.inference_rule_bytes)}")
        for note in est.notes:
            self.say(("note: ", "yellow"), note)
        self.say(self.verdict(view))
        if view.budget_bytes is not None:
            self.say((view.context_line, "dim"))
        self.say((view.kernels, "dim"))
        if view.fit is not None:
            self.say(fit_line(view.fit, s.seq_len))
        if view.largest:
            self.say(view.largest)
        return view

    # ---- the LoRA targets step ---------------------------------------------------------

    def step_targets(self, step: Step) -> str | None:
        """Which layers get adapters (a shortcut or picked by name), then the step's form: rank, alpha
        and dropout."""
        info = self.draft.info
        chosen = set(selected_targets(self.draft))
        r = self.draft.preset.lora.r
        width = max(len(t.name) for t in info.targets)
        shapes = {t.name: f"{t.in_features:,}>{t.out_features:,} x{t.count}" for t in info.targets}
        shape_width = max(map(len, shapes.values()))
        self.say(f"the model's layers (weights, and the parameters LoRA adds at r={r}):")
        for t in info.targets:
            mark = "[x]" if t.name in chosen else "[ ]"
            self.say(f"  {mark} {t.name:<{width}}  {shapes[t.name]:<{shape_width}}  "
                     f"{count(t.weight_params):>9} weights  +{count(t.lora_params(r))} LoRA")
        shortcuts = target_shortcuts(info)
        choices = [(f"{label} ({', '.join(shortcuts[key])})", key) for key, label in SHORTCUTS]
        choices.append(("pick layers by name", "pick"))
        current = next((key for key, _ in SHORTCUTS if set(shortcuts[key]) == chosen), "pick")
        answer = self.select("adapt which layers", choices, default=current)
        if answer == "pick":
            options = [questionary.Choice(f"{t.name:<{width}}  {count(t.weight_params):>9} weights  "
                                          f"+{count(t.lora_params(r))} LoRA", t.name, checked=t.name in chosen)
                       for t in info.targets]
            names = questionary.checkbox("layers to adapt", choices=options,
                                         validate=lambda a: True if a else "pick at least one layer",
                                         **self.io).unsafe_ask()
        else:
            names = shortcuts[answer]
        self.draft.set("lora.targets", targets_value(info, names))
        for f in step.fields:
            self.ask_form_field(f)
        view = lora_view(self.draft)
        p = self.draft.preset.lora
        self.say("adapting ", (", ".join(selected_targets(self.draft)), "bold"))
        self.say("trainable ", (f"{view.trainable:,}", "bold"), f" parameters, {100 * view.share:.3g} % of the "
                 f"model's {info.params_total:,}; memory added {gib(view.memory_bytes)} (adapters, their "
                 f"gradients, optimizer states); update scale alpha / r = {p.alpha / p.r:g}")
        return None

    # ---- the data step -----------------------------------------------------------------

    def step_data(self, step: Step) -> str | None:
        """The training data and the step's form (format, validation share, training on the prompts),
        checked and tokenized; its statistics and an example."""
        while True:
            source = self.text("training data (a .jsonl/.json/.csv/.parquet file, a Hub dataset id, or "
                               "builtin:demo)", self.draft.get("data.train"))
            if not source:
                self.error("type a data file, a Hub dataset id, or builtin:demo")
                continue
            if source != self.draft.get("data.train"):
                self.draft.set("data.train", source)
            for f in step.fields:
                self.ask_form_field(f)
            if self.ensure_data():
                break
        self.show_data()
        return None

    def ensure_data(self) -> bool:
        """Check and tokenize the data when the draft's settings have changed since; False on a problem."""
        draft = self.draft
        if draft.data_ready:
            return True
        if not draft.model_ready:
            return False
        self.say((f"checking and tokenizing {draft.get('data.train')} ...", "yellow"))
        report = self.attempt(lambda: self.services.check_data(draft.preset), f"cannot read {draft.get('data.train')}")
        if report is FAILED:
            return False
        note = self.attempt(lambda: draft.accept_data(report), f"cannot train on {draft.get('data.train')}")
        if note is FAILED:
            return False
        if note:
            self.say((note, "yellow"))
        return True

    def show_data(self) -> None:
        """The statistics and the first example as the model sees it."""
        report = self.draft.data
        for line in report.stats.summary_lines():
            if line.startswith("warning:"):  # examples that do not end with the stop token, say
                self.say(("  ", ""), (line, "yellow"))
            else:
                self.say(f"  {line}")
        if report.bad_records:
            self.say(("  ", ""), (f"{report.bad_records:,} malformed records skipped (data.skip_bad_records)",
                                  "yellow"))
        if report.examples and report.stats.paired:
            self.say((f"pair 1 of {len(report.examples)} as the model sees it: the prompt, the chosen and the rejected "
                      f"answer (trained parts between « »):", "bold"))
            self.console.print(render_example(report.examples[0], TRAINED_STYLE, TRAINED_MARKS))
        elif report.examples:
            self.say((f"example 1 of {len(report.examples)} as the model sees it (trained part between « »):",
                      "bold"))
            self.console.print(render_example(report.examples[0], TRAINED_STYLE, TRAINED_MARKS))

    # ---- the hyperparameters step ------------------------------------------------------

    METHOD_ASKED = tuple(f.path for f in METHOD_FORM)
    """The method and its settings, asked first every time (those the chosen method uses)."""

    FIRST_ASKED = METHOD_ASKED + ("training.max_steps", "training.epochs", "training.gradient_accumulation_steps")
    """The hyperparameters asked every time; the rest of the form on request."""

    RATE = "training.learning_rate"
    """The field asked last, the rule's value shown (:meth:`ask_learning_rate`)."""

    def step_hyper(self, step: Step) -> str | None:
        """The method and the settings of it, steps or epochs, gradient accumulation (and on request the
        rest of the form, base rate and pretraining batch included), then the learning rate."""
        self.ask_method(step)
        need = self.not_yet(step)  # the data is checked again if the method changed what it is
        if need:
            return need
        self.ask_hyper_field(step, step.field("training.max_steps"))
        if self.draft.get("training.max_steps") is None:
            self.ask_hyper_field(step, step.field("training.epochs"))
        self.ask_hyper_field(step, step.field("training.gradient_accumulation_steps"))
        self.show_batch()
        more = [f for f in step.fields if f.path not in self.FIRST_ASKED and f.path != self.RATE
                and f.offered(self.draft.preset)]
        if self.confirm(f"change more settings ({', '.join(f.label for f in more)})?", default=False):
            before = (self.draft.data_key, self.draft.get("training.micro_batch_size"))
            for f in more:
                self.ask_hyper_field(step, f)
            need = self.not_yet(step)
            if need:
                return need
            if (self.draft.data_key, self.draft.get("training.micro_batch_size")) != before:
                self.show_batch()
        self.ask_learning_rate(step.field(self.RATE))
        return None

    def ask_method(self, step: Step) -> None:
        """What the run teaches (``training.method``), then the settings of it that the answer uses."""
        for f in step.fields:
            if f.path in self.METHOD_ASKED:
                self.ask_hyper_field(step, f)

    def ask_hyper_field(self, step: Step, f: FormField) -> None:
        """Ask one field of the step when it applies to the draft's method (``FormField.applies``); a
        choice is set with the fields its answer makes stop applying back to their defaults
        (``Step.changes``: the method switched to sft puts beta and the dpo settings back), which the
        preset would refuse otherwise."""
        if not f.offered(self.draft.preset):
            return
        if f.is_choice:
            self.ask_step_choice(step, f)
        else:
            self.ask_form_field(f)

    def ask_step_choice(self, step: Step, f: FormField) -> None:
        """Ask a choice field of ``step`` (the schema's values), setting what the answer changes with it."""
        value = self.select(f.prompt, choice_options(f.path), default=self.draft.get(f.path))
        self.draft.set_many(step.changes(f.path, value, self.draft.preset))

    def show_batch(self) -> None:
        """The effective batch and the run's steps."""
        view = lr_view(self.draft)
        effective, made = batch_words(self.draft)
        self.say("effective batch ", (f"{effective}", "bold"), f" examples ({made}); "
                 f"{view.steps_per_epoch:,} steps per epoch, ", (f"{view.steps:,} steps", "bold"), " in all")

    def ask_learning_rate(self, rate: FormField) -> None:
        """The guide's rule with this run's numbers (asking for any it lacks), or for dpo and orpo the
        method's published rates with their sources; the rate (``rate``), the suggestion by default."""
        from engine.lr import RULE_FORMULA, note_on_rate

        view = lr_view(self.draft)
        method = self.draft.preset.training.method
        if view.advice is not None:
            for words, style in advice_lines(view.advice):
                self.say((words, style))
            self.say((f"   source: {view.advice.source}", "dim"))
            self.ask_field(f"{rate.label} (the suggestion for LoRA shown)", rate.path, rate.kind,
                           default=view.advice.learning_rate)
            note = note_on_rate(method, self.draft.get(rate.path))
            if note:
                self.say(("note: ", "yellow"), note)
            return
        while view.suggestion is None:
            self.say(("type ", "yellow"), (f"{view.missing}: {view.source}", "yellow"))
            if view.base_lr is None:
                self.ask_field("base learning rate of the pretrained model", "model.base_lr", "float")
            else:
                self.ask_field("pretraining batch in tokens", "model.pretrained_batch_tokens", "int")
            view = lr_view(self.draft)
        s = view.suggestion
        self.say((RULE_FORMULA, "bold"))
        self.say(f"   = {s.arithmetic}")
        per_step = (f"   {view.supervised_tokens:,} supervised tokens per epoch, {view.steps:,} steps over "
                    f"{view.epochs:g} epochs: {s.tokens_per_step:,.0f} tokens per step")
        self.say((per_step, "dim"))
        self.say((f"   base rate and batch: {view.source}", "dim"))
        self.ask_field(f"{rate.label} (the rule's value shown)", rate.path, rate.kind,
                       default=float(f"{s.learning_rate:.3g}"))
        note = note_on_rate(method, self.draft.get(rate.path))
        if note:
            self.say(("note: ", "yellow"), note)

    # ---- the review step ---------------------------------------------------------------

    def step_review(self, step: Step) -> str | None:
        """The step's form (the run's name), the preset as YAML; export it; start the run, or finish,
        or go back."""
        for f in step.fields:
            self.ask_form_field(f)
        self.console.print(Text(self.draft.preset.to_yaml().rstrip()))
        self.export()
        nodes = self.draft.preset.distributed.nodes
        if nodes > 1:
            where = str(self.draft.exported_to or "PRESET.yaml")
            self.say((f"{nodes} machines", "bold"), ": copy the preset (with the data) to each and run there, "
                     "or start this machine's part now:")
            for line in node_commands(self.draft.preset, where, self.draft.master):
                self.say(f"  {line}")
        if self.confirm("start training now?", default=True) and self.start():
            return _FINISHED
        choices = [("finish here (run it later)", "finish")]
        choices += [(f"back to {i + 1}. {s.title}", s.name) for i, s in enumerate(STEPS[:-1])]
        answer = self.select("what now", choices, default="finish")
        if answer != "finish":
            return answer
        target = self.draft.exported_to
        if target is None:
            target = keep_draft(self.draft)
            if target is not None:
                self.say(f"the draft is kept in {target} (qlora-wizard plain {target} continues)")
        if target is not None:
            self.say(f"run it later with: qlora-wizard --preset {target}")
        return _FINISHED

    def export(self) -> None:
        """Ask where to write the preset (empty skips; an existing file is overwritten only when confirmed)."""
        shown = str(self.draft.exported_to or default_export_path(self.draft))
        while True:
            answer = self.text("export the preset to (empty: skip)", shown)
            if not answer:
                return
            shown = answer
            try:
                path = self.draft.export_path(answer)
                if self.draft.export_overwrites(path) and not self.confirm(f"{path} exists: overwrite it?",
                                                                          default=False):
                    continue
                path = self.draft.export(path)
            except UserError as exc:
                self.error(exc.one_line())
                continue
            self.say(f"exported {path}; run it with: qlora-wizard --preset {path}")
            return

    def ask_node(self) -> bool:
        """A run over several machines: this machine's number and machine 0's address; False when
        the person gives up (empty answer)."""
        nodes = self.draft.preset.distributed.nodes
        self.say(f"a run on {nodes} machines: each runs the same preset; this one needs its number and "
                 "machine 0's address")
        while True:
            rank = self.text(f"this machine's number (0 to {nodes - 1})", str(self.draft.node_rank))
            master = self.text("machine 0's address (HOST:PORT, empty: do not start)", self.draft.master or "")
            if not master:
                return False
            try:
                self.draft.set_node(rank, master)
                return True
            except UserError as exc:
                self.error(exc.one_line())

    def start(self) -> bool:
        """Start the run in its background process; False (said) when it could not start."""
        if self.draft.preset.distributed.nodes > 1 and not self.ask_node():
            return False
        self.say(("starting the training process ...", "yellow"))
        run_dir = self.attempt(lambda: self.services.start_run(self.draft.preset, **self.draft.start_kwargs()),
                               "could not start the run")
        if run_dir is FAILED:
            return False
        self.run_dir = Path(run_dir)
        from engine.runs import launch_command

        command = launch_command(run_dir)
        if command is not None:
            self.say(f"started: {command}")
        self.say("training in the background: ", (str(run_dir), "bold"))
        self.say(f"  it goes on if this terminal closes; follow it again with: qlora-wizard attach {run_dir}")
        self.say(f"  stop it: qlora-wizard stop {run_dir}")
        return True


def run_plain(
    draft: Draft,
    *,
    services: Services | None = None,
    runs_dir: str | os.PathLike = "runs",
    input: Any = None,
    output: Any = None,
    follow: bool = True,
) -> int:
    """Walk the draft through the six steps as prompts; returns the exit status.

    0 when the person finished (with or without exporting), else the followed run's status
    (``follow=False`` returns 0 as soon as the run has started); 130 on Ctrl-C or the end of the
    input at a question, after keeping the draft. ``input``/``output`` are prompt_toolkit's,
    for tests; the terminal when None.
    """
    wizard = PlainWizard(draft, services or Services(), runs_dir, input=input, output=output)
    try:
        run_dir = wizard.walk()
    except (KeyboardInterrupt, EOFError):
        kept = keep_draft(wizard.draft)
        where = (f"the draft is kept in {kept} (qlora-wizard plain {kept} continues)" if kept
                 else "the draft could not be saved")
        print(f"\ninterrupted; {where}", flush=True)
        return EXIT_STOPPED
    if run_dir is None:
        return EXIT_OK
    if not follow:
        return EXIT_OK
    print("following it here; Ctrl-C asks it to save a checkpoint and stop", flush=True)
    from tui.console import follow_run

    return follow_run(run_dir)
