# Shared by train.sbatch and extract.sbatch: site settings, environment, and the multi-node launch line.
# Every setting is an environment variable with a default; see slurm/README.md.
: "${GPUS_PER_NODE:=8}"          # processes per node = GPUs per node; 0 = CPU mode
: "${CPU_PROCS_PER_NODE:=1}"     # processes per node in CPU mode
: "${PROJECT_DIR:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${VENV:=$PROJECT_DIR/.venv}"
: "${SITE_SETUP:=}"              # e.g. "module load cuda/12.4" (eval'ed before the venv is activated)
: "${MASTER_PORT:=$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

cd "$PROJECT_DIR"
eval "$SITE_SETUP"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true

if [ "$GPUS_PER_NODE" -gt 0 ]; then PROCS_PER_NODE=$GPUS_PER_NODE; else PROCS_PER_NODE=$CPU_PROCS_PER_NODE; fi
# The head node's address through Slurm (its NodeAddr), not by trusting its host name to resolve.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
# --machine_rank is escaped: each srun task reads its own SLURM_NODEID on its node.
LAUNCH="accelerate launch --multi_gpu --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * PROCS_PER_NODE)) \
--machine_rank \$SLURM_NODEID --main_process_ip $HEAD_ADDR --main_process_port $MASTER_PORT \
--rdzv_backend static --same_network --mixed_precision no"
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) x $PROCS_PER_NODE process(es), head $HEAD_NODE ($HEAD_ADDR:$MASTER_PORT)"
