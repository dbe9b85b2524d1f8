"""The one-command GPU suite, on the CPU: ``--dry-run`` runs every section on the demo model.

On a GPU it measures throughput against the baselines, profiles an engine step and runs the memory
matrix (issues 11 and 12) and the preference methods' cases; here it proves the same code paths end
to end, streaming each result.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

SUITE = ROOT / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow
def test_the_dry_run_streams_every_section_and_prints_the_tables(tmp_path):
    out = tmp_path / "suite"
    r = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "suite.jsonl").read_text().splitlines()]
    sections = [row["section"] for row in rows]
    assert sections[0] == "env" and {"bench", "profile", "memory", "preference"} <= set(sections)

    bench = next(row for row in rows if row["section"] == "bench")
    assert bench["exit"] == 0, bench.get("log_tail")
    assert bench["summary"]

    profile = next(row for row in rows if row["section"] == "profile")
    assert profile["exit"] == 0, profile.get("log_tail")
    assert profile["top_cpu_ops"] and profile["wall_ms_per_step"] > 0 and profile["process_cpu_ms_per_step"] > 0

    memory = [row for row in rows if row["section"] == "memory"]
    assert len(memory) == 1
    for row in memory:
        assert row["status"] == "finished", row.get("log_tail")
        assert row["estimate_total"] > 0 and row["attn"] == "sdpa_packed"
        assert "no mask" in row["kernels"] and row["method"] == "sft" and "reward_accuracy" not in row

    # One of the memory cases, moved (not one more): dpo on pairs filling seq_len, 8-bit AdamW.
    [pref] = [row for row in rows if row["section"] == "preference"]
    assert pref["case"].endswith(":opt=adamw_8bit:method=dpo")
    assert pref["status"] == "finished", pref.get("log_tail")
    assert pref["method"] == "dpo" and pref["reference"] == "each_step"  # 24 pairs, 12 trained: less than a pass
    assert pref["estimate_total"] > 0 and pref["peak_rss"] > 0
    assert 0 <= pref["reward_accuracy"] <= 1 and isinstance(pref["reward_margin"], float)
    assert pref["tokens_per_step"] == 2 * 4 * 128  # both sides of 4 pairs, each a full row of seq_len

    dist = [row for row in rows if row["section"] == "distributed"]
    assert len(dist) == 2
    for row in dist:
        assert row["status"] == "finished", row.get("log_tail")
    assert dist[1]["world"]["world_size"] == 2 and dist[1]["world"]["strategy"] == "ddp"
    assert [r["rank"] for r in dist[1]["ranks"]] == [0, 1] and dist[1]["speedup_vs_one_gpu"] > 0

    table = (out / "suite.md").read_text()
    assert table in r.stdout
    for heading in ("## Machine", "## Throughput", "## Profile of one engine step", "## Memory: estimate",
                    "## Preference tuning: dpo and orpo", "## Several GPUs: DDP and FSDP"):
        assert heading in table


def test_the_suite_refuses_to_measure_a_cpu_as_a_gpu_and_names_unknown_sections(tmp_path):
    r = subprocess.run([sys.executable, str(SUITE), "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: no CUDA GPU here; run with --dry-run")
    r = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--only", "bench,nope", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "error: --only nope" in r.stderr


def test_the_memory_matrix_covers_what_issue_12_asks_for():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import parse_case
    from gpu_suite import CONFIG_FOLDERS, MEMORY_MATRIX

    cases = [parse_case(c) for c in MEMORY_MATRIX]
    assert len(cases) >= 10
    families = {c["name"].split("-")[0].lower().rstrip("0123456789.") for c in cases}
    assert {"llama", "qwen", "mistral", "gemma", "phi"} <= families
    assert all((ROOT / "tests" / "fixtures" / "hf-configs" / CONFIG_FOLDERS[c["name"]] / "config.json").exists()
               for c in cases)
    assert min(c["seq"] for c in cases) <= 512 and max(c["seq"] for c in cases) >= 8192
    assert min(c["mb"] for c in cases) == 1 and max(c["mb"] for c in cases) >= 8
    assert {True, False} == {c["ckpt"] for c in cases} and {"all", "qv"} == {c["targets"] for c in cases}
    assert min(c["rank"] for c in cases) <= 8 and max(c["rank"] for c in cases) >= 64
    assert {"nf4", "none"} <= {c["quant"] for c in cases} and "adamw_8bit" in {c["opt"] for c in cases}
    assert {"auto", "sdpa_packed", "eager"} <= {c["attn"] for c in cases}
    assert {"on", "off"} <= {c["liger"] for c in cases}


def test_the_preference_matrix_covers_dpo_both_references_orpo_and_the_8b_preset():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import parse_case
    from gpu_suite import CONFIG_FOLDERS, PREFERENCE_MATRIX, SECTIONS

    assert "preference" in SECTIONS
    cases = [parse_case(c) for c in PREFERENCE_MATRIX]
    assert all((ROOT / "tests" / "fixtures" / "hf-configs" / CONFIG_FOLDERS[c["name"]] / "config.json").exists()
               for c in cases)
    kinds = {(c["name"], c["method"], c["reference"]) for c in cases}
    assert {("Llama-3.2-1B", "dpo", "each_step"), ("Llama-3.2-1B", "dpo", "precomputed"),
            ("Llama-3.2-1B", "orpo", "auto")} <= kinds
    [big] = [c for c in cases if c["name"] == "Llama-3.1-8B"]
    assert big["method"] == "dpo" and big["opt"] == "adamw_8bit" and (big["seq"], big["mb"]) == (2048, 1)
    assert all(c["seq"] >= 2048 and c["ckpt"] for c in cases)


def test_a_preference_case_trains_on_pairs_that_fill_its_sequence(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import case_preset, parse_case, write_long_pair_data

    from engine.preset import preset_from_dict

    assert parse_case("demo:128:4:nockpt:qv:8")["method"] == "sft"
    for bad in ("demo:128:4:nockpt:qv:8:method=kto", "demo:128:4:nockpt:qv:8:method=orpo:reference=precomputed",
                "demo:128:4:nockpt:qv:8:reference=each_step", "demo:128:4:nockpt:qv:8:method=dpo:reference=off"):
        with pytest.raises(ValueError):
            parse_case(bad)

    data = write_long_pair_data(tmp_path / "pairs.jsonl", 128, records=5)
    assert data.read_text() == write_long_pair_data(tmp_path / "again.jsonl", 128, records=5).read_text()
    pairs = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(pairs) == 5
    for p in pairs:  # BOS + prompt + answer + EOS, one token a character with the demo tokenizer
        assert 1 + len(p["prompt"]) + len(p["chosen"]) + 1 == 128 == 1 + len(p["prompt"]) + len(p["rejected"]) + 1
        assert p["chosen"] != p["rejected"] and p["prompt"].endswith("\n")

    for case, reference in (("demo:128:4:nockpt:qv:8:method=dpo:reference=precomputed", "precomputed"),
                            ("demo:128:4:nockpt:qv:8:method=dpo:reference=each_step", None),
                            ("demo:128:4:nockpt:qv:8:method=orpo", "auto")):
        raw = case_preset(tmp_path / "model", data, case, steps=3)
        assert raw["data"]["format"] == "preference"
        preset = preset_from_dict(raw)  # the engine takes it as it is
        assert preset.training.method == parse_case(case)["method"]
        assert preset.training.reference not in ("auto", "precomputed") if reference is None \
            else preset.training.reference == reference
    raw = case_preset(tmp_path / "model", data, "demo:128:4:nockpt:qv:8", steps=3)
    assert raw["data"]["format"] == "text" and "method" not in raw["training"]
