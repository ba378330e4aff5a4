"""MAST -- Memory-Augmented Self-supervised Tracker (Lai, Lu, Xie, CVPR 2020) as a training objective.

Frames are converted to Lab (OpenCV float convention) and normalised ``((L - 50) / 50, a / 127, b / 127)``. The
encoder input drops exactly one of ``a``/``b`` (:func:`lab_channel_dropout`: the same channel for every frame of
the batch, ``L`` is never dropped, the frames are multiplied by 3/2), and the model reconstructs the *dropped*
channel of the clean target frame by copying it from the references through restricted attention
(:func:`vidssl.models.local_attention.local_attention`): raw dot products over a ``(2R + 1)^2`` window (R = 6 in
training), the reference channel subsampled every 4th pixel, a softmax over all window entries of all references,
bilinear x4 upsampling, and the loss ``smooth_l1(20 * y_hat, 20 * y)``.

Stages (``stage``):

* ``"pairwise"`` -- the released code: one reference, one target. ``pair_gaps`` picks the pair inside the clip: the
  reference is frame 0 and the target frame ``g`` with ``g`` drawn per sample from ``pair_gaps`` with
  ``pair_probs`` (official: {2, 5, 8} with (0.4, 0.4, 0.2), so ``data.clip_len=9, data.stride=1``); ``None`` uses
  the first and the last frame of the clip.
* ``"multiframe"`` -- **not in the official code** (the paper's second stage, never released): the target is the
  last frame of the clip, the references are the clip frames ``long_term + short_term`` (default ``[0, 1]`` and
  ``[-3, -2]``), one joint softmax over all their windows, and the long-term references are read through ROI
  localisation (coarse dilated search, expected offset, fine window around it; :func:`vidssl.models.local_attention.
  expected_offset`). Recommended lr 2e-5, initialised from a pairwise checkpoint.

Attention scaling: MAST's code converges only on PyTorch 1.1; MAMP found that dividing the correlation by
``sqrt(C)`` (C = 64) makes it train on current PyTorch. ``sqrt_c_scaling=True`` (default for new training) does that;
``False`` reproduces the official raw dot products. Out-of-image window entries follow the official correlation
sampler (``out_of_image="zero"``: logit 0, zero value) unless ``"mask"`` is chosen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.config import ConfigError, to_dict
from vidssl.losses.reconstruction import huber_reconstruction
from vidssl.models.corrflow import _rand, input_rgb
from vidssl.models.lab import normalise_lab, rgb_to_lab
from vidssl.models.local_attention import expected_offset, local_attention
from vidssl.models.objective import BuildContext, DataNeeds, Objective

__all__ = ["MAST", "lab_channel_dropout"]


def lab_channel_dropout(lab: torch.Tensor, *, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, int]:
    """MAST's bottleneck: zero one of the ``a``/``b`` channels (equally likely) and scale the frames by 3/2.

    One draw for the whole batch (all frames alike), ``L`` (channel 0) never dropped -- the released code
    (zlai0/MAST #19), not the paper's "one of three channels".

    Args:
        lab: ``(B, T, 3, H, W)`` or ``(B, 3, H, W)`` normalised Lab.

    Returns:
        the new frames (the input is not modified) and the dropped channel (1 = ``a``, 2 = ``b``).
    """
    if lab.shape[-3] != 3:
        raise ValueError(f"lab: expected 3 channels at dim -3, got shape {tuple(lab.shape)}")
    ch = 1 + int(float(_rand(generator)) >= 0.5)
    keep = torch.ones(3, dtype=lab.dtype, device=lab.device)
    keep[ch] = 0.0
    return lab * (keep[:, None, None] * 1.5), ch


def subsample_to_features(x: torch.Tensor, size: tuple[int, int], stride: int = 4) -> torch.Tensor:
    """Strided subsampling ``x[..., ::stride, ::stride]`` (MAST's ``prep``), checked against the feature size."""
    out = x[..., ::stride, ::stride]
    if tuple(out.shape[-2:]) != tuple(size):
        raise ValueError(f"labels subsampled by {stride} have size {tuple(out.shape[-2:])}, but the features are "
                         f"{tuple(size)}; the encoder must have output stride {stride}")
    return out


def _min_clip_len(stage: str, pair_gaps: Sequence[int] | None, long_term: Sequence[int],
                  short_term: Sequence[int]) -> int:
    """Frames a clip must have: pairwise reads frame 0 and frame ``max(pair_gaps)`` (or the last of 2); multiframe
    reads its references, distinct and before the target (the last frame)."""
    if stage == "pairwise":
        return 2 if pair_gaps is None else max(pair_gaps) + 1
    refs_all = list(long_term) + list(short_term)
    for t in range(2, 1000):
        refs = [i % t for i in refs_all if -t <= i < t]
        if len(refs) == len(refs_all) and len(set(refs)) == len(refs) and max(refs) < t - 1:
            return t
    raise ValueError(f"long_term/short_term: {list(long_term)} + {list(short_term)} never fit a clip")


@dataclass
class MASTParams:
    """MAST (zlai0/MAST defaults + the sqrt(C) fix; see :class:`vidssl.models.MAST`)."""

    stage: Literal["pairwise", "multiframe"] = "pairwise"  #: multiframe = paper stage 2, not in the official code
    radius: int = 6  #: training window half-size (13x13)
    sqrt_c_scaling: bool = True  #: divide correlations by sqrt(C) (needed on current PyTorch); false = official
    out_of_image: Literal["zero", "mask"] = "zero"  #: official sampler: out-of-image entries score 0, copy 0
    huber_scale: float = 20.0
    pair_gaps: list[int] | None = None  #: pairwise target frame gap choices (official [2, 5, 8]); null = last frame
    pair_probs: list[float] | None = None  #: their probabilities (official [0.4, 0.4, 0.2])
    long_term: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  #: multiframe references
    short_term: list[int] = dataclasses.field(default_factory=lambda: [-3, -2])
    roi: bool = True  #: ROI localisation of long-term references (multiframe)
    roi_radius: int | None = None  #: coarse search half-size (default: radius)
    roi_dilation: int = 2
    input_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    input_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def validate(self, prefix: str = "") -> None:
        if self.radius < 1 or self.roi_dilation < 1:
            raise ConfigError(f"{prefix}: radius and roi_dilation must be >= 1")
        if self.pair_probs is not None and self.pair_gaps is None:
            raise ConfigError(f"{prefix}.pair_probs: needs pair_gaps")


class MAST(Objective):
    """MAST objective over a shared stride-4 encoder.

    Args:
        encoder: frame encoder ``(M, 3, H, W) -> (M, C, h, w)`` with ``stride`` 4 and ``out_channels`` C
            (the :class:`~vidssl.models.mast_encoder.MASTEncoder`).
        stage: ``"pairwise"`` (released code) or ``"multiframe"`` (paper stage 2, not in the official code).
        radius: window half-size in training (6: 13x13).
        sqrt_c_scaling: divide correlations by ``sqrt(C)`` (MAMP's fix; needed on current PyTorch).
        out_of_image: ``"zero"`` (official sampler: logit 0, value 0) or ``"mask"``.
        huber_scale: both sides of the smooth-L1 are multiplied by it (20).
        pair_gaps, pair_probs: pairwise target frame choice (see module docstring); ``None`` = last frame.
        long_term, short_term: multiframe reference frames (clip indices; negative counts from the end, the target
            is the last frame).
        roi: read long-term references through ROI localisation (multiframe).
        roi_radius: coarse search window half-size (default: ``radius``).
        roi_dilation: coarse search dilation.
        input_mean, input_std: the data normalisation to undo (default: none; recipes use mean 0, std 1).

    ``forward(batch, generator)``: ``batch["video"]`` ``(B, T, 3, H, W)``; returns ``(loss, logs)``.
    """

    Params = MASTParams

    @classmethod
    def data_needs(cls, params: MASTParams, data=None) -> DataNeeds:
        """Pairwise: frame 0 and the target gap's frame; multiframe: the references and the last frame (Lab input)."""
        return DataNeeds(clip_len=_min_clip_len(params.stage, params.pair_gaps, params.long_term, params.short_term),
                         colour="lab")

    @classmethod
    def from_params(cls, encoder: nn.Module, params: MASTParams, ctx: BuildContext) -> "MAST":
        return cls(encoder, **to_dict(params))

    def __init__(self, encoder: nn.Module, *, stage: Literal["pairwise", "multiframe"] = "pairwise",
                 radius: int = 6, sqrt_c_scaling: bool = True, out_of_image: Literal["zero", "mask"] = "zero",
                 huber_scale: float = 20.0, pair_gaps: Sequence[int] | None = None,
                 pair_probs: Sequence[float] | None = None, long_term: Sequence[int] = (0, 1),
                 short_term: Sequence[int] = (-3, -2), roi: bool = True, roi_radius: int | None = None,
                 roi_dilation: int = 2, input_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 input_std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if stage not in ("pairwise", "multiframe"):
            raise ValueError(f"stage: {stage!r}; expected 'pairwise' or 'multiframe'")
        if out_of_image not in ("zero", "mask"):
            raise ValueError(f"out_of_image: {out_of_image!r}; expected 'zero' or 'mask'")
        if radius < 1 or roi_dilation < 1:
            raise ValueError(f"radius and roi_dilation: must be >= 1, got {radius}, {roi_dilation}")
        if pair_gaps is not None:
            pair_gaps = [int(g) for g in pair_gaps]
            if not pair_gaps or min(pair_gaps) < 1:
                raise ValueError(f"pair_gaps: expected positive frame gaps, got {pair_gaps}")
            probs = [1.0 / len(pair_gaps)] * len(pair_gaps) if pair_probs is None else [float(p) for p in pair_probs]
            if len(probs) != len(pair_gaps) or min(probs) < 0 or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(f"pair_probs: expected {len(pair_gaps)} probabilities summing to 1, got {pair_probs}")
            self.pair_probs = probs
        else:
            self.pair_probs = None
        if stage == "multiframe" and not (list(long_term) or list(short_term)):
            raise ValueError("long_term/short_term: the multiframe stage needs at least one reference")
        self.encoder = encoder
        self.stage, self.radius = stage, int(radius)
        self.sqrt_c_scaling, self.out_of_image, self.huber_scale = bool(sqrt_c_scaling), out_of_image, huber_scale
        self.pair_gaps = pair_gaps
        self.long_term, self.short_term = [int(i) for i in long_term], [int(i) for i in short_term]
        self.roi, self.roi_radius, self.roi_dilation = bool(roi), int(roi_radius or radius), int(roi_dilation)
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)

    @property
    def min_clip_len(self) -> int:
        """Frames a clip must have for this configuration."""
        return _min_clip_len(self.stage, self.pair_gaps, self.long_term, self.short_term)

    def temperature(self, channels: int) -> float:
        """Divisor of the correlations: ``sqrt(C)`` with ``sqrt_c_scaling``, else 1."""
        return math.sqrt(channels) if self.sqrt_c_scaling else 1.0

    def _lab(self, video: torch.Tensor) -> torch.Tensor:
        return normalise_lab(rgb_to_lab(input_rgb(video, mean=self.input_mean, std=self.input_std)))

    def _pair_targets(self, t: int, generator: torch.Generator | None, b: int) -> list[int]:
        if self.pair_gaps is None:
            return [t - 1] * b
        cum = torch.cumsum(torch.tensor(self.pair_probs, dtype=torch.float64), 0)
        u = _rand(generator, b).double()
        picks = torch.searchsorted(cum, u.clamp(max=float(cum[-1]) - 1e-12), right=True).tolist()
        return [self.pair_gaps[min(p, len(self.pair_gaps) - 1)] for p in picks]

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        """``batch["video"]: (B, T, 3, H, W)`` -> ``(loss, logs)``."""
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"batch['video']: expected (B, T, 3, H, W), got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        if t < self.min_clip_len:
            raise ValueError(f"batch['video']: MAST ({self.stage}) needs clips of >= {self.min_clip_len} frames, got "
                             f"{t}; raise data.clip_len")
        lab = self._lab(video)  # b t 3 H W, clean
        height, width = lab.shape[-2:]
        x, ch = lab_channel_dropout(lab, generator=generator) if self.training else (lab, 1)
        rows = torch.arange(b, device=video.device)
        if self.stage == "pairwise":
            tgt_idx = torch.tensor(self._pair_targets(t, generator, b), device=video.device)
            ref_frames = [0]
            tgt_in, tgt_clean = x[rows, tgt_idx], lab[rows, tgt_idx]
        else:
            tgt_idx = torch.full((b,), t - 1, device=video.device)
            ref_frames = [i % t for i in self.long_term + self.short_term]
            tgt_in, tgt_clean = x[:, t - 1], lab[:, t - 1]
        f_t = self.encoder(tgt_in)
        size = tuple(f_t.shape[-2:])
        temp = self.temperature(f_t.shape[1])
        keys, values, centres = [], [], []
        for j, r in enumerate(ref_frames):
            f_r = self.encoder(x[:, r])
            keys.append(f_r)
            values.append(subsample_to_features(lab[:, r, ch:ch + 1], size, self.encoder.stride))
            long_ref = self.stage == "multiframe" and j < len(self.long_term)
            if long_ref and self.roi:
                centres.append(expected_offset(f_t, f_r, radius=self.roi_radius, dilation=self.roi_dilation,
                                               temperature=temp, out_of_image=self.out_of_image))
            else:
                centres.append(None)
        low = local_attention(f_t, keys, values, radius=self.radius, temperature=temp,
                              out_of_image=self.out_of_image, centres=centres)
        pred = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
        target = tgt_clean[:, ch:ch + 1]
        loss = huber_reconstruction(pred, target, scale=self.huber_scale)
        with torch.no_grad():
            ref_full = lab[:, ref_frames[-1], ch:ch + 1]
            identity = float(huber_reconstruction(ref_full, target, scale=self.huber_scale))  # copy-the-reference
            l1 = float((pred - target).abs().mean())
        logs = {"huber": float(loss.detach()), "l1": l1, "huber_identity": identity, "dropped_channel": float(ch),
                "gap": float(tgt_idx.float().mean())}
        return loss, logs

    def extra_repr(self) -> str:
        return (f"stage={self.stage}, radius={self.radius}, sqrt_c_scaling={self.sqrt_c_scaling}, "
                f"out_of_image={self.out_of_image}, pair_gaps={self.pair_gaps}, long_term={self.long_term}, "
                f"short_term={self.short_term}, roi={self.roi}")
