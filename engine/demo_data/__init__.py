"""The bundled demo data sets and the scripts that generate them."""

from pathlib import Path

DEMO_PAIRS = "builtin:demo-pairs"
"""The bundled preference pairs (dpo, orpo) on the demo's word tasks."""
DEMO_PAIRS_FILE = Path(__file__).resolve().parent / "tiny-demo-pairs.jsonl"
"""Its file (``make_demo_pairs.py`` writes it)."""
