"""Benchmarks: workloads, the load generator, peers side by side, the vision stage (see README)."""
