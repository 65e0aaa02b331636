"""Benchmark of training, data loading and evaluation (`dfcvae-bench`); results in benchmarks/."""

# The benchmark's sections, in the order a run measures them (here, so the CLI checks --sections before importing
# torch.utils.benchmark, which warns on import on a CUDA build without a GPU).
SECTIONS = ["train_step", "loader", "extract", "svm", "scaling", "step_overhead", "end_to_end"]
