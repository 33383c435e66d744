"""GPU benchmarks that write JSON (and plots) under docs/benchmarks/."""
