"""The planning commands and run management as a person uses them: output, JSON keys, exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli, write_preset

INSPECT_KEYS = {"model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "params_total", "lora_target_candidates", "default_targets",
                "weight_bytes", "is_moe"}


def test_inspect_json_has_the_stable_keys(hf_configs):
    r = run_cli("inspect", str(hf_configs / "meta-llama__Llama-3.2-1B"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert INSPECT_KEYS <= set(out)
    assert out["params_total"] == 1_235_814_400
    assert "lm_head" not in out["default_targets"]


def test_inspect_table_shows_the_model(hf_configs):
    r = run_cli("inspect", str(hf_configs / "mistralai__Mistral-7B-v0.1"))
    assert r.returncode == 0
    assert "7,241,732,096" in r.stdout
    assert "q_proj" in r.stdout and "down_proj" in r.stdout


def test_inspect_remote_code_model_never_prompts(hf_configs):
    r = run_cli("inspect", str(hf_configs / "tiiuae__falcon-7b"), timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "--trust-remote-code" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,expected", [
    (["inspect", "/no/such/model"], "error: "),
    (["estimate"], "error: estimate needs a model"),
    (["lr", "--base-lr", "5e-5"], "error: lr needs --supervised-tokens"),
    (["estimate", "x/y", "--micro-batch", "0"], "micro_batch_size = 0 is not valid"),
    (["nonsense-command"], "error: "),
])
def test_bad_input_is_one_line_and_exit_2(args, expected):
    r = run_cli(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["inspect", "estimate"])
def test_a_config_without_hidden_size_is_one_error_line_not_a_default_sized_model(tmp_path, hf_configs, command):
    raw = json.loads((hf_configs / "meta-llama__Llama-3.2-1B" / "config.json").read_text())
    del raw["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    r = run_cli(command, str(tmp_path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.startswith(f"error: {tmp_path / 'config.json'} has no 'hidden_size'")
    assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout


def test_estimate_json_and_fit(hf_configs):
    src = str(hf_configs / "meta-llama__Llama-3.1-8B")
    r = run_cli("estimate", src, "--seq-len", "2048", "--micro-batch", "1", "--gpu-mem", "24", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"total_bytes", "components", "inference_rule_bytes", "fits"} <= set(out)
    assert out["fits"] is True
    assert sum(out["components"].values()) == out["total_bytes"]
    assert out["inference_rule_bytes"] == round(16_060_522_496 * 1.2)
    big = json.loads(run_cli("estimate", src, "--seq-len", "2048", "--micro-batch", str(out["fit"]["max_micro_batch"] + 1),
                             "--gpu-mem", "24", "--json").stdout)
    assert big["fits"] is False


def test_estimate_table_says_fits_or_not(hf_configs):
    src = str(hf_configs / "Qwen__Qwen2.5-7B")
    out = " ".join(run_cli("estimate", src, "--gpu-mem", "8").stdout.split())
    assert "DOES NOT FIT: needs " in out and ", 8.00 GiB available (" in out and " short); 8 GiB (--gpu-mem)" in out
    r = run_cli("estimate", src, "--gpu-mem", "80", "--no-grad-ckpt", "--targets", "q_proj,v_proj")
    out = " ".join(r.stdout.split())
    assert "FITS: " in out and " of 80.00 GiB (" in out and " left; 80 GiB (--gpu-mem)" in out
    assert "DOES NOT FIT" not in out
    assert "inference rule" in r.stdout


def test_estimate_says_the_memory_steps_verdict(hf_configs):
    """One verdict: the line ``estimate`` prints is the memory step's (``MemoryView.verdict``), as the
    plain prompts print it."""
    from engine.gpu import probe_gpus
    from engine.modelinfo import inspect_model
    from engine.preset import preset_from_dict
    from tui.draft import Draft
    from tui.steps.memory import memory_view

    src = str(hf_configs / "Qwen__Qwen2.5-7B")
    preset = preset_from_dict({"model": {"source": src}, "data": {"train": "builtin:demo"},
                               "distributed": {"gpus": 1}})
    draft = Draft(preset, info=inspect_model(src), gpus=probe_gpus())
    for card_gib in (8, 80):
        badge, figures = memory_view(draft, card_gib * 2**30).verdict
        out = " ".join(run_cli("estimate", src, "--gpu-mem", str(card_gib)).stdout.split())
        assert f"{badge}: {figures}; {card_gib} GiB (--gpu-mem)" in out


def test_estimate_checks_against_the_first_visible_gpu(hf_configs, monkeypatch, capsys):
    """``CUDA_VISIBLE_DEVICES=1``: the budget, the plan and the speed model are the second GPU's."""
    from engine.gpu import GpuInfo
    from tui.cli import main

    gpus = [GpuInfo(0, "NVIDIA RTX 4090", 24 * 2**30, 23 * 2**30, (8, 9)),
            GpuInfo(1, "NVIDIA H100 80GB HBM3", 80 * 2**30, 79 * 2**30, (9, 0))]
    monkeypatch.setattr("engine.gpu.probe_gpus", lambda: list(gpus))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    src = str(hf_configs / "meta-llama__Llama-3.1-8B")
    assert main(["estimate", src, "--seq-len", "2048", "--micro-batch", "1", "--fit", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget_bytes"] == 79 * 2**30 and out["fastest_fit"]["gpu"].startswith("NVIDIA H100")
    assert main(["estimate", src, "--seq-len", "2048", "--micro-batch", "1"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "; NVIDIA H100 80GB HBM3: 79.00 GiB free of 80.00 GiB" in text and "RTX 4090" not in text


def test_each_strategy_has_one_entry_in_the_engines_table():
    from engine.distributed import STRATEGY_SHORT, STRATEGY_WORDS
    from engine.memory import STRATEGIES

    assert tuple(STRATEGY_SHORT) == tuple(STRATEGY_WORDS) == STRATEGIES
    assert all(STRATEGY_WORDS[s].startswith(STRATEGY_SHORT[s]) for s in STRATEGIES)


def test_every_command_is_declared_beside_its_function():
    """Each ``cmd_X`` is registered by ``@command`` (its help and arguments beside it), once, in the
    order ``--help`` lists the commands."""
    import tui.cli as cli

    defined = {name: f for name, f in vars(cli).items() if name.startswith("cmd_") and callable(f)}
    assert {c.func for c in cli.COMMANDS} == set(defined.values())
    assert [f"cmd_{c.name}" for c in cli.COMMANDS] == [c.func.__name__ for c in cli.COMMANDS]
    listed = run_cli("--help").stdout.split("COMMAND\n", 1)[1]
    shown = [line.split()[0] for line in listed.splitlines() if line.startswith("    ") and not
             line.startswith("     ")]
    assert shown == [c.name for c in cli.COMMANDS]


def test_a_16_and_a_24_gb_card_get_the_same_arithmetic_and_are_told_what_is_left(tmp_path, hf_configs):
    """The shipped Llama-3.1-8B preset claims a 16 GB card: the estimate is the same for every card;
    each is told the room left and what the CUDA context in the total costs, and which kernels run."""
    data = yaml.safe_load((ROOT / "presets" / "llama-3.1-8b-qlora.yaml").read_text())
    data["model"]["source"] = str(hf_configs / "meta-llama__Llama-3.1-8B")
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump(data))
    totals, lefts = [], []
    for card_gib in (14.9, 22.5):  # what a 16 GB and a 24 GB card have free
        r = run_cli("estimate", "--preset", str(preset), "--gpu-mem", str(card_gib), "--json")
        totals.append(json.loads(r.stdout)["total_bytes"])
        r = run_cli("estimate", "--preset", str(preset), "--gpu-mem", str(card_gib))
        text = " ".join(r.stdout.split())
        left = text.split("FITS: ")[1].split(" left")[0].split(", ")[-1]
        lefts.append(float(left.split()[0]))
        assert "the total counts 0.75 GiB of CUDA context" in text
        assert "kernels: " in text and "no mask" in text
    assert totals[0] == totals[1]
    assert abs((lefts[1] - lefts[0]) - (22.5 - 14.9)) < 0.02
    assert abs(lefts[0] - (14.9 - totals[0] / 2**30)) < 0.01


def test_estimate_fit_prints_the_fastest_settings_that_fit_and_why(hf_configs):
    src = str(hf_configs / "meta-llama__Llama-3.1-8B")
    args = ("estimate", src, "--seq-len", "2048", "--micro-batch", "1", "--grad-accum", "16", "--gpu-mem", "79",
            "--fit")
    r = run_cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    fastest = json.loads(r.stdout)["fastest_fit"]
    choice = fastest["choice"]
    assert fastest["found"] is True and fastest["effective_batch"] == 16
    assert fastest["usable_bytes"] == int(79 * 2**30 * 0.9) and fastest["margin"] == 0.1
    assert choice["gradient_checkpointing"] is False and choice["micro_batch_size"] > 1
    assert choice["micro_batch_size"] * choice["gradient_accumulation_steps"] == 16
    assert all(a["micro_batch_size"] * a["gradient_accumulation_steps"] == 16 for a in fastest["alternatives"])

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    mb, acc = choice["micro_batch_size"], choice["gradient_accumulation_steps"]
    assert f"fastest that fits: checkpointing off, micro batch {mb} x accumulation {acc}: " in out
    assert f"~{choice['tokens_per_s']:,.0f} tokens/s modelled" in out
    assert "  - checkpointing off: fits with" in out and "saves the recompute" in out
    assert f"  - micro batch {mb} x accumulation {acc} keeps your effective batch of 16" in out
    assert "  - pass --mean-len TOKENS with the data's mean example length" in out
    assert "what fits in 71.10 GiB, fastest first (modelled)" in out
    rows = [line for line in out.splitlines() if line.startswith(("│ on ", "│ off "))]
    assert len(rows) == 1 + len(fastest["alternatives"])
    assert rows[0].split("│")[1:4] == [" off           ", f" {mb:>5} ", f" {acc:>5} "] and "chosen" in rows[0]

    r = run_cli("estimate", src, "--seq-len", "2048", "--gpu-mem", "4", "--fit")
    assert r.returncode == 0, r.stderr
    assert "nothing fits in 3.6 GiB (4.0 GiB less the 10% margin): even micro batch 1 with checkpointing on needs" \
        in r.stdout
    assert "what fits in" not in r.stdout


def test_estimate_fit_arguments_are_checked(hf_configs):
    src = str(hf_configs / "meta-llama__Llama-3.1-8B")
    r = run_cli("estimate", src, "--mean-len", "300")
    assert r.returncode == 2 and r.stderr.startswith("error: --mean-len is for --fit")
    r = run_cli("estimate", src, "--gpu-mem", "24", "--fit", "--mean-len", "0")
    assert r.returncode == 2 and "mean example length must be a number of tokens above 0" in r.stderr
    from engine.gpu import probe_gpus

    if not probe_gpus():
        r = run_cli("estimate", src, "--fit")
        assert r.returncode == 2 and r.stderr.startswith("error: --fit needs the GPU's memory")
        assert "--gpu-mem" in r.stderr


def test_estimate_unknown_target_names_the_models_layers(hf_configs):
    r = run_cli("estimate", str(hf_configs / "openai-community__gpt2"), "--targets", "q_proj")
    assert r.returncode == 2
    assert "c_attn" in r.stderr


def test_lr_reproduces_the_guides_example():
    r = run_cli("lr", "--base-lr", "5e-5", "--supervised-tokens", "2000000", "--steps", "350", "--epochs", "1",
                "--pretrained-batch-tokens", "4000000", "--json")
    assert r.returncode == 0
    assert f"{json.loads(r.stdout)['learning_rate']:.3g}" == "1.89e-06"


def test_lr_from_a_preset_counts_the_real_data(tmp_path):
    r = run_cli("lr", "--preset", str(ROOT / "presets" / "tiny-demo.yaml"), "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["steps"] == 120 and out["supervised_tokens"] > 1000
    expected = out["base_lr"] * (out["supervised_tokens"] / (out["steps"] / out["epochs"])
                                 / out["pretrained_batch_tokens"]) ** 0.5
    assert out["learning_rate"] == pytest.approx(expected)


def test_lr_for_an_unknown_family_asks_instead_of_guessing(tmp_path, hf_configs):
    data = yaml.safe_load((ROOT / "presets" / "tiny-demo.yaml").read_text())
    model = tmp_path / "gpt2"
    shutil.copytree(hf_configs / "openai-community__gpt2", model)
    data["model"] = {"source": str(model)}
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    r = run_cli("lr", "--preset", str(p), "--base-lr", "1e-4", "--steps", "10")
    # gpt2's tokenizer is not there: the person is told, in one line
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_runs_on_an_empty_folder(tmp_path):
    r = run_cli("runs", "--runs-dir", str(tmp_path))
    assert r.returncode == 0 and "no runs" in r.stdout
    assert json.loads(run_cli("runs", "--runs-dir", str(tmp_path), "--json").stdout) == []


def test_resume_and_stop_of_something_that_is_not_a_run(tmp_path):
    for cmd in ("resume", "stop"):
        r = run_cli(cmd, str(tmp_path))
        assert r.returncode == 2 and r.stderr.startswith("error:")


def _demo_copy(tmp_path: Path, name: str) -> Path:
    """A copy of the demo model's folder without its weights."""
    from engine.demo import ensure_demo_model

    model = tmp_path / name
    model.mkdir()
    for f in Path(ensure_demo_model()).iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, model / f.name)
    return model


def _preset_for(tmp_path: Path, model: Path) -> Path:
    data = yaml.safe_load((ROOT / "presets" / "tiny-demo.yaml").read_text())
    data["model"] = {"source": str(model)}
    data["training"]["max_steps"] = 3
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_a_model_folder_without_weights_is_bad_input(tmp_path):
    model = _demo_copy(tmp_path, "no-weights")
    r = run_cli("--preset", str(_preset_for(tmp_path, model)), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {model} has a config.json but no weights")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_that_fails_exits_1_with_the_reason(tmp_path):
    """A broken download (a truncated weights file) is only found when the weights load: the run fails in words."""
    from engine.demo import ensure_demo_model

    model = _demo_copy(tmp_path, "truncated")
    whole = (Path(ensure_demo_model()) / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    r = run_cli("--preset", str(_preset_for(tmp_path, model)), "--run-dir", str(tmp_path / "run"), timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed:" in r.stdout
    summary = json.loads(run_cli("runs", "--runs-dir", str(tmp_path), "--json").stdout)[0]
    assert summary["status"] == "failed" and summary["message"]


def test_out_of_memory_becomes_advice_with_the_estimate(tmp_path):
    import torch

    from engine.preset import load_preset
    from engine.train import RunState, _describe_failure

    class Est:
        total_bytes = 30 * 2**30

    preset = load_preset(ROOT / "presets" / "llama-3.1-8b-qlora.yaml")
    message, code = _describe_failure(torch.OutOfMemoryError("CUDA out of memory"),
                                      RunState(preset=preset, estimate=Est()), tmp_path)
    assert code == 1
    assert message.startswith("the GPU ran out of memory: the estimate for these settings was 30.0 GiB")
    assert "sequence length 2048 -> 1024" in message


def test_cache_shows_its_place_and_parts_and_clears_what_is_asked(tmp_path):
    """`qlora-wizard cache` names the folder and each part with its size; `cache clear --only data` removes
    the tokenized data alone; `cache clear` the rest of what qlora-wizard made, never files it did not make."""
    cache = tmp_path / "cache"
    (cache / "data" / "0123abcd").mkdir(parents=True)
    (cache / "data" / "0123abcd" / "train.arrow").write_bytes(b"\0" * 3 * 2**20)
    (cache / "tiny-llama-v1").mkdir()  # an older recipe's demo model: the demo's part too
    (cache / "tiny-llama-v1" / "model.safetensors").write_bytes(b"\0" * 2**20)
    (cache / "last-draft.yaml").write_text("version: 1\n")
    (cache / "someone-elses.txt").write_text("keep")
    env = {"QLORA_WIZARD_CACHE": str(cache)}
    r = run_cli("cache", env=env)
    assert r.returncode == 0, r.stderr
    assert f"cache: {cache} (4.0 MiB" in r.stdout
    rows = [" ".join(line.split()) for line in r.stdout.splitlines()]
    assert "data 3.0 MiB 1 files tokenized data sets (made again by the next run of the same data)" in rows
    assert "demo 1.0 MiB 1 files the offline demo model (made again on first use)" in rows
    report = json.loads(run_cli("cache", "--json", env=env).stdout)
    assert {p["name"]: p["bytes"] for p in report["parts"]} == {"data": 3 * 2**20, "demo": 2**20, "drafts": 11,
                                                                "other": 4}
    r = run_cli("cache", "clear", "--only", "data", env=env)
    assert r.returncode == 0 and r.stdout.startswith("removed data: 3.0 MiB in 1 files"), r.stdout + r.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["last-draft.yaml", "someone-elses.txt", "tiny-llama-v1"]
    assert run_cli("cache", "clear", env=env).returncode == 0
    assert sorted(p.name for p in cache.iterdir()) == ["someone-elses.txt"]
    r = run_cli("cache", "--only", "data", env=env)
    assert r.returncode == 2 and r.stderr.strip() == "error: --only is for `qlora-wizard cache clear`"


def test_the_headless_start_warns_before_training_when_examples_do_not_end_with_the_eos(tmp_path, demo_cache):
    """Cut at a short seq_len, demo examples lose their </s>: one warning line before training starts."""
    preset = write_preset(tmp_path, training__seq_len=100, training__max_steps=1, training__eval_steps=1,
                          training__save_steps=1, training__micro_batch_size=4, training__packing=False)
    r = run_cli("--preset", str(preset), "--run-dir", str(tmp_path / "run"), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, r.stderr
    assert "do not end with the end-of-sequence token </s>" in warnings[0] and "cut at seq_len 100" in warnings[0]
    assert "the model will not learn to stop on them; raise training.seq_len or shorten them" in warnings[0]
