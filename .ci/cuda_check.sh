#!/usr/bin/env bash
# Compile-and-link check of the CUDA kernels (no GPU needed).
#
#   .ci/cuda_check.sh [VENV]
#
# VENV: a virtual environment with a CUDA build of torch (e.g. torch 2.14.1+cu130). Without
# it, $CUDA_VENV (default .venv-cuda) is used, created with `python3 -m venv` and
# `pip install torch==2.14.1 numpy ninja setuptools wheel` when it has no torch yet.
#
# Copies csrc/, mini_unlearn/, setup.py and pyproject.toml to a temporary directory, builds the
# extension there with FORCE_CUDA=1 (CPU + CUDA sources, sm_80 and sm_90), loads the built
# library (no GPU: only dlopen + op registration) and asserts that every op in
# mini_unlearn/_backend.py OP_NAMES has both a CPU and a CUDA kernel. Exits non-zero on any
# failure. Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default
# "8.0;9.0"), MAX_JOBS (default 2), KEEP_BUILD=1 keeps the temporary directory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${CUDA_VENV:-$REPO/.venv-cuda}}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export FORCE_CUDA=1
unset FORCE_ONLY_CPU

log() { echo "[cuda_check] $*"; }
fail() { echo "[cuda_check] FAIL: $*" >&2; exit 1; }

[ -x "$CUDA_HOME/bin/nvcc" ] || fail "nvcc not found at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"

if [ ! -x "$VENV/bin/python" ]; then
  if [ $# -ge 1 ]; then fail "no python in the given venv $VENV"; fi
  log "creating venv $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if [ $# -ge 1 ]; then fail "the given venv $VENV has no torch"; fi
  log "installing torch into $VENV"
  "$PY" -m pip install --quiet torch==2.14.1 numpy ninja setuptools wheel
fi
"$PY" - <<'EOF' || fail "torch in $VENV is not a CUDA build"
import torch
assert torch.version.cuda is not None, "torch.version.cuda is None"
print(f"[cuda_check] torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
log "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
# ninja from the venv (BuildExtension uses it when it is on PATH).
export PATH="$VENV/bin:$PATH"

WORK="$(mktemp -d)"  # a fresh build folder
cleanup() { if [ "${KEEP_BUILD:-0}" = "1" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

cp -r "$REPO/csrc" "$REPO/mini_unlearn" "$REPO/setup.py" "$REPO/pyproject.toml" "$WORK/"
[ -f "$REPO/README.md" ] && cp "$REPO/README.md" "$WORK/"  # pyproject.toml names it (quiets setuptools)
# Drop build artefacts that came along with the copy (a CPU-only _C.so must not be tested).
find "$WORK/mini_unlearn" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
[ -n "$(ls "$WORK"/csrc/cuda/*.cu 2>/dev/null)" ] || fail "no CUDA sources in csrc/cuda/"

log "building in $WORK (arch $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
(cd "$WORK" && "$PY" setup.py build_ext --inplace) > "$WORK/build.log" 2>&1 || {
  tail -n 80 "$WORK/build.log" >&2
  fail "build failed (full log: $WORK/build.log; set KEEP_BUILD=1 to keep it)"
}
log "build took $(( $(date +%s) - start )) s"
grep -iE "warning" "$WORK/build.log" | grep -v "^ *$" | sort -u | head -n 20 || true

SO="$(ls "$WORK"/mini_unlearn/_C*.so 2>/dev/null | head -n 1)"
[ -n "$SO" ] || fail "no mini_unlearn/_C*.so was built"

(cd "$WORK" && "$PY" - "$SO" <<'EOF') || fail "load/registration check failed"
import ast
import importlib.util
import sys

import torch

so = sys.argv[1]
# Load the built library as the Python module mini_unlearn._C without importing the package
# (its other modules need more than torch): dlopen runs the op registrations, then PyInit__C.
spec = importlib.util.spec_from_file_location("mini_unlearn._C", so)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
torch.ops.load_library(so)  # the same library: dlopen is a no-op, torch.ops records it

# OP_NAMES straight from the source (importing mini_unlearn._backend imports the package).
tree = ast.parse(open("mini_unlearn/_backend.py").read())
names = None
for node in tree.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "OP_NAMES" for t in node.targets):
        names = ast.literal_eval(node.value)
assert names, "OP_NAMES not found in mini_unlearn/_backend.py"

missing = []
for name in names:
    for key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mini_unlearn::{name}", key):
            missing.append(f"{name}[{key}]")
if missing:
    sys.exit("[cuda_check] missing kernels: " + ", ".join(missing))
print(f"[cuda_check] {len(names)} ops have CPU and CUDA kernels: {', '.join(names)}")
EOF
log "OK"
