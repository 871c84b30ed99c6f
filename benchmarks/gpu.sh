#!/usr/bin/env bash
# The GPU figures of issue 4 in one go: latency (seed model, fused vs as built, 320/640, batch 1/16, fp16) and a
# 3-trial search on the GPU, printed as one table. Made for a CUDA machine whose Python already has torch (and
# numpy, pandas, matplotlib, pyyaml, tqdm) but lacks optuna, thop, torch-pruning and pycocotools, with no
# internet: those come as wheels from the git-ignored folder .whl/, which this script prepares on a machine
# that can reach PyPI:
#
#   benchmarks/gpu.sh download [PYTHON_VERSION]     # here: fetch the wheels for that Python (default 3.12)
#   benchmarks/gpu.sh                               # there, in the repo root: install into /tmp/site and run
#
# torch is never installed or upgraded (installs use --no-deps into a separate --target folder). The synthetic
# dataset is generated into $REPNAS_CACHE_DIR (default /tmp/repnas-cache). Budget: under 6 minutes on an H100.
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
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export REPNAS_CACHE_DIR="${REPNAS_CACHE_DIR:-/tmp/repnas-cache}"
python3 -c "import torch, optuna, thop, torch_pruning, pycocotools; assert torch.cuda.is_available(), 'no CUDA device'"
OUTDIR="${OUT:-/tmp/repnas-gpu}"
mkdir -p "$OUTDIR"

echo "== latency: seed model, fused vs as built (benchmarks/latency.py)"
python3 benchmarks/latency.py --device cuda --sizes 320 640 --batches 1 16 --repeats 5 | tee "$OUTDIR/latency.txt"

echo "== 3-trial search on the GPU (synthetic default data, default space, 20 epochs at 160 px)"
python3 -m nas.cli search --study gpu3 --trials 3 --epochs 20 --device cuda --results "$OUTDIR" \
  --no-early-stop | tee "$OUTDIR/search.txt"
python3 -m nas.cli show gpu3 --results "$OUTDIR" | tee "$OUTDIR/show.txt"

echo "== one table"
python3 - "$OUTDIR" <<'PY'
import re, sys, pathlib
out = pathlib.Path(sys.argv[1])
import torch
print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; CUDA {torch.version.cuda}")
print(f"{'figure':<52}{'value':>14}")
for line in (out / "latency.txt").read_text().splitlines():
    cols = line.split()
    if len(cols) == 8 and cols[0].isdigit():
        size, batch = cols[0], cols[1]
        print(f"{f'latency fused, {size}px batch {batch} (ms, CV)':<52}{cols[4] + ' ' + cols[5]:>14}")
        print(f"{f'fused / as built, {size}px batch {batch}':<52}{cols[6]:>14}")
for line in (out / "search.txt").read_text().splitlines():
    m = re.match(r"trial\s+(\d+) (\w+)\s+mAP50-95\s+(\S+) mAP50\s+(\S+) latency\s+(\S+) ms.*?(\S+) s", line)
    if m:
        print(f"{f'trial {m[1]} {m[2]}: mAP50 / latency ms / wall s':<52}{m[4] + ' / ' + m[5] + ' / ' + m[6]:>14}")
PY
echo "total wall time: $(( $(date +%s) - start )) s"
