"""MAST / CorrFlow propagation protocols: memory bookkeeping, ROI dilation, label downsampling, tracking sanity,
CorrFlow crop/pad, the feature extractor, and a checkpoint round trip into propagation."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vidssl.evaluation.features import WindowFeatures, crop_to_multiple
from vidssl.evaluation.mast_propagation import (corrflow_preset, labels_at_features, mast_memory_indices,
                                                mast_preset, pad_to_size, propagate_sequence_window,
                                                propagate_video_corrflow, propagate_video_mast, roi_dilation)
from vidssl.models.lab import normalise_lab, rgb_to_lab
from vidssl.models.mast_encoder import MASTEncoder

from davis_scores import rescored_j_mean  # tests/davis_scores.py


def test_memory_bank_holds_the_official_frames():
    # benchmark.py --ref 0: long-term {0, 5} (<= i) + short-term {i, i-2, i-4} (> 0), sorted, for target i + 1
    expected = {1: [0], 2: [0, 1], 3: [0, 2], 4: [0, 1, 3], 5: [0, 2, 4], 6: [0, 1, 3, 5], 7: [0, 2, 4, 5, 6],
                8: [0, 3, 5, 7], 9: [0, 4, 5, 6, 8], 20: [0, 5, 15, 17, 19]}
    for t, refs in expected.items():
        assert mast_memory_indices(t) == refs, t
    assert mast_memory_indices(7, memory="first_short") == [0, 2, 4, 6]  # --ref 1
    assert mast_memory_indices(1, memory="first_short") == [0]
    assert mast_memory_indices(7, memory="previous") == [6]  # --ref 2
    with pytest.raises(ValueError, match="target"):
        mast_memory_indices(0)


def test_roi_dilation_schedule():
    # a reference is searched with ROI when it is more than 15 frames back; dilation min(4, gap // 15 + 1)
    assert [roi_dilation(g) for g in (1, 15, 16, 29, 30, 44, 45, 200)] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_features_requested_once_and_dropped_when_no_longer_needed():
    t_total, h, w = 24, 6, 7
    feats = torch.randn(t_total, 8, h, w, generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    def provider(t):
        calls.append(t)
        return feats[t]

    ids0 = torch.zeros(h * 4, w * 4, dtype=torch.long)
    ids0[4:12, 8:20] = 1
    out = propagate_video_mast(provider, ids0, num_frames=t_total, cfg=mast_preset())
    assert calls == list(range(t_total))  # every frame computed exactly once, in order: the cache kept what was needed
    ref = propagate_video_mast(feats, ids0, cfg=mast_preset())
    assert torch.equal(out, ref) and out.shape == (t_total, h * 4, w * 4) and out.dtype == torch.uint8


def test_labels_at_features_modes():
    ids = torch.zeros(9, 10, dtype=torch.long)
    ids[:, 5:] = 2
    strided = labels_at_features(ids, num_classes=7, size=(3, 3), mode="strided")
    assert strided.shape == (7, 3, 3) and strided.argmax(0).tolist() == [[0, 0, 2]] * 3
    ids2 = torch.zeros(8, 8, dtype=torch.long)
    ids2[:, 4:] = 3
    bil = labels_at_features(ids2, num_classes=16, size=(1, 2), mode="bilinear_ids")
    assert bil.argmax(0).tolist() == [[0, 3]]
    edge = torch.zeros(4, 4, dtype=torch.long)
    edge[:, 2:] = 2
    assert labels_at_features(edge, num_classes=16, size=(1, 1), mode="bilinear_ids").argmax(0).item() == 1  # quirk
    with pytest.raises(ValueError, match="num_classes"):
        labels_at_features(torch.full((8, 8), 7), num_classes=7, size=(2, 2))
    # resized input: labels are nearest-resized to the input size before the stride
    big = torch.zeros(16, 16, dtype=torch.long)
    big[8:, :] = 1
    assert labels_at_features(big, num_classes=7, size=(2, 2), input_size=(8, 8)).argmax(0).tolist() == [[0, 0],
                                                                                                       [1, 1]]


def position_features(t_total: int, h: int, w: int, motion: tuple[int, int]) -> torch.Tensor:
    """One-hot position codes (scaled) of a scene translated by ``motion`` cells per frame: frame t's cell (y, x)
    shows scene point (y - t*dy, x - t*dx)."""
    my, mx = t_total * abs(motion[0]), t_total * abs(motion[1])
    hs, ws = h + 2 * my + 1, w + 2 * mx + 1
    scene = torch.eye(hs * ws).reshape(hs * ws, hs, ws) * 30.0
    frames = []
    for t in range(t_total):
        oy = my - t * motion[0]
        ox = mx - t * motion[1]
        frames.append(scene[:, oy:oy + h, ox:ox + w])
    return torch.stack(frames)


@pytest.mark.parametrize("protocol", ["mast", "corrflow"])
def test_tracks_a_translating_square(protocol):
    t_total, h, w = 8, 10, 15
    feats = position_features(t_total, h, w, motion=(0, 1))  # one feature cell (4 px) to the right per frame
    ids0 = torch.zeros(h * 4, w * 4, dtype=torch.long)
    ids0[12:28, 8:24] = 1  # 4x4 cells, aligned with the stride-4 grid
    if protocol == "mast":
        out = propagate_video_mast(feats, ids0)
    else:
        out = propagate_video_corrflow(feats, ids0)
    for t in (1, 4, 7):
        truth = torch.zeros_like(ids0)
        truth[12:28, 8 + 4 * t:24 + 4 * t] = 1
        inter = ((out[t] == 1) & (truth == 1)).sum()
        union = ((out[t] == 1) | (truth == 1)).sum()
        assert float(inter) / float(union) > 0.8, (protocol, t)


def test_identity_features_keep_the_first_frame_labels():
    t_total, h, w = 5, 8, 9
    feats = position_features(t_total, h, w, motion=(0, 0))
    ids0 = torch.zeros(h * 4, w * 4, dtype=torch.long)
    ids0[8:20, 4:24] = 1
    ids0[20:32, 24:36] = 2
    out = propagate_video_mast(feats, ids0)
    for t in range(1, t_total):
        assert (out[t].long() == ids0).float().mean() > 0.97


def test_corrflow_crop_and_pad():
    assert crop_to_multiple(480, 854, 8) == (480, 848) and crop_to_multiple(480, 910, 8) == (480, 904)
    ids = torch.arange(6).repeat(2, 1)  # (2, 6)
    padded = pad_to_size(ids, (2, 12))
    assert padded.shape == (2, 12) and padded[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 5, 5, 5]
    frames = torch.randint(0, 256, (3, 3, 20, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ext = WindowFeatures(None, colour="rgb", crop_multiple=8)
    assert ext.input_size(20, 30) == (16, 24) and ext.feature_size(20, 30) == (4, 6)
    first = torch.zeros(20, 30, dtype=torch.long)
    first[4:12, 8:20] = 1
    written = {}
    out = propagate_sequence_window(frames, first, extractor=ext, cfg=corrflow_preset(),
                                    on_frame=lambda t, ids: written.__setitem__(t, ids.clone()))
    assert out.shape == (3, 20, 30) and torch.equal(out[0].long(), first)
    assert sorted(written) == [0, 1, 2] and all(v.shape == (20, 30) for v in written.values())
    assert torch.equal(written[2].to(torch.uint8), out[2])


def test_window_features_preprocessing():
    frames = torch.randint(0, 256, (2, 3, 24, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    enc = MASTEncoder()
    ext = WindowFeatures(enc, colour="lab")
    x = ext.preprocess(frames)
    torch.testing.assert_close(x, normalise_lab(rgb_to_lab(frames.float() / 255)))
    assert ext(frames).shape == (2, 64, 6, 10)
    small = WindowFeatures(enc, colour="lab", short_side=12)
    assert small.input_size(24, 40) == (12, 20) and small(frames).shape == (2, 64, 3, 5)
    lab = WindowFeatures(None, colour="lab")
    assert lab(frames).shape == (2, 3, 6, 10) and lab.info()["kind"] == "lab_pixels"
    with pytest.raises(ValueError, match="colour"):
        WindowFeatures(enc, colour="hsv")


def _tiny_davis(root: Path, names: list[str], frames: int = 4, size: tuple[int, int] = (32, 40)) -> None:
    """DAVIS-2016-like folder: a bright square moving right on a textured background, masks 0/255."""
    from PIL import Image

    g = np.random.default_rng(0)
    for name in names:
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True)
        bg = (g.random((size[0], size[1] + 20, 3)) * 120).astype(np.uint8)
        for t in range(frames):
            img = bg[:, 2 * t:2 * t + size[1]].copy()
            mask = np.zeros(size, np.uint8)
            mask[8:20, 8 + 2 * t:20 + 2 * t] = 255
            img[mask > 0] = (230, 60, 40)
            Image.fromarray(img).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            Image.fromarray(mask, mode="L").save(root / "Annotations" / "480p" / name / f"{t:05d}.png")
    (root / "ImageSets" / "2016").mkdir(parents=True)
    (root / "ImageSets" / "2016" / "sample.txt").write_text("\n".join(names) + "\n")


def test_checkpoint_round_trip_into_propagation(tmp_path):
    from vidssl.data.davis import frame_paths, load_annotations
    from vidssl.engine.checkpoint import read_weights, save_checkpoint
    from vidssl.models.mast import MAST

    torch.manual_seed(0)
    model = MAST(MASTEncoder())  # the objective owns the shared encoder, saved under "encoder.*" like the trainer
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the seed-0 init: the loaded weights must be these
    weights = {"encoder." + k: v for k, v in model.encoder.state_dict().items()}
    config = {"name": "t", "model": {"encoder": "mast_resnet18"}, "objectives": [{"name": "mast", "params": {}}]}
    ckpt = save_checkpoint(tmp_path / "run", step=3, weights=weights, trainer_state={"step": 3}, config=config)
    loaded, cfg_back, step = read_weights(ckpt)
    assert step == 3 and cfg_back["model"]["encoder"] == "mast_resnet18"
    enc = MASTEncoder()
    enc.load_state_dict({k[len("encoder."):]: v for k, v in loaded.items() if k.startswith("encoder.")})

    root = tmp_path / "davis"
    _tiny_davis(root, ["a"])
    frames = frame_paths(root, "a")
    first = torch.from_numpy(load_annotations(root, "a", year="2016").ids[0].astype(np.int64))
    out_loaded = propagate_sequence_window(frames, first, extractor=WindowFeatures(enc), cfg=mast_preset())
    out_direct = propagate_sequence_window(frames, first, extractor=WindowFeatures(model.encoder), cfg=mast_preset())
    assert torch.equal(out_loaded, out_direct) and out_loaded.shape == (4, 32, 40)


def test_propagate_cli_with_mast_preset(tmp_path):
    """End to end through the CLI and the runner: a random-init mast_resnet18 under the mast preset."""
    from vidssl.cli import main

    root = tmp_path / "davis"
    _tiny_davis(root, ["a", "b"])
    out = tmp_path / "res"
    rc = main(["propagate", "--encoder", "mast_resnet18", "--preset", "mast", "--davis-root", str(root),
               "--year", "2016", "--split", "sample", "--out", str(out), "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    g = metrics["global"]
    assert metrics["preset"] == "mast" and metrics["hyperparameters"]["window"]["radius"] == 12
    assert g["J-Mean"] == pytest.approx(rescored_j_mean(root, out, ["a", "b"], year="2016"), abs=1e-6)
    assert g["J&F-Mean"] == pytest.approx((g["J-Mean"] + g["F-Mean"]) / 2, abs=1e-6)
    assert sorted(os.listdir(out / "a")) == [f"{t:05d}.png" for t in range(4)]


@pytest.mark.parametrize("colour", ["lab", "rgb"])
def test_common_presets_read_the_stride4_encoder_like_the_window_reader(colour):
    """Under crw/dino the CorrFlow/MAST encoder's head is fed exactly what its own window reader feeds it."""
    from vidssl.evaluation.features import EncoderFeatures

    torch.manual_seed(0)
    enc = MASTEncoder().eval()
    frames = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    common = EncoderFeatures(enc, layer="head", colour=colour)
    assert (common.stride, common.channels) == (4, 64)
    torch.testing.assert_close(common(frames), WindowFeatures(enc, colour=colour)(frames), rtol=0, atol=0)


def test_mast_checkpoint_under_the_crw_preset_through_the_cli(tmp_path):
    """A MAST run is scored under the common crw protocol (stride-4 head, Lab input) and the run records it."""
    from vidssl.cli import main
    from vidssl.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    enc = MASTEncoder()
    config = {"name": "m", "model": {"encoder": "mast_resnet18", "padding_mode": "zeros", "colour": "lab"},
              "objectives": [{"name": "mast", "params": {}}]}
    save_checkpoint(tmp_path / "run", step=1, weights={"encoder." + k: v for k, v in enc.state_dict().items()},
                    trainer_state={"step": 1}, config=config)
    root = tmp_path / "davis"
    _tiny_davis(root, ["a"])
    out = tmp_path / "res"
    assert main(["propagate", "--checkpoint", str(tmp_path / "run"), "--preset", "crw", "--davis-root", str(root),
                 "--year", "2016", "--split", "sample", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == "crw" and metrics["hyperparameters"]["layer"] == "head"
    assert metrics["extractor"]["stride"] == 4 and metrics["extractor"]["colour"] == "lab"
    assert sorted(os.listdir(out / "a")) == [f"{t:05d}.png" for t in range(4)]


@pytest.mark.parametrize("preset", ["crw", "mast"])
def test_truncated_mast_checkpoint_propagates_from_its_last_stage(tmp_path, preset):
    """A run with ``model.out_layer: layer2`` (the demo's truncated trunk) rebuilds from its checkpoint alone and is
    read at layer2 (128 channels, stride 4) under a common and a window preset; the run records the layer."""
    from vidssl.cli import main
    from vidssl.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    enc = MASTEncoder(out_layer="layer2")
    config = {"name": "m", "model": {"encoder": "mast_resnet18", "out_layer": "layer2", "padding_mode": "zeros",
                                     "colour": "lab"}, "objectives": [{"name": "mast", "params": {}}]}
    save_checkpoint(tmp_path / "run", step=1, weights={"encoder." + k: v for k, v in enc.state_dict().items()},
                    trainer_state={"step": 1}, config=config)
    root = tmp_path / "davis"
    _tiny_davis(root, ["a"])
    out = tmp_path / "res"
    assert main(["propagate", "--checkpoint", str(tmp_path / "run"), "--preset", preset, "--davis-root", str(root),
                 "--year", "2016", "--split", "sample", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["preset"] == preset and metrics["extractor"]["channels"] == 128
    if preset == "crw":
        assert metrics["hyperparameters"]["layer"] == "layer2" and metrics["extractor"]["stride"] == 4
    assert sorted(os.listdir(out / "a")) == [f"{t:05d}.png" for t in range(4)]
