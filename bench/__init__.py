"""Benchmarks (not tests). `python -m bench` runs the side-by-side comparison."""
