"""The offline demo: a tiny Llama model and a bundled data set, no network and no GPU needed.

``builtin:tiny-llama`` names a Llama-architecture model of about 0.62 M parameters that is created
locally on first use (a few seconds on two CPU cores) and kept in the cache folder:

- a character-level tokenizer built with the ``tokenizers`` library (printable ASCII plus
  ``<unk> <s> </s> <pad>``), which adds ``<s>`` in front like Llama's, wrapped as a transformers
  fast tokenizer with a small chat template (``### User:`` / ``### Assistant:`` turns);
- ``LlamaForCausalLM`` with hidden size 128, 4 layers, 4 attention heads and 2 key/value heads,
  MLP width 256: every Linear layer inside the blocks has both sizes a multiple of 64, so
  bitsandbytes quantizes it to NF4 in whole blocks;
- briefly pretrained (150 full-parameter steps, fixed seed, about 10 s on two cores) on generic
  text of the demo's domain: word-list entries giving each word's forms and plain sentences
  about words, never the instruction layout. A QLoRA fine-tune on ``builtin:demo`` then adapts
  a model that already knows the words, as with a real base model. Measured (r=16 all-linear,
  micro batch 8, lr 2e-3, 100 steps): validation loss 5.2 -> 2.4 on the pretrained base against
  4.7 -> 3.8 on a randomly initialised one; training loss follows it closely.

``builtin:demo`` (resolved in :mod:`engine.data`) is ``engine/demo_data/tiny-demo.jsonl``.

Creation is atomic: the model is built in a temporary folder beside its final place and renamed
into it, so a killed or concurrent creation never leaves a half-written model behind.
Nothing here imports torch or transformers at module level.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
import time
from pathlib import Path

DEMO_MODEL = "builtin:tiny-llama"
"""The model source that names the demo model."""

DEMO_DATA = "builtin:demo"
"""The data source that names the bundled demo data set."""

DEMO_DATA_FILE = Path(__file__).resolve().parent / "demo_data" / "tiny-demo.jsonl"
"""The bundled demo data set (alpaca format)."""

DEMO_PRESET = Path(__file__).resolve().parent.parent / "presets" / "tiny-demo.yaml"
"""The offline demo preset (the demo model on the demo data): what ``qlora-wizard demo`` trains and
``make run`` opens the wizard on."""

DEMO_MODEL_DIRNAME = "tiny-llama-v2"
"""Folder of the demo model inside the cache; the suffix changes whenever the recipe does."""

_COMPLETE_MARKER = ".complete"

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
"""The demo tokenizer's chat template: plain ``### Role:`` headers, each assistant turn ends with ``</s>``."""

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
"""The demo model's dimensions (q/o 128x128, k/v 128x64, gate/up 128x256, down 256x128)."""

PRETRAIN_STEPS = 150
PRETRAIN_BATCH = 16
PRETRAIN_BLOCK = 128
PRETRAIN_LR = 3e-3
SEED = 0


def cache_root() -> Path:
    """Where qlora-wizard keeps what it creates: ``$QLORA_WIZARD_CACHE``, else
    ``$XDG_CACHE_HOME/qlora-wizard``, else ``~/.cache/qlora-wizard``."""
    explicit = os.environ.get("QLORA_WIZARD_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qlora-wizard"


def resolve_model_source(source: str) -> str:
    """``builtin:tiny-llama`` becomes the local folder of the demo model (created on first use);
    any other source is returned unchanged."""
    if source.strip() == DEMO_MODEL:
        return str(ensure_demo_model())
    return source


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the demo model lives (whether or not it exists yet)."""
    return Path(cache_dir if cache_dir is not None else cache_root()) / DEMO_MODEL_DIRNAME


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """The folder of the demo model and tokenizer, creating it once (atomically) if needed.

    ``cache_dir`` defaults to :func:`cache_root`. Returns a folder that ``AutoModelForCausalLM``
    and ``AutoTokenizer`` load with ``from_pretrained``.
    """
    target = demo_model_dir(cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    root = target.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from engine.errors import UserError

        raise UserError(
            f"cannot create the cache folder {root}: {exc.strerror or exc}",
            "set QLORA_WIZARD_CACHE to a writable folder",
        ) from None
    _remove_stale_temp_dirs(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_DIRNAME}.tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is an ordinary folder
    try:
        build_demo_model(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"created {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Someone else finished first (the target is a non-empty folder now): use theirs.
            if not (target / _COMPLETE_MARKER).is_file():
                if target.exists():
                    # A leftover without the marker (e.g. copied by hand half-way): replace it.
                    shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_temp_dirs(root: Path, older_than_s: float = 3600) -> None:
    """Remove temporary folders left by creations that were killed (older than an hour)."""
    now = time.time()
    for p in root.glob(f".{DEMO_MODEL_DIRNAME}.tmp-*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Building


SPACE_PIECE = "\u2581"
"""How the space is spelled in the vocabulary, as SentencePiece spells it (``▁``)."""


def demo_pieces() -> list[str]:
    """The demo vocabulary in id order: the special tokens, then one piece per character of printable
    ASCII (letters, digits, punctuation, space as ``▁``, tab, newline)."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    return list(SPECIAL_TOKENS) + [SPACE_PIECE if c == " " else c for c in chars]


def build_demo_tokenizer():
    """The demo tokenizer: character level over printable ASCII, ``<s>`` added in front.

    The space is the piece ``▁`` (a normalizer writes it, the decoder reads it back), as in a
    SentencePiece model: :func:`write_sentencepiece_model` writes the same vocabulary as the
    ``tokenizer.model`` that llama.cpp's converter reads, so a GGUF export tokenizes exactly as training did.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(demo_pieces())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    backend.normalizer = normalizers.Replace(" ", SPACE_PIECE)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE_PIECE, " "), decoders.Fuse()])
    bos_id = vocab["<s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_demo_model(out_dir: Path, pretrain_steps: int = PRETRAIN_STEPS) -> dict:
    """Create the tokenizer and the (briefly pretrained) model and save both into out_dir.

    Returns what was done (also written to ``demo_info.json`` beside the weights)."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    tokenizer = build_demo_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    # The weights and the pretraining batches come from their own seeded state: the result does
    # not depend on what used the global random state before, and that state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        losses = _pretrain(model, tokenizer, pretrain_steps) if pretrain_steps else []
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    write_sentencepiece_model(Path(out_dir) / "tokenizer.model")
    info = {
        "recipe": DEMO_MODEL_DIRNAME,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_steps": pretrain_steps,
        "pretrain_loss_first": round(losses[0], 4) if losses else None,
        "pretrain_loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4) if losses else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (Path(out_dir) / "demo_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def write_sentencepiece_model(path: Path) -> None:
    """The demo vocabulary as a SentencePiece model file (``tokenizer.model``): the same pieces and ids
    as :func:`build_demo_tokenizer`, no merges, no dummy prefix, spaces written ``▁``. llama.cpp's
    converter builds the GGUF's tokenizer from it (its tokenizer.json alone is a byte-pair vocabulary the
    converter does not know)."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    model = spm.ModelProto()
    kinds = {"<unk>": spm.ModelProto.SentencePiece.UNKNOWN}
    for i, piece in enumerate(demo_pieces()):
        p = model.pieces.add()
        p.piece = piece
        p.score = 0.0 if piece in SPECIAL_TOKENS else -float(i)
        p.type = kinds.get(piece, spm.ModelProto.SentencePiece.CONTROL if piece in SPECIAL_TOKENS
                           else spm.ModelProto.SentencePiece.NORMAL)
    model.trainer_spec.model_type = spm.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(model.pieces)
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = 3
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = False
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    Path(path).write_bytes(model.SerializeToString())


def _pretrain(model, tokenizer, steps: int) -> list[float]:
    """A few seconds of full-parameter training on text about words and letters (see
    ``engine/demo_data/make_demo_data.py``); returns the loss of each step."""
    import torch

    from engine.demo_data.make_demo_data import pretraining_text

    text = " ".join(pretraining_text())
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)
    n_blocks = len(ids) // PRETRAIN_BLOCK
    blocks = ids[: n_blocks * PRETRAIN_BLOCK].view(n_blocks, PRETRAIN_BLOCK)
    bos = torch.full((PRETRAIN_BATCH, 1), tokenizer.bos_token_id, dtype=torch.long)
    gen = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps)
    )
    model.train()
    losses = []
    for _ in range(steps):
        batch = torch.cat([bos, blocks[torch.randint(0, n_blocks, (PRETRAIN_BATCH,), generator=gen)]], dim=1)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
