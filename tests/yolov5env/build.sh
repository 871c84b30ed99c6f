#!/usr/bin/env bash
# Build the YOLOv5 environment that tests/yolov5 run the bridge against: the PyPI `yolov5` package 7.0.14 in its
# own venv at VENV, with the design document's RepVGG block patched in (patch_yolov5.py) and a checkout-shaped copy
# of the patched package at VENV/yolov5-checkout (the `models.yolo` import root). Nothing of YOLOv5 is committed.
#
#   bash tests/yolov5env/build.sh VENV [BLOCK.py]     # BLOCK: default ../shared/reference/seed_repvgg_block.py
#   export REPNAS_YOLOV5_PYTHON=VENV/bin/python       # then: pytest tests/yolov5
#
# The venv is made by $PYTHON (default: python, the one repnas is installed in) and sees its site-packages (torch
# and torchvision are reused, not downloaded again); what yolov5 brings lands in the venv only, including
# `ultralytics-thop`, which installs into `thop/` and would otherwise overwrite repnas's `thop` (checked below). Pins, each for YOLOv5 7.0.14's own code: setuptools<81 (its
# utils/general.py imports pkg_resources), numpy<2.4 (its metrics call np.trapz), pillow<10 (its plots call
# FreeTypeFont.getsize). Running it again on a built VENV changes nothing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:?usage: build.sh VENV [BLOCK.py]}"
block="${2:-$here/../../../shared/reference/seed_repvgg_block.py}"
python="${PYTHON:-python}"
[ -f "$block" ] || { echo "build.sh: $block: no such file (the design document's RepVGG block)" >&2; exit 1; }

thop_before="$("$python" -c 'import importlib.metadata as m; print(m.version("thop"))' 2>/dev/null || echo absent)"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check -q "yolov5==7.0.14" "setuptools<81" "numpy<2.4" "pillow<10"
"$venv/bin/python" "$here/patch_yolov5.py" --block "$block" --checkout "$venv/yolov5-checkout"
thop_after="$("$python" -c 'import importlib.metadata as m; print(m.version("thop"))' 2>/dev/null || echo absent)"
if [ "$thop_before" != "$thop_after" ]; then
  echo "build.sh: the main environment's thop changed ($thop_before -> $thop_after)" >&2
  exit 1
fi
"$venv/bin/python" - <<'EOF'
import importlib.metadata as m
import torch
print(f"yolov5 {m.version('yolov5')}, torch {torch.__version__}, numpy {m.version('numpy')}, "
      f"ultralytics-thop {m.version('ultralytics-thop')} (in the venv only)")
EOF
echo "main environment's thop: $thop_after (unchanged)"
echo "export REPNAS_YOLOV5_PYTHON=$venv/bin/python"
