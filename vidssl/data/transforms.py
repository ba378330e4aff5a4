"""Clip-consistent augmentation: random resized crop (per clip or per frame), flip, colour jitter, normalisation.

Randomness is explicit: :func:`sample_clip_params` draws a :class:`ClipParams` from a ``torch.Generator`` (never the
global RNG), and both implementations apply given parameters:

- :class:`ClipTransform` -- one clip ``uint8 (T, 3, H, W)`` on the CPU (DataLoader workers), built on
  ``torchvision.transforms.v2.functional`` with ``tv_tensors.Video`` (antialiased bilinear resize);
- :class:`BatchClipAugment` -- its batched twin for ``b t c h w`` batches on any device (the GPU path): crops with
  ``torchvision.ops.roi_align`` (exact ``S x S`` output, adaptive sampling averages when shrinking), then flip,
  jitter and normalisation as tensor arithmetic.

With the same parameters the two agree up to interpolation (antialias filter vs roi_align's box averaging, and the
CPU path rounding the resized crop to uint8). Crops are drawn per frame when ``per_frame_crop`` (CRW draws crops
independently per frame) and once per clip otherwise; flip and jitter factors are shared by the whole clip unless
``per_frame_jitter`` (VIVI: every frame of a shot augmented independently), which draws them per frame.
Jitter order is fixed: brightness, contrast, saturation (torchvision's formulas; contrast uses each frame's mean grey).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from einops import rearrange, reduce

#: ImageNet statistics, the default normalisation.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Grey weights of torchvision's ``rgb_to_grayscale`` (ITU-R 601-2 luma).
_GREY = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ClipParams:
    """The random choices for one clip.

    Attributes:
        boxes: ``(T, 4)`` int64 crop boxes ``(top, left, height, width)`` in input pixels, one per frame.
        flip: horizontal flip of the whole clip, or a tuple of ``T`` per-frame flips (``per_frame_jitter``).
        brightness, contrast, saturation: jitter factors shared by the clip (``1.0`` = unchanged), or tuples of
            ``T`` per-frame factors.
    """

    boxes: torch.Tensor
    flip: bool | tuple[bool, ...] = False
    brightness: float | tuple[float, ...] = 1.0
    contrast: float | tuple[float, ...] = 1.0
    saturation: float | tuple[float, ...] = 1.0

    def per_frame(self, name: str) -> list:
        """Field ``name`` as one value per frame (a shared value repeated ``T`` times)."""
        value = getattr(self, name)
        return list(value) if isinstance(value, tuple) else [value] * int(self.boxes.shape[0])


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def sample_crop_box(height: int, width: int, *, scale: tuple[float, float], ratio: tuple[float, float],
                    generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A random resized crop box ``(top, left, h, w)`` inside a ``height x width`` frame.

    The box covers a fraction of the area uniform in ``scale`` with an aspect ratio (w/h) log-uniform in ``ratio``;
    after 10 rejected draws it falls back to the largest centred box with the ratio clamped to ``ratio`` (the
    standard RandomResizedCrop rule).
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(height - h + 1, (), generator=generator))
            left = int(torch.randint(width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def sample_clip_params(num_frames: int, height: int, width: int, *, scale: tuple[float, float],
                       ratio: tuple[float, float], per_frame_crop: bool, flip: float, color_jitter: float,
                       generator: torch.Generator | None = None, per_frame_jitter: bool = False) -> ClipParams:
    """Draw the crop boxes (``num_frames`` of them, or one repeated), flip and jitter factors for one clip.

    ``per_frame_jitter`` draws flip and jitter factors for every frame (tuples of ``num_frames`` values, the clip's
    draws of frame 0 first) instead of once per clip.

    The number of draws depends only on the arguments, so a generator consumed here ends in the same state on every
    device. Jitter factors are uniform in ``[max(0, 1 - color_jitter), 1 + color_jitter]``.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"need a non-empty clip, got T={num_frames}, H={height}, W={width}")
    n_boxes = num_frames if per_frame_crop else 1
    boxes = torch.tensor([sample_crop_box(height, width, scale=scale, ratio=ratio, generator=generator)
                          for _ in range(n_boxes)], dtype=torch.int64)  # (n_boxes, 4)
    if not per_frame_crop:
        boxes = boxes.expand(num_frames, 4).clone()
    def draw() -> tuple[bool, list[float]]:
        do_flip = flip > 0 and float(torch.rand((), generator=generator)) < flip
        factors = [1.0, 1.0, 1.0]
        if color_jitter > 0:
            lo, hi = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter
            factors = [_uniform(lo, hi, generator) for _ in range(3)]
        return bool(do_flip), factors

    if not per_frame_jitter:
        do_flip, factors = draw()
        return ClipParams(boxes=boxes, flip=do_flip, brightness=factors[0], contrast=factors[1],
                          saturation=factors[2])
    draws = [draw() for _ in range(num_frames)]
    return ClipParams(boxes=boxes, flip=tuple(d[0] for d in draws), brightness=tuple(d[1][0] for d in draws),
                      contrast=tuple(d[1][1] for d in draws), saturation=tuple(d[1][2] for d in draws))


class _AugmentSpec:
    """Hyperparameters shared by :class:`ClipTransform` and :class:`BatchClipAugment`."""

    def __init__(self, *, crop_size: int = 256, scale: tuple[float, float] = (0.8, 0.95),
                 ratio: tuple[float, float] = (0.7, 1.3), per_frame_crop: bool = True, flip: float = 0.0,
                 color_jitter: float = 0.0, mean: Sequence[float] | None = IMAGENET_MEAN,
                 std: Sequence[float] | None = IMAGENET_STD, per_frame_jitter: bool = False) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size: must be >= 1, got {crop_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale: need 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio: need 0 < lo <= hi, got {ratio}")
        if not 0 <= flip <= 1:
            raise ValueError(f"flip: must be a probability in [0, 1], got {flip}")
        if color_jitter < 0:
            raise ValueError(f"color_jitter: must be >= 0, got {color_jitter}")
        if (mean is None) != (std is None):
            raise ValueError("mean and std: give both (normalise) or neither")
        self.crop_size = int(crop_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.per_frame_crop = bool(per_frame_crop)
        self.flip = float(flip)
        self.color_jitter = float(color_jitter)
        self.per_frame_jitter = bool(per_frame_jitter)
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None

    @classmethod
    def from_config(cls, cfg) -> "_AugmentSpec":
        """Build from a :class:`vidssl.data.config.DataConfig` (crop_size, crop_scale, crop_ratio, ...)."""
        return cls(crop_size=cfg.crop_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                   per_frame_crop=cfg.per_frame_crop, flip=cfg.flip, color_jitter=cfg.color_jitter,
                   mean=tuple(cfg.mean), std=tuple(cfg.std),
                   per_frame_jitter=getattr(cfg, "per_frame_jitter", False))

    def spec(self) -> dict:
        """The hyperparameters as keyword arguments (to build the twin)."""
        return {"crop_size": self.crop_size, "scale": self.scale, "ratio": self.ratio,
                "per_frame_crop": self.per_frame_crop, "flip": self.flip, "color_jitter": self.color_jitter,
                "mean": self.mean, "std": self.std, "per_frame_jitter": self.per_frame_jitter}

    def sample_params(self, num_frames: int, height: int, width: int, *,
                      generator: torch.Generator | None) -> ClipParams:
        """Draw :class:`ClipParams` for a clip of ``num_frames`` frames of ``height x width``."""
        return sample_clip_params(num_frames, height, width, scale=self.scale, ratio=self.ratio,
                                  per_frame_crop=self.per_frame_crop, flip=self.flip,
                                  color_jitter=self.color_jitter, generator=generator,
                                  per_frame_jitter=self.per_frame_jitter)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items())
        return f"{type(self).__name__}({args})"


class ClipTransform(_AugmentSpec):
    """Clip-consistent augmentation of one clip on the CPU (torchvision.transforms.v2 on ``tv_tensors.Video``).

    ``transform(video, generator=g)``: ``video`` ``uint8 (T, 3, H, W)`` -> ``float32 (T, 3, S, S)``, ``S =
    crop_size``, normalised with ``mean``/``std`` (or in ``[0, 1]`` when both are ``None``).

    Example::

        t = ClipTransform(crop_size=64, flip=0.5, color_jitter=0.4)
        out = t(torch.zeros(4, 3, 120, 160, dtype=torch.uint8), generator=torch.Generator().manual_seed(0))
        out.shape  # (4, 3, 64, 64)
    """

    def __call__(self, video: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        t, _, h, w = video.shape
        return self.apply(video, self.sample_params(t, h, w, generator=generator))

    def geometric(self, video: torch.Tensor, params: ClipParams) -> torch.Tensor:
        """Crop, resize (antialiased bilinear) and flip: ``uint8 (T, 3, H, W)`` -> ``uint8 (T, 3, S, S)``."""
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        if video.ndim != 4 or video.shape[1] != 3:
            raise ValueError(f"video: expected (T, 3, H, W), got shape {tuple(video.shape)}")
        if params.boxes.shape != (video.shape[0], 4):
            raise ValueError(f"params.boxes: expected ({video.shape[0]}, 4), got {tuple(params.boxes.shape)}")
        size = [self.crop_size, self.crop_size]
        boxes = params.boxes.tolist()
        if all(b == boxes[0] for b in boxes):  # one box for the clip: one call on the Video
            out = F.resized_crop(tv_tensors.Video(video), *boxes[0], size=size, antialias=True)
        else:
            out = torch.stack([F.resized_crop(frame, *box, size=size, antialias=True)
                               for frame, box in zip(video, boxes)])  # (T, 3, S, S)
        out = tv_tensors.Video(out)
        if isinstance(params.flip, tuple):  # per-frame flips (per_frame_jitter)
            flips = torch.tensor(params.flip).view(-1, 1, 1, 1)  # (T, 1, 1, 1)
            out = torch.where(flips, out.as_subclass(torch.Tensor).flip(-1), out.as_subclass(torch.Tensor))
        elif params.flip:
            out = F.horizontal_flip(out)
        return out.as_subclass(torch.Tensor)

    def photometric(self, video: torch.Tensor, params: ClipParams) -> torch.Tensor:
        """Jitter and normalise: ``uint8`` or ``[0, 1]`` float ``(T, 3, S, S)`` -> ``float32 (T, 3, S, S)``."""
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        v = tv_tensors.Video(video)
        v = F.to_dtype(v, torch.float32, scale=True)
        if isinstance(params.brightness, tuple):  # per-frame factors (per_frame_jitter): one frame at a time
            frames = [self._jitter(tv_tensors.Video(frame[None]), b, c, s) for frame, b, c, s in
                      zip(v.as_subclass(torch.Tensor), params.brightness, params.contrast, params.saturation)]
            v = tv_tensors.Video(torch.cat([f.as_subclass(torch.Tensor) for f in frames]))  # (T, 3, S, S)
        else:
            v = self._jitter(v, params.brightness, params.contrast, params.saturation)
        if self.mean is not None:
            v = F.normalize(v, mean=list(self.mean), std=list(self.std))
        return v.as_subclass(torch.Tensor)

    @staticmethod
    def _jitter(v, brightness: float, contrast: float, saturation: float):
        """Brightness, contrast, saturation (torchvision's order and formulas) on a float ``Video``."""
        from torchvision.transforms.v2 import functional as F

        if brightness != 1.0:
            v = F.adjust_brightness(v, brightness)
        if contrast != 1.0:
            v = F.adjust_contrast(v, contrast)
        if saturation != 1.0:
            v = F.adjust_saturation(v, saturation)
        return v

    def apply(self, video: torch.Tensor, params: ClipParams) -> torch.Tensor:
        """``uint8 (T, 3, H, W)`` -> ``float32 (T, 3, S, S)`` with the given parameters."""
        return self.photometric(self.geometric(video, params), params)


class BatchClipAugment(_AugmentSpec):
    """Batched twin of :class:`ClipTransform` for ``b t c h w`` clips on any device (CPU or CUDA).

    ``augment(clips, params)`` / ``augment(clips, generators=[...])``: ``clips`` is ``uint8 (B, T, 3, H, W)`` (or
    float in ``[0, 1]``), or a list of ``(T, 3, H_b, W_b)`` clips of different sizes; returns ``float32 (B, T, 3, S,
    S)`` on the clips' device. Each clip has its own :class:`ClipParams` (per-clip crops, flip and jitter factors).
    """

    def __call__(self, clips: torch.Tensor | Sequence[torch.Tensor], params: Sequence[ClipParams] | None = None, *,
                 generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        clips_list = list(clips)
        if params is None:
            if generators is None or len(generators) != len(clips_list):
                raise ValueError("give params, or one generator per clip")
            params = [self.sample_params(c.shape[0], c.shape[-2], c.shape[-1], generator=g)
                      for c, g in zip(clips_list, generators)]
        return self.apply(clips, params)

    def crop(self, clips: torch.Tensor | Sequence[torch.Tensor], params: Sequence[ClipParams]) -> torch.Tensor:
        """Resized crops in ``[0, 1]``: ``(B, T, 3, H, W)`` or a list of ``(T, 3, H_b, W_b)`` -> ``(B, T, 3, S, S)``."""
        from torchvision.ops import roi_align

        same_size = isinstance(clips, torch.Tensor)
        clips_list = [clips] if same_size else [c.unsqueeze(0) for c in clips]  # each (b, T, 3, H, W)
        b_total = sum(c.shape[0] for c in clips_list)
        if len(params) != b_total:
            raise ValueError(f"params: expected {b_total} (one per clip), got {len(params)}")
        outs = []
        k = 0
        for c in clips_list:
            if c.ndim != 5 or c.shape[2] != 3:
                raise ValueError(f"clips: expected (B, T, 3, H, W) or (T, 3, H, W) items, got {tuple(c.shape)}")
            b, t = c.shape[:2]
            x = rearrange(c, "b t c h w -> (b t) c h w")
            x = x.float().div_(255.0) if not x.is_floating_point() else x.float()
            boxes = torch.cat([p.boxes for p in params[k:k + b]]).to(torch.float32)  # (b*t, 4) top, left, h, w
            if boxes.shape[0] != b * t:
                raise ValueError(f"params.boxes: expected {t} boxes per clip")
            top, left, h, w = boxes.unbind(1)
            rois = torch.stack([torch.arange(b * t, dtype=torch.float32), left, top, left + w, top + h], dim=1)
            y = roi_align(x, rois.to(x.device), output_size=(self.crop_size, self.crop_size), spatial_scale=1.0,
                          sampling_ratio=-1, aligned=True)  # (b*t, 3, S, S)
            outs.append(rearrange(y, "(b t) c h w -> b t c h w", b=b))
            k += b
        return torch.cat(outs)

    def apply(self, clips: torch.Tensor | Sequence[torch.Tensor], params: Sequence[ClipParams]) -> torch.Tensor:
        """Crop, flip, jitter and normalise with per-clip ``params``: -> ``float32 (B, T, 3, S, S)``."""
        x = self.crop(clips, params)  # (B, T, 3, S, S) in [0, 1]
        dev = x.device

        def per_frame(name: str) -> torch.Tensor:  # (B, T, 1, 1, 1): shared values repeated over the clip
            values = [p.per_frame(name) for p in params]
            return rearrange(torch.tensor(values, device=dev), "b t -> b t 1 1 1")

        flips = per_frame("flip")  # (B, T, 1, 1, 1) bool
        x = torch.where(flips, x.flip(-1), x)
        bright = per_frame("brightness").float()
        if bool((bright != 1.0).any()):
            x = (x * bright).clamp_(0.0, 1.0)
        c = per_frame("contrast").float()
        if bool((c != 1.0).any()):
            mean_grey = reduce(self._grey(x), "b t c h w -> b t c 1 1", "mean")  # (B, T, 1, 1, 1)
            x = (c * x + (1.0 - c) * mean_grey).clamp_(0.0, 1.0)
        s = per_frame("saturation").float()
        if bool((s != 1.0).any()):
            x = (s * x + (1.0 - s) * self._grey(x)).clamp_(0.0, 1.0)
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=dev).view(1, 1, 3, 1, 1)
            std = torch.tensor(self.std, device=dev).view(1, 1, 3, 1, 1)
            x = (x - mean) / std
        return x

    @staticmethod
    def _grey(x: torch.Tensor) -> torch.Tensor:
        """Luma of ``(B, T, 3, h, w)`` -> ``(B, T, 1, h, w)`` (torchvision's weights)."""
        r, g, b = x.unbind(2)
        return (_GREY[0] * r + _GREY[1] * g + _GREY[2] * b).unsqueeze(2)
