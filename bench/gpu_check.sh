#!/usr/bin/env bash
# The project's GPU check: everything a CPU-only CI cannot run, on one CUDA machine, in under 8 minutes
# (H100/H200), with nothing to install and nothing downloaded. Run from anywhere:
#
#     OUT=/tmp/gpu_check bash bench/gpu_check.sh      # logs: $OUT/<step>.log (default /tmp/gpu_check), $OUT/SUMMARY.txt
#
# Prints PASS / FAIL / SKIP lines (and GOAL / INFO lines for the benchmarks) and a closing count; exits 1
# if anything failed. The whole run stays inside GPU_CHECK_BUDGET seconds (default 450): a step that
# would start with less than 20 s left is a SKIP. Steps:
#   env            versions and the GPU; stops here without CUDA
#   pytest         the whole test suite with the GPU visible (kernel tests compiled on CUDA, CUDA-graph
#                  decode tests), started in the background while the correctness checks run
#   kernels        bench/gpu_checks.py kernels: compiled Triton kernels vs float64 (logp, entropy, dh, dW;
#                  fp32/bf16/fp16; V = 151,936; a chunk of more than 2^31 logits), advantages, spills
#   sampler        bench/gpu_checks.py sampler: CUDA-graph and compiled decode vs eager, no math SDPA,
#                  host syncs per step, decode speed
#   train          a few GRPO steps of train.py's demo on CUDA (bf16 autocast, Triton log-probs)
#   bench_kernels  bench/kernels.py at H 896/2048 x N 4096/16384, V = 151,936, bf16 (GOAL: <= 25% of
#                  naive's peak memory and <= 1.0x its time at H 2048, N 16384)
#   bench_sample_speed  bench/sample_speed.py --gpu-preset (GOAL: >= 3x transformers' generate, ragged too)
#   bench_train_step    bench/train_step.py --gpu (0.5B and 1.5B shapes; 16 prompts x 8 here, for time)
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_check}  # outside the checkout: nothing to ignore or commit
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET:-450}
START=$(date +%s)
PY=${PYTHON:-$(command -v python3 || command -v python)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$WORK/triton_cache" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor_cache"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET NANO_GTALIGN_LOGPROB_BACKEND NANO_GTALIGN_DECODE
SUMMARY="$OUT/SUMMARY.txt"
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# verdict NAME RC SECONDS CUT: the step's own PASS/FAIL/INFO/GOAL lines, then one line for the step
verdict() {
  local name=$1 rc=$2 dt=$3 cut=$4
  grep -E '^(PASS|FAIL|INFO|GOAL|SKIP) ' "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
  if (( rc == 124 || rc == 137 )); then
    if (( cut )); then say "SKIP $name: cut short by the time budget after ${dt}s (log: $OUT/$name.log)"
    else say "FAIL $name: timed out after ${dt}s (log: $OUT/$name.log)"; fi
  elif (( rc == 0 )); then
    say "PASS $name (${dt}s)"
  else
    say "FAIL $name: exit $rc after ${dt}s; last lines of $OUT/$name.log:"
    tail -n 8 "$OUT/$name.log" | sed 's/^/    | /' | tee -a "$SUMMARY"
  fi
}

# step NAME TIMEOUT_S CMD...: run CMD under a timeout that fits the budget, log to $OUT/NAME.log
step() {
  local name=$1 tmo=$2 cut=0 t0 rc; shift 2
  if (( $(left) < 20 )); then say "SKIP $name: time budget (${BUDGET}s) spent"; return 0; fi
  if (( tmo > $(left) - 5 )); then tmo=$(( $(left) - 5 )); cut=1; fi
  echo "=== $name (timeout ${tmo}s, $(( $(date +%s) - START ))s elapsed)"
  t0=$(date +%s)
  timeout -k 10 "$tmo" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  verdict "$name" "$rc" "$(( $(date +%s) - t0 ))" "$cut"
}

# ----------------------------------------------------------------------------- env
step env 60 "$PY" -c "
import importlib, sys, torch
mods = {m: getattr(importlib.import_module(m), '__version__', '?') for m in ('triton', 'numpy', 'transformers')}
print('INFO env: python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      ' '.join(f'{k} {v}' for k, v in mods.items()))
if not torch.cuda.is_available():
    print('FAIL env: torch.cuda.is_available() is False'); sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f'INFO env: {torch.cuda.device_count()} GPU(s); #0 {p.name} sm_{p.major}{p.minor} {p.total_memory / 2**30:.0f} GiB')
"
if ! grep -q '^PASS env' "$SUMMARY"; then
  say "FAIL gpu_check: no usable CUDA device or a missing package: stopping (see $OUT/env.log)"
  echo "0 passed, 1 failed, 0 skipped"; exit 1
fi

# ----------------------------------------------------------------------------- the test suite, in the background
# Mostly CPU work with small GPU use: it runs beside the correctness checks and is awaited before the
# benchmarks, which need the GPU to themselves.
PYTEST_TMO=$(( $(left) - 150 < 300 ? $(left) - 150 : 300 ))
PYTEST_TMO=$(( PYTEST_TMO < 60 ? 60 : PYTEST_TMO ))
echo "=== pytest (background, timeout ${PYTEST_TMO}s)"
PYTEST_T0=$(date +%s)
timeout -k 10 "$PYTEST_TMO" "$PY" -m pytest -q -p no:cacheprovider -rfEs tests > "$OUT/pytest.log" 2>&1 &
PYTEST_PID=$!

# ----------------------------------------------------------------------------- correctness on the GPU
step kernels 150 "$PY" bench/gpu_checks.py kernels
step sampler 180 "$PY" bench/gpu_checks.py sampler
step train 150 "$PY" train.py --device cuda --steps 3 --sft-steps 20 --demo-train-size 64 --eval-size 8 \
  --eval-every -1 --save-every 0 --prompts-per-step 8 --group-size 4 --max-new-tokens 64 --out-dir "$OUT/train_run"
if [ -f "$OUT/train_run/metrics.jsonl" ]; then
  "$PY" - "$OUT/train_run/metrics.jsonl" <<'PYEOF' | tee -a "$SUMMARY"
import json, math, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
steps = [r for r in rows if r.get("kind") == "train"]
keys = ("loss", "grad_norm", "entropy", "logp_mismatch")
finite = all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for r in steps for k in keys if k in r)
print(f"{'PASS' if len(steps) == 3 and finite else 'FAIL'} train/metrics: {len(steps)} GRPO steps logged, finite {finite}; "
      + " | ".join(f"step {r['step']}: W {r.get('W')} loss {r.get('loss', float('nan')):.4g} logp_mismatch "
                   f"{r.get('logp_mismatch', float('nan')):.2e} gen {r.get('gen_tokens_per_s', 0):.0f} tok/s" for r in steps))
PYEOF
fi

wait "$PYTEST_PID"
rc=$?
verdict pytest "$rc" "$(( $(date +%s) - PYTEST_T0 ))" 0
tail -n 1 "$OUT/pytest.log" | sed 's/^/INFO pytest: /' | tee -a "$SUMMARY"
grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | sed 's/^/INFO pytest: /' | tee -a "$SUMMARY"

# ----------------------------------------------------------------------------- benchmarks (the GPU to themselves)
step bench_kernels 120 "$PY" bench/kernels.py --hidden 896 2048 --rows 4096 16384 --rep-ms 200 --no-liger
if [ -f "$OUT/bench_kernels.log" ]; then
  line=$(grep -E '^H=2048 N=16384' "$OUT/bench_kernels.log" | head -1)
  t=$(echo "$line" | sed -n 's/.*time \([0-9.]*\)x naive.*/\1/p'); m=$(echo "$line" | sed -n 's/.*memory \([0-9.]*\)x naive.*/\1/p')
  if [ -n "$t" ] && [ -n "$m" ]; then
    ok=$(awk "BEGIN{print ($m <= 0.25 && $t <= 1.0) ? \"met\" : \"NOT met\"}")
    say "GOAL kernels at H=2048 N=16384 bf16: memory ${m}x naive (<= 0.25), time ${t}x naive (<= 1.0): $ok"
  fi
fi

step bench_sample_speed 150 "$PY" bench/sample_speed.py --gpu-preset --repeats 1
if [ -f "$OUT/bench_sample_speed.log" ]; then
  grep -E '^\| (greedy|sampling)' "$OUT/bench_sample_speed.log" | awk -F'|' '{r = $2; gsub(/^ +| +$/, "", r); x = $5 + 0;
    printf "GOAL sampler %s: %.2fx transformers generate (>= 3x): %s\n", r, x, (x >= 3 ? "met" : "NOT met")}' \
    | tee -a "$SUMMARY"
fi

step bench_train_step 170 "$PY" bench/train_step.py --gpu --prompts 16 --threads 0
if [ -f "$OUT/bench_train_step.log" ]; then
  awk '/^model /{p=1} p' "$OUT/bench_train_step.log" | sed 's/^/INFO bench_train_step: /' | tee -a "$SUMMARY"
  grep -E ': failed' "$OUT/bench_train_step.log" | sed 's/^/INFO bench_train_step: /' | tee -a "$SUMMARY"
fi

# ----------------------------------------------------------------------------- the count
echo
echo "================ SUMMARY ($(( $(date +%s) - START ))s) ================"
grep -E '^(PASS|FAIL|SKIP|GOAL) ' "$SUMMARY"
n_pass=$(grep -cE '^PASS ' "$SUMMARY"); n_fail=$(grep -cE '^FAIL ' "$SUMMARY"); n_skip=$(grep -cE '^SKIP ' "$SUMMARY")
echo "$n_pass passed, $n_fail failed, $n_skip skipped (the checks inside each step are indented above it)"
echo "logs: $OUT"
exit $(( n_fail > 0 ))
