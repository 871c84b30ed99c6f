import json
import logging
import re
from dataclasses import replace

import pytest
import torch

from nas.cli import main
from nas.device import resolve_device
from nas.synth import SynthConfig, make_synthetic
from nas.train import ProxyConfig, TrainingDiverged, fit, parameter_groups
from space.builder import build_model
from space.errors import RepnasError
from tests.conftest import tiny_yaml

FAST = {"epochs": 2, "imgsz": 64, "batch": 8, "val_every": 1, "device": "cpu", "quiet": True, "warmup_epochs": 0.5}


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    monkeypatch.setenv("REPNAS_CACHE_DIR", str(tmp_path / "cache"))
    return make_synthetic(tmp_path / "shapes", SynthConfig(images=24, classes=3, imgsz=64, seed=3))


def test_fit_trains_evaluates_and_calls_back(tiny_data):
    model = build_model(tiny_yaml(nc=3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    result = fit(model, tiny_data, ProxyConfig(**FAST), callbacks=[lambda *a: calls.append(a)])
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert [c[0] for c in calls] == [1, 2]
    _, losses, map50_95, map50 = calls[-1]
    assert set(losses) == {"box", "obj", "cls"} and all(v > 0 for v in losses.values())
    assert 0 <= map50_95 <= map50 <= 1 and result.metrics.map50 == map50
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not result.stopped_early and result.seconds > 0


def test_a_callback_can_stop_training(tiny_data):
    result = fit(build_model(tiny_yaml(nc=3)), tiny_data, ProxyConfig(**FAST | {"epochs": 3}),
                 callbacks=[lambda epoch, *_: epoch >= 1])
    assert result.stopped_early and len(result.history) == 1


def test_fit_says_one_line_per_epoch_that_stays_in_a_log(tiny_data, caplog):
    lines: list[str] = []
    cfg = ProxyConfig(**FAST | {"quiet": False, "val_every": 2, "epochs": 3})
    fit(build_model(tiny_yaml(nc=3)), tiny_data, cfg, progress=lines.append)
    assert len(lines) == 3 and [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all(re.fullmatch(r"epoch \d/3: box [\d.]+ obj [\d.]+ cls [\d.]+, [\d.]+ s(; mAP50-95 [\d.]+ mAP50 "
                            r"[\d.]+)?", line) for line in lines), lines
    assert ["mAP50" in line for line in lines] == [False, True, True]  # validated: every 2nd epoch and the last
    caplog.set_level(logging.INFO, logger="repnas.train")  # no `progress`: the log (the CLI shows INFO lines)
    fit(build_model(tiny_yaml(nc=3)), tiny_data, replace(cfg, epochs=1))
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == "repnas.train"] == ["epoch 1/1"]
    caplog.clear()
    fit(build_model(tiny_yaml(nc=3)), tiny_data, replace(cfg, epochs=1, quiet=True), progress=lines.append)
    assert len(lines) == 3 and not caplog.records  # quiet: no line anywhere


def test_fit_is_deterministic_for_a_seed(tiny_data):
    cfg = ProxyConfig(**FAST | {"epochs": 1})
    a = fit(build_model(tiny_yaml(nc=3)), tiny_data, cfg).history[0]
    torch.manual_seed(123)  # whatever happened before, fit seeds itself...
    b = fit(build_model(tiny_yaml(nc=3)), tiny_data, cfg).history[0]
    assert a["box"] != b["box"] or a["obj"] != b["obj"]  # ...but the two models were initialised differently
    torch.manual_seed(0)
    m1 = build_model(tiny_yaml(nc=3))
    torch.manual_seed(0)
    m2 = build_model(tiny_yaml(nc=3))
    assert fit(m1, tiny_data, cfg).history[0]["box"] == fit(m2, tiny_data, cfg).history[0]["box"]


def test_train_job_twice_with_one_seed_gives_bit_identical_weights(tiny_data, tmp_path):
    """The seed covers the initial weights too (train_job seeds before it builds): same seed, same run, on the CPU
    with equal thread counts and no loader workers."""
    import hashlib

    from nas.train import train_job

    cfg = ProxyConfig(**FAST | {"epochs": 1, "workers": 0, "cache_images": False})
    torch.manual_seed(123)  # whatever the generators held before
    first = train_job(tiny_yaml(nc=3), tiny_data, cfg, tmp_path / "a")
    torch.manual_seed(456)
    second = train_job(tiny_yaml(nc=3), tiny_data, cfg, tmp_path / "b")
    a, b = (torch.load(r.folder / "weights.pt", weights_only=True) for r in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    digest = [hashlib.sha256((r.folder / "weights.pt").read_bytes()).hexdigest() for r in (first, second)]
    assert digest[0] == digest[1] and first.metrics["map50_95"] == second.metrics["map50_95"]
    other = train_job(tiny_yaml(nc=3), tiny_data, ProxyConfig(**FAST | {"epochs": 1, "workers": 0, "seed": 1}),
                      tmp_path / "c")
    c = torch.load(other.folder / "weights.pt", weights_only=True)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed: another run


def test_nan_loss_raises_training_diverged(tiny_data, monkeypatch):
    from nas import train

    class NaNLoss:
        def __init__(self, *a, **k):
            pass

        def __call__(self, preds, targets):
            loss = sum(p.sum() for p in preds) * float("nan")
            return loss, torch.zeros(3)

    monkeypatch.setattr(train, "DetectionLoss", NaNLoss)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, batch 1 .* lower lr0"):
        fit(build_model(tiny_yaml(nc=3)), tiny_data, ProxyConfig(**FAST))


def test_nc_mismatch_is_a_clear_error(tiny_data):
    with pytest.raises(RepnasError, match=r"the model has nc=5 but .*data.yaml names 3 classes"):
        fit(build_model(tiny_yaml(nc=5)), tiny_data, ProxyConfig(**FAST))


def test_parameter_groups_follow_yolov5():
    model = build_model(tiny_yaml())
    bn, decay, bias = parameter_groups(model, 5e-4)
    assert bn["weight_decay"] == 0 and bias["weight_decay"] == 0 and decay["weight_decay"] == 5e-4
    n = sum(1 for _ in model.parameters())
    assert len(bn["params"]) + len(decay["params"]) + len(bias["params"]) == n
    assert all(p.ndim == 1 for p in bn["params"]) and all(p.ndim == 4 for p in decay["params"])


def test_proxy_config_validation_and_finetune_preset():
    with pytest.raises(ValueError, match="imgsz=100 must be a multiple of 32"):
        ProxyConfig(imgsz=100)
    with pytest.raises(ValueError, match="optimizer='Adam' must be"):
        ProxyConfig(optimizer="Adam")
    ft = ProxyConfig.finetune(epochs=3)
    assert ft.epochs == 3 and ft.warmup_epochs == 0 and ft.warmup_bias_lr == 0 and ft.lr0 < ProxyConfig().lr0


def test_proxy_config_takes_nested_settings_as_dicts():
    """A study stores its proxy as JSON: loss gains and augmentation come back as dicts and must round-trip."""
    cfg = ProxyConfig(loss={"obj": 6.25}, augment={"fliplr": 0.0})
    assert cfg.loss.obj == 6.25 and cfg.loss.box == ProxyConfig().loss.box
    assert cfg.augment.fliplr == 0.0 and cfg.augment.scale == ProxyConfig().augment.scale
    assert ProxyConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"loss=.*bogus"):
        ProxyConfig(loss={"bogus": 1})


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(RepnasError, match=r"is not a device|is not supported"):
        resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(RepnasError, match="CUDA is not available on this machine; use --device cpu"):
            resolve_device("cuda:0")


def test_cli_train_then_val(tiny_data, tmp_path, capsys):
    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(json.dumps(tiny_yaml(nc=80)))  # JSON is YAML; nc follows the data
    out = tmp_path / "run"
    assert main(["train", str(model_yaml), "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64",
                 "--batch", "8", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"map50", "map50_95", "params", "gflops", "epochs", "imgsz", "train_seconds"} <= set(metrics)
    assert metrics["epochs"] == 1 and metrics["imgsz"] == 64
    assert (out / "epochs.csv").read_text().splitlines()[0].startswith("epoch,box,obj,cls")
    state = torch.load(out / "weights.pt", weights_only=True)
    assert "model.0.rbr_dense.conv.weight" in state
    printed = capsys.readouterr().out
    assert "mAP50" in printed and str(out) in printed
    assert main(["val", str(out / "model.yaml"), "--weights", str(out / "weights.pt"), "--data", str(tiny_data),
                 "--imgsz", "64", "--device", "cpu", "--quiet"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert float(row[2]) == pytest.approx(metrics["map50"], abs=5e-5)  # `val` prints 4 decimals
    # the run's folder is a source too: its data and size come from metrics.json (no --data, no --imgsz)
    assert main(["val", str(out), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[2] == row[2] and printed[1].split()[4] == "64"
    assert printed[2] == (f"evaluated at 64 px (the size it was trained at; --imgsz changes it) on the val split of "
                          f"{tiny_data}")
    # and for latency (timed at its recorded size unless --imgsz), and its disk use was said at the end of train
    assert main(["latency", str(out), "--device", "cpu", "--iters", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split()[:2] == ["fused", "64x64"]
    assert "at 64 px, the size it was timed at (--imgsz changes it)" in captured.err
    assert main(["latency", str(out), "--no-fused", "--device", "cpu"]) == 2
    assert "--no-fused needs a MODEL.yaml" in capsys.readouterr().err


def test_cli_train_says_its_disk_use(tiny_data, tmp_path, capsys):
    from nas.files import folder_bytes, format_bytes

    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(json.dumps(tiny_yaml(nc=3)))
    out = tmp_path / "run"
    assert main(["train", str(model_yaml), "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64", "--batch", "8",
                 "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    assert f"; {format_bytes(folder_bytes(out))} on disk)" in capsys.readouterr().out


def test_cli_train_says_what_it_trains_and_one_line_per_epoch(tiny_data, tmp_path, caplog):
    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(json.dumps(tiny_yaml(nc=3)))
    caplog.set_level(logging.INFO)
    assert main(["train", str(model_yaml), "--data", str(tiny_data), "--epochs", "2", "--imgsz", "64", "--batch", "8",
                 "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "repnas.train"]
    assert said[0].startswith(f"training {model_yaml} (") and said[0].endswith(": 2 epochs at 64 px, batch 8, "
                                                                                 "device cpu")
    assert [line.split(":")[0] for line in said[1:]] == ["epoch 1/2", "epoch 2/2"]


def test_cli_refuses_pickled_weights(tmp_path, capsys):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("PWNED",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps(Payload()))
    model_yaml = tmp_path / "tiny.yaml"
    model_yaml.write_text(json.dumps(tiny_yaml(nc=3)))
    assert main(["val", str(model_yaml), "--weights", str(bad), "--data", "nope.yaml"]) == 2
    captured = capsys.readouterr()
    assert "PWNED" not in captured.out
    assert captured.err.count("\n") == 1


def test_cli_data_synth(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "s"), "--images", "12", "--classes", "2", "--imgsz", "64"]) == 0
    assert (tmp_path / "s" / "data.yaml").is_file()
    assert main(["data", "synth", str(tmp_path / "t"), "--classes", "99"]) == 2
    assert "--classes 99 must be in 1..8" in capsys.readouterr().err


def _poison_gradients(model, calls: list, every: bool):
    """Make the first conv's gradient infinite on the first backward (or on every one)."""
    weight = model.model[0].rbr_dense.conv.weight

    def hook(grad):
        calls.append(1)
        return grad * float("inf") if every or len(calls) == 1 else grad

    weight.register_hook(hook)


def test_one_non_finite_gradient_is_skipped_not_fatal(tiny_data):
    model = build_model(tiny_yaml(nc=3))
    calls = []
    _poison_gradients(model, calls, every=False)
    result = fit(model, tiny_data, ProxyConfig(**FAST | {"epochs": 1}))
    assert result.history[0]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # every step was skipped
def test_persistent_non_finite_gradients_raise(tiny_data):
    model = build_model(tiny_yaml(nc=3))
    _poison_gradients(model, [], every=True)
    with pytest.raises(TrainingDiverged, match=r"gradients were non-finite for 5 steps in a row"):
        fit(model, tiny_data, ProxyConfig(**FAST | {"epochs": 4}))


def test_obj_ref_imgsz_sets_the_objectness_gain_and_val_fraction_a_fixed_val_subset(tiny_data, monkeypatch):
    import nas.train as train_mod

    gains, val_sizes = [], []
    real_loss, real_eval = train_mod.DetectionLoss, train_mod.evaluate

    def loss(model, hyp):
        gains.append(hyp.obj)
        return real_loss(model, hyp)

    def evaluate(model, dataset, *args, **kwargs):
        val_sizes.append([str(r.path) for r in dataset.records])
        return real_eval(model, dataset, *args, **kwargs)

    monkeypatch.setattr(train_mod, "DetectionLoss", loss)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    one = FAST | {"epochs": 1}
    fit(build_model(tiny_yaml(nc=3)), tiny_data, ProxyConfig(**one))  # YOLOv5: obj x (imgsz / 640)^2 x 3 / nl
    fit(build_model(tiny_yaml(nc=3)), tiny_data, ProxyConfig(**one, obj_ref_imgsz=160, val_fraction=0.5))
    fit(build_model(tiny_yaml(nc=3)), tiny_data, ProxyConfig(**one, seed=5, val_fraction=0.5))
    nl = build_model(tiny_yaml(nc=3)).detect.nl
    assert gains == pytest.approx([(64 / 640) ** 2 * 3 / nl, (160 / 640) ** 2 * 3 / nl, (64 / 640) ** 2 * 3 / nl])
    full, half, half_other_seed = val_sizes
    assert len(half) == round(len(full) / 2) and set(half) < set(full)
    assert half == half_other_seed  # one subset for every training seed: their mAPs compare
    with pytest.raises(ValueError, match="obj_ref_imgsz=16"):
        ProxyConfig(obj_ref_imgsz=16)
    with pytest.raises(ValueError, match="val_fraction=0"):
        ProxyConfig(val_fraction=0)
