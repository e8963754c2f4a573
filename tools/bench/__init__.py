"""Parts of tools/benchmark.py: the training step, inference, dense energy, the report."""
