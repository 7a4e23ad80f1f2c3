"""A training run: its schema, runtime, run folder, loop, and inference with its result."""
