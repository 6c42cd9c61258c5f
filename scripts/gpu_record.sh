#!/usr/bin/env bash
# A GPU machine's record, run from the repository root: kernel check, kernel / model / method benchmarks and
# quality sweeps, inside a total time budget. Installs nothing: torch, Triton and diffusers must be importable.
#
#   OUT=bench_out BUDGET=500 bash scripts/gpu_record.sh
#
# Writes to $OUT (default ./bench_out), 7 files: log.txt (every step's output, in order), attention.json,
# model.json, methods.json, quality.json, model_compiled.json, summary.txt. Each step runs under `timeout`
# within what is left of $BUDGET seconds; the JSON files are rewritten after every row, so a step stopped by its
# limit keeps what it measured. Regional compilation goes last: it runs only in the time left.
# SMOKE=1 runs the same steps at toy sizes (model and methods on the CPU) to check the plumbing.
set -u
OUT=${OUT:-./bench_out}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-500}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1  # whole lines in the log, no progress bars
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
STATUS=()

if [ "${SMOKE:-0}" = 1 ]; then
    TINY=(--tiny --runs 2 --warmup 1)
    SWEEP=(--prompts 2 --seeds 1 --steps 2 --frames 4 --batch-size 2)
else
    TINY=()
    # 100 clips per setting in one batch; the same seeds for dense and every setting.
    SWEEP=(--split heldout --prompts 50 --seeds 2 --steps 20 --batch-size 100)
fi

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with its output appended to the log, under the smaller of
# LIMIT_SECONDS and the budget left (skipped when under 20 s are left).
step() {
    local name=$1 limit=$2 left t0 rc
    shift 2
    left=$((BUDGET - SECONDS - 5))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        STATUS+=("$(printf '%-16s skipped (budget)' "$name")")
        echo "== $name: skipped, budget spent" | tee -a "$LOG"
        return
    fi
    echo "== $name (limit ${limit} s, at ${SECONDS} s): $*" | tee -a "$LOG"
    t0=$SECONDS
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local why=""
    ((rc == 124 || rc == 137)) && why=" (time limit)"
    STATUS+=("$(printf '%-16s rc=%-3s %4s s%s' "$name" "$rc" $((SECONDS - t0)) "$why")")
    echo "   rc=$rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

# Random weights give near-flat attention, so threshold settings say little about speed there: the model steps
# also run each method at a fixed 85% sparsity (about the 15% of blocks the kernel targets are set at).
FIXED=(rectified:sparsity=0.85 vmoba:sparsity=0.85 xattention:sparsity=0.85)

step kernels 120 "$PY" scripts/check_kernels.py
step attention 120 "$PY" scripts/benchmark.py attention --quick --json "$OUT/attention.json"
step model 90 "$PY" scripts/benchmark.py model --methods all "${FIXED[@]}" "${TINY[@]}" --json "$OUT/model.json"
step methods 90 "$PY" scripts/benchmark.py methods --methods all "${FIXED[@]}" "${TINY[@]}" \
    --json "$OUT/methods.json"
step quality 120 "$PY" scripts/sweep_quality.py --method all "${SWEEP[@]}" --json "$OUT/quality.json"
step model-compiled 600 "$PY" scripts/benchmark.py model --compile --methods dense "${FIXED[@]}" "${TINY[@]}" \
    --json "$OUT/model_compiled.json"

{
    echo
    echo "== steps (total ${SECONDS} s of a ${BUDGET} s budget)"
    printf '%s\n' "${STATUS[@]}"
    echo "kernel checks: $(grep -c '^ok  ' "$LOG") ok, $(grep -c '^FAIL' "$LOG") failed"
    "$PY" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]


def load(name):
    try:
        with open(os.path.join(out, name)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


d = load("attention.json")
if d:
    print(f"\nattention (ms, {d['device']}): density, cuDNN, Flex, ours, ours/Flex, cuDNN/ours")
    for r in d["rows"]:
        print(f"  {r['density_pct']:5.1f}% {r['cudnn_ms']:8.3f} {r['flex_ms']:8.3f} {r['ours_ms']:8.3f} "
              f"{r['ours_over_flex']:6.2f} {r['cudnn_over_ours']:6.2f}")
for name in ("model.json", "model_compiled.json"):
    d = load(name)
    if d:
        print(f"\n{name[:-5]} (one forward, {d['tokens']} tokens, {d['device']}): ms, speedup, density, compile s")
        for r in d["rows"]:
            print(f"  {r['name'][:40]:40s} {f(r['ms'], '.1f'):>8s} {f(r['speedup']):>6s} {f(r['density'], '.3f'):>6s} "
                  f"{f(r.get('compile_s'), '.1f'):>6s} {r['note'][:60]}")
d = load("methods.json")
if d:
    print(f"\nmethods (ms, {d['tokens']} tokens, dense cuDNN {d['dense_ms']:.2f}): density, select, kernel, total, "
          "Flex, select % of total")
    for r in d["rows"]:
        spec = r["method"] + "".join(f",{k}={v}" for k, v in r["options"].items())
        print(f"  {spec[:30]:30s} L{f(r['layer'], 'd')} {f(r.get('density'), '.3f'):>6s} "
              + "".join(f"{f(r.get(key), '.3f'):>8s}" for key in ("select_ms", "kernel_ms", "total_ms", "flex_ms"))
              + f" {f(r.get('select_pct'), '.1f'):>5s} {r['note'][:50]}")
d = load("quality.json")
if d:
    print(f"\nquality ({d['split']}, {d['prompts']} x {d['seeds']}, {d['steps']} steps): sparsity, all %, points vs "
          "dense, PSNR mean / min dB")
    for r in d["rows"]:
        spec = (r["method"] + " " + ",".join(f"{k}={v}" for k, v in r["options"].items())).strip()
        if "all" not in r:
            print(f"  {spec[:40]:40s} ({r['note'][:60]})")
            continue
        print(f"  {spec[:40]:40s} {f(r['sparsity'], '.3f'):>6s} {f(100 * r['all'], '.1f'):>6s} "
              f"{f(r['delta_all'], '+.1f'):>6s} {f(r['psnr_mean'], '.1f'):>6s} {f(r['psnr_min'], '.1f'):>6s}")
EOF
} 2>&1 | tee "$OUT/summary.txt"
