"""Console scripts (`dfcvae-*` in pyproject.toml): argument parsing and printing; the work is in the library."""
