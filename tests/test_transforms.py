"""Clip-consistent transforms (vidssl.data.transforms): ClipTransform and its batched twin BatchClipAugment."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vidssl.data.config import DataConfig
from vidssl.data.transforms import (
    BatchClipAugment,
    ClipParams,
    ClipTransform,
    sample_clip_params,
    sample_crop_box,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_video(t: int, h: int, w: int, seed: int = 0, cell: int = 16) -> torch.Tensor:
    """uint8 (T, 3, H, W): random colours on a coarse grid, bilinearly upsampled (smooth, full range)."""
    low = torch.rand(t, 3, max(2, h // cell), max(2, w // cell), generator=gen(seed))
    up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (up * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------- parameters

def test_crop_boxes_respect_scale_ratio_and_bounds():
    h, w = 120, 160
    for s in range(200):
        top, left, bh, bw = sample_crop_box(h, w, scale=(0.3, 0.6), ratio=(0.75, 1.33), generator=gen(s))
        assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
        area = bh * bw / (h * w)
        assert 0.3 * 0.95 <= area <= 0.6 * 1.05  # rounding of the sides
        assert 0.75 * 0.93 <= bw / bh <= 1.33 * 1.07


def test_crop_box_fallback_is_centred():
    # a ratio no draw can satisfy in a 10x100 strip at full scale: the centred fallback clamps the ratio
    top, left, bh, bw = sample_crop_box(10, 100, scale=(1.0, 1.0), ratio=(1.0, 2.0), generator=gen(0))
    assert (top, bh, bw) == (0, 10, 20) and left == 40


def test_params_per_clip_vs_per_frame_and_reproducible():
    kw = dict(scale=(0.2, 0.9), ratio=(0.7, 1.3), flip=0.5, color_jitter=0.4)
    clip = sample_clip_params(5, 64, 80, per_frame_crop=False, generator=gen(3), **kw)
    assert (clip.boxes == clip.boxes[0]).all()
    frame = sample_clip_params(5, 64, 80, per_frame_crop=True, generator=gen(3), **kw)
    assert len({tuple(b) for b in frame.boxes.tolist()}) > 1
    again = sample_clip_params(5, 64, 80, per_frame_crop=True, generator=gen(3), **kw)
    assert torch.equal(frame.boxes, again.boxes) and frame.flip == again.flip
    assert frame.brightness == again.brightness and 0.6 <= frame.contrast <= 1.4
    none = sample_clip_params(5, 64, 80, per_frame_crop=True, generator=gen(3), scale=(0.2, 0.9),
                              ratio=(0.7, 1.3), flip=0.0, color_jitter=0.0)
    assert (none.flip, none.brightness, none.contrast, none.saturation) == (False, 1.0, 1.0, 1.0)
    flips = [sample_clip_params(1, 8, 8, per_frame_crop=False, generator=gen(s), **kw).flip for s in range(200)]
    assert 60 < sum(flips) < 140


# ----------------------------------------------------------------------------------------------- ClipTransform

def test_clip_transform_shape_dtype_and_generator():
    t = ClipTransform(crop_size=32, flip=0.5, color_jitter=0.4)
    v = smooth_video(4, 60, 80)
    a = t(v, generator=gen(1))
    assert a.dtype == torch.float32 and a.shape == (4, 3, 32, 32) and type(a) is torch.Tensor
    assert torch.equal(a, t(v, generator=gen(1)))
    assert not torch.equal(a, t(v, generator=gen(2)))


def test_clip_consistent_crop_on_identical_frames():
    frame = smooth_video(1, 60, 80, seed=4)
    v = frame.expand(4, -1, -1, -1).contiguous()
    per_clip = ClipTransform(crop_size=24, per_frame_crop=False, flip=0.5, color_jitter=0.5)
    out = per_clip(v, generator=gen(0))
    assert all(torch.equal(out[0], out[k]) for k in range(1, 4))  # same crop, flip and jitter on every frame
    per_frame = ClipTransform(crop_size=24, per_frame_crop=True, scale=(0.2, 0.5))
    out = per_frame(v, generator=gen(0))
    assert not torch.equal(out[0], out[1])  # CRW: independent crops per frame


def test_clip_transform_values_known_params():
    t = ClipTransform(crop_size=4, mean=None, std=None)
    v = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).expand(2, 3, 4, 4).contiguous() * 10
    box = torch.tensor([[0, 0, 4, 4], [0, 0, 4, 4]])
    out = t.apply(v, ClipParams(boxes=box))  # identity crop: just scaling to [0, 1]
    assert torch.allclose(out, v.float() / 255)
    flipped = t.apply(v, ClipParams(boxes=box, flip=True))
    assert torch.allclose(flipped, (v.float() / 255).flip(-1))
    bright = t.apply(v, ClipParams(boxes=box, brightness=2.0))
    assert torch.allclose(bright, (v.float() / 255 * 2).clamp(0, 1))
    norm = ClipTransform(crop_size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).apply(v, ClipParams(boxes=box))
    assert torch.allclose(norm, (v.float() / 255 - 0.5) / 0.25)


def test_from_config():
    cfg = DataConfig(crop_size=48, crop_scale=(0.5, 0.6), flip=0.25, color_jitter=0.1, per_frame_crop=False)
    t = ClipTransform.from_config(cfg)
    b = BatchClipAugment.from_config(cfg)
    assert t.spec() == b.spec()
    assert (t.crop_size, t.scale, t.flip, t.per_frame_crop) == (48, (0.5, 0.6), 0.25, False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        ClipTransform(scale=(0.9, 0.1))
    with pytest.raises(ValueError, match="flip"):
        ClipTransform(flip=2.0)
    with pytest.raises(ValueError, match="video"):
        ClipTransform(crop_size=8).apply(torch.zeros(2, 4, 8, 8, dtype=torch.uint8),
                                         ClipParams(boxes=torch.zeros(2, 4, dtype=torch.int64)))


# ------------------------------------------------------------------------------------------- the batched twin

@pytest.mark.parametrize("per_frame", [True, False])
def test_batch_twin_matches_clip_transform_up_to_interpolation(per_frame):
    spec = dict(crop_size=40, scale=(0.4, 0.9), per_frame_crop=per_frame, flip=0.5, color_jitter=0.4)
    t, b = ClipTransform(**spec), BatchClipAugment(**spec)
    clips = torch.stack([smooth_video(3, 96, 128, seed=s) for s in range(4)])  # (B, T, 3, H, W)
    params = [t.sample_params(3, 96, 128, generator=gen(10 + s)) for s in range(4)]
    ref = torch.stack([t.apply(c, p) for c, p in zip(clips, params)])
    out = b.apply(clips, params)
    assert out.shape == ref.shape == (4, 3, 3, 40, 40) and out.dtype == torch.float32
    diff = (out - ref).abs() * max(t.std) * 255  # back to (jittered) pixel levels, upper bound
    # interpolation only: antialias filter vs roi_align averaging, uint8 rounding on the CPU path
    assert diff.mean() < 1.0
    assert diff.max() < 10.0
    # and nowhere near unrelated crops
    other = torch.stack([t.apply(c, t.sample_params(3, 96, 128, generator=gen(99))) for c in clips])
    assert ((other - ref).abs() * max(t.std) * 255).mean() > 4 * diff.mean()


def test_batch_twin_exact_for_full_frame_boxes():
    """Whole-frame boxes: both are plain bilinear with the same border rule -> equal up to uint8 rounding."""
    t = ClipTransform(crop_size=50, color_jitter=0.5, flip=0.5)
    b = BatchClipAugment(**t.spec())
    v = smooth_video(2, 36, 42, seed=3)
    box = torch.tensor([[0, 0, 36, 42]] * 2)
    for kw in ({}, {"flip": True}, {"brightness": 1.3, "contrast": 0.7, "saturation": 1.4}):
        p = ClipParams(boxes=box, **kw)
        ref = t.apply(v, p)
        out = b.apply(v[None], [p])[0]
        # a rounding error e (<= 1 level) grows to b * (|c| + |1 - c|) * (|s| + |1 - s|) * e through the jitter
        # (blends also move the mean/grey), then / std through normalisation
        b_, c_, s_ = p.brightness, p.contrast, p.saturation
        gain = b_ * (abs(c_) + abs(1 - c_)) * (abs(s_) + abs(1 - s_)) / min(t.std)
        assert (out - ref).abs().max() <= gain * 1.0 / 255 + 1e-5


def test_batch_twin_accepts_clips_of_different_sizes_and_generators():
    t = ClipTransform(crop_size=16, color_jitter=0.2, flip=0.5)
    b = BatchClipAugment(**t.spec())
    clips = [smooth_video(2, 40, 60, seed=1), smooth_video(2, 64, 48, seed=2)]
    out = b(clips, generators=[gen(1), gen(2)])
    assert out.shape == (2, 2, 3, 16, 16)
    params = [t.sample_params(2, 40, 60, generator=gen(1)), t.sample_params(2, 64, 48, generator=gen(2))]
    assert torch.equal(out, b.apply(clips, params))
    ref = torch.stack([t.apply(c, p) for c, p in zip(clips, params)])
    assert ((out - ref).abs() * 255 * max(t.std)).mean() < 2.0
    with pytest.raises(ValueError, match="params"):
        b.apply(clips, params[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_twin_cuda_matches_cpu():
    b = BatchClipAugment(crop_size=64, flip=0.5, color_jitter=0.4)
    clips = torch.stack([smooth_video(4, 120, 160, seed=s) for s in range(3)])
    params = [b.sample_params(4, 120, 160, generator=gen(s)) for s in range(3)]
    cpu = b.apply(clips, params)
    cuda = b.apply(clips.to("cuda"), params)
    assert cuda.device.type == "cuda"
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-4)
    assert math.isfinite(float(cuda.sum()))
