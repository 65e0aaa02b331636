#!/usr/bin/env bash
# The first thing to run whenever a GPU is at hand (benchmarks/README.md, docs/performance.md "The GPU check").
# Needs the working tree and a Python with torch; packages it lacks (webdataset, braceexpand, ...) are installed
# from $WHEELS (default wheels/ in the working tree) when that folder exists. Tracking is off throughout (no MLflow
# needed; test modules that cannot be imported without it are passed over).
#
#   benchmarks/gpu-check.sh                      # results in $OUT (default ./gpu-check-out)
#   OUT=/tmp/out COMMIT=$(git rev-parse HEAD) benchmarks/gpu-check.sh
#   DEVICE=cpu QUICK=1 benchmarks/gpu-check.sh   # every stage small, on CPU: trying the script itself
#
# Stages, each under its own time limit (6 minutes in all), each writing NAME.log to $OUT:
#   pytest   pytest -m gpu tests (pytest.xml: the results per test)
#   data     2,000 synthetic faces as npy shards, for the profile
#   profile  10 steps of the real trainer (dfcvae-123) under torch.profiler (profile.json: kernels per step, the
#            share of the time the GPU is busy, the kernels that take the most time)
#   bench    dfcvae-bench --device $DEVICE --sections $BENCH_SECTIONS (bench.json: the loader and the end-to-end
#            runs of the real trainer, its levers included)
# and check.json: every stage's exit status and seconds, the GPU, torch, the date and the commit.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
BENCH_SECTIONS=${BENCH_SECTIONS:-loader,end_to_end}
if [ -n "${QUICK:-}" ]; then
    FACES=400 STEPS=2 WARMUP=1 BENCH_ARGS=(--quick) PROFILE_ARGS=(train.batch_size=16)
else
    FACES=2000 STEPS=10 WARMUP=5 BENCH_ARGS=() PROFILE_ARGS=()
fi
export DFCVAE_COMMIT=${COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1

WHEELS=${WHEELS:-$ROOT/wheels}
if [ -d "$WHEELS" ]; then  # after the working tree on the path, before the installed packages
    "$PYTHON" -m pip install -q --no-deps --no-index --no-compile --target "$WORK/site" "$WHEELS"/*.whl &&
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

: > "$WORK/stages"
stage() {  # NAME LIMIT_S COMMAND...: run under a time limit (exit 124 when it ran past it), log to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (at most $limit s)"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
    echo "$name $rc $((SECONDS - start)) $limit" >> "$WORK/stages"
}

cd "$ROOT" || exit 1
stage pytest 150 "$PYTHON" -m pytest -m gpu tests -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest.xml"
stage data 25 bash -c '"$0" tools/make_synthetic_celeba.py --out "$1/celeba" --num "$2" --workers "$3" &&
    "$0" tools/make_shards.py --celeba-root "$1/celeba" --out "$1/shards" --image-size 64 --shard-size 50 \
    --workers "$3"' "$PYTHON" "$WORK" "$FACES" "$(nproc)"
stage profile 35 "$PYTHON" -m dfcvae_dist.bench.profile --out "$OUT/profile.json" --steps "$STEPS" \
    --warmup-steps "$WARMUP" --config dfcvae-123 "data.shards=$WORK/shards" "train.run_dir=$WORK/profile-run" \
    loss.network_weights=random log.enabled=false train.resume=none "${PROFILE_ARGS[@]}"
# last: a bench cut short by its limit keeps the sections it finished in bench.json
stage bench 150 "$PYTHON" tools/bench.py --device "$DEVICE" --sections "$BENCH_SECTIONS" "${BENCH_ARGS[@]}" \
    --json "$OUT/bench.json"

"$PYTHON" - "$WORK/stages" "$OUT/check.json" <<'EOF'
import datetime, json, os, sys
import torch
stages = {}
for line in open(sys.argv[1]):
    name, rc, seconds, limit = line.split()
    stages[name] = {"exit": int(rc), "seconds": int(seconds), "limit_s": int(limit), "timed_out": rc in ("124", "137")}
check = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "commit": os.environ["DFCVAE_COMMIT"], "torch": torch.__version__,
         "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
         "seconds": sum(s["seconds"] for s in stages.values()), "stages": stages}
with open(sys.argv[2], "w") as f:
    json.dump(check, f, indent=1)
print(json.dumps(check))
EOF
