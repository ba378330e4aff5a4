"""Tests for the synthetic video generator (vidssl.data.synthetic): tiny videos, all made in the test."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from vidssl.config import ConfigError, from_dict, to_dict
from vidssl.data.synthetic import (
    SynthConfig,
    decode_frame_index,
    frame_index_video,
    generate_multishot,
    generate_video,
    write_davis,
    write_multishot,
    write_videos,
)
from vidssl.io import write_video
from vidssl.io.images import DAVIS_PALETTE, read_image, read_label_png

from decoded import decode_all  # tests/decoded.py

SMALL = SynthConfig(num_frames=8, height=64, width=64)
STILL = dict(max_speed=0.0, max_rotation=0.0, deform=0.0, scale_range=(1.0, 1.0), camera_pan=0.0,
             lighting_drift=0.0, noise_std=0.0)


def _visible(video) -> np.ndarray:
    """(T, N) visible pixel count of each object id."""
    return np.stack([(video.masks == k).sum(axis=(1, 2)) for k in range(1, video.num_objects + 1)], axis=1)


# ---------------------------------------------------------------------------------------------- config


def test_config_round_trips_through_from_dict():
    cfg = SynthConfig(num_frames=5, object_size=(0.1, 0.2), occlusion=False, seed=7)
    assert from_dict(SynthConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize("key,value", [("height", 4), ("object_size", [0.3, 0.45]), ("min_objects", 0),
                                       ("num_colours", 1), ("lighting_drift", 1.5)])
def test_bad_config_names_the_field(key, value):
    with pytest.raises(ConfigError, match=key):
        from_dict(SynthConfig, {key: value})


# ---------------------------------------------------------------------------------------------- generate_video


def test_deterministic_and_seeded():
    a = generate_video(3, SMALL)
    b = generate_video(3, SMALL)
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.masks, b.masks)
    other_seed = generate_video(3, dataclasses.replace(SMALL, seed=1))
    other_index = generate_video(4, SMALL)
    assert not np.array_equal(a.frames, other_seed.frames)
    assert not np.array_equal(a.frames, other_index.frames)


def test_shapes_dtypes_and_ids():
    cfg = dataclasses.replace(SMALL, height=48, width=80, min_objects=2, max_objects=4)
    counts = set()
    for i in range(6):
        v = generate_video(i, cfg)
        assert v.frames.shape == (8, 48, 80, 3) and v.frames.dtype == np.uint8
        assert v.masks.shape == (8, 48, 80) and v.masks.dtype == np.uint8
        assert 2 <= v.num_objects <= 4
        assert set(np.unique(v.masks).tolist()) <= set(range(v.num_objects + 1))
        assert sorted(v.depth_order) == list(range(1, v.num_objects + 1))
        assert v.centers.shape == (8, v.num_objects, 2) and v.camera.shape == (8, 2)
        counts.add(v.num_objects)
    assert len(counts) > 1  # the object count varies


def test_first_frame_holds_every_object():
    cfg = dataclasses.replace(SMALL, min_objects=3, max_objects=4)
    for i in range(8):
        v = generate_video(i, cfg)
        assert set(np.unique(v.masks[0]).tolist()) == set(range(v.num_objects + 1))
        visible = _visible(v)[0]
        assert np.all(visible >= cfg.min_first_visible * v.areas[0])


def test_objects_move_so_copying_the_first_mask_is_wrong():
    for i in range(4):
        v = generate_video(i, SMALL)
        shifts = []
        for k in range(1, v.num_objects + 1):
            ys0, xs0 = np.nonzero(v.masks[0] == k)
            ys1, xs1 = np.nonzero(v.masks[-1] == k)
            if len(xs1):
                shifts.append(np.hypot(xs1.mean() - xs0.mean(), ys1.mean() - ys0.mean()))
        assert max(shifts) > 1.0
        assert not np.array_equal(v.masks[0], v.masks[-1])


def test_occlusion_is_consistent_and_happens():
    occluded_videos = 0
    for i in range(8):
        v = generate_video(i, SMALL)
        visible = _visible(v)
        assert np.all(visible <= v.areas)
        front = v.depth_order[-1]
        np.testing.assert_array_equal(visible[:, front - 1], v.areas[:, front - 1])  # nothing covers the front
        occluded_videos += bool(np.any(visible < v.areas))
    assert occluded_videos >= 1


def test_no_occlusion_keeps_objects_apart():
    cfg = dataclasses.replace(SMALL, occlusion=False, min_objects=2, max_objects=3)
    for i in range(6):
        v = generate_video(i, cfg)
        np.testing.assert_array_equal(_visible(v), v.areas)


def _colour_only_object_recall(frame: np.ndarray, mask: np.ndarray, bins: int = 8) -> float:
    """Best per-pixel colour classifier fitted on this very frame (majority label per quantised RGB bin): the
    fraction of object pixels it labels correctly. An upper bound for any colour-only segmentation of the frame."""
    q = frame.astype(np.int64) * bins // 256
    key = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    hist = np.zeros((bins ** 3, int(mask.max()) + 1), dtype=np.int64)
    np.add.at(hist, (key.ravel(), mask.ravel()), 1)
    pred = hist.argmax(axis=1)[key]
    obj = mask > 0
    return float((pred[obj] == mask[obj]).mean())


def test_colour_alone_is_ambiguous():
    shared = [_colour_only_object_recall(v.frames[0], v.masks[0])
              for v in (generate_video(i, SMALL) for i in range(6))]
    # control: with private object colours the same classifier does find the objects, so the check can fail
    private_cfg = dataclasses.replace(SMALL, shared_palette=False)
    private = [_colour_only_object_recall(v.frames[0], v.masks[0])
               for v in (generate_video(i, private_cfg) for i in range(6))]
    assert np.mean(shared) < 0.2
    assert np.mean(private) > 0.8


def test_still_scene_is_static_and_lighting_changes_only_intensity():
    still = generate_video(1, dataclasses.replace(SMALL, **STILL))
    assert np.array_equal(still.frames[0], still.frames[-1])
    lit = generate_video(1, dataclasses.replace(SMALL, **{**STILL, "lighting_drift": 0.3}))
    np.testing.assert_array_equal(lit.masks, still.masks)
    np.testing.assert_array_equal(lit.frames[0], still.frames[0])  # the drift starts at 0
    assert np.abs(lit.frames[-1].astype(int) - still.frames[-1]).mean() > 5


def test_camera_pan_translates_the_whole_scene():
    cfg = dataclasses.replace(SMALL, **{**STILL, "camera_pan": 2.0, "num_frames": 16})
    for i in range(4):
        v = generate_video(i, cfg)
        d = (v.camera[-1] - v.camera[0]).astype(int)
        if np.any(d != 0):
            break
    else:
        pytest.fail("the camera never moved")
    dx, dy = d
    h, w = cfg.height, cfg.width
    # image_t(y, x) = image_0(y + dy, x + dx): compare on the overlap, background pixels only
    a = v.frames[-1][max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    b = v.frames[0][max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    ma = v.masks[-1][max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    mb = v.masks[0][max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    both_bg = (ma == 0) & (mb == 0)
    assert both_bg.sum() > 0.3 * h * w
    np.testing.assert_array_equal(a[both_bg], b[both_bg])
    np.testing.assert_allclose(v.centers[-1], v.centers[0] - (v.camera[-1] - v.camera[0]), atol=1e-3)


def test_full_size_frame_works():
    v = generate_video(0, SynthConfig(num_frames=2, height=480, width=854))
    assert v.frames.shape == (2, 480, 854, 3)
    assert set(np.unique(v.masks[0]).tolist()) == set(range(v.num_objects + 1))


# ---------------------------------------------------------------------------------------------- DAVIS tree


def test_davis_tree_layout(tmp_path):
    root = write_davis(tmp_path / "synth", SMALL, num_train=2, num_val=2)
    sets = root / "ImageSets" / "2017"
    assert (sets / "train.txt").read_text().split() == ["synth-train-0000", "synth-train-0001"]
    assert (sets / "val.txt").read_text().split() == ["synth-val-0000", "synth-val-0001"]
    meta = json.loads((root / "synth.json").read_text())
    assert from_dict(SynthConfig, meta["config"]) == SMALL and meta["complete"] is True
    firsts = []
    for name in ["synth-train-0000", "synth-train-0001", "synth-val-0000", "synth-val-0001"]:
        jpgs = sorted((root / "JPEGImages" / "480p" / name).glob("*.jpg"))
        pngs = sorted((root / "Annotations" / "480p" / name).glob("*.png"))
        assert [p.stem for p in jpgs] == [f"{t:05d}" for t in range(8)] == [p.stem for p in pngs]
        ids, palette = read_label_png(pngs[0])
        assert palette is not None and palette[:768] == list(DAVIS_PALETTE)
        img = read_image(jpgs[0])
        assert tuple(img.shape) == (3, 64, 64)
        firsts.append(img.numpy())
        if name.startswith("synth-val"):
            index = 2 * int(name[-4:]) + 1
            v = generate_video(index, SMALL)
            assert set(np.unique(ids).tolist()) == set(range(v.num_objects + 1))
            np.testing.assert_array_equal(ids, v.masks[0])
            jpeg_error = np.abs(img.numpy().transpose(1, 2, 0).astype(int) - v.frames[0]).mean()
            assert jpeg_error < 0.25 * np.abs(v.frames[0].astype(int) - v.frames[0][::-1, ::-1]).mean()
    for i in range(len(firsts)):  # train and val hold different videos
        for j in range(i + 1, len(firsts)):
            assert not np.array_equal(firsts[i], firsts[j])


def test_davis_is_cached_and_refuses_foreign_folders(tmp_path):
    root = tmp_path / "synth"
    write_davis(root, SMALL, num_train=1, num_val=1)
    jpg = root / "JPEGImages" / "480p" / "synth-val-0000" / "00003.jpg"
    before = jpg.stat().st_mtime_ns, (root / "synth.json").stat().st_mtime_ns
    write_davis(root, SMALL, num_train=1, num_val=1)
    assert (jpg.stat().st_mtime_ns, (root / "synth.json").stat().st_mtime_ns) == before  # nothing rewritten

    with pytest.raises(FileExistsError, match="synth") as info:
        write_davis(root, dataclasses.replace(SMALL, seed=5), num_train=1, num_val=1)
    assert str(root) in str(info.value) and "seed" in str(info.value)
    with pytest.raises(FileExistsError, match="num_val"):
        write_davis(root, SMALL, num_train=1, num_val=2)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(foreign)):
        write_davis(foreign, SMALL, num_train=1, num_val=1)
    assert (foreign / "notes.txt").read_text() == "keep me"

    jpg.unlink()  # an incomplete tree of ours is completed
    write_davis(root, SMALL, num_train=1, num_val=1)
    assert jpg.is_file()


# ---------------------------------------------------------------------------------------------- mp4


def test_write_videos(tmp_path):
    cfg = dataclasses.replace(SMALL, num_frames=4)
    paths = write_videos(tmp_path, cfg, num_videos=2, lossless=True)
    assert [p.name for p in paths] == ["synth-0000.mp4", "synth-0001.mp4"]
    decoded, _, _ = decode_all(paths[1])
    np.testing.assert_array_equal(np.stack(decoded), generate_video(1, cfg).frames)


# ---------------------------------------------------------------------------------------------- multi-shot


def _colour_distance(frames: np.ndarray) -> np.ndarray:
    """(T-1,) mean per-channel 1-D Wasserstein distance between the colour distributions of consecutive frames (a
    histogram-style shot-detector signal, insensitive to where the colours are)."""
    s = np.sort(frames.reshape(len(frames), -1, 3).astype(np.float32), axis=1)
    return np.abs(np.diff(s, axis=0)).mean(axis=(1, 2))


def test_multishot_cuts_are_where_the_frames_jump():
    for i in range(4):
        m = generate_multishot(i, SMALL, num_shots=4)
        assert len(m.cuts) == 3 and m.cuts == sorted(m.cuts) and 0 < m.cuts[0]
        assert [len(x) for x in m.masks] == np.diff([0, *m.cuts, m.num_frames]).tolist()
        before_cut = np.array(m.cuts) - 1  # signal[t] compares frames t and t + 1
        pixel = np.abs(np.diff(m.frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
        for signal in (pixel, _colour_distance(m.frames)):
            # the three largest jumps are exactly the cuts, with a clear margin
            assert sorted(np.argsort(signal)[-3:].tolist()) == before_cut.tolist()
            assert signal[before_cut].min() > 1.5 * np.delete(signal, before_cut).max()
    again = generate_multishot(i, SMALL, num_shots=4)
    np.testing.assert_array_equal(again.frames, m.frames)


def test_write_multishot(tmp_path):
    cfg = dataclasses.replace(SMALL, num_frames=4)
    paths = write_multishot(tmp_path, cfg, num_videos=2, num_shots=3)
    assert [p.name for p in paths] == ["synth-shots-0000.mp4", "synth-shots-0001.mp4"]
    info = json.loads((tmp_path / "synth-shots-0001.json").read_text())
    m = generate_multishot(1, cfg, num_shots=3)
    assert info == {"num_frames": m.num_frames, "cuts": m.cuts, "fps": 25.0}
    decoded, _, _ = decode_all(paths[1])
    assert len(decoded) == m.num_frames


# ---------------------------------------------------------------------------------------------- frame index


def test_frame_index_survives_lossy_coding(tmp_path):
    frames = frame_index_video(70, 32, 48)
    assert frames.shape == (70, 32, 48, 3) and frames.dtype == np.uint8
    assert [decode_frame_index(f) for f in frames] == list(range(70))
    decoded, _, _ = decode_all(write_video(tmp_path / "idx.mp4", frames, gop=10))
    assert [decode_frame_index(f) for f in decoded] == list(range(70))
    assert decode_frame_index(frames[45].transpose(2, 0, 1)) == 45  # (3, H, W) works too
    with pytest.raises(ValueError, match="neither black nor white"):
        decode_frame_index(np.full((32, 48, 3), 128, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- motion vs DAVIS

# Object motion on the 12 DAVIS-2016 sample sequences (binary masks, 699 consecutive-frame pairs), measured by
# `python tools/davis_motion_stats.py --json` (davis section): 10th / 50th / 90th percentiles of the mask-centroid
# displacement per frame as a fraction of the frame diagonal, and of the frame-to-frame mask IoU.
DAVIS_DISP = (0.00228, 0.00835, 0.02026)
DAVIS_IOU = (0.5387, 0.7351, 0.8582)


def _inside_davis(synth: dict, davis: tuple[float, float, float], slack: float = 0.1) -> bool:
    """Synthetic median inside DAVIS's 10-90 % range, and the synthetic 10-90 % range inside it widened by ``slack``
    of its width on each side (the two distributions overlap; the synthetic one is not much faster or slower)."""
    lo, _, hi = davis
    pad = slack * (hi - lo)
    return lo <= synth["p50"] <= hi and lo - pad <= synth["p10"] and synth["p90"] <= hi + pad


def test_demo_motion_statistics_fall_in_the_davis_range():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from davis_motion_stats import recipe_synth_config, synthetic_stats

    cfg, n = recipe_synth_config(None)  # the demo recipe's generator settings
    stats = synthetic_stats(cfg, n)
    assert _inside_davis(stats["disp"], DAVIS_DISP), stats["disp"]
    assert _inside_davis(stats["iou"], DAVIS_IOU), stats["iou"]
    # the check can fail: still objects, or objects twice as fast as the default, fall outside the DAVIS range
    still = synthetic_stats(dataclasses.replace(cfg, **STILL), 6)
    assert not _inside_davis(still["iou"], DAVIS_IOU)
    fast = synthetic_stats(dataclasses.replace(cfg, max_speed=2 * cfg.max_speed), 6)
    assert not _inside_davis(fast["disp"], DAVIS_DISP)


def test_deformation_changes_the_shape_of_a_still_object():
    cfg = dataclasses.replace(SMALL, **{**STILL, "deform": 0.3}, min_objects=1, max_objects=1)
    video = generate_video(0, cfg)
    areas = (video.masks > 0).sum(axis=(1, 2))  # (T,)
    assert not all(np.array_equal(video.masks[0], m) for m in video.masks[1:])
    rigid = generate_video(0, dataclasses.replace(cfg, deform=0.0))
    assert all(np.array_equal(rigid.masks[0], m) for m in rigid.masks[1:])
    assert areas.min() > 0


def test_bad_deform_names_the_field():
    with pytest.raises(ConfigError, match="deform"):
        from_dict(SynthConfig, {"deform": 0.9})
