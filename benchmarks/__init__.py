"""Benchmarks (source checkout only; run with ``sciddiff bench ...``)."""
