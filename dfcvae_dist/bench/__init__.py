"""Benchmark of training, data loading and evaluation (`dfcvae-bench`); results in benchmarks/."""
