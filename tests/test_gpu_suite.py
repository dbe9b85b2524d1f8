"""The one-command GPU suite, on the CPU: ``--dry-run`` runs every section on the demo model.

On a GPU it measures throughput against the baselines, profiles an engine step and runs the memory
matrix (issues 11 and 12); here it proves the same code paths end to end, streaming each result.
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
    assert sections[0] == "env" and {"bench", "profile", "memory"} <= set(sections)

    bench = next(row for row in rows if row["section"] == "bench")
    assert bench["exit"] == 0, bench.get("log_tail")
    assert bench["summary"]

    profile = next(row for row in rows if row["section"] == "profile")
    assert profile["exit"] == 0, profile.get("log_tail")
    assert profile["top_cpu_ops"] and profile["wall_ms_per_step"] > 0 and profile["process_cpu_ms_per_step"] > 0

    memory = [row for row in rows if row["section"] == "memory"]
    assert len(memory) == 2
    for row in memory:
        assert row["status"] == "finished", row.get("log_tail")
        assert row["estimate_total"] > 0 and row["attn"] == "sdpa_packed"
        assert "no mask" in row["kernels"]

    dist = [row for row in rows if row["section"] == "distributed"]
    assert len(dist) == 2
    for row in dist:
        assert row["status"] == "finished", row.get("log_tail")
    assert dist[1]["world"]["world_size"] == 2 and dist[1]["world"]["strategy"] == "ddp"
    assert [r["rank"] for r in dist[1]["ranks"]] == [0, 1] and dist[1]["speedup_vs_one_gpu"] > 0

    table = (out / "suite.md").read_text()
    assert table in r.stdout
    for heading in ("## Machine", "## Throughput", "## Profile of one engine step", "## Memory: estimate",
                    "## Several GPUs: DDP and FSDP"):
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
