"""Trying a finished run: one loaded model that answers with its adapter on or off.

USABLE (issue 13): ``TrySession.open``, ``render``, ``stream``, ``answer``, ``examples`` and ``close``
follow the shared contract; the screen may build on them.

The base model loads exactly as the run trained it (``engine.train._load_model`` with the run's
preset and this machine's device plan: 4-bit NF4 on a CUDA GPU, NF4 with fp32 compute on the CPU),
then the run's adapter (``RUN_DIR/adapter``, PEFT format) on top. The base model's answer is the
same model with the adapter switched off (peft's ``disable_adapter()``), never a second copy.
Generation runs in a thread and streams text through transformers' ``TextIteratorStreamer``; one
generation runs at a time (the adapter switch is the model's state), a second waits for it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from engine.errors import UserError, first_line
from engine.events import RunHistory, fold_history, read_events
from engine.preset import Preset, load_preset
from engine.runs import ADAPTER_DIR, PRESET_FILE, is_running, require_run


@dataclass(frozen=True)
class Decoding:
    """How an answer is generated."""

    max_new_tokens: int = 128
    """Longest answer in tokens."""
    temperature: float = 0.7
    """Sampling temperature; 0 means greedy (the most likely token each time)."""
    top_p: float = 0.9
    """Nucleus sampling: draw from the most likely tokens that together hold this share of probability."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max new tokens {self.max_new_tokens} must be at least 1")
        if self.temperature < 0:
            raise UserError(f"temperature {self.temperature:g} must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top-p {self.top_p:g} must be above 0 and at most 1")


@dataclass(frozen=True)
class Ending:
    """Why an answer ended."""

    reason: str
    """``eos``: the model generated a stop token; ``length``: it reached max new tokens without one;
    ``stopped``: the caller stopped it."""
    tokens: int
    """Tokens generated (the stop token included)."""
    limit: int
    """The max new tokens it ran under."""
    token: str = ""
    """The stop token generated (``reason`` ``eos``), e.g. ``</s>``."""

    def words(self) -> str:
        """In a few words, e.g. ``ended by the stop token </s>``."""
        if self.reason == "eos":
            return f"ended by the stop token {self.token}".rstrip()
        if self.reason == "length":
            return f"cut at the length limit of {self.limit:,} tokens: the model did not stop"
        return "stopped before the model ended it"


@dataclass(frozen=True)
class Example:
    """A held-out example to try: what a person would type and the answer it was trained towards."""

    prompt: str
    """The user's text of a validation example (what a person would type)."""
    reference: str
    """Its reference answer (the trained response text)."""


# ---------------------------------------------------------------------------------------------
# A finished run


@dataclass(frozen=True)
class FinishedRun:
    """A run whose training finished and whose adapter is in place: what try, eval, merge and push need."""

    run_dir: Path
    preset: Preset
    """The run's ``preset.yaml``."""
    history: RunHistory
    adapter: Path
    """``RUN_DIR/adapter``."""

    @property
    def format(self) -> str:
        """The data format the run trained with: the preset's, or the one detected (start event)."""
        if self.preset.data.format != "auto":
            return self.preset.data.format
        detected = self.history.start.data.format if self.history.start else None
        return detected or "auto"


def finished_run(run_dir: str | Path) -> FinishedRun:
    """The run at ``run_dir`` if it finished with an adapter; else one line saying why not and what to do."""
    run_dir = require_run(run_dir)
    history = fold_history(read_events(run_dir))
    end = history.end
    if end is None:
        if is_running(run_dir):
            raise UserError(f"{run_dir} is still training, so it has no adapter yet",
                            f"follow it with `qlora-wizard attach {run_dir}`")
        raise UserError(f"{run_dir} has not finished (no end event), so it has no adapter",
                        f"continue it with `qlora-wizard resume {run_dir}`")
    if end.status != "finished":
        raise UserError(f"{run_dir} has not finished ({end.status} at step {history.step}), so it has no adapter",
                        f"continue it with `qlora-wizard resume {run_dir}`")
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} finished but its adapter is missing ({adapter} has no adapter_config.json)")
    return FinishedRun(run_dir, load_preset(run_dir / PRESET_FILE), history, adapter)


def model_source(run: FinishedRun) -> str:
    """The base model's local folder or Hub id (the demo model created on first use; a .gguf's
    converted folder, converted again only if the cache lost it): what ``try``, ``eval`` and ``merge``
    load."""
    from engine.demo import resolve_model_source
    from engine.gguf import local_model

    return local_model(resolve_model_source(run.preset.model.source))


def load_tokenizer(run: FinishedRun):
    """The tokenizer saved with the adapter (the one the run trained with), with a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(run.adapter, trust_remote_code=run.preset.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line
        raise UserError(f"cannot load the tokenizer saved in {run.adapter}: {first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_adapter_model(run: FinishedRun, base=None):
    """The run's base model with its adapter attached (peft ``PeftModel``), in evaluation mode.

    ``base``: a base model already loaded (merge loads it in 16 bits); by default it loads as the
    run trained it (:func:`load_base_as_trained`)."""
    quiet_loading()
    from peft import PeftModel

    if base is None:
        base = load_base_as_trained(run)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(base, run.adapter)
    except Exception as exc:  # noqa: BLE001 - shapes or names of another base model
        raise UserError(f"the adapter in {run.adapter} does not load onto {run.preset.model.source}: "
                        f"{first_line(exc, 200)}") from None
    model.eval()
    return model


def load_base_as_trained(run: FinishedRun):
    """The base model loaded the way the run's training process loaded it, on this machine's device,
    with the attention kernel for plain (unpacked) rows and the KV cache on for generation."""
    import torch

    from engine.attention import PACKED_KERNELS
    from engine.gpu import probe_gpus
    from engine.modelinfo import inspect_model, require_weights
    from engine.plan import plan_device
    from engine.train import _load_model

    quiet_loading()
    preset, source = run.preset, model_source(run)
    info = inspect_model(source, revision=preset.model.revision, trust_remote_code=preset.model.trust_remote_code)
    require_weights(info)
    gpus = probe_gpus() if torch.cuda.is_available() else []
    plan = plan_device(preset, gpus, info.model_type)
    # One prompt at a time, no packed rows: plain SDPA (or flash-attn), and no fused training kernels.
    attn = "sdpa" if plan.attn_implementation in PACKED_KERNELS else plan.attn_implementation
    plan = replace(plan, attn_implementation=attn, liger=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside transformers and peft
            model = _load_model(preset, source, plan)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing download, a full GPU: one line
        raise UserError(f"cannot load the base model {preset.model.source}: {first_line(exc)}") from None
    model.config.use_cache = True  # training turned it off (packed rows); generation needs it
    return model


def quiet_loading() -> None:
    """No progress bars or library chatter while models load and save: the front end says what happens."""
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def device_of(model) -> str:
    """``cuda`` or ``cpu``: where the model's weights are."""
    return "cuda" if next(model.parameters()).device.type == "cuda" else "cpu"


def adapter_switch(model, adapter: bool):
    """A context in which the model answers with its adapter (``adapter``) or as the plain base."""
    from contextlib import nullcontext

    return nullcontext() if adapter else model.disable_adapter()


# ---------------------------------------------------------------------------------------------
# The session


class TrySession:
    """One loaded model for trying a finished run: the base model (4-bit NF4 on CUDA exactly as the run
    trained, fp32 on the CPU) with the run's adapter (RUN_DIR/adapter, PEFT format) attached; the base
    model's answer comes from the same model with the adapter switched off (peft's
    ``with model.disable_adapter():``), never a second copy."""

    def __init__(self, run: FinishedRun, model, tokenizer) -> None:
        self.run = run
        """The finished run."""
        self.run_dir: Path = run.run_dir
        """The run directory."""
        self.preset: Preset = run.preset
        """The run's preset.yaml."""
        self.model = model
        """The ``PeftModel``: the base with the adapter attached."""
        self.tokenizer = tokenizer
        """The tokenizer saved with the adapter."""
        self.device: str = device_of(model)
        """``cuda`` or ``cpu``."""
        self._lock = threading.Lock()
        self.last_stop: dict[bool, Ending] = {}
        """Why the last answer ended, by adapter (True: the fine-tuned answer, False: the base one); an
        answer that failed has none."""
        from engine.data.formats import get_format

        self._format = get_format(run.format if run.format != "auto" else "text")

    @classmethod
    def open(cls, run_dir: str | Path) -> "TrySession":
        """Load the run's base model and adapter; one-line :class:`UserError` when there is no run, no
        adapter yet, or the model cannot be loaded."""
        run = finished_run(run_dir)
        tokenizer = load_tokenizer(run)
        return cls(run, load_adapter_model(run), tokenizer)

    def render(self, prompt: str) -> str:
        """The prompt as the model sees it: the run's data format's template, as in training (the chat
        template with its generation prompt for messages and sharegpt; alpaca reads a blank line as the
        end of the instruction and the start of its input)."""
        rendered = self._rendered(prompt)
        bos = self.tokenizer.bos_token if rendered.bos and self.tokenizer.bos_token else ""
        return bos + rendered.text

    def _rendered(self, prompt: str):
        from engine.data.formats import TemplateRefused
        from engine.data.tokenize import adds_bos

        try:
            return self._format.render_prompt(prompt, self.tokenizer, adds_bos(self.tokenizer))
        except TemplateRefused as exc:
            raise UserError(f"the chat template refused the prompt ({exc})") from None

    def _input_ids(self, prompt: str):
        """The prompt's token ids as training built them: the text without special tokens, then BOS first."""
        import torch

        rendered = self._rendered(prompt)
        ids = self.tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
        if rendered.bos and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id, *ids]
        return torch.tensor([ids], device=self.model.device)

    def _eos_ids(self) -> list[int]:
        """Every token that ends an answer: the tokenizer's EOS and the model's generation config's."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return sorted(i for i in ids if i is not None)

    def stream(self, prompt: str, *, adapter: bool, decoding: Decoding = Decoding(),
               stop: threading.Event | None = None) -> Iterator[str]:
        """The answer as text pieces while it is generated (fine-tuned with ``adapter``, else the base);
        stops early when ``stop`` is set or the caller stops reading. Once it is over,
        ``last_stop[adapter]`` says why it ended (:class:`Ending`)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        input_ids = self._input_ids(prompt)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        halt = threading.Event()
        halted: list[bool] = []  # the stopping criterion ended it (the caller's stop, or the reader left)

        class _Stop(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                flag = halt.is_set() or (stop is not None and stop.is_set())
                if flag:
                    halted.append(True)
                return torch.full((ids.shape[0],), flag, dtype=torch.bool, device=ids.device)

        config = self._generation_config(decoding)
        failure: list[BaseException] = []
        generated: list[list[int]] = []
        self.last_stop.pop(adapter, None)

        def generate() -> None:
            try:
                with self._lock, torch.inference_mode(), adapter_switch(self.model, adapter):
                    out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                              generation_config=config, streamer=streamer,
                                              stopping_criteria=StoppingCriteriaList([_Stop()]))
                generated.append(out[0, input_ids.shape[1]:].tolist())
            except BaseException as exc:  # noqa: BLE001 - handed to the reader below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, name="qlora-wizard-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            halt.set()  # the reader stopped early (or is done): the generation ends at its next token
            thread.join()
            if generated and not failure:
                self.last_stop[adapter] = self._ending(generated[0], config.eos_token_id, bool(halted),
                                                       decoding.max_new_tokens)
        if failure:
            exc = failure[0]
            raise UserError(f"generation failed: {type(exc).__name__}: {first_line(exc)}") from exc

    def _generation_config(self, decoding: Decoding):
        """transformers' generation settings for ``decoding``, ending at every stop token."""
        from transformers import GenerationConfig

        sample = decoding.temperature > 0
        return GenerationConfig(
            max_new_tokens=decoding.max_new_tokens,
            do_sample=sample,
            temperature=decoding.temperature if sample else None,
            top_p=decoding.top_p if sample else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self._eos_ids(),
            use_cache=True,
        )

    def answers(self, prompts: list[str], *, adapter: bool, decoding: Decoding = Decoding(),
                batch_size: int = 8) -> list[tuple[str, Ending]]:
        """Each prompt's whole answer and why it ended, generated ``batch_size`` prompts at a time
        (left-padded, each with its own attention mask): what ``eval`` generates. One generation per
        batch instead of one per prompt: on a CPU, where each step reads every 4-bit weight once for
        the whole batch, several times faster; greedy answers are the one-at-a-time answers (tested)."""
        import torch

        config = self._generation_config(decoding)
        eos = set(config.eos_token_id)
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        step = max(1, batch_size)
        out: list[tuple[str, Ending]] = []
        for start in range(0, len(prompts), step):
            rows = [self._input_ids(p)[0].tolist() for p in prompts[start:start + step]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.model.device)
            try:
                with self._lock, torch.inference_mode(), adapter_switch(self.model, adapter):
                    generated = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            except Exception as exc:  # noqa: BLE001 - one line, as a single answer's failure is
                raise UserError(f"generation failed: {type(exc).__name__}: {first_line(exc)}") from exc
            for row in generated[:, width:].tolist():
                end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))  # the stop token kept
                new = row[:end]
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                out.append((text, self._ending(new, config.eos_token_id, False, decoding.max_new_tokens)))
        return out

    def _ending(self, new_ids: list[int], eos_ids: list[int], halted: bool, limit: int) -> Ending:
        """Why a generation of ``new_ids`` ended: a stop token last, the caller's stop, or the length limit."""
        if new_ids and new_ids[-1] in eos_ids:
            token = self.tokenizer.convert_ids_to_tokens(new_ids[-1])
            return Ending("eos", len(new_ids), limit, str(token or ""))
        if halted or len(new_ids) < limit:
            return Ending("stopped", len(new_ids), limit)
        return Ending("length", len(new_ids), limit)

    def answer(self, prompt: str, *, adapter: bool, decoding: Decoding = Decoding()) -> str:
        """The whole answer (fine-tuned with ``adapter``, else the base model's)."""
        return "".join(self.stream(prompt, adapter=adapter, decoding=decoding))

    def answer_with_ending(self, prompt: str, *, adapter: bool,
                           decoding: Decoding = Decoding()) -> tuple[str, Ending | None]:
        """The whole answer and why it ended (:class:`Ending`: the stop token or the length limit)."""
        text = self.answer(prompt, adapter=adapter, decoding=decoding)
        return text, self.last_stop.get(adapter)

    def examples(self, n: int = 20) -> list[Example]:
        """Up to ``n`` validation examples of the run (its own split, same seed), or the training data's
        last examples when the run had no validation split."""
        return held_out(self.run, n)

    def close(self) -> None:
        """Let the model go (and the GPU memory it holds)."""
        self.model = None
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - freeing memory is best effort
            pass

    def __enter__(self) -> "TrySession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def held_out(run: FinishedRun, n: int) -> list[Example]:
    """The run's held-out examples (validation split, else the last training ones) as prompt and reference."""
    from engine.data import held_out_examples
    from engine.data.formats import get_format

    settings = run.preset.data
    if settings.format == "auto" and run.format != "auto":
        settings = settings.model_copy(update={"format": run.format})
    fmt, records, _ = held_out_examples(settings, run.preset.training.seed, n)
    form = get_format(fmt)
    return [Example(*form.typed_prompt(r)) for r in records]
