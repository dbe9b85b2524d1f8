"""The command line: ``qlora-wizard``.

Subcommands plan (``inspect``, ``estimate``, ``lr``), manage runs (``runs``, ``resume``,
``stop``) and use a finished one (``try``, ``eval``, ``merge``, ``card``, ``push``, ``plot``);
``--preset FILE`` runs a preset headless. Nothing heavy is imported at module level:
``qlora-wizard --help`` answers without loading torch.

A subcommand is one ``cmd_X(args) -> int`` registered with ``@command(NAME, ARGUMENTS, help=...)``,
where ``ARGUMENTS(parser)``, defined right above it, declares what it takes (options several commands
share are the ``_add_*`` helpers); ``build_parser`` adds them in the order they are defined.

Exit status: 0 success (a run finished), 1 an unexpected failure (a run failed), 2 bad input
(one line on stderr starting with ``error:``), 130 a run stopped by Ctrl-C after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.collector import fewer_collections
from engine.errors import EXIT_OK, EXIT_STOPPED, UserError, run_exit_status
from tui.format import STATUS_STYLES, gib, size


EPILOG = """\
examples:
  qlora-wizard                                     the wizard, step by step (in a terminal)
  qlora-wizard wizard presets/tiny-demo.yaml       the wizard on the offline demo
  qlora-wizard plain                               the same steps as plain prompts
  qlora-wizard --preset presets/tiny-demo.yaml     train the offline demo (no GPU needed)
  qlora-wizard inspect meta-llama/Llama-3.1-8B     what is this model (reads config.json only)
  qlora-wizard estimate Qwen/Qwen2.5-7B --seq-len 4096 --micro-batch 2
  qlora-wizard estimate meta-llama/Llama-3.1-8B --micro-batch 1 --grad-accum 16 --gpu-mem 80 --fit
  qlora-wizard lr --preset my.yaml                 the guide's learning rate for your data
  qlora-wizard runs                                every run and its status
  qlora-wizard try runs/NAME --prompt "..."        the fine-tuned and the base model's answers
  qlora-wizard eval runs/NAME                      validation loss of base and fine-tuned, side by side
  qlora-wizard merge runs/NAME --out merged/       the adapter merged into its base, for from_pretrained
  qlora-wizard push runs/NAME you/my-adapter       the adapter and its card to a private Hub repo (asks first)
  qlora-wizard cache                               where the cache is, what it holds; `cache clear` empties it
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as bad input: one line, exit status 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse's hook
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# The subcommands: each ``cmd_X`` is registered by ``@command`` with its help line and the function
# that declares its arguments (defined just above it); ``build_parser`` adds them in the order they
# are defined here, which is the order ``--help`` lists them in.


@dataclass(frozen=True)
class Command:
    """One subcommand of ``qlora-wizard``."""

    name: str
    """What is typed: ``qlora-wizard NAME``."""
    func: Callable[[argparse.Namespace], int]
    """What it runs: takes the parsed arguments, returns the exit status."""
    arguments: Callable[[argparse.ArgumentParser], None]
    """Declares its arguments on its parser (called when the parser is built, so imports stay lazy)."""
    help: str
    """Its line in ``qlora-wizard --help``."""
    options: dict[str, Any] = field(default_factory=dict)
    """More of ``add_parser``'s keywords (``description``, ...)."""


COMMANDS: list[Command] = []
"""Every subcommand, in the order they are defined (and listed by ``--help``)."""


def command(name: str, arguments: Callable[[argparse.ArgumentParser], None], *, help: str, **options: Any):
    """Register the decorated ``cmd_X(args) -> int`` as subcommand ``name``, with ``arguments(parser)``
    declaring what it takes and ``help`` its line in ``--help``; ``options`` go to ``add_parser``."""

    def register(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if any(c.name == name for c in COMMANDS):
            raise ValueError(f"two commands named {name!r}")
        COMMANDS.append(Command(name, func, arguments, help, options))
        return func

    return register


# Arguments several commands take, declared once.


def _add_run_dir(s: argparse.ArgumentParser) -> None:
    """``RUN_DIR``: the run the command is about (alone: every argument of ``stop``)."""
    s.add_argument("run_dir", metavar="RUN_DIR")


def _add_json(s: argparse.ArgumentParser, help: str | None = None) -> None:
    s.add_argument("--json", action="store_true", help=help)


def _add_runs_dir(s: argparse.ArgumentParser, default: str | None = "runs", help: str | None = None) -> None:
    s.add_argument("--runs-dir", default=default, metavar="DIR", help=help)


def _add_trust_remote_code(s: argparse.ArgumentParser, help: str) -> None:
    s.add_argument("--trust-remote-code", action="store_true", help=help)


def _add_merged(s: argparse.ArgumentParser, help: str) -> None:
    """``--merged DIR``: a folder ``merge`` wrote, used instead of the run's adapter."""
    s.add_argument("--merged", metavar="DIR", help=help)


def _add_decoding(s: argparse.ArgumentParser, temperature: bool = True) -> None:
    """How answers are generated (``try``, ``eval``): the longest answer, and with ``temperature``
    the sampling temperature and nucleus share."""
    from engine.after.session import Decoding

    d = Decoding()
    s.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, metavar="N",
                   help=f"longest answer in tokens (default {d.max_new_tokens})")
    if temperature:
        s.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                       help=f"sampling temperature, 0 for greedy (default {d.temperature:g})")
        s.add_argument("--top-p", type=float, default=d.top_p, metavar="P",
                       help=f"nucleus sampling share (default {d.top_p:g})")


# ---------------------------------------------------------------------------------------------
# inspect


def _inspect_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", help="a Hub id (org/name), a model directory, a config.json or a .gguf file")
    s.add_argument("--revision", help="a Hub branch, tag or commit")
    _add_trust_remote_code(s, "allow models that need their own code")
    _add_json(s, "print JSON")


@command("inspect", _inspect_arguments, help="what is this model: sizes, parameters, LoRA-targetable layers")
def cmd_inspect(args) -> int:
    from engine.demo import resolve_model_source
    from engine.modelinfo import inspect_model

    info = inspect_model(resolve_model_source(args.source), revision=args.revision,
                         trust_remote_code=args.trust_remote_code)
    if args.json:
        _print_json(info.to_json())
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{info.source}[/]  {info.architecture} ({info.model_type}), {info.dtype}")
    facts = Table.grid(padding=(0, 2))
    facts.add_row("parameters", f"{info.params_total:,}  ({info.params_total / 1e9:.2f} B)")
    facts.add_row("  embeddings / head / blocks",
                  f"{info.params_embedding:,} / {info.params_head:,}{' (tied)' if info.tie_word_embeddings else ''}"
                  f" / {info.params_blocks:,}")
    facts.add_row("hidden size", f"{info.hidden_size:,}")
    facts.add_row("layers", str(info.num_hidden_layers))
    facts.add_row("attention heads (q / kv)", f"{info.num_attention_heads} / {info.num_key_value_heads}")
    facts.add_row("intermediate size", f"{info.intermediate_size:,}")
    facts.add_row("vocabulary", f"{info.vocab_size:,}")
    facts.add_row("context", f"{info.context_length:,}")
    facts.add_row("weights on disk", f"{gib(info.weight_bytes)} ({info.weight_bytes_source})")
    if info.is_moe:
        facts.add_row("mixture of experts", f"{info.num_experts} experts")
    from engine.arch import profile

    facts.add_row("family profile", profile(info.model_type).describe())
    c.print(facts)
    t = Table(title="LoRA-targetable layers", title_justify="left")
    for col in ("name", "kind", "in", "out", "count", "params", "default"):
        t.add_column(col, justify="right" if col in ("in", "out", "count", "params") else "left")
    for layer in info.targets:
        shapes = layer.shapes or ((layer.in_features, layer.out_features, layer.count),)
        t.add_row(layer.name, layer.kind, ", ".join(f"{i:,}" for i, _, _ in shapes),
                  ", ".join(f"{o:,}" for _, o, _ in shapes), str(layer.count),
                  f"{layer.weight_params:,}", "yes" if layer.name in info.default_targets else "")
    c.print(t)
    for note in info.notes:
        c.print(f"note: {note}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# estimate


def _estimate_preset(args):
    """A preset from --preset, or one built from SOURCE and the schema's defaults, with overrides."""
    from engine.preset import load_preset, preset_from_dict

    if args.preset:
        data = load_preset(args.preset).model_dump(mode="json")
        # The file's trust_remote_code: true is not consent to run the model's code for a look.
        args.preset_trusts_code = data["model"]["trust_remote_code"]
        data["model"]["trust_remote_code"] = bool(args.trust_remote_code)
    elif args.source:
        data = {"model": {"source": args.source, "trust_remote_code": args.trust_remote_code},
                "data": {"train": "builtin:demo"}}
    else:
        raise UserError("estimate needs a model (SOURCE) or --preset FILE", "e.g. qlora-wizard estimate Qwen/Qwen2.5-7B")
    t, lora, q = data.setdefault("training", {}), data.setdefault("lora", {}), data.setdefault("quantization", {})
    overrides = [
        (t, "seq_len", args.seq_len), (t, "micro_batch_size", args.micro_batch), (lora, "r", args.lora_r),
        (t, "gradient_accumulation_steps", args.grad_accum),
        (t, "optimizer", args.optimizer), (q, "method", args.quant), (t, "gradient_checkpointing", args.grad_ckpt),
    ]
    for section, key, value in overrides:
        if value is not None:
            section[key] = value
    if args.targets:
        lora["targets"] = "all-linear" if args.targets == "all" else [s.strip() for s in args.targets.split(",") if s.strip()]
    if args.no_double_quant:
        q["double_quant"] = False
    if args.gpus is not None and args.gpus < 1:
        raise UserError(f"--gpus {args.gpus} is not a number of GPUs", "pass --gpus 1 or more")
    from engine.plan import with_init_adapter

    return with_init_adapter(preset_from_dict(data, args.preset or "(command line)"))


def _estimate_world(args, preset):
    """The GPUs the estimate is for (``--gpus``, else the preset's ``distributed.gpus`` when it is a
    number, else 1) and the preset with the strategy asked (``--strategy``, else the preset's).
    A strategy that cannot run on that many GPUs is a UserError when the command line asked for it."""
    from engine.distributed import World

    d = preset.distributed
    count = args.gpus if args.gpus is not None else (d.gpus if isinstance(d.gpus, int) else 1)
    world = World(count, d.nodes, "cuda")
    asked = args.strategy or d.strategy
    if asked in ("ddp", "fsdp") and not world.distributed and args.strategy:
        raise UserError(f"--strategy {asked} needs several GPUs, and this estimate is for one",
                        f"pass --gpus 2 or more with --strategy {asked}")
    if asked == "single" and world.distributed:
        said = "--strategy single" if args.strategy else "the preset's distributed.strategy single"
        raise UserError(f"{said} trains on one GPU, not {world.describe()}",
                        "pass --strategy ddp, fsdp or auto for several GPUs")
    distributed = d.model_copy(update={"strategy": asked, "gpus": count})
    return world, preset.model_copy(update={"distributed": distributed})


def _estimate_view(args, preset, info, world):
    """The memory step's view (``tui.steps.memory.MemoryView``: estimate, budget, what fits, the
    verdict) of ``preset`` per GPU of ``world``, against ``--gpu-mem`` or the first visible GPU's free
    memory; with the visible GPUs and the device plan behind it."""
    from engine.distributed import visible_gpus
    from engine.gpu import probe_gpus
    from engine.memory import fit
    from tui.draft import Draft
    from tui.steps.memory import MemoryView, draft_device, draft_estimate, memory_budget

    gpus = visible_gpus(probe_gpus())  # the GPUs CUDA will use: the first is the one planned for
    draft = Draft(preset, info=info, gpus=gpus)
    typed = int(args.gpu_mem * 2**30) if args.gpu_mem is not None else None
    budget, budget_name = memory_budget(draft, typed)
    if typed is not None:
        budget_name = f"{args.gpu_mem:g} GiB (--gpu-mem)"
    # The strategy: asked for, or (auto) DDP when the model fits each GPU, FSDP when only sharded.
    device = draft_device(draft, budget, world=world)
    settings, est = draft_estimate(draft, device)
    view = MemoryView(est, settings, budget, budget_name, fit(info, settings, budget) if budget is not None else None,
                      kernels=f"kernels: {device.kernels_note}")
    return gpus, view, device


def _estimate_arguments(s: argparse.ArgumentParser) -> None:
    from engine.preset import choices

    s.add_argument("source", nargs="?", help="a Hub id, a model directory, a config.json or a .gguf file")
    s.add_argument("--preset", metavar="FILE", help="take the settings from a preset")
    s.add_argument("--seq-len", type=int, metavar="N")
    s.add_argument("--micro-batch", type=int, metavar="N")
    s.add_argument("--lora-r", type=int, metavar="N")
    s.add_argument("--targets", metavar="a,b,...|all", help="LoRA target layer names, or all")
    s.add_argument("--optimizer", choices=choices("training.optimizer"))
    s.add_argument("--quant", choices=choices("quantization.method"))
    s.add_argument("--no-double-quant", action="store_true")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=None)
    g.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    s.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps (with --micro-batch: "
                   "the effective batch --fit keeps)")
    s.add_argument("--gpu-mem", type=float, metavar="GIB", help="check against this much GPU memory (per GPU)")
    s.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs training the run: the estimate is per GPU (default: the preset's distributed.gpus "
                        "when it is a number, else 1)")
    s.add_argument("--strategy", choices=choices("distributed.strategy"),
                   help="with --gpus N: ddp (every GPU holds the whole model), fsdp (sharded across them) or auto "
                        "(ddp when it fits each GPU, else fsdp; default: the preset's distributed.strategy)")
    s.add_argument("--fit", action="store_true",
                   help="the fastest checkpointing, micro batch and accumulation that fit with a margin to "
                        "spare, keeping the effective batch (micro batch x accumulation), and why")
    s.add_argument("--mean-len", type=float, metavar="TOKENS",
                   help="with --fit: the data's mean example length (default: every example --seq-len long)")
    _add_trust_remote_code(s, "allow a model that needs its own code to run it (a preset's trust_remote_code: "
                              "true does not count here)")
    _add_json(s)


@command("estimate", _estimate_arguments,
         help="will QLoRA training fit: memory by component, largest batch that fits")
def cmd_estimate(args) -> int:
    from engine.demo import resolve_model_source
    from engine.errors import NeedsRemoteCode
    from engine.modelinfo import inspect_model

    if args.mean_len is not None and not args.fit:
        raise UserError("--mean-len is for --fit (the speed model); the memory estimate is for full-length examples")
    preset = _estimate_preset(args)
    world, preset = _estimate_world(args, preset)
    if args.gpu_mem is not None and args.gpu_mem <= 0:
        raise UserError(f"--gpu-mem {args.gpu_mem} must be a positive number of GiB")
    try:
        info = inspect_model(resolve_model_source(preset.model.source), revision=preset.model.revision,
                             trust_remote_code=preset.model.trust_remote_code)
    except NeedsRemoteCode as exc:
        if not getattr(args, "preset_trusts_code", False):
            raise
        raise NeedsRemoteCode(exc.message, "the preset's trust_remote_code: true does not count for a look: "
                              "pass --trust-remote-code if you trust its authors") from None
    gpus, view, device = _estimate_view(args, preset, info, world)
    est, settings, budget = view.estimate, view.settings, view.budget_bytes
    largest = card = None
    if budget is not None:
        from engine.sizes import largest_fitting

        largest = largest_fitting(settings, budget, world.size,
                                  ("ddp", "fsdp") if world.distributed else ("single",))
        card = f"{args.gpu_mem:g} GiB" if args.gpu_mem is not None else f"{gpus[0].name} ({gib(budget)} free)"
    fastest = None
    if args.fit:
        if budget is None:
            raise UserError("--fit needs the GPU's memory to fit in: there is no NVIDIA GPU here",
                            "pass --gpu-mem GIB")
        from engine.speed import fastest_fit

        fastest = fastest_fit(info, settings, budget,
                              gradient_accumulation_steps=preset.training.gradient_accumulation_steps,
                              mean_len=args.mean_len, gpu=gpus[0].name if gpus else None)
    if args.json:
        out = est.to_json()
        out["fits"] = view.fits
        out["budget_bytes"] = budget
        if view.fit is not None:
            out["fit"] = {"max_micro_batch": view.fit.max_micro_batch, "max_seq_len": view.fit.max_seq_len}
        if fastest is not None:
            out["fastest_fit"] = fastest.to_json()
        out["strategy_reason"] = device.strategy_reason
        if largest is not None:
            out["largest_reference"] = {name: f.to_json() for name, f in largest.items()}
        _print_json(out)
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"training memory: {Path(info.source).name or info.source}", title_justify="left")
    t.add_column("component")
    t.add_column("memory", justify="right")
    for name, b in est.components.items():
        t.add_row(name.replace("_", " "), gib(b))
    t.add_row("[bold]total[/]", f"[bold]{gib(est.total_bytes)}[/]")
    c.print(t)
    if world.distributed:
        from engine.distributed import STRATEGY_WORDS

        why = f"--strategy {args.strategy}" if args.strategy in ("ddp", "fsdp") else device.strategy_reason
        c.print(f"strategy: {STRATEGY_WORDS[device.strategy]} on {world.describe()} ({why}); "
                "the table is per GPU", markup=False)
        c.print(est.sharing_words(), markup=False)
    c.print(f"settings: {settings.quantization}{' + double quant' if settings.double_quant else ''}, "
            f"LoRA r={settings.lora_rank} on {', '.join(settings.lora_targets)}, micro batch "
            f"{settings.micro_batch_size} x {settings.seq_len} tokens, gradient checkpointing "
            f"{'on' if settings.gradient_checkpointing else 'off'}, {settings.optimizer}, {device.compute_dtype}")
    c.print(f"torch reserved peak (estimate): {gib(est.reserved_bytes)}; "
            f"the guide's inference rule (weights on disk x 1.2): {gib(est.inference_rule_bytes)}")
    c.print(view.kernels, markup=False)
    for note in getattr(est, "notes", []):
        c.print(f"note: {note}")
    if info.weight_bytes_source == "gguf":  # what happens to a .gguf before it trains
        for note in (n for n in info.notes if "GGUF" in n):
            c.print(f"note: {note}", markup=False)
    if budget is None:
        c.print("no NVIDIA GPU found here: pass --gpu-mem GIB to check against a GPU's memory")
    else:
        from rich.text import Text

        from tui.steps.memory import fit_line

        # The memory step's verdict, as the plain prompts print it: FITS or DOES NOT FIT, the figures, the budget.
        badge, figures = view.verdict
        c.print(Text.assemble((badge, "bold green" if view.fits else "bold red"), f": {figures}; {view.budget_name}"))
        c.print(view.context_line, markup=False)
        if view.fit is not None:
            c.print(fit_line(view.fit, settings.seq_len))
        if largest is not None:
            from engine.sizes import largest_words

            c.print(largest_words(largest, world.size, card), markup=False)
    if fastest is not None:
        _print_fastest(c, fastest)
    return EXIT_OK


def _print_fastest(c, fastest) -> None:
    """``estimate --fit``: the choice, why, and every way of splitting the effective batch that fits."""
    from rich.table import Table

    from tui.steps.memory import fastest_fit_lines

    c.print()
    for line in fastest_fit_lines(fastest, "pass --mean-len TOKENS with the data's mean example length"):
        c.print(line, soft_wrap=True, markup=False, highlight=False)
    if not fastest.found:
        return
    t = Table(title=f"what fits in {gib(fastest.usable_bytes)}, fastest first (modelled)", title_justify="left")
    for col in ("checkpointing", "micro", "accum", "tokens/s", "s/step", "peak GiB", ""):
        t.add_column(col, justify="left" if col in ("checkpointing", "") else "right")
    for cand in (fastest.choice, *fastest.alternatives):
        t.add_row("on" if cand.gradient_checkpointing else "off", str(cand.micro_batch_size),
                  str(cand.gradient_accumulation_steps), f"{cand.tokens_per_s:,.0f}", f"{cand.step_s:.2f}",
                  f"{cand.total_bytes / 2**30:.2f}", "chosen" if cand is fastest.choice else "")
    c.print(t)


# ---------------------------------------------------------------------------------------------
# lr


def _lr_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--preset", metavar="FILE", help="count supervised tokens and steps from the preset's data")
    s.add_argument("--base-lr", type=float, metavar="X")
    s.add_argument("--supervised-tokens", type=int, metavar="N")
    s.add_argument("--steps", type=int, metavar="N")
    s.add_argument("--epochs", type=float, metavar="N")
    s.add_argument("--pretrained-batch-tokens", type=int, metavar="N")
    _add_trust_remote_code(s, "with --preset: allow a model that needs its own code to run it (the preset's "
                              "trust_remote_code: true does not count here)")
    _add_json(s)


@command("lr", _lr_arguments, help="the guide's learning-rate rule, from numbers or from a preset's data "
                                     "(for a dpo or orpo preset: the method's published rates)")
def cmd_lr(args) -> int:
    from engine.lr import RULE_FORMULA, note_on_lora_range, suggest_learning_rate

    extra = {}
    if args.preset:
        from engine.errors import NeedsRemoteCode
        from tui.draft import Services, check_data, load_draft
        from tui.steps.hyper import lr_view

        # The file's trust_remote_code: true is not consent to run the model's code: the flag is.
        draft = load_draft(args.preset)
        if draft.preset.training.method != "sft":
            return _print_preference_lr(args, draft.preset)
        if args.trust_remote_code:
            draft.allow_code(None)
        for path, value in (("model.base_lr", args.base_lr), ("model.pretrained_batch_tokens",
                                                              args.pretrained_batch_tokens)):
            if value is not None:
                draft.set(path, value)
        m = draft.preset.model
        try:
            if m.base_lr is None or m.pretrained_batch_tokens is None:
                # The model family's published values fill what the preset leaves out.
                draft.info = Services().inspect_model(m.source, m.revision, m.trust_remote_code)
            report = check_data(draft.preset)
            if report.method != "sft":  # pairs under sft: refused, as a headless start refuses them
                from engine.data import check_records

                check_records(draft.preset.data, method="sft")
            draft.data = report
        except NeedsRemoteCode as exc:
            said = ("the preset's trust_remote_code: true does not count for a look: "
                    if draft.code_from_file is not None else "")
            raise NeedsRemoteCode(exc.message, f"{said}pass --trust-remote-code if you trust its authors") from None
        view = lr_view(draft, steps=args.steps, epochs=args.epochs, supervised_tokens=args.supervised_tokens)
        if view.suggestion is None:
            family = draft.info.family if draft.info else None
            raise UserError(
                f"no published base learning rate and pretraining batch for model family {family!r}",
                "set model.base_lr and model.pretrained_batch_tokens in the preset, or pass "
                "--base-lr and --pretrained-batch-tokens",
            )
        s, base_lr, bsz = view.suggestion, view.base_lr, view.pretrained_batch_tokens
        supervised, steps, epochs = view.supervised_tokens, view.steps, view.epochs
        extra.update(examples=draft.data.stats.examples, steps_per_epoch=view.steps_per_epoch,
                     family=draft.info.family if draft.info else None, source=view.source)
    else:
        missing = [n for n in ("base_lr", "supervised_tokens", "steps", "pretrained_batch_tokens")
                   if getattr(args, n) is None]
        if missing:
            raise UserError(f"lr needs --{missing[0].replace('_', '-')} (or --preset FILE to work it out from the data)")
        base_lr, bsz, steps = args.base_lr, args.pretrained_batch_tokens, args.steps
        supervised, epochs = args.supervised_tokens, args.epochs or 1
        s = suggest_learning_rate(base_lr, supervised, steps, epochs, bsz)
    note = note_on_lora_range(s.learning_rate)
    if args.json:
        _print_json({"method": "sft", "learning_rate": s.learning_rate, "arithmetic": s.arithmetic,
                     "base_lr": base_lr, "supervised_tokens": supervised, "steps": steps, "epochs": epochs,
                     "pretrained_batch_tokens": bsz, "note": note, **extra})
        return EXIT_OK
    print(f"learning rate: {s.learning_rate:.3g}")
    print(f"  {RULE_FORMULA}")
    print(f"     = {s.arithmetic}")
    if extra.get("source"):
        print(f"  base rate and pretraining batch: {extra['source']}")
    if note:
        print(f"note: {note}")
    return EXIT_OK


def _print_preference_lr(args, preset) -> int:
    """``lr --preset`` for a dpo or orpo preset: the method's published rates with their sources instead
    of the rule (which is for supervised tokens), and the note on the preset's own rate. Neither the
    model nor the data is read: the advice is a figure of neither."""
    from engine.lr import note_on_rate, preference_advice
    from tui.steps.hyper import advice_lines

    t = preset.training
    advice = preference_advice(t.method)
    note = note_on_rate(t.method, t.learning_rate)
    rule_numbers = ("base_lr", "supervised_tokens", "steps", "epochs", "pretrained_batch_tokens")
    unused = [f"--{name.replace('_', '-')}" for name in rule_numbers if getattr(args, name) is not None]
    if args.json:
        _print_json({**advice.to_json(), "beta": t.beta, "chosen_learning_rate": t.learning_rate, "note": note})
        return EXIT_OK
    print(f"learning rate for {t.method}: {advice.learning_rate:.3g} (suggested for LoRA)")
    for words, _style in advice_lines(advice)[1:]:
        print(f"  {words.strip()}")
    print(f"  source: {advice.source}")
    print(f"  this preset: learning rate {t.learning_rate:g}, beta {t.beta:g}")
    if unused:
        print(f"  {', '.join(unused)}: the rule's numbers, not used for {t.method}")
    if note:
        print(f"note: {note}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# runs


def _runs_arguments(s: argparse.ArgumentParser) -> None:
    _add_runs_dir(s, default=None, help="the folder that holds the runs (default: runs)")
    _add_json(s)


@command("runs", _runs_arguments, help="every run with its status, step and loss")
def cmd_runs(args) -> int:
    from engine.runs import list_runs

    if args.runs_dir is None:
        args.runs_dir = "runs"
    elif not Path(args.runs_dir).is_dir():
        what = "is not a folder" if Path(args.runs_dir).exists() else "does not exist"
        raise UserError(f"--runs-dir {args.runs_dir} {what}", "name the folder that holds your runs")
    runs = list_runs(args.runs_dir)
    if args.json:
        _print_json([r.to_json() for r in runs])
        return EXIT_OK
    if not runs:
        print(f"no runs in {args.runs_dir}/ yet: start one with qlora-wizard --preset FILE")
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    t = Table()
    several = any(r.world for r in runs)  # a GPUs column only where some run used several processes
    for col in ("run", "status", "step", "loss", "val loss", "model") + (("GPUs",) if several else ()):
        t.add_column(col, justify="right" if col in ("step", "loss", "val loss") else "left")
    for r in runs:
        step = f"{r.step}/{r.total_steps}" if r.total_steps else str(r.step)
        t.add_row(r.name, f"[{STATUS_STYLES.get(r.status, 'white')}]{r.status}[/]", step,
                  "-" if r.loss is None else f"{r.loss:.4f}", "-" if r.eval_loss is None else f"{r.eval_loss:.4f}",
                  r.model or "", *((r.world or "1",) if several else ()))
    Console().print(t)
    for r in runs:
        if r.status in ("crashed", "failed") and r.message:
            print(f"{r.name}: {r.message}")
    finished = [r for r in runs if r.status == "finished"]
    if finished:
        print(f"try a finished run beside its base model: qlora-wizard try {finished[0].path}   "
              f"(then: eval, merge, push, plot)")
        from engine.after.export import export_command

        print(f"take it home as a GGUF for llama.cpp/Ollama: {export_command(finished[0].path)}")
    return EXIT_OK


def _follow(run_dir: Path, detach: bool) -> int:
    if detach:
        print(f"training in the background: {run_dir}")
        print(f"  follow it:  qlora-wizard attach {run_dir}    (or: tail -f {run_dir}/train.log)")
        print(f"  stop it:    qlora-wizard stop {run_dir}")
        return EXIT_OK
    from tui.console import follow_run

    return follow_run(run_dir)


def _resume_arguments(s: argparse.ArgumentParser) -> None:
    _add_run_dir(s)
    s.add_argument("--max-steps", type=int, metavar="N",
                   help="raise the run's target to N optimizer steps (a finished run needs it; its learning-rate "
                        "schedule is stretched to N, its adapter kept as adapter-step-DONE/)")
    s.add_argument("--master", metavar="HOST:PORT",
                   help="a run over several machines: machine 0's address now (default: as it began)")
    s.add_argument("--detach", action="store_true")


@command("resume", _resume_arguments,
         help="continue a stopped, failed or crashed run from its newest checkpoint")
def cmd_resume(args) -> int:
    from engine.runs import resume_run

    r = resume_run(args.run_dir, max_steps=args.max_steps, master=args.master)
    for name in r.removed:
        print(f"removed {name}: the earlier process was cut short while writing it")
    if r.kept_adapter is not None:
        print(f"the finished adapter is kept in {r.kept_adapter}")
    target = f" to step {r.max_steps}" if r.max_steps is not None else ""
    from engine.runs import recorded_launch

    launch = recorded_launch(args.run_dir)
    on = f" on {launch.world.describe()}, as it began" if launch is not None else ""
    print(f"resuming {args.run_dir} from "
          f"{r.checkpoint.name if r.checkpoint else 'the beginning (no checkpoint was saved)'}{target}{on}")
    return _follow(Path(args.run_dir), args.detach)


def _not_training(run_dir: Path) -> UserError:
    """Why a run cannot be stopped: what it is doing instead, and what to do."""
    from engine.runs import summarize_run

    s = summarize_run(run_dir)
    at = f"step {s.step}" + (f" of {s.total_steps}" if s.total_steps else "")
    what = {"finished": f"it finished at {at}", "stopped": f"it was stopped at {at}",
            "failed": f"it failed at {at}", "crashed": f"it crashed at {at}"}.get(s.status, s.status)
    hint = (f"its adapter is in {run_dir / 'adapter'}" if s.status == "finished"
            else f"continue it with `qlora-wizard resume {run_dir}`")
    return UserError(f"{run_dir} is not training ({what})", hint)


@command("stop", _add_run_dir, help="ask a run to save a checkpoint and stop")
def cmd_stop(args) -> int:
    from engine.runs import require_run, stop_run

    run_dir = require_run(args.run_dir)
    if not stop_run(run_dir):
        raise _not_training(run_dir)
    print(f"asked {run_dir} to save a checkpoint and stop")
    return EXIT_OK


def _attach_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("run_dir", nargs="?", metavar="RUN_DIR")
    _add_runs_dir(s)
    s.add_argument("--plain", action="store_true",
                   help="print one line per event instead of the full-screen view (the default without a terminal)")


@command("attach", _attach_arguments, help="follow a run (the newest if none is named) with its whole history")
def cmd_attach(args) -> int:
    from engine.runs import newest_run

    from engine.runs import require_run

    run_dir = Path(args.run_dir) if args.run_dir else newest_run(args.runs_dir)
    if run_dir is None:
        raise UserError(f"no runs in {args.runs_dir}/ to attach to", "start one with `qlora-wizard --preset FILE`")
    require_run(run_dir)
    if args.plain or not (sys.stdout.isatty() and sys.stdin.isatty()):
        from tui.console import follow_run

        return follow_run(run_dir)
    # Textual loads only here, so `--help` and the plain follower stay light.
    from tui.app import RunApp

    return _report_run(run_dir, RunApp(run_dir).run())


def _run_preset_arguments(p: argparse.ArgumentParser) -> None:
    """``qlora-wizard --preset FILE``'s options, on the top-level parser (``main`` calls :func:`run_preset`)."""
    p.add_argument("--preset", metavar="FILE", help="run this preset headless (see presets/)")
    p.add_argument("--run-dir", metavar="DIR", help="with --preset: the run directory (default runs/<name>)")
    p.add_argument("--detach", action="store_true", help="with --preset: start in the background and return")
    p.add_argument("--nodes", type=int, metavar="N",
                   help="with --preset: train on N machines together (sets distributed.nodes)")
    p.add_argument("--node-rank", type=int, metavar="R", help="with --nodes: this machine's number, 0 to N-1")
    p.add_argument("--master", metavar="HOST:PORT", help="with --nodes: machine 0's address and a free port")


def run_preset(preset_path: str, run_dir: str | None, detach: bool, nodes: int | None = None,
               node_rank: int | None = None, master: str | None = None) -> int:
    """Headless: check the preset and the data, create the run, start the detached process, follow it.

    ``nodes``/``node_rank``/``master``: this machine's part of a run over several; the torchrun
    command it starts is printed, and what the other machines type."""
    from engine.preset import load_preset, preset_from_dict
    from tui.draft import start_run
    from tui.steps.review import node_commands

    preset = load_preset(preset_path)
    if nodes is not None:
        if nodes < 1:
            raise UserError(f"--nodes {nodes} is not a number of machines", "give 1 or more")
        # Validated as a whole: --nodes 2 with the preset's strategy single is refused, not ignored.
        data = preset.model_dump(mode="json")
        data["distributed"]["nodes"] = nodes
        preset = preset_from_dict(data, f"{preset_path} with --nodes {nodes}")
    elif node_rank is not None or master is not None:
        if preset.distributed.nodes == 1:
            raise UserError("--node-rank and --master place this machine in a run over several",
                            "add --nodes N (or set distributed.nodes in the preset)")
    if preset.distributed.nodes > 1 and (node_rank is None or master is None):
        raise UserError(f"a run on {preset.distributed.nodes} machines needs --node-rank R and --master HOST:PORT",
                        "run on each machine: " + node_commands(preset, preset_path, master)[0].replace(
                            "--node-rank 0", "--node-rank R"))
    if preset.model.trust_remote_code:
        # Training headless is what the file's trust_remote_code: true is for; said before anything
        # runs, with the commit a Hub model's code is pinned to (the run's preset records it).
        from engine.modelinfo import remote_code_words
        from tui.draft import pin_revision

        revision = pin_revision(preset.model.source, preset.model.revision)
        if revision and revision != preset.model.revision:
            preset = preset.model_copy(update={"model": preset.model.model_copy(update={"revision": revision})})
        print(f"training {remote_code_words(preset.model.source, preset.model.revision)}", flush=True)
    # Whether every example ends with the stop token (else the model does not learn to stop), said
    # before training starts; a warning goes to stderr.
    rd = start_run(preset, run_dir, node_rank or 0, master, note=lambda line: print(
        line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True))
    _print_launch(rd, preset, preset_path, master)
    return _follow(rd, detach)


def _print_launch(run_dir: Path, preset, preset_path: str, master: str | None) -> None:
    """For a run over several processes: the torchrun command this machine started, and for several
    machines what each one types."""
    from engine.runs import launch_command
    from tui.steps.review import node_commands

    command = launch_command(run_dir)
    if command is None:
        return
    print(f"started: {command}")
    others = node_commands(preset, preset_path, master)
    if others:
        print("each machine runs its own line (the same preset, data and model path on each):")
        for line in others:
            print(f"  {line}")


def _report_run(run_dir: Path, result: str | None) -> int:
    """What to print after the run screen closes, and the exit status."""
    if result in (None, "detached"):
        print(f"the run goes on in the background; come back with: qlora-wizard attach {run_dir}")
        return EXIT_OK
    print(f"{run_dir}: {result}; look at it again with: qlora-wizard attach {run_dir}")
    if result in ("stopped", "crashed"):
        print(f"continue it with: qlora-wizard resume {run_dir}")
    return run_exit_status(result)


# ---------------------------------------------------------------------------------------------
# After the run: try, eval, merge, card, push, plot


def _say(line: str) -> None:
    """Progress on stderr, so that stdout holds only the result (and --json stays parseable)."""
    print(line, file=sys.stderr, flush=True)


def _try_arguments(s: argparse.ArgumentParser) -> None:
    _add_run_dir(s)
    s.add_argument("--prompt", metavar="TEXT", help="what to ask, laid out as the run's data was (alpaca: a blank "
                   "line separates the instruction from its input); without it, the interactive screen")
    _add_decoding(s)
    _add_json(s, "print both answers as JSON")
    s.add_argument("--plain", action="store_true", help="line-by-line prompts instead of the full-screen screen")


@command("try", _try_arguments, help="a finished run's answer to a prompt next to its base model's")
def cmd_try(args) -> int:
    import importlib.util

    from engine.after import Decoding, TrySession, finished_run

    if args.prompt is None:
        finished_run(args.run_dir)  # the one-line refusal before any screen opens
        if importlib.util.find_spec("tui.try_command") is None:
            raise UserError("pass --prompt TEXT: the interactive try screen is not in this version",
                            f'e.g. qlora-wizard try {args.run_dir} --prompt "..."')
        from tui.try_command import run_try_app

        return run_try_app(Path(args.run_dir), plain=args.plain)
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p)
    with TrySession.open(args.run_dir) as session:
        who = (("fine_tuned", True, f"fine-tuned ({session.run_dir.name}, adapter on)"),
               ("base", False, f"base ({session.preset.model.source}, adapter off)"))
        if args.json:
            out = {"prompt": args.prompt, "rendered": session.render(args.prompt),
                   "decoding": {"max_new_tokens": decoding.max_new_tokens, "temperature": decoding.temperature,
                                "top_p": decoding.top_p}}
            for key, adapter, _ in who:
                out[key], ending = session.answer_with_ending(args.prompt, adapter=adapter, decoding=decoding)
                out[f"{key}_stop"] = ending.reason if ending else None  # eos: a stop token; length: max new tokens
            _print_json(out)
            return EXIT_OK
        dim = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")
        for i, (_, adapter, label) in enumerate(who):
            print(("\n" if i else "") + f"── {label} ──", flush=True)
            for piece in session.stream(args.prompt, adapter=adapter, decoding=decoding):
                print(piece, end="", flush=True)
            print()
            ending = session.last_stop.get(adapter)
            if ending is not None:  # whether the model stopped by itself or ran into the limit
                print(f"{dim[0]}({ending.words()}){dim[1]}", flush=True)
    return EXIT_OK


def _cell(text: str, width: int = 48) -> str:
    """One line of an answer for a table cell."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _eval_arguments(s: argparse.ArgumentParser) -> None:
    _add_run_dir(s)
    s.add_argument("--generations", type=int, default=5, metavar="N",
                   help="held-out prompts answered by both models (default 5; greedy)")
    _add_decoding(s, temperature=False)
    _add_json(s)


@command("eval", _eval_arguments, help="validation loss and perplexity of base and fine-tuned, and answers against "
         "references (writes RUN_DIR/eval.json)")
def cmd_eval(args) -> int:
    from engine.after import Decoding, evaluate_run

    result = evaluate_run(args.run_dir, generations=args.generations,
                          decoding=Decoding(max_new_tokens=args.max_new_tokens, temperature=0), progress=_say)
    if args.json:
        _print_json(result.as_dict())
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    def num(value, fmt="{:.4f}") -> str:
        return "-" if value is None else fmt.format(value)

    c = Console()
    base, tuned = result.base, result.fine_tuned
    prefs = result.preferences
    t = Table(title=f"{Path(args.run_dir).name}: base against fine-tuned on "
                    f"{result.validation.examples:,} validation {'pairs' if prefs else 'examples'}",
              title_justify="left")
    for col in ("", "base", "fine-tuned"):
        t.add_column(col, justify="left" if not col else "right")
    if prefs:
        t.add_row("chosen answer likelier than rejected", num(prefs.base_accuracy, "{:.0%}"),
                  num(prefs.fine_tuned_accuracy, "{:.0%}"))
        whose = "orpo's, the fine-tuned model's" if prefs.method == "orpo" else "dpo's, against the base"
        t.add_row(f"reward accuracy ({whose})", "", num(prefs.reward_accuracy, "{:.0%}"))
        t.add_row("reward margin", "", num(prefs.reward_margin, "{:+.3f}"))
    what = "chosen answers' " if prefs else "validation "
    t.add_row(f"{what}loss", num(base.loss), num(tuned.loss))
    t.add_row("perplexity", num(base.perplexity, "{:,.2f}"), num(tuned.perplexity, "{:,.2f}"))
    n = len(result.generations)
    if n:
        t.add_row("answers equal to the reference", f"{result.exact_matches.base}/{n}",
                  f"{result.exact_matches.fine_tuned}/{n}")
    c.print(t)
    if result.validation.examples == 0:
        c.print("the run had no validation split: no losses; the answers are for training examples")
    if n:
        g = Table(title=f"answers ({result.generations_from} examples, greedy)", title_justify="left")
        for col in ("prompt", "reference", "base", "fine-tuned"):
            g.add_column(col)
        for a in result.generations:
            g.add_row(_cell(a.prompt), _cell(a.reference, 24), _cell(a.base, 24), _cell(a.fine_tuned, 24))
        c.print(g)
    c.print(f"written to {Path(result.run_dir) / 'eval.json'}", markup=False, highlight=False)
    return EXIT_OK


def _merge_arguments(s: argparse.ArgumentParser) -> None:
    _add_run_dir(s)
    s.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the merged model")
    s.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="weights of the merged model (default: the run's load dtype: fp32 for a CPU run, "
                        "the GPU's 16-bit type for a GPU run)")


@command("merge", _merge_arguments, help="merge the adapter into its base (reloaded in 16 bits or fp32) and save a "
         "model AutoModelForCausalLM.from_pretrained loads")
def cmd_merge(args) -> int:
    from engine.after import merge_run, plan_merge

    plan = plan_merge(args.run_dir, args.out, args.dtype)
    print(plan.summary(), flush=True)
    out = merge_run(plan, progress=_say)
    print(f"merged model in {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return EXIT_OK


def _export_arguments(s: argparse.ArgumentParser) -> None:
    from engine.after.export import CHECK_PROMPTS, CHECK_TOKENS, DEFAULT_QUANT, QUANTS

    _add_run_dir(s)
    s.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder for the export")
    s.add_argument("--quant", choices=QUANTS, default=DEFAULT_QUANT,
                   help=f"the GGUF's weights (default {DEFAULT_QUANT}; q4_k_m needs llama-cpp-python)")
    _add_merged(s, "convert this merged folder (from `merge`) instead of merging again")
    s.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="answer held-out prompts in llama.cpp and in transformers and compare (default: on where "
                        "llama-cpp-python is installed)")
    s.add_argument("--prompts", type=int, default=CHECK_PROMPTS, metavar="N",
                   help=f"held-out prompts the check answers (default {CHECK_PROMPTS})")
    s.add_argument("--max-new-tokens", type=int, default=CHECK_TOKENS, metavar="N",
                   help=f"longest answer the check compares, in tokens (default {CHECK_TOKENS}; greedy)")
    _add_json(s, "print the paths, sizes, quant and the check as JSON")


@command("export", _export_arguments, help="a GGUF for llama.cpp, Ollama and LM Studio with the run's prompt "
         "format, an Ollama Modelfile and a README, checked in llama.cpp")
def cmd_export(args) -> int:
    from engine.after.export import export_run, plan_export

    plan = plan_export(args.run_dir, args.out, args.quant, merged=args.merged, check=args.check,
                       prompts=args.prompts, max_new_tokens=args.max_new_tokens)
    print(plan.summary(), file=sys.stderr if args.json else sys.stdout, flush=True)
    result = export_run(plan, progress=_say)
    if args.json:
        _print_json(result)
        return EXIT_OK
    mib = result["gguf_bytes"] / 2**20
    print(f"{result['gguf']} ({mib:,.1f} MiB, {result['quant']}), with {result['modelfile']} and {result['readme']}")
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    if result["check"]:
        print(result["check"]["verdict"])
        diff = result["check"]["first_difference"]
        if diff:
            print(f"first difference: prompt {diff['prompt']!r}: llama.cpp {diff['llama_cpp']!r}, "
                  f"transformers {diff['transformers']!r}")
    out = Path(result["out"])
    name = Path(result["run_dir"]).name.lower()
    print(f"run it: cd {out} && ollama create {name} -f Modelfile && ollama run {name}   "
          f"(or llama-cli -m {Path(result['gguf']).name} -cnv --jinja)")
    return EXIT_OK


def _card_arguments(s: argparse.ArgumentParser) -> None:
    _add_run_dir(s)
    s.add_argument("--repo-id", metavar="ORG/NAME", help="the Hub repo the card's load command names")
    _add_merged(s, "describe this merged folder instead of the adapter")


@command("card", _card_arguments, help="write the run's model card (RUN_DIR/README.md) and its loss curves")
def cmd_card(args) -> int:
    from engine.after import write_card

    path = write_card(args.run_dir, repo_id=args.repo_id, merged=args.merged)
    print(f"model card written to {path} (the loss curves beside it: {path.parent / 'curves.svg'})")
    return EXIT_OK


def _push_arguments(s: argparse.ArgumentParser) -> None:
    _add_run_dir(s)
    s.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, e.g. you/my-adapter (created if missing)")
    _add_merged(s, "upload this merged folder (from `merge`) instead")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--public", action="store_true",
                   help="create the repo public (anyone can see it); without it the repo is private")
    g.add_argument("--private", action="store_true",
                   help="accepted for old scripts and does nothing: repos are private unless --public")
    s.add_argument("--yes", action="store_true",
                   help="upload without asking (for scripts); without it push shows the plan and asks on the "
                        "terminal, and refuses when stdin is not one")


@command("push", _push_arguments, help="upload the adapter (or a merged folder) with its model card to the Hub: "
         "private unless --public, shown and asked first")
def cmd_push(args) -> int:
    from engine.after.card import hub_token, plan_push, push_run

    plan = plan_push(args.run_dir, args.repo_id, merged=args.merged, public=args.public)
    hub_token(plan)  # no token, or the Hub switched off: one line before anything is asked
    print(plan.summary(), flush=True)
    if not args.yes:
        # Consent comes from a person at a terminal; a piped "y" is not one (scripts pass --yes).
        if not sys.stdin.isatty():
            raise UserError(f"push needs your consent: {plan.visibility} upload of {len(plan.files)} files to "
                            f"{plan.repo_id}, and stdin is not a terminal to ask on (pass --yes to upload "
                            "without asking)")
        print(f"upload to {plan.repo_id} ({plan.visibility})? [y/N] ", end="", flush=True)
        answer = sys.stdin.readline()
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing uploaded")
            return EXIT_OK
    url = push_run(plan, progress=_say)
    print(f"pushed {plan.what} of {args.run_dir} to {url} ({plan.visibility})")
    return EXIT_OK


def _plot_arguments(s: argparse.ArgumentParser) -> None:
    _add_run_dir(s)
    s.add_argument("--out", metavar="PATH", help="where to write them (its suffix becomes .svg and .png)")


@command("plot", _plot_arguments, help="the loss curves as SVG and PNG (RUN_DIR/curves.svg and .png)")
def cmd_plot(args) -> int:
    from engine.after import write_curves

    svg, png = write_curves(args.run_dir, args.out)
    print(f"curves written to {svg} and {png}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# The cache, the wizard and the demo


def _cache_arguments(s: argparse.ArgumentParser) -> None:
    from engine.cache import PARTS

    s.add_argument("action", nargs="?", choices=("show", "clear"), default="show")
    s.add_argument("--only", choices=PARTS, help="with clear: only this part")
    _add_json(s)


@command("cache", _cache_arguments, help="where the cache is and what it holds (tokenized data, the demo model, "
         "converted GGUF models); `cache clear` empties it")
def cmd_cache(args) -> int:
    from engine.cache import cache_report, clear_cache

    if args.only and args.action != "clear":
        raise UserError("--only is for `qlora-wizard cache clear`")
    if args.action == "clear":
        removed = clear_cache(args.only)
        if args.json:
            _print_json({"removed": removed.to_json()})
            return EXIT_OK
        if not removed.parts:
            print(f"nothing to clear in {removed.root}")
        for part in removed.parts:
            print(f"removed {part.name}: {size(part.bytes)} in {part.files:,} files; {part.what}")
        return EXIT_OK
    report = cache_report()
    if args.json:
        _print_json(report.to_json())
        return EXIT_OK
    print(f"cache: {report.root} ({size(report.bytes)}; set QLORA_WIZARD_CACHE to move it)")
    for part in report.parts:
        print(f"  {part.name:<7} {size(part.bytes):>10}  {part.files:>6,} files  {part.what}")
    if not report.parts:
        print("  empty")
    print("clear it with `qlora-wizard cache clear` (runs are kept: they live in their own folders); "
          "models from the Hub are in huggingface_hub's cache (`hf cache`)")
    return EXIT_OK


def _need_terminal(what: str) -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UserError(f"{what} needs an interactive terminal",
                        "run a preset headless with: qlora-wizard --preset FILE")


def _wizard_draft(preset: str | None):
    from tui.draft import Draft, load_draft

    if preset:
        return load_draft(preset)
    from engine.preset import preset_from_dict

    return Draft(preset_from_dict({"model": {"source": "builtin:tiny-llama"}, "data": {"train": "builtin:demo"}}))


def _wizard_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("preset", nargs="?", metavar="PRESET", help="start from this preset (e.g. presets/tiny-demo.yaml)")
    _add_runs_dir(s)


@command("wizard", _wizard_arguments, help="the full-screen wizard (the default with no arguments in a terminal)")
def cmd_wizard(args) -> int:
    _need_terminal("the wizard")
    draft = _wizard_draft(args.preset)
    # Textual loads only here, so `--help` and the headless paths stay light.
    from tui.wizard import WizardApp

    app = WizardApp(draft, ask_model=args.preset is None, runs_dir=args.runs_dir)
    result = app.run()
    if app.run_dir is not None:
        return _report_run(app.run_dir, result)
    from tui.draft import keep_draft

    saved = keep_draft(app.draft)
    if app.draft.exported_to:
        print(f"preset exported to {app.draft.exported_to}; run it with: qlora-wizard --preset {app.draft.exported_to}")
    elif saved:
        print(f"no run started; the draft is kept in {saved} (open it again with: qlora-wizard wizard {saved})")
    return EXIT_OK


def _plain_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("preset", nargs="?", metavar="PRESET", help="start from this preset")
    _add_runs_dir(s)


@command("plain", _plain_arguments, help="the wizard's steps as line-by-line prompts (for terminals where "
         "the full-screen app misbehaves)")
def cmd_plain(args) -> int:
    _need_terminal("qlora-wizard plain")
    from tui.plain import run_plain

    return run_plain(_wizard_draft(args.preset), runs_dir=args.runs_dir)


def _demo_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--run-dir", metavar="DIR")


@command("demo", _demo_arguments, help="train the offline demo preset (tiny model, bundled data)")
def cmd_demo(args) -> int:
    from engine.demo import DEMO_PRESET

    print("qlora-wizard demo: a real QLoRA run of a tiny model on the bundled data, offline, on this machine.")
    print(f"the same as: qlora-wizard --preset {DEMO_PRESET.relative_to(Path.cwd()) if DEMO_PRESET.is_relative_to(Path.cwd()) else DEMO_PRESET}")
    print("Ctrl-C stops it after saving a checkpoint; `qlora-wizard resume RUN_DIR` continues it.\n")
    return run_preset(str(DEMO_PRESET), args.run_dir, detach=False)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``qlora-wizard`` parser: the top-level ``--preset`` options, then every registered command."""
    p = _Parser(prog="qlora-wizard", description="QLoRA fine-tuning of Hugging Face causal language models, "
                "right about memory, with runs that survive a dropped connection.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_preset_arguments(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for c in COMMANDS:
        s = sub.add_parser(c.name, help=c.help, **c.options)
        c.arguments(s)
        s.set_defaults(func=c.func)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns (and exits with) the exit status."""
    fewer_collections()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.preset and not getattr(args, "func", None):
            code = run_preset(args.preset, args.run_dir, args.detach, args.nodes, args.node_rank, args.master)
        elif getattr(args, "func", None):
            code = args.func(args)
        elif sys.stdin.isatty() and sys.stdout.isatty():
            args.preset, args.runs_dir = None, "runs"
            code = cmd_wizard(args)
        else:
            parser.print_help()
            code = EXIT_OK
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = EXIT_STOPPED
    except BrokenPipeError:
        code = EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
