"""Every metric name the framework logs, declared once with what it measures and its unit: the trainer, the
families, the evaluations and the report log these names, and docs/metrics.md is generated from them
(`python tools/generate_docs.py`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    unit: str


def by_name(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


# Logged by the trainer for every family; a family adds its own (`ModelFamily.metrics`).
TRAINING = [
    Metric("train/total", "the optimised objective (each family's, below); the progress metric", "that of its terms"),
    Metric("train/grad_norm", "global L2 norm of the gradients before clipping (two-network families: the "
           "generator's or VAE's)", "gradient units"),
    Metric("train/lr", "the learning rate of the step", "—"),
    Metric("train/epoch", "whole epochs over the training split completed after the step", "epochs"),
    Metric("train/img_per_s", "training throughput since the previous log step, all ranks together", "images / s"),
    Metric("train/skipped_steps", "optimizer steps skipped so far for a non-finite loss (`train.on_nonfinite=skip`) "
           "or an fp16 overflow", "steps"),
    Metric("train/skipped_samples", "damaged samples passed over so far, summed over ranks (with "
           "`data.skip_corrupt`)", "samples"),
]
