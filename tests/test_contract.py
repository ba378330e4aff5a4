"""The objective / encoder / stream contract: a method from outside vidssl trains, resumes and propagates through
the CLI; a method with its own optimisers resumes exactly; two streams mix at their set ratio under DDP; every
built-in method reads exactly the clip length it declares."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vidssl.config import ConfigError
from vidssl.data.streams import batches_drawn, stream_drawn
from vidssl.engine import (encoder_from_checkpoint, load_plugins, model_from_checkpoint, resolve_run_config,
                           train)
from vidssl.engine.checkpoint import read_trainer_state

PLUGINS = Path(__file__).with_name("plugins")
REPO = Path(__file__).resolve().parents[1]


def _env(with_plugin: bool) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([str(PLUGINS)] if with_plugin else []))
    return env


def _run(cmd, cwd, with_plugin=True):
    res = subprocess.run(cmd, env=_env(with_plugin), capture_output=True, text=True, timeout=600, cwd=cwd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "davis"
    _run([sys.executable, "-m", "vidssl", "data", "synth", "--out", str(root), "--format", "davis", "--videos", "2",
          "--val-videos", "1", "--frames", "6", "--size", "64", "64"], cwd=root.parent)
    return root


def _toy_recipe(path: Path, davis: Path, extra: str = "") -> Path:
    path.write_text(f"""name: toy
data: {{source: frames, root: {davis}, split: train, clip_len: 2, crop_size: 32, clips_per_video: 2}}
model: {{encoder: resnet18, out_layer: layer2, eval_layer: layer2}}
objectives: [{{name: toy, clip_len: 2}}]
optim: {{lr: 0.001}}
train: {{steps: 2, batch_size: 2, log_every: 1, ckpt_every: 1, threads: 1, device: cpu}}
{extra}""")
    return path


def test_plugin_objective_trains_resumes_and_propagates_through_the_cli(tmp_path, davis):
    recipe = _toy_recipe(tmp_path / "toy.yaml", davis)
    cmd = [sys.executable, "-m", "vidssl", "pretrain", "--plugin", "toy_plugin", "--config", str(recipe),
           "--out", str(tmp_path / "run"), "--no-progress"]
    _run(cmd, tmp_path)
    res = _run(cmd + ["--set", "train.steps=4"], tmp_path)
    assert "resumed from" in res.stderr and "step_00000002" in res.stderr
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["toy/total_steps"] == 4.0  # the builder saw the run's length
    assert json.loads((tmp_path / "run" / "config.json").read_text())["plugins"] == ["toy_plugin"]
    # propagation needs only the encoder: it works in a process where the plugin is not importable
    _run([sys.executable, "-m", "vidssl", "propagate", "--checkpoint", str(tmp_path / "run"), "--davis-root",
          str(davis), "--year", "2017", "--split", "val", "--out", str(tmp_path / "prop"), "--no-progress"],
         tmp_path, with_plugin=False)
    metrics = json.loads((tmp_path / "prop" / "metrics.json").read_text())
    assert metrics["extra_info"]["source"] == "checkpoint" and metrics["extra_info"]["step"] == 4
    pngs = sorted((tmp_path / "prop" / "synth-val-0000").glob("*.png"))
    gt = sorted((davis / "Annotations" / "480p" / "synth-val-0000").glob("*.png"))
    assert [p.name for p in pngs] == [g.name for g in gt]
    np.testing.assert_array_equal(np.array(Image.open(pngs[0])), np.array(Image.open(gt[0])))


def test_encoder_from_checkpoint_reads_only_the_model_section(tmp_path, davis):
    sys.path.insert(0, str(PLUGINS))
    try:
        load_plugins(["toy_plugin"])
        cfg = resolve_run_config(_toy_recipe(tmp_path / "toy.yaml", davis))
        summary = train(cfg, tmp_path / "run", progress=False, echo=False)
    finally:
        sys.path.remove(str(PLUGINS))
    enc, model_cfg, config, step = encoder_from_checkpoint(summary["checkpoint"])
    full, _, _ = model_from_checkpoint(summary["checkpoint"])
    assert step == 2 and model_cfg.encoder == "resnet18" and model_cfg.colour == "rgb"
    for k, v in full.encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v, rtol=0, atol=0)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _two_opt_cfg(*extra):
    return resolve_run_config(None, ["model.out_layer=layer1", "model.eval_layer=layer1", "data.clip_len=2",
                                     "objectives=[{name: toy2opt}]", "train.batch_size=2", "train.log_every=1",
                                     "train.device=cpu", *extra], plugins=["toy_plugin"])


def test_custom_step_with_two_optimisers_resumes_to_identical_parameters(tmp_path, monkeypatch):
    from test_trainer import TensorLoader

    monkeypatch.syspath_prepend(str(PLUGINS))
    straight = train(_two_opt_cfg("train.steps=4"), tmp_path / "a", loader=TensorLoader(T=2), progress=False,
                     echo=False)
    train(_two_opt_cfg("train.steps=2"), tmp_path / "b", loader=TensorLoader(T=2), progress=False, echo=False)
    state = read_trainer_state(tmp_path / "b")
    assert sorted(state["optimizers"]) == ["encoder", "head"]
    assert state["optimizers"]["encoder"]["state"] and state["optimizers"]["head"]["state"]  # momentum / moments
    resumed = train(_two_opt_cfg("train.steps=4"), tmp_path / "b", loader=TensorLoader(T=2), progress=False,
                    echo=False)
    half, _, _ = model_from_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000002")
    a, _, _ = model_from_checkpoint(straight["checkpoint"])
    b, _, _ = model_from_checkpoint(resumed["checkpoint"])
    for k, v in _params(a).items():
        torch.testing.assert_close(_params(b)[k], v, rtol=0, atol=0, msg=k)
    moved = {k.split(".")[0] for k, v in _params(a).items()
             if v.is_floating_point() and not torch.equal(v, _params(half)[k])}
    assert moved == {"encoder", "objectives"}  # both optimisers stepped after the resume
    logs = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and all("toy2opt/enc" not in r for r in logs)
    assert all(r["loss"] == pytest.approx(r["enc"] + r["head"]) for r in logs)


def test_custom_step_objective_must_run_alone(monkeypatch):
    from vidssl.engine import build_training_model

    monkeypatch.syspath_prepend(str(PLUGINS))
    cfg = resolve_run_config(None, ["objectives=[{name: toy2opt}, {name: crw}]", "data.clip_len=3"],
                             plugins=["toy_plugin"])
    with pytest.raises(ConfigError, match="'toy2opt' runs its own training_step and must be the only objective"):
        build_training_model(cfg)


def test_stream_schedule_is_a_pure_function_of_seed_name_and_step():
    drawn = [stream_drawn(0, "images", k, 0.25) for k in range(4000)]
    assert drawn == [stream_drawn(0, "images", k, 0.25) for k in range(4000)]
    assert abs(sum(drawn) / 4000 - 0.25) < 0.03
    assert drawn != [stream_drawn(1, "images", k, 0.25) for k in range(4000)]
    assert batches_drawn(0, "images", 4000, 0.25) == sum(drawn)
    assert batches_drawn(0, "main", 17, 1.0) == 17


def _image_folder(root: Path, classes=("cat", "dog"), per_class=6):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.slow
def test_two_streams_mix_at_their_ratio_under_two_process_ddp(tmp_path, davis):
    images = _image_folder(tmp_path / "images")
    recipe = _toy_recipe(tmp_path / "toy.yaml", davis, extra=f"""streams:
  images: {{batch_size: 4, weight: 0.5, data: {{source: images, root: {images}, crop_size: 32}}}}
""")
    recipe.write_text(recipe.read_text().replace("objectives: [{name: toy, clip_len: 2}]",
                                                 "objectives: [{name: toy, clip_len: 2, streams: [main, images]}]")
                      .replace("steps: 2, batch_size: 2", "steps: 12, batch_size: 4")
                      .replace("clips_per_video: 2", "clips_per_video: 4").replace("ckpt_every: 1", "ckpt_every: 6"))
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vidssl",
          "pretrain", "--plugin", "toy_plugin", "--config", str(recipe), "--out", str(tmp_path / "run"),
          "--no-progress"], tmp_path)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    drawn = 0
    for r in log:
        assert r["toy/main_items"] == 2  # 4 clips per step over 2 processes
        if stream_drawn(0, "images", r["step"] - 1, 0.5):
            drawn += 1
            assert r["toy/images_items"] == 2 and r["streams/images/items"] == 4
        else:
            assert "toy/images_items" not in r
    assert 0 < drawn < 12


def _declared_and_model(name, overrides):
    """(declared clip length, objective built from its Params through the registry, frame size)."""
    from vidssl.engine.objectives import objective_class
    from vidssl.models.objective import BuildContext

    from tiny_encoder import TinyEncoder

    cls = objective_class(name)
    params = cls.Params(**overrides)
    size = 32
    if name == "timecycle":
        from vidssl.models.encoders import build_encoder

        enc, size = build_encoder("resnet18", out_layer="layer2", padding_mode="zeros"), params.frame_size
    else:
        enc = TinyEncoder()
    model = cls.from_params(enc, params, BuildContext(total_steps=10))
    return cls.data_needs(params).clip_len, model.train(), size


@pytest.mark.parametrize("name, overrides, reads", [
    ("corrflow", {"centroids": [[float(a), float(b)] for a in (-20, 0, 20, 40) for b in (-20, 0, 20, 40)]},
     lambda T: {0, 1, 2}),
    ("mast", {"pair_gaps": [2, 5, 8], "pair_probs": [0.0, 0.0, 1.0]}, lambda T: {0, 8}),
    ("mast", {"stage": "multiframe", "long_term": [0, 1], "short_term": [-3, -2], "roi_radius": 2},
     lambda T: {0, 1, T - 3, T - 2, T - 1}),  # short-term memory and target count from the clip's end
    ("timecycle", {"num_past": 2, "target_index": 2, "frame_size": 168, "patch_size": 56}, lambda T: {0, 1, 2, 3}),
])
def test_declared_clip_length_is_what_forward_reads(name, overrides, reads):
    """The declared length is tight (its last frame is read) and forward reads exactly the frames it documents, for
    the declared length and a longer clip: NaN in every other frame gives the very same loss, a new value in a read
    frame changes it; one frame fewer is refused."""
    torch.manual_seed(0)
    n, model, size = _declared_and_model(name, overrides)
    assert max(reads(n)) == n - 1

    def loss_of(video):
        return float(model({"video": video}, generator=torch.Generator().manual_seed(0))[0].detach())

    for T in (n, n + 2):
        base = torch.rand(1, T, 3, size, size, generator=torch.Generator().manual_seed(T))
        ref = loss_of(base)
        unread = base.clone()
        unread[:, [i for i in range(T) if i not in reads(T)]] = float("nan")
        assert loss_of(unread) == ref, f"{name} read a frame outside {sorted(reads(T))} (T={T})"
        for i in sorted(reads(T)) if T == n else [max(reads(T))]:
            changed = base.clone()
            changed[:, i] = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(100 + i))
            assert loss_of(changed) != ref, f"{name} did not read frame {i} (T={T})"
    with pytest.raises(ValueError):
        model({"video": torch.rand(1, n - 1, 3, size, size)}, generator=torch.Generator().manual_seed(0))


def test_crw_declares_its_shortest_palindrome():
    from vidssl.models.crw import CRW, CRWParams
    from vidssl.models.encoders import build_encoder
    from vidssl.models.objective import BuildContext

    for k in (1, 2, 3):
        p = CRWParams(min_length=k, patch_size=16, patch_stride=8, patch_jitter=None)
        n = CRW.data_needs(p).clip_len
        assert n == k + 1
        model = CRW.from_params(build_encoder("resnet18", out_layer="layer1"), p, BuildContext())
        loss, _ = model({"video": torch.rand(1, n, 3, 32, 32)})
        assert math.isfinite(float(loss.detach()))
        with pytest.raises(ValueError):
            model({"video": torch.rand(1, n - 1, 3, 32, 32)})


def test_two_streams_resume_to_the_same_batches_and_parameters(tmp_path, davis, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    images = _image_folder(tmp_path / "images")
    extra = ["objectives=[{name: toy, clip_len: 2, streams: [main, images]}]",
             f"streams={{images: {{batch_size: 2, weight: 0.5, data: {{source: images, root: {images}, "
             "crop_size: 32}}}"]
    base = ["data.source=frames", f"data.root={davis}", "data.split=train", "data.clip_len=2", "data.crop_size=32",
            "model.out_layer=layer1", "model.eval_layer=layer1", "train.batch_size=2", "train.log_every=1",
            "train.device=cpu", "train.threads=1", "train.seed=5"]  # seed 5: images drawn at steps 2-4 and 6
    cfg = lambda steps: resolve_run_config(None, base + extra + [f"train.steps={steps}"], plugins=["toy_plugin"])
    a = train(cfg(6), tmp_path / "a", progress=False, echo=False)
    train(cfg(3), tmp_path / "b", progress=False, echo=False)
    b = train(cfg(6), tmp_path / "b", progress=False, echo=False)
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    key = lambda r: (r["step"], r["loss"], r.get("toy/images_items"), r.get("toy/images_label_sum"))
    assert [key(r) for r in la] == [key(r) for r in lb]
    assert [r["step"] for r in la if "toy/images_items" in r] == [2, 3, 4, 6]
    ma, _, _ = model_from_checkpoint(a["checkpoint"])
    mb, _, _ = model_from_checkpoint(b["checkpoint"])
    for k, v in _params(ma).items():
        torch.testing.assert_close(_params(mb)[k], v, rtol=0, atol=0, msg=k)


def test_format_1_trainer_state_still_resumes(tmp_path):
    """Checkpoints written before several optimisers existed stored one ``optimizer`` (and ``scaler``)."""
    from test_trainer import TensorLoader, tiny_cfg

    straight = train(tiny_cfg("train.steps=4"), tmp_path / "a", loader=TensorLoader(), progress=False, echo=False)
    half = train(tiny_cfg("train.steps=2"), tmp_path / "b", loader=TensorLoader(), progress=False, echo=False)
    state = read_trainer_state(half["checkpoint"])
    old = {"optimizer": state["optimizers"]["main"], "scaler": {}, "step": state["step"], "rng": state["rng"]}
    torch.save(old, Path(half["checkpoint"]) / "trainer.pt")
    resumed = train(tiny_cfg("train.steps=4"), tmp_path / "b", loader=TensorLoader(), progress=False, echo=False)
    a, _, _ = model_from_checkpoint(straight["checkpoint"])
    b, _, _ = model_from_checkpoint(resumed["checkpoint"])
    for k, v in _params(a).items():
        torch.testing.assert_close(_params(b)[k], v, rtol=0, atol=0, msg=k)
