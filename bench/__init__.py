"""Benchmarks that reproduce the HeadInfer paper's tables; run `python bench/bench.py` (see NOTES.md)."""
