#!/usr/bin/env bash
# The GPU checks of issue 15 in one command of under 10 minutes on one lent CUDA GPU: benchmarks/gpu_checks.py, whose
# docstring lists the checks and their bars (eager vs CUDA-graph latency, ratio stability, fp16 + channels_last, an
# AMP fit and fusion, pruning and fine-tuning, a latency target, ONNX of CUDA-trained weights, --prune-to and
# --workers 2 --devices 0,0 studies, relatency). Made for a CUDA machine whose Python already has torch, numpy,
# scipy, pandas, matplotlib, pyyaml, tqdm, onnx, onnxruntime and nvidia-ml-py (the lent H200's image, see the device
# tool's KINDS.md) but lacks optuna, thop, torch-pruning and pycocotools, with no internet: those come as wheels
# from the git-ignored folder .whl/, which this script prepares on a machine that can reach PyPI:
#
#   benchmarks/gpu.sh download [PYTHON_VERSION]   # here: fetch the wheels for that Python (default 3.12)
#   benchmarks/gpu.sh [--only CHECK ...]          # there, in the repo root: install into /tmp/site and run the checks
#   benchmarks/gpu.sh --dry-cpu                   # anywhere: the same checks on the CPU at tiny sizes, no install
#
# With the device tool: run(command="benchmarks/gpu.sh", carry=[".whl"], timeout_s=600). torch is never installed or
# upgraded (installs use --no-deps into a separate --target folder). Data, weights and studies go to a fresh /tmp
# folder; only small text files go to $OUT (default /tmp/repnas-gpu): gpu_checks.log (this output), summary.txt (the
# table, rewritten after every check), results.json and the tails of the four CLI runs, 7 files (the tool brings back
# 8 at most). The checks start no new work after GPU_CHECKS_BUDGET_S seconds (default 480), so that the command,
# install included, ends inside the tool's 10 minutes; a check that would not fit is reported as SKIP.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(optuna==5.0.0 alembic==1.20.1 SQLAlchemy==2.1.9 greenlet Mako==1.4.3 MarkupSafe colorlog==6.12.0
        thop==0.1.1.post2209072238 torch-pruning==1.6.1 pycocotools==2.0.11)

if [[ "${1:-}" == "download" ]]; then
  py="${2:-3.12}"
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  ls -l .whl
  exit 0
fi

start=$(date +%s)
OUTDIR="${OUT:-/tmp/repnas-gpu}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
if [[ " $* " == *" --dry-cpu "* ]]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no wheels in .whl/: run 'benchmarks/gpu.sh download' on a machine with PyPI and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import torch, optuna, thop, torch_pruning, pycocotools; assert torch.cuda.is_available(), 'no CUDA device'"
  python3 - <<'PY'
import importlib
for name in ("onnx", "onnxruntime", "pynvml", "scipy"):  # expected in the machine's image; a missing one fails its check
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except ImportError as err:
        print(f"{name} MISSING ({err}): the checks that need it will report ERROR")
PY
fi
echo "== install and imports: $(( $(date +%s) - start )) s"

status=0
python3 benchmarks/gpu_checks.py --out "$OUTDIR" --budget-s "${GPU_CHECKS_BUDGET_S:-480}" "$@" 2>&1 \
  | tee "$OUTDIR/gpu_checks.log" || status=$?
echo "total wall time: $(( $(date +%s) - start )) s (exit $status)" | tee -a "$OUTDIR/gpu_checks.log"
exit "$status"
