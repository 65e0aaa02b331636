"""Console scripts (`dfcvae-*` in pyproject.toml): argument parsing and printing; the work is in the library.

Importing this package is the first thing every entry point does, so a rank started by a launcher is tied
to it before any heavy import."""

from dfcvae_dist.lifeline import arm_if_launched

arm_if_launched()
