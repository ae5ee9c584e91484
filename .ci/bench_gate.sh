#!/usr/bin/env bash
# CI speed gate of the CPU kernels: `python -m benchmarks.bench_kernels --quick` (16M elements)
# twice, on the CPU's native clone and with the AVX2 baseline clone forced
# (MINI_UNLEARN_CPU_ISA=avx2; ATEN_CPU_CAPABILITY=avx2 makes eager PyTorch and torch.compile
# run as on an AVX2-only CPU too). Fails if any op is under MIN_RATIO x copy (default 0.6) or
# not faster than torch.compile, or if the run did not use the clone it asked for.
# A mode that fails is run once more and an op passes if either run met the bar (a loaded
# machine slows single runs; a real regression fails both). About 1-3 minutes on 2 cores.
#
#   bash .ci/bench_gate.sh            # PYTHON (default .venv/bin/python), OUT_DIR (default a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
MIN_RATIO=${MIN_RATIO:-0.6}
OUT=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# torch.compile's kernels are compiled into a cache of the gate's own: a shared
# /tmp/torchinductor_$USER written by concurrent jobs has served a corrupt kernel (a heap
# corruption abort in the compiled baseline) on a shared machine.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$OUT/inductor_cache}

bench() {  # bench MODE TRY: one quick run into $OUT/bench_MODE_TRY.json
  local mode=$1 try=$2 env=()
  [ "$mode" = avx2 ] && env=(MINI_UNLEARN_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2)
  echo "== bench kernels --quick ($mode, try $try)" >&2
  env "${env[@]}" "$PY" -m benchmarks.bench_kernels --quick --json "$OUT/bench_${mode}_${try}.json"
}

check() {  # check MODE JSON...: prints the failing ops (passing if any of the runs passes)
  "$PY" - "$MIN_RATIO" "$@" <<'EOF'
import json, sys
min_ratio, mode, paths = float(sys.argv[1]), sys.argv[2], sys.argv[3:]
runs = [json.load(open(p)) for p in paths]
for r in runs:
    if mode == "avx2" and r.get("cpu_isa") != "avx2":
        print(f"{mode}: the native kernels ran {r.get('cpu_isa')!r}, not the forced avx2 clone")
ok = {}
for r in runs:
    for row in r["results"]:
        c = row["speedup_vs_compile"]
        good = row["ratio_to_copy"] >= min_ratio and c is not None and c > 1.0
        ok[row["op"]] = ok.get(row["op"], False) or good
        print(f"  {mode:6s} {row['op']:28s} x{row['ratio_to_copy']:.2f} copy  "
              f"{'x%.2f' % c if c is not None else 'n/a'} compile  {'ok' if good else 'LOW'}",
              file=sys.stderr)
for op, good in ok.items():
    if not good:
        print(f"{mode}: {op} under {min_ratio}x copy or not faster than torch.compile")
EOF
}

status=0
for mode in native avx2; do
  bench "$mode" 1
  fails=$(check "$mode" "$OUT/bench_${mode}_1.json")
  if [ -n "$fails" ]; then
    echo "$fails" >&2
    echo "-- rerunning $mode once" >&2
    bench "$mode" 2
    fails=$(check "$mode" "$OUT/bench_${mode}_1.json" "$OUT/bench_${mode}_2.json")
  fi
  if [ -n "$fails" ]; then
    echo "FAIL: $fails" >&2
    status=1
  fi
done
[ $status = 0 ] && echo "bench gate: ok (results in $OUT)" >&2
exit $status
