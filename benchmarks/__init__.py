"""Benchmarks and the emulated multi-node cluster (see ``benchmarks/README.md``)."""
