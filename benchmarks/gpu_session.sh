#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, phase by phase, on a machine with CUDA and PyTorch.
#
# The GPU machine used here has PyTorch, NumPy, SciPy and threadpoolctl but no polars, so the
# splits are prepared beforehand on a machine that has it (same code path as `recvae train`):
#
#   PY=.venv/bin/python bash benchmarks/gpu_session.sh prepare  # writes .gpudata/splits/*.pkl
#
# then, where the GPU is (OUT: a folder for logs and results):
#
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh tests          # pytest -m gpu
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh speed          # benchmarks/train_speed.py
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh quick          # tests, profiles, speed rows, ~8 min
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh quality ml-1m  # quality table rows (issue 7)
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh pack           # $OUT/quality.tgz of the results
#
# DEADLINE (a time in seconds since the epoch) cuts the quality steps short in time to pack.
# A rerun with the same QOUT skips the results already there (the searches skip finished
# combinations too), so unpacking an earlier quality.tgz into QOUT resumes where it stopped.
# SMOKE=1 shrinks every run to an epoch or two, to check the script itself on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MLFLOW_DISABLE_TELEMETRY=true
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu}
CACHE=${CACHE:-.gpudata/splits}
DEVICE=${DEVICE:-cuda}
THREADS=${THREADS:-8}
QOUT=${QOUT:-$OUT/quality}
mkdir -p "$OUT" "$QOUT"

smoke() { [[ "${SMOKE:-0}" == 1 ]]; }
epochs() { if smoke; then echo 1; else echo "$1"; fi; }

q() {  # one quality_*.py call with the common options
    local script=$1
    shift
    $PY "benchmarks/$script" "$@" --device "$DEVICE" --threads "$THREADS" \
        --split-cache "$CACHE" --out "$QOUT"
}

phase_prepare() {
    for d in ml-1m lastfm gowalla; do
        $PY -c "import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from quality_common import load_split
print('$d', load_split('$d', '../shared/data', Path('$CACHE')).summary())"
    done
}

phase_tests() {
    $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_training.py \
        tests/test_speed_paths.py tests/test_evaluation.py 2>&1 | tee "$OUT/pytest_gpu.log"
}

phase_speed() {
    local quality=200 repeats=5 datasets=(ml-20m-like ml-1m gowalla)
    if smoke; then quality=2 repeats=1 datasets=(ml-1m); fi
    $PY benchmarks/train_speed.py --devices "$DEVICE" --datasets "${datasets[@]}" \
        --repeats "$repeats" --quality-epochs "$quality" --quality-device "$DEVICE" \
        --quality-precisions fp32 bf16 --split-cache "$CACHE" --json "$OUT/train_speed.json" \
        2>&1 | tee "$OUT/train_speed.log"
}

# About 8 minutes on an H100/H200: the GPU tests, then where the time of a large-batch bf16
# step on ml-20m-like goes (train_profile.py, compiled then eager), then those two rows and the
# compiled one without the logits padded to 64 items (RunOptions.item_multiple = 1) against
# the reference per epoch.
# A failed step does not stop the next ones; the phase then returns non-zero.
phase_quick() {
    local dataset=ml-20m-like steps=10 warmup=5 repeats=3 rc=0 batch=()
    # First the GPU tests (at most 4 minutes): the padded logits are the CUDA default.
    if ! smoke; then
        export -f phase_tests
        export PY OUT
        timeout 240 bash -c phase_tests || rc=$?
    fi
    # bf16 at batch 24,576 takes ~15 s a step on a CPU: the smoke run uses batch 500.
    if smoke; then dataset=ml-1m steps=2 warmup=1 repeats=1 batch=(--batch-size 500); fi
    local profile=(benchmarks/train_profile.py --dataset "$dataset" --device "$DEVICE" --large
        --precision bf16 --steps "$steps" --warmup "$warmup" --split-cache "$CACHE" "${batch[@]}")
    $PY "${profile[@]}" --compile --out "$OUT/profile-large-compile" 2>&1 |
        tee "$OUT/profile-large-compile.log" || rc=$?
    $PY "${profile[@]}" --out "$OUT/profile-large" 2>&1 | tee "$OUT/profile-large.log" || rc=$?
    $PY benchmarks/train_speed.py --devices "$DEVICE" --datasets "$dataset" \
        --rows reference project-large project-large-compile project-large-compile-unpadded \
        --repeats "$repeats" \
        --quality-epochs 0 --split-cache "$CACHE" --json "$OUT/train_speed_quick.json" \
        2>&1 | tee "$OUT/train_speed_quick.log" || rc=$?
    return "$rc"
}

# Quality rows of one dataset, most needed first, so that a run cut short by DEADLINE (seconds
# since the epoch; each step gets the time left) still leaves whole results. Everything is
# chosen on validation users; test users are scored once per final configuration.
phase_quality() {
    local d=$1 lambdas vae_grid rec_grid
    case $d in
        ml-1m) lambdas=100,200,300,500,700,1000,2000 ;;
        lastfm) lambdas=20,50,100,200,500,1000 ;;
        gowalla) lambdas=50,100,200,500,1000 ;;
        *) echo "unknown dataset $d" >&2; return 2 ;;
    esac
    vae_grid='{"beta_max": [0.2, 0.4], "dropout": [0.5, 0.7]}'
    rec_grid='{"gamma": [0.0025, 0.01]}'
    if smoke; then lambdas=500 vae_grid='{"beta_max": [0.2]}' rec_grid='{"gamma": [0.01]}'; fi
    # EASE (lambda on validation); Mult-VAE, RecVAE and Mult-DAE with their papers' settings.
    step once "$d" ease q quality_run.py --dataset "$d" --model ease --name ease \
        --lambdas "$lambdas" --test
    step once "$d" multvae-paper q quality_run.py --dataset "$d" --model multvae \
        --name multvae-paper --test --save-bundle --set "epochs=$(epochs 200)"
    step once "$d" recvae-paper q quality_run.py --dataset "$d" --model recvae \
        --name recvae-paper --test --save-bundle --set "epochs=$(epochs 50)"
    step once "$d" blend-paper blend "$d" blend-paper
    step once "$d" multdae-paper q quality_run.py --dataset "$d" --model multdae \
        --name multdae-paper --test --set "epochs=$(epochs 200)"
    # Tuned: validation grids (longer training with early stopping for Mult-VAE).
    step q quality_search.py --dataset "$d" --model multvae --prefix multvae-s1 \
        --set "epochs=$(epochs 400)" --set patience=50 --grid "$vae_grid"
    step q quality_search.py --dataset "$d" --model recvae --prefix recvae-s1 \
        --set "epochs=$(epochs 150)" --set patience=20 --grid "$rec_grid"
    step test_best "$d" multvae
    step test_best "$d" recvae
    step blend "$d" blend-best
}

step() {  # run a step with the time left before DEADLINE (if set); skip it when none is left
    if [[ -n "${DEADLINE:-}" ]]; then
        local left=$((DEADLINE - $(date +%s)))
        if ((left < 20)); then
            echo "SKIPPED (deadline): $*" >&2
            return 0
        fi
        # timeout runs programs, not functions: the functions and settings go to a child bash.
        export -f q blend test_best best_of smoke epochs once
        export PY OUT CACHE DEVICE THREADS QOUT
        timeout "$left" bash -c '"$@"' bash "$@" || echo "FAILED or cut ($?): $*" >&2
    else
        "$@" || echo "FAILED ($?): $*" >&2
    fi
}

once() {  # once DATASET NAME CMD...: run CMD unless the result NAME exists (a rerun resumes)
    if [[ -f "$QOUT/$1/$2.json" ]]; then
        echo "done already: $1/$2" >&2
        return 0
    fi
    shift 2
    "$@"
}

test_best() {  # score the test users of the best VAE of a model, unless already scored
    local name
    name=$(best_of "$1" "$2") || return 1
    if [[ -z "$name" ]] || grep -q '"test"' "$QOUT/$1/$name.json"; then
        return 0
    fi
    q quality_test.py --dataset "$1" --name "$name"
}

blend() {  # EASE + the best VAE so far (validation), scored once
    local name model
    name=$(best_of "$1" "") || return 1
    [[ -n "$name" ]] || return 1
    model=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['model'])" \
        "$QOUT/$1/$name.json")
    test_best "$1" "$model"
    q quality_blend.py --dataset "$1" --vae "$name" --ease ease --name "$2"
}

best_of() {  # the result with the best validation NDCG@100 among saved VAEs of a model
    $PY - "$QOUT/$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
folder, model = Path(sys.argv[1]), sys.argv[2]
best = None
for path in folder.glob("*.json"):
    record = json.loads(path.read_text())
    if record.get("model") not in ("multvae", "recvae") or "bundle" not in record:
        continue
    if model and record["model"] != model:
        continue
    value = record["validation"]["ndcg@100"]["mean"]
    if best is None or value > best[0]:
        best = (value, path.stem)
print("" if best is None else best[1])
EOF
}

pack() {  # the results (no bundles or checkpoints) as one archive under OUT
    tar czf "$OUT/quality.tgz" -C "$QOUT" --exclude=bundles --exclude=checkpoints .
}

phase=${1:?usage: gpu_session.sh prepare|tests|speed|quick|quality DATASET|pack}
shift
if [[ $phase == pack ]]; then pack; else "phase_$phase" "$@"; fi
