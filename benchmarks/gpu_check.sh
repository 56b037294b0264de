#!/usr/bin/env bash
# The GPU check of minilora's NF4 kernels, one command on a CUDA machine (about 5-8 minutes on an H100):
#   1. a Python with a CUDA build of torch: $GPU_PYTHON, else .venv-cuda, else a new .venv-cuda: on top of
#      python3's own packages when its torch sees a GPU (minilora added without its dependencies, then the
#      dev extras if an index is reachable), otherwise `pip install torch` and minilora[dev,triton]
#   2. the CUDA tests: compiled decode and tile kernels against float64 and the interpreter
#   3. one table of ratios measured in this run (benchmarks/kernel_speed.py): minilora against bf16
#      torch.matmul, dequantize-then-matmul and bitsandbytes on the same NF4 weight, with achieved GB/s
#   4. a QLoRA training step against PEFT + bitsandbytes, PagedAdamW (25 % budget) against bitsandbytes'
#      paged AdamW (benchmarks/qlora_vs_peft.py)
#
#   bash benchmarks/gpu_check.sh              # everything
#   bash benchmarks/gpu_check.sh --dry-run    # no GPU: the Python parts on the CPU with tiny shapes
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1 TRITON_DEFAULT_FP_FUSION=1 OMP_WAIT_POLICY=PASSIVE

case "${1:-}" in
  "") DRY=0 ;;
  --dry-run) DRY=1 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (expected nothing or --dry-run)" >&2; exit 2 ;;
esac

step() { printf '\n== %s  [%ds]\n' "$1" "$SECONDS"; }

has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if (( DRY )); then
  PY=${GPU_PYTHON:-.venv/bin/python}
  step "dry run with $PY (CPU): argument checks, the table, the step and paged sections"
  "$PY" benchmarks/kernel_speed.py --dry-run --tokens 1 3
  "$PY" benchmarks/qlora_vs_peft.py --dry-run --tokens 16
  if "$PY" benchmarks/kernel_speed.py --shapes 12 >/dev/null 2>&1; then
    echo "gpu_check.sh: kernel_speed.py accepted a bad --shapes" >&2; exit 1
  fi
  step "dry run done"
  exit 0
fi

step "1. a Python with CUDA torch"
if [[ -n "${GPU_PYTHON:-}" ]]; then
  PY=$GPU_PYTHON
elif [[ -x .venv-cuda/bin/python ]] && has_cuda_torch .venv-cuda/bin/python; then
  PY=.venv-cuda/bin/python
elif has_cuda_torch python3; then
  python3 -m venv --system-site-packages .venv-cuda
  .venv-cuda/bin/pip install -q --no-deps --no-build-isolation -e . \
    || { echo "gpu_check.sh: could not install minilora into .venv-cuda" >&2; exit 1; }
  .venv-cuda/bin/pip install -q -e ".[dev,triton]" \
    || echo "gpu_check.sh: no package index here: running with python3's packages (bitsandbytes/peft may be missing)"
  PY=.venv-cuda/bin/python
else
  python3 -m venv .venv-cuda
  .venv-cuda/bin/pip install -q --upgrade pip
  .venv-cuda/bin/pip install -q torch
  .venv-cuda/bin/pip install -q -e ".[dev,triton]"
  PY=.venv-cuda/bin/python
fi
if ! has_cuda_torch "$PY"; then
  echo "gpu_check.sh: $PY has no CUDA build of torch or sees no GPU (set GPU_PYTHON to one that does)" >&2
  exit 1
fi
"$PY" -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader 2>/dev/null || true

step "2. CUDA tests (compiled kernels)"
timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_decode.py tests/test_kernels_nf4.py -k cuda

step "3. NF4 matmuls: ratios to bf16 torch.matmul, measured now"
timeout 240 "$PY" benchmarks/kernel_speed.py

step "4. QLoRA step against PEFT + bitsandbytes; PagedAdamW against bitsandbytes"
timeout 150 "$PY" benchmarks/qlora_vs_peft.py

step "done"
