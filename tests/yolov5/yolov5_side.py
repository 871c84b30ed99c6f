"""What tests/yolov5 run inside the YOLOv5 environment (REPNAS_YOLOV5_PYTHON), with YOLOv5's own code only: load
checkpoints as val.py/detect.py do and record their outputs, and make checkpoints as YOLOv5's training leaves them.
Results go to weights-only tensor files and one JSON line on stdout; repnas is never imported here.

    python yolov5_side.py outputs --images I.pt --out O.pt CKPT...    (+ --root, run from a checkout for `models`)
    python yolov5_side.py make-checkpoints --bundle B --bridge bridge.py --out DIR
    python yolov5_side.py val-batches --data DATA.yaml --imgsz 160 --batch 32 --out B.pt
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

VAL_NMS = {"conf_thres": 0.001, "iou_thres": 0.6, "max_det": 300, "multi_label": True}  # val.py's
DETECT_NMS = {"conf_thres": 0.25, "iou_thres": 0.45, "max_det": 1000, "multi_label": False}  # detect.py's


def _yolov5(root: str):
    if root == "models":
        sys.path.insert(0, os.getcwd())
    prefix = "models" if root == "models" else "yolov5.models"
    utils = "utils" if root == "models" else "yolov5.utils"
    modules = {name: importlib.import_module(f"{prefix}.{name}") for name in ("yolo", "common", "experimental")}
    modules["general"] = importlib.import_module(f"{utils}.general")
    logging.getLogger("yolov5").setLevel(logging.WARNING)
    return modules


def _structure(model, common) -> dict:
    """What form a checkpoint's Model is in: RepVGG blocks in deploy form, Convs fused as YOLOv5's fuse() leaves
    them (no bn, forward = forward_fuse), the class's import root, dtypes, names."""
    blocks = [m for m in model.modules() if isinstance(m, common.RepVGGBlock)]
    convs = [m for m in model.modules() if isinstance(m, common.Conv)]
    fuse = common.Conv.forward_fuse
    return {
        "class": f"{type(model).__module__}.{type(model).__name__}",
        "repvgg": len(blocks),
        "repvgg_deploy": sum(bool(m.deploy) and hasattr(m, "rbr_reparam") and not hasattr(m, "rbr_dense")
                             for m in blocks),
        "convs": len(convs),
        "convs_fused": sum(not hasattr(m, "bn") and getattr(m.__dict__.get("forward"), "__func__", None) is fuse
                           for m in convs),
        "dtypes": sorted({str(p.dtype) for p in model.state_dict().values() if p.is_floating_point()}),
        "names": model.names, "nc": model.nc, "yaml_rows": model.yaml["backbone"] + model.yaml["head"],
    }


def outputs(args) -> dict:
    """Per checkpoint: YOLOv5's refusal without TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (torch >= 2.6), then with it
    attempt_load (as val.py and detect.py load, Convs fused) and the eval outputs and NMS results on the images."""
    y = _yolov5(args.root)
    images = torch.load(args.images, weights_only=True)  # (B, 3, H, W) float 0..1
    report, tensors = {"torch": torch.__version__}, {}
    for k, ckpt in enumerate(args.checkpoints):
        os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
        try:
            y["experimental"].attempt_load(ckpt, device="cpu")
            refused = None
        except Exception as err:  # torch's UnpicklingError, as YOLOv5's loaders meet it
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(err).strip().splitlines()[0])  # (torch colours it)
            refused = f"{type(err).__name__}: {first}"
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
        model = y["experimental"].attempt_load(ckpt, device="cpu")  # fuse=True, as val.py and detect.py
        with torch.no_grad():
            pred, maps = model(images)
        nms = {name: y["general"].non_max_suppression(pred, **settings)
               for name, settings in (("val", VAL_NMS), ("detect", DETECT_NMS))}
        tensors[f"{k}"] = {"pred": pred, "maps": list(maps), "nms_val": nms["val"], "nms_detect": nms["detect"]}
        report[ckpt] = {"refused_without_env": refused, "keys": sorted(raw),
                        "repnas": raw.get("repnas"), **_structure(raw["model"], y["common"])}
    torch.save(tensors, args.out)
    return report


def make_checkpoints(args) -> dict:
    """Checkpoints as YOLOv5's training leaves them (fp16 `model` and `ema`, optimizer state dropped), converted
    back with the bridge's from_yolov5, with YOLOv5's output on a fixed input for each:
      autoanchor: the bundle's model, anchors moved as check_anchors moves them; `model` differs from `ema` in
                  Detect's biases
      offspace:   the bundle's rows with the head's first C3 given shortcut=True (not a point of the space)
      yolov5n:    YOLOv5's own yolov5n.yaml at nc=1 (no RepVGG block)
    """
    y = _yolov5(args.root)
    spec = importlib.util.spec_from_file_location("bridge", args.bridge)
    bridge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bridge)
    bundle = bridge.read_bundle(args.bundle)
    nc = bundle["meta"]["nc"]
    out = Path(args.out)
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    made, tensors = {}, {"images": x}

    base = bridge.build(y["yolo"], bundle["cfg"], nc, deploy=False)
    bridge.load_exact(base, bundle["train"], "bundle")
    ema = copy.deepcopy(base)
    detect = ema.model[-1]
    pixels = detect.anchors * detect.stride.view(-1, 1, 1) * 1.1 + 1.0  # as check_anchors writes them: pixels,
    detect.anchors[:] = pixels.clone().view_as(detect.anchors)       # ordered, then back to grid units
    y["yolo"].check_anchor_order(detect)
    pixels = detect.anchors.clone()
    detect.anchors /= detect.stride.view(-1, 1, 1)
    model = copy.deepcopy(ema)
    with torch.no_grad():
        model.model[-1].m[0].bias += 0.5
    offspace_cfg = copy.deepcopy(bundle["cfg"])
    offspace_cfg["head"][3][3] = [offspace_cfg["head"][3][3][0], True]
    yolov5n = Path(y["yolo"].__file__).parent / "yolov5n.yaml"
    checkpoints = {
        "autoanchor": {"model": model, "ema": ema},
        "offspace": {"model": y["yolo"].DetectionModel(offspace_cfg, ch=3, nc=nc), "ema": None},
        "yolov5n": {"model": y["yolo"].DetectionModel(str(yolov5n), ch=3, nc=nc), "ema": None},
    }
    for name, ckpt in checkpoints.items():
        for key in ("model", "ema"):
            if ckpt[key] is not None:
                ckpt[key].names = {0: "raccoon"}
                ckpt[key].nc = nc
        path = out / f"{name}.pt"
        half = {k: None if v is None else copy.deepcopy(v).half() for k, v in ckpt.items()}  # as train.py saves
        torch.save({"epoch": 3, "best_fitness": 0.1, "updates": 10, "optimizer": None, "opt": {"imgsz": 160},
                    **half}, path)
        with torch.no_grad():  # the saved (fp16) weights in float32, as the bridge reads them
            for key in ("ema", "model"):
                if half[key] is not None:
                    tensors[f"{name}_{key}"] = copy.deepcopy(half[key]).float().eval()(x)[0]
        made[name] = bridge.from_yolov5(path, out / name, use=None, yolo=y["yolo"], common=y["common"],
                                        root=args.root)
    made["autoanchor_model"] = bridge.from_yolov5(out / "autoanchor.pt", out / "autoanchor_model", use="model",
                                                  yolo=y["yolo"], common=y["common"], root=args.root)
    saved = torch.load(out / "autoanchor.pt", map_location="cpu", weights_only=False)["ema"].float().model[-1]
    made["anchors_px"] = (saved.anchors * saved.stride.view(-1, 1, 1)).view(len(pixels), -1).tolist()  # fp16 ones
    torch.save(tensors, out / "outputs.pt")
    return made


def val_batches(args) -> dict:
    """val.py's own batches of a split: YOLOv5's dataloader as val.py makes it (rect batches, pad 0.5, stride 32):
    the uint8 images (B, 3, H, W), their files and the shapes that map boxes back to the original pixels."""
    y = _yolov5(args.root)
    dataloaders = importlib.import_module(("utils" if args.root == "models" else "yolov5.utils") + ".dataloaders")
    data = y["general"].check_dataset(args.data)
    loader = dataloaders.create_dataloader(data["val"], args.imgsz, args.batch, 32, pad=0.5, rect=True, workers=0)[0]
    batches = [{"images": im, "files": [Path(f).stem for f in paths],
                "shapes": [[list(map(float, h0w0)), [list(map(float, ratio)), list(map(float, pad))]]
                           for h0w0, (ratio, pad) in shapes]}
               for im, _, paths, shapes in loader]
    torch.save([b["images"] for b in batches], args.out)
    return {"files": [b["files"] for b in batches], "shapes": [b["shapes"] for b in batches]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", choices=("yolov5", "models"), default="yolov5")
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("outputs")
    o.add_argument("checkpoints", nargs="+")
    o.add_argument("--images", required=True)
    o.add_argument("--out", required=True)
    m = sub.add_parser("make-checkpoints")
    m.add_argument("--bundle", required=True)
    m.add_argument("--bridge", required=True)
    m.add_argument("--out", required=True)
    v = sub.add_parser("val-batches")
    v.add_argument("--data", required=True)
    v.add_argument("--imgsz", type=int, required=True)
    v.add_argument("--batch", type=int, required=True)
    v.add_argument("--out", required=True)
    args = p.parse_args()
    report = {"outputs": outputs, "make-checkpoints": make_checkpoints, "val-batches": val_batches}[args.command](args)
    print("RESULT " + json.dumps(report, default=str))


if __name__ == "__main__":
    main()
