"""Training engine: checkpoint round trip, resume continuity, crash safety, logging."""

import json
from pathlib import Path

import pytest
import torch

from vidssl.engine import model_from_checkpoint, resolve_run_config, train
from vidssl.engine.checkpoint import checkpoint_dirs, latest_checkpoint, read_trainer_state, read_weights
from vidssl.engine.trainer import lr_at
from vidssl.engine.config import OptimConfig


class TensorLoader:
    """A deterministic in-memory loader with the engine's loader interface (set_epoch, len, iter, skipped)."""

    def __init__(self, num_clips=8, batch_size=2, T=3, size=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.clips = torch.rand(num_clips, T, 3, size, size, generator=g)
        self.batch_size, self.epoch, self.skipped = batch_size, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.clips) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.clips), generator=torch.Generator().manual_seed(100 + self.epoch))
        for b in range(len(self)):
            yield {"video": self.clips[order[b * self.batch_size:(b + 1) * self.batch_size]]}


TINY = ["model.out_layer=layer2", "model.eval_layer=layer2", "data.clip_len=3",
        "objectives.0.patch_size=16", "objectives.0.patch_stride=8", "train.batch_size=2",
        "optim.lr=1e-3", "train.log_every=1", "data.source=synthetic"]


def tiny_cfg(*extra):
    return resolve_run_config(None, TINY + list(extra))


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedules():
    c = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(0, c, 10) == 0.5 and lr_at(1, c, 10) == 1.0
    assert lr_at(10, c, 10) == pytest.approx(0.1)
    m = OptimConfig(lr=1.0, schedule="multistep", milestones=[3, 5], gamma=0.5)
    assert [lr_at(s, m, 10) for s in (2, 3, 5)] == [1.0, 0.5, 0.25]


def test_checkpoint_round_trip_rebuilds_from_file_alone(tmp_path):
    cfg = tiny_cfg("train.steps=2")
    summary = train(cfg, tmp_path / "run", loader=TensorLoader(), progress=False, echo=False)
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer.pt").is_file()
    model, cfg2, step = model_from_checkpoint(ckpt / "model.safetensors")
    assert step == 2 and cfg2.model.out_layer == "layer2"
    weights, config, _ = read_weights(tmp_path / "run")
    from vidssl.engine.checkpoint import dedup_state_dict

    assert sorted(weights) == sorted(dedup_state_dict(model.state_dict()))  # shared encoder stored once
    assert {k.split(".")[0] for k in weights} == {"encoder", "objectives"}
    assert not any(k.startswith("objectives.crw.encoder.") for k in weights)
    sd = model.state_dict()
    for k, v in weights.items():
        torch.testing.assert_close(sd[k], v)
    state = read_trainer_state(ckpt)  # loads with weights_only=True: no pickled objects
    assert state["step"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config


def test_resume_reaches_the_same_parameters(tmp_path):
    full = train(tiny_cfg("train.steps=6", "train.ckpt_every=100"), tmp_path / "a", loader=TensorLoader(),
                 progress=False, echo=False)
    # stopped at step 3 (a run of 3 steps), then resumed automatically in the same folder to 6
    train(tiny_cfg("train.steps=3"), tmp_path / "b", loader=TensorLoader(), progress=False, echo=False)
    resumed = train(tiny_cfg("train.steps=6", "train.ckpt_every=100"), tmp_path / "b", loader=TensorLoader(),
                    progress=False, echo=False)
    a, _, _ = read_weights(full["checkpoint"])
    b, _, _ = read_weights(resumed["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_cfg("train.steps=2"), run, loader=TensorLoader(), progress=False, echo=False)
    good = latest_checkpoint(run)
    before, _, _ = read_weights(good)

    import vidssl.engine.checkpoint as ck

    def exploding_save(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_cfg("train.steps=4"), run, loader=TensorLoader(), progress=False, echo=False)
    monkeypatch.undo()
    assert latest_checkpoint(run) == good
    after, _, _ = read_weights(run)
    for k in before:
        torch.testing.assert_close(before[k], after[k])
    assert not [d for d in (run / "checkpoints").iterdir() if d.name.startswith(".tmp-")]
    assert read_trainer_state(run)["step"] == 2


def test_keeps_only_the_newest_checkpoints(tmp_path):
    train(tiny_cfg("train.steps=4", "train.ckpt_every=1", "train.keep_checkpoints=2"), tmp_path / "r",
          loader=TensorLoader(), progress=False, echo=False)
    assert [d.name for d in checkpoint_dirs(tmp_path / "r")] == ["step_00000003", "step_00000004"]


def test_log_has_timings_and_throughput(tmp_path):
    train(tiny_cfg("train.steps=2"), tmp_path / "r", loader=TensorLoader(), progress=False, echo=False)
    rec = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "lr", "data_time", "step_time", "clips_per_s", "skipped", "crw/xent_2"):
        assert key in rec


def test_clip_too_short_for_objective(tmp_path):
    with pytest.raises(ValueError, match=r"data.clip_len: 2 is too short for objective .crw. \(objectives.0\), "
                                         r"which reads 3 frames"):
        train(tiny_cfg("data.clip_len=2"), tmp_path / "r", loader=TensorLoader(T=2), progress=False, echo=False)


def test_train_amp_resolves_per_device(monkeypatch):
    from vidssl.engine import trainer

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda native=native: native)
        assert trainer.effective_amp("native", cpu) == ("bf16" if native else "off")
        assert [trainer.effective_amp(a, cpu) for a in ("auto", "off", "bf16", "fp16")] == ["off", "off", "bf16", "off"]
    assert [trainer.effective_amp(a, cuda) for a in ("auto", "off", "bf16", "fp16", "native")] == [
        "bf16", "off", "bf16", "fp16", "bf16"]


def test_bf16_autocast_and_channels_last_on_the_cpu(tmp_path, capsys, monkeypatch):
    """train.amp=bf16 runs the step under CPU autocast (the loss differs from fp32 but stays close: the loss
    arithmetic is fp32), channels_last keeps the weights channels-last, and the checkpoint holds the trained weights."""
    from vidssl.engine import trainer

    built = []
    build = trainer.build_training_model
    monkeypatch.setattr(trainer, "build_training_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    losses = {}
    for amp in ("off", "bf16"):
        cfg = tiny_cfg("train.steps=1", f"train.amp={amp}", "train.channels_last=true")
        summary = train(cfg, tmp_path / amp, loader=TensorLoader(), progress=False, echo=False)
        losses[amp] = json.loads((tmp_path / amp / "log.jsonl").read_text().splitlines()[0])["loss"]
        conv = built[-1].encoder.conv1
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        weights, _, _ = read_weights(Path(summary["checkpoint"]))
        torch.testing.assert_close(weights["encoder.conv1.weight"], conv.weight.detach())
    assert "autocast bf16 on cpu (train.amp=bf16)" in capsys.readouterr().err
    assert losses["bf16"] != losses["off"] and losses["bf16"] == pytest.approx(losses["off"], rel=0.05)


def _folder_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


INSTANCE = ["objectives.0.name=instance", "objectives.0.negatives=queue", "objectives.0.queue_size=8",
            "objectives.0.dim=8", "objectives.0.bn_splits=2", "model.out_layer=layer2", "model.eval_layer=layer2",
            "data.clip_len=3", "train.batch_size=2", "train.log_every=1", "data.source=synthetic", "optim.lr=1e-3"]


@pytest.mark.parametrize("bad, key, clips", [
    (["objectives.0.queue_size=7"], "queue_size", 8),  # refused by the objective's builder (7 % batch 2)
    (["optim.param_groups=[{pattern: 'nothing.*', lr: 0.1}]"], "optim.param_groups.0.pattern", 8),  # the optimiser
    (["objectives.0.queue_size=16"], "queue.queue", 8),  # the checkpoint to resume (queue of 8 stored)
    (["train.batch_size=8"], "batch size", 4),  # the loader: fewer clips than a batch
])
def test_a_rejected_rerun_leaves_the_run_folder_byte_identical(tmp_path, bad, key, clips):
    """Every check that can refuse a config runs before the first write: config.json, log.jsonl and the
    checkpoints of the run already in the folder stay as they were."""
    run = tmp_path / "run"
    train(resolve_run_config(None, INSTANCE + ["train.steps=2"]), run, loader=TensorLoader(), progress=False,
          echo=False)
    before = _folder_bytes(run)
    assert {"config.json", "log.jsonl"} <= set(before) and any(k.startswith("checkpoints/") for k in before)
    cfg = resolve_run_config(None, INSTANCE + ["train.steps=4"] + bad)  # a valid config as far as keys go
    loader = TensorLoader(num_clips=clips, batch_size=cfg.train.batch_size)
    with pytest.raises((ValueError, RuntimeError), match=key):
        train(cfg, run, loader=loader, progress=False, echo=False)
    assert _folder_bytes(run) == before
    if key == "queue.queue":
        return  # a fresh folder has nothing to resume
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=key):
        train(cfg, fresh, loader=loader, progress=False, echo=False)
    assert not fresh.exists()  # not even the folder
