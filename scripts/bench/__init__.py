"""``make bench``: side-by-side training-loop throughput and memory measurements (scripts/benchmark.py)."""
