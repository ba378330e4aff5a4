"""The probe as an in-training monitor: logged scalars, the live encoder left as it was, bit-identical training."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidssl.cli import main
from vidssl.config import ConfigError
from vidssl.data import labelled
from vidssl.engine import resolve_run_config, train
from vidssl.engine.checkpoint import read_weights
from vidssl.evaluation import probe

from test_trainer import TensorLoader  # tests/test_trainer.py: the engine's loader interface in memory


@pytest.fixture(autouse=True)
def _single_thread(one_thread):  # conftest's one_thread for every test here
    yield


def _frame_folders(root, names=("s0", "s1", "s2"), frames=8, size=(24, 32)):
    """Each sequence its own colour and a square moving over time (so frames of a sequence differ)."""
    for si, n in enumerate(names):
        for t in range(frames):
            img = np.full((*size, 3), (40 * si + 5 * t, 120, 30 * si), dtype=np.uint8)
            img[4 + t:10 + t, 3 * t:3 * t + 6] = 255 - 60 * si
            (root / n).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / n / f"{t:05d}.png")
    return root


TINY = ["model.out_layer=layer2", "model.eval_layer=layer2", "data.clip_len=3",
        "objectives.0.patch_size=16", "objectives.0.patch_stride=8", "train.batch_size=2",
        "optim.lr=1e-3", "train.log_every=1", "data.source=synthetic", "train.steps=4"]


def _probe_sets(root, *extra):
    return [f"monitor.probe.frames={root}", "monitor.probe.clip_len=2", "monitor.probe.clips_per_video=2",
            "monitor.probe.size=32", "monitor.probe.every=2", *extra]


def _log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def test_probe_monitor_logs_at_its_steps_and_training_is_bit_identical(tmp_path, monkeypatch, capsys):
    from vidssl.engine import trainer

    root = _frame_folders(tmp_path / "frames")
    built = []
    build = trainer.build_training_model
    monkeypatch.setattr(trainer, "build_training_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    plain = train(resolve_run_config(None, TINY), tmp_path / "plain", loader=TensorLoader(), progress=False,
                  echo=False)
    cfg = resolve_run_config(None, TINY + ["train.log_every=3"] + _probe_sets(root, "monitor.probe.enabled=true"))
    monitors = probe.monitors_from_config(cfg)
    assert len(monitors) == 1 and monitors[0].layer == "layer2" and monitors[0].protocols == probe.PROTOCOLS
    reads = []
    read = probe.read_item_frames
    monkeypatch.setattr(probe, "read_item_frames", lambda path, idx: reads.append(path) or read(path, idx))
    watched = train(cfg, tmp_path / "watched", loader=TensorLoader(), progress=False, monitors=monitors)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("step 2/4 loss") and " probe/knn.k=20.top1 " in printed[0]
    assert "probe/" not in printed[1]

    plain_log, log = _log(tmp_path / "plain"), _log(tmp_path / "watched")
    keys = ("probe/knn.k=20.top1", "probe/linear.top1", "probe/retrieval.R@1", "probe/arrow.top1", "probe/time_s")
    assert [r["step"] for r in log] == [2, 3, 4]  # log_every=3, plus the monitor's steps 2 and 4
    assert [r["step"] for r in log if all(k in r for k in keys)] == [2, 4]
    assert not any(k.startswith("probe/") for k in log[1])
    assert all(0.0 <= log[0][k] <= 1.0 for k in keys[:-1])
    assert sorted(Path(r).name for r in reads) == ["s0", "s1", "s2"]  # read at the first call only, not again
    # same losses at every step and the same final weights, bit for bit
    assert [r["loss"] for r in log] == [plain_log[s - 1]["loss"] for s in (2, 3, 4)]
    a, _, _ = read_weights(plain["checkpoint"])
    b, _, _ = read_weights(watched["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = built[-1]
    assert all(m.training for m in model.modules())  # the encoder is back in train mode
    assert all(p.requires_grad for p in model.encoder.parameters())


def test_trainer_restores_what_a_careless_monitor_changes(tmp_path):
    """A monitor that switches modes, freezes parameters and draws random numbers changes nothing in training."""
    seen = []

    def careless(step, encoder):
        seen.append((step, encoder.training, type(encoder).__name__))
        encoder.eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        torch.rand(1000)
        return {"x": float(step)}

    careless.every, careless.name = 3, "careless"
    plain = train(resolve_run_config(None, TINY), tmp_path / "plain", loader=TensorLoader(), progress=False,
                  echo=False)
    watched = train(resolve_run_config(None, TINY), tmp_path / "w", loader=TensorLoader(), progress=False,
                    echo=False, monitors=[careless])
    assert [s[:2] for s in seen] == [(3, True), (4, True)] and seen[0][2] == "ResNetEncoder"
    assert [r.get("careless/x") for r in _log(tmp_path / "w")] == [None, None, 3.0, 4.0]
    assert [r["loss"] for r in _log(tmp_path / "w")] == [r["loss"] for r in _log(tmp_path / "plain")]
    a, _, _ = read_weights(plain["checkpoint"])
    b, _, _ = read_weights(watched["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    from vidssl.engine.trainer import _encoder_kept

    enc, state = torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.random.get_rng_state()
    with _encoder_kept(enc, torch.device("cpu")):
        careless(0, enc)
    assert torch.equal(torch.random.get_rng_state(), state) and enc.training and enc[0].weight.requires_grad


def test_frame_features_leave_the_callers_module_as_it_was():
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    enc[1].eval()  # a frozen BatchNorm inside a training module stays frozen, the rest stays in train mode
    ff = probe.FrameFeatures(enc, None, size=8)
    stats = enc[1].running_mean.clone()
    feats = ff(torch.randint(0, 255, (2, 3, 10, 12), dtype=torch.uint8))
    assert feats.shape == (2, 4) and not feats.requires_grad and not feats.is_inference()
    assert [m.training for m in enc] == [True, False, True] and torch.equal(enc[1].running_mean, stats)
    with probe.eval_mode(enc):
        assert not any(m.training for m in enc.modules())
    assert [m.training for m in enc] == [True, False, True]


def test_probe_monitor_on_a_split_by_video_defaults_to_arrow(tmp_path):
    root = _frame_folders(tmp_path / "frames")
    data = labelled.frame_folders_set(root, sequences=["s0", "s1"], test_sequences=["s2"], clip_len=2,
                                      clips_per_video=3)
    mon = probe.ProbeMonitor(data, size=16, layer=None)
    assert mon.protocols == ("arrow",) and len(mon) == 3 * 3 * 2  # 3 sequences x 3 disjoint clips of 2 frames
    enc = torch.nn.Conv2d(3, 5, 3)
    out = mon(0, enc)
    assert set(out) == {"arrow.top1", "time_s"} and enc.training
    with pytest.raises(ValueError, match=r"monitor.probe.protocols: \['knn'\]"):
        probe.ProbeMonitor(data, protocols=["knn"])


@pytest.mark.parametrize("sets, message", [
    (["monitor.probe.evry=2"], "monitor.probe.evry: unknown key"),
    (["monitor.probe.every=0"], "monitor.probe.every: must be >= 1"),
    (["monitor.probe.protocols=[knn, nope]"], "monitor.probe.protocols.1: 'nope' is not allowed"),
    (["monitor.probe.layer=layer3"], "monitor.probe.layer: 'layer3' comes after model.out_layer 'layer2'"),
    (["monitor.probe.frames="], "monitor.probe.frames: the probe monitor needs labelled frame folders"),
    (["monitor.probe.test_sequences=[s2]", "monitor.probe.protocols=[knn]"], "monitor.probe.protocols: ['knn']"),
])
def test_bad_monitor_keys_are_named(tmp_path, sets, message):
    root = _frame_folders(tmp_path / "frames")
    with pytest.raises(ConfigError) as exc:
        resolve_run_config(None, TINY + _probe_sets(root, "monitor.probe.enabled=true", *sets))
    assert message in str(exc.value)


def test_bad_monitor_input_stops_the_run_before_anything_is_written(tmp_path, capsys, monkeypatch):
    root = _frame_folders(tmp_path / "frames")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("objectives: [{name: crw, patch_size: 16, patch_stride: 8}]\n")
    base = ["pretrain", "--config", str(recipe), "--out", str(tmp_path / "r"), "--no-progress"]
    sets = sum((["--set", s] for s in TINY[:3] + TINY[5:] + _probe_sets(root, "monitor.probe.enabled=true")), [])
    assert main(base + sets + ["--set", f"monitor.probe.frames={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "monitor.probe.frames:" in err[0] and "missing" in err[0]
    assert main(base + sets + ["--set", "monitor.probe.sequences=[s0, nope]"]) == 2
    assert "monitor.probe.frames:" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # the CLI hands the recipe's monitor to train()
    import vidssl.engine

    calls = []
    monkeypatch.setattr(vidssl.engine, "train", lambda cfg, out, **kw: calls.append(kw) or {
        "step": 0, "logs": {}, "checkpoint": None})
    assert main(base + sets + ["--set", "monitor.probe.every=3"]) == 0
    (mon,) = calls[0]["monitors"]
    assert isinstance(mon, probe.ProbeMonitor) and mon.every == 3 and mon.layer == "layer2"
    assert main(base + sets + ["--set", "monitor.probe.enabled=false"]) == 0 and calls[1]["monitors"] == []
    # a stage the training encoder does not build: refused by the monitor's check before the run folder is made
    cfg = resolve_run_config(None, TINY)
    data = labelled.frame_folders_set(root, clip_len=2, clips_per_video=2)
    with pytest.raises(ConfigError, match=r"monitor.probe.layer: 'layer4' is not built in this encoder"):
        train(cfg, tmp_path / "r", loader=TensorLoader(), progress=False, echo=False,
              monitors=[probe.ProbeMonitor(data, size=16, layer="layer4")])
    assert not (tmp_path / "r").exists()
