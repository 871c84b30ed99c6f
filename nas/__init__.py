"""Running experiments: files, devices, Optuna and progress bars live here, not in `space` or `pruning`.

    data.py, synth.py         YOLO datasets (checked once, cached) and the synthetic default sets
    loss.py, metrics.py       YOLOv5's loss; NMS and COCO mAP
    train.py, evaluate.py     ProxyConfig, fit, train_job; evaluate
    latency.py, device.py     LatencyConfig, measure_latency, backends; resolve_device, gpu_identity, gpu_lock
    earlystop.py, pareto.py   the two-objective early-stopping rule; front, hypervolume, exports
    prune.py, source.py       the pruning job; STUDY:TRIAL and other model sources
    onnx_export.py, files.py  export_onnx; FileLock, weights as bytes, the atomic writers
    cli.py, cli_args.py       `repnas`: one command class per subcommand; the argparse pieces they share
    dashboard.py              `repnas dashboard`: optuna-dashboard on the study's own storage
    yolov5.py, yolov5_bridge.py  `repnas yolov5-bridge`: the bundle; the converter it prints (never imported here)
    fidelity.py, zerocost.py  rank agreement (τ-b, bootstrap) for `repnas confirm`; training-free scores
    study/                    the search study, one module per concern (see its __init__)
"""
