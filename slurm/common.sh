# Shared by train.sbatch, extract.sbatch and sweep.sbatch: site settings, environment, and the multi-node launch.
# Every setting is an environment variable with a default; see slurm/README.md.
# GPUs per node: what Slurm allocated (--gpus-per-node, or --gres), else 8; 0 = CPU mode.
ALLOCATED_GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
: "${GPUS_PER_NODE:=${ALLOCATED_GPUS##*:}}"  # SLURM_GPUS_PER_NODE may read "a100:4"
: "${CPU_PROCS_PER_NODE:=1}"     # processes per node in CPU mode
: "${ACCELERATE_CONFIG:=}"       # e.g. configs/accelerate/deepspeed-zero2.yaml; empty = DDP
: "${MIXED_PRECISION:=}"         # no, fp16 or bf16 for `accelerate launch`; empty = the config file's
: "${PROJECT_DIR:=${SLURM_SUBMIT_DIR:-$PWD}}"
: "${VENV:=$PROJECT_DIR/.venv}"
: "${SITE_SETUP:=}"              # e.g. "module load cuda/12.4" (eval'ed before the venv is activated)
: "${MASTER_PORT:=$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

cd "$PROJECT_DIR" || exit 2
eval "$SITE_SETUP"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true

if [ "$GPUS_PER_NODE" -gt 0 ]; then PROCS_PER_NODE=$GPUS_PER_NODE; else PROCS_PER_NODE=$CPU_PROCS_PER_NODE; fi
NUM_PROCESSES=$((SLURM_NNODES * PROCS_PER_NODE))
# The head node's address through Slurm (its NodeAddr), not by trusting its host name to resolve.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')

# What every node's `accelerate launch` shares: Slurm's values on the command line win over a config file's.
LAUNCH_OPTS=(--num_machines "$SLURM_NNODES" --num_processes "$NUM_PROCESSES" --main_process_ip "$HEAD_ADDR"
             --main_process_port "$MASTER_PORT" --rdzv_backend static --same_network)
if [ -n "$ACCELERATE_CONFIG" ]; then
  [ -f "$ACCELERATE_CONFIG" ] || { echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file (relative to $PROJECT_DIR)" >&2; exit 2; }
  LAUNCH_OPTS+=(--config_file "$ACCELERATE_CONFIG")  # its distributed_type (e.g. DEEPSPEED) decides the launcher
elif [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH_OPTS+=(--multi_gpu)  # DDP; accelerate refuses --multi_gpu for one process
fi
if [ -n "$MIXED_PRECISION" ]; then LAUNCH_OPTS+=(--mixed_precision "$MIXED_PRECISION"); fi

# One srun task per node runs `accelerate launch ... "$@"` there, with that node's SLURM_NODEID as its machine
# rank. The arguments travel as arguments, never through a command string: `loss.layers=[relu1_2, relu2_1]`
# stays one argument.
launch_on_every_node() {
  srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' launch \
    "${LAUNCH_OPTS[@]}" "$@"
}
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NNODES node(s) x $PROCS_PER_NODE process(es), head $HEAD_NODE ($HEAD_ADDR:$MASTER_PORT)${ACCELERATE_CONFIG:+, accelerate config $ACCELERATE_CONFIG}"

# Preemption (train.sbatch, sweep.sbatch). SIGUSR1 ahead of the time limit (or `scancel --batch --signal=USR1`)
# reaches the batch shell; the trainer wants SIGTERM: every rank then checkpoints at one agreed step and leaves
# RESUME_ME.json. `run_preemptible CMD...` runs CMD (which starts job steps) with that translation in place.
preempt() {
  PREEMPTED=1
  echo "preemption signal: asking the trainer to checkpoint and stop"
  scancel --signal=TERM "$SLURM_JOB_ID"
}
run_preemptible() {
  trap preempt USR1 TERM
  "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done  # a trapped signal interrupts wait: wait again
  wait "$pid"
}
# After an early stop: requeue this job (an array job's own task only) while restarts are left, else fail.
# $1: the run directory a resubmission continues from; $2: what stopped.
requeue_or_fail() {
  : "${MAX_REQUEUES:=10}"
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "$2: requeueing (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 )) of at most $MAX_REQUEUES)"
    # The requeue SIGTERMs this shell: left to the trap, its scancel retried "Job can not be altered now" until
    # KillWait's SIGKILL, and the requeued job waited that long for its node.
    trap '' USR1 TERM
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "stopped early, but MAX_REQUEUES=$MAX_REQUEUES is reached: resubmit to continue from $1"
  exit 1
}
