"""Sweeps: many training runs from one YAML file, each trained, evaluated and tracked as a child of one MLflow
parent run; on a workstation (`dfcvae-sweep run`) or as a Slurm job array (`slurm/sweep.sbatch`)."""
