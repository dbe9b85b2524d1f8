"""The real-model tier, after its run: ``try`` answers with the adapter, and ``merge`` writes a model
whose logits are the adapter model's. The run (``conftest.real_run``) is trained once and shared; this
file is apart from tests/test_real_model.py so that the workers run their minutes side by side."""

from __future__ import annotations

import pytest

from conftest import run_cli

pytestmark = [pytest.mark.real, pytest.mark.slow]


def test_try_answers_with_the_adapter_and_merge_gives_the_same_logits(real_run, real_merged):
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    # Sixteen new tokens: room for the answer and its EOS (the base, which rambles, stops there too).
    r = run_cli("try", str(real_run), "--prompt", "Say it twice: cobalt\nAnswer:", "--temperature", "0",
                "--max-new-tokens", "16", "--json", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "cobalt cobalt" in r.stdout

    out = real_merged  # qlora-wizard merge RUN --out DIR --dtype fp32 (conftest)
    import yaml

    base_dir = yaml.safe_load((real_run / "preset.yaml").read_text())["model"]["source"]
    # The merged folder's tokenizer.json read by the tokenizers library itself (the same ids as
    # transformers' tokenizer, BOS first, without its seconds of loading a 262,144-word vocabulary).
    ids = torch.tensor([Tokenizer.from_file(str(out / "tokenizer.json")).encode("Say it twice: maple\nAnswer:").ids])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).train(False)
        want = merged(**batch).logits
        del merged
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        tuned = PeftModel.from_pretrained(base, real_run / "adapter").train(False)
        got = tuned(**batch).logits
    assert torch.allclose(got, want, atol=1e-3, rtol=0), float((got - want).abs().max())
    assert int(got[0, -1].argmax()) == int(want[0, -1].argmax())
