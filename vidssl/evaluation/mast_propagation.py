"""The MAST and CorrFlow label-propagation protocols (spec: propagation_and_davis.md §1.2, §1.3, preset sheet §1.6).

Both copy *hard* labels through a local-window softmax without top-k, on the stride-4 CorrFlow/MAST encoder:

**MAST** (zlai0/MAST ``benchmark.py`` + ``models/colorizer.py``), for target ``t``:

* memory (:func:`mast_memory_indices`): long-term ``{0, 5}`` (those ``<= t - 1``) plus short-term
  ``{t-1, t-3, t-5}`` (those ``> 0``), deduplicated and sorted (``memory="long_short"``, the official ``--ref 0``);
  ``"first_short"`` = ``--ref 1``, ``"previous"`` = ``--ref 2``;
* a reference more than ``roi_interval`` (15) frames older than the target is read through ROI localisation: a
  coarse 25x25 window correlation with dilation ``d = min(4, gap // 15 + 1)``, softmax over its 625 entries, the
  expected offset ``o = d * sum p * delta``, then a fine 25x25 window centred at ``q + o`` sampled bilinearly
  (:func:`vidssl.models.local_attention.expected_offset`, ``shifted_local_correlation``); other references use a
  plain 25x25 window (R = 12);
* one softmax over all window entries of all references, raw dot products (``temperature`` 1), labels one-hot with
  a fixed ``num_classes`` = 7, subsampled every 4th pixel; the prediction is upsampled bilinearly to full size and
  argmaxed; the argmax (full resolution) is what later targets read (hard feedback).
* quirks kept as flags: ``roi_label_offset="last"`` -- every ROI reference's labels are gathered with the offset
  of the *last* ROI reference (loop-variable reuse); ``out_of_image="zero"`` -- window entries outside the image have
  correlation 0 and a zero label and still take part in the softmax; ``num_classes=7``; ``align_corners`` -- the
  deformable sampling normalises with ``size - 1`` (``True``, PyTorch <= 1.2 behaviour the code was written for;
  ``False`` reproduces the call on PyTorch >= 1.3).

**CorrFlow** (zlai0/CorrFlow ``benchmark.py``): frames cropped at the right/bottom to a multiple of 8; the previous
frame only; its integer label map bilinearly downsampled by 4 and truncated to int (``label_down="bilinear_ids"``),
one-hot with ``num_classes`` 16; 13x13 window (R = 6), out-of-image entries excluded; bilinear upsampling to the
cropped size, argmax, hard feedback; the output is edge-padded back to the frame size (3 px left and right for
854- and 910-wide frames, as the official writer).

Inputs: :class:`~vidssl.evaluation.features.WindowFeatures` turns ``uint8`` frames into the encoder's input
(``colour="lab"``: MAST's normalised Lab; ``"rgb"``: RGB/255 for CorrFlow) and features ``(N, C, h, w)``; with
``encoder=None`` it returns raw normalised Lab pixels averaged over 4x4 cells (the "Lab pixels" baseline);
:class:`~vidssl.evaluation.features.FrameFeatures` reads and encodes a sequence's frames in batches. :func:`propagate_video_mast` /
:func:`propagate_video_corrflow` are pure tensor functions (features in, object ids out);
:func:`propagate_sequence_window` runs a preset on one DAVIS sequence (frames on disk -> ids per frame, written
through a callback), for the ``vidssl propagate`` runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange

from vidssl.config import ConfigError
# WindowFeatures lives in features.py; imported here for the annotation below and for sources.py
from vidssl.evaluation.features import FrameFeatures, WindowFeatures
from vidssl.evaluation.propagation import FeatureCache
from vidssl.models.local_attention import (expected_offset, local_attention, local_correlation, local_aggregate,
                                           window_valid)

__all__ = [
    "WindowPropagationConfig",
    "corrflow_preset",
    "labels_at_features",
    "mast_memory_indices",
    "mast_preset",
    "mast_propagate_frame",
    "pad_to_size",
    "propagate_sequence_window",
    "propagate_video_corrflow",
    "propagate_video_mast",
    "roi_dilation",
]

Memory = Literal["long_short", "first_short", "previous"]


@dataclass
class WindowPropagationConfig:
    """Every knob of the MAST / CorrFlow protocols; :func:`mast_preset` and :func:`corrflow_preset` give the official
    values (``protocol`` picks the algorithm)."""

    protocol: Literal["mast", "corrflow"] = "mast"
    colour: Literal["lab", "rgb"] = "lab"  #: encoder input: MAST normalised Lab, or CorrFlow RGB/255
    crop_multiple: int = 1  #: crop frames right/bottom to a multiple of this (CorrFlow: 8)
    short_side: int = 0  #: 0 = native size (official); else frames are resized so the short side has this length
    radius: int = 12  #: window half-size (MAST test 12 = 25x25; CorrFlow 6 = 13x13)
    temperature: float = 1.0  #: correlations are divided by it (official: raw dot products)
    num_classes: int = 7  #: fixed one-hot size (MAST 7, CorrFlow 16); more objects than num_classes - 1 raise
    label_down: Literal["strided", "bilinear_ids"] = "strided"  #: MAST every 4th pixel; CorrFlow bilinear->int
    out_of_image: Literal["zero", "mask"] = "zero"  #: MAST quirk (ii) zero; CorrFlow masks (-1e10)
    memory: Memory = "long_short"  #: MAST reference set (--ref 0/1/2)
    long_term: tuple[int, ...] = (0, 5)  #: MAST long-term frames
    short_term: int = 3  #: MAST short-term references
    short_gap: int = 2  #: MAST short-term step
    roi: bool = True  #: ROI localisation for far references (MAST)
    roi_interval: int = 15  #: a reference more than this many frames back is read through ROI
    roi_max_dilation: int = 4  #: coarse dilation cap
    roi_radius: int = 12  #: coarse window half-size
    roi_label_offset: Literal["last", "own"] = "last"  #: MAST quirk (i): labels of all ROI refs use the last offset
    align_corners: bool = True  #: MAST quirk (iv): False = grid_sample semantics of the code on PyTorch >= 1.3

    def validate(self, prefix: str = "propagate.window") -> None:
        """Check value ranges; a :class:`~vidssl.config.ConfigError` names the key."""
        p = f"{prefix}." if prefix else ""
        for name in ("radius", "roi_radius", "crop_multiple", "short_gap", "roi_interval", "roi_max_dilation"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ConfigError(f"{p}num_classes: must be >= 2, got {self.num_classes}")
        if not self.temperature > 0:
            raise ConfigError(f"{p}temperature: must be > 0, got {self.temperature}")
        if self.short_side < 0 or self.short_term < 0:
            raise ConfigError(f"{p}short_side/short_term: must be >= 0, got {self.short_side}, {self.short_term}")


def mast_preset() -> WindowPropagationConfig:
    """Official MAST ``benchmark.py --ref 0`` values."""
    return WindowPropagationConfig()


def corrflow_preset() -> WindowPropagationConfig:
    """Official CorrFlow ``benchmark.py`` values."""
    return WindowPropagationConfig(protocol="corrflow", colour="rgb", crop_multiple=8, radius=6, num_classes=16,
                                   label_down="bilinear_ids", out_of_image="mask", memory="previous", roi=False)


# ------------------------------------------------------------------------------------------ bookkeeping

def mast_memory_indices(target: int, *, memory: Memory = "long_short", long_term: Sequence[int] = (0, 5),
                        short_term: int = 3, short_gap: int = 2) -> list[int]:
    """Reference frames MAST reads to predict frame ``target`` (>= 1).

    With ``i = target - 1``: ``long_short`` = long-term frames ``<= i`` plus ``{i, i - gap, ...}`` (``short_term``
    of them) that are ``> 0``, deduplicated and sorted; ``first_short`` = ``[0]`` + those short-term frames;
    ``previous`` = ``[i]``.

    Returns:
        sorted frame indices.
    """
    if target < 1:
        raise ValueError(f"target: frames to predict start at 1, got {target}")
    i = target - 1
    short = [j for j in range(i, i - short_term * short_gap, -short_gap) if j > 0]
    if memory == "previous":
        return [i]
    if memory == "first_short":
        return [0] + sorted(short)
    if memory == "long_short":
        return sorted(set([j for j in long_term if j <= i] + short))
    raise ValueError(f"memory: {memory!r}; expected 'long_short', 'first_short' or 'previous'")


def roi_dilation(gap: int, *, interval: int = 15, max_dilation: int = 4) -> int:
    """Coarse-search dilation of a reference ``gap`` frames back: 1 (no ROI) when ``gap <= interval``, else
    ``min(max_dilation, gap // interval + 1)``."""
    if gap <= interval:
        return 1
    return min(max_dilation, gap // interval + 1)


def labels_at_features(ids: torch.Tensor, *, num_classes: int, size: tuple[int, int],
                       mode: Literal["strided", "bilinear_ids"] = "strided", stride: int = 4,
                       input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Object ids ``(H, W)`` -> one-hot labels ``(num_classes, h, w)`` at feature size.

    ``strided`` (MAST): ``ids[::stride, ::stride]`` of the id map at the encoder's input size (``input_size``, when
    the frames were resized: nearest-resized first); ``bilinear_ids`` (CorrFlow): the id map as a float image,
    bilinearly resized to ``size`` and truncated to int (spurious intermediate ids can appear between objects).
    """
    if ids.ndim != 2:
        raise ValueError(f"ids: expected (H, W), got shape {tuple(ids.shape)}")
    if mode == "strided":
        if input_size is not None and tuple(input_size) != tuple(ids.shape):
            ids = F.interpolate(ids[None, None].float(), size=tuple(int(s) for s in input_size),
                                mode="nearest-exact")[0, 0]
        small = ids[::stride, ::stride].long()
        if tuple(small.shape) != tuple(size):
            raise ValueError(f"ids: subsampling {tuple(ids.shape)} by {stride} gives {tuple(small.shape)}, "
                             f"features are {tuple(size)}")
    elif mode == "bilinear_ids":
        small = F.interpolate(ids[None, None].float(), size=tuple(size), mode="bilinear",
                              align_corners=False)[0, 0].long()
    else:
        raise ValueError(f"label_down: {mode!r}; expected 'strided' or 'bilinear_ids'")
    if int(small.max()) >= num_classes or int(small.min()) < 0:
        raise ValueError(f"ids: object ids up to {int(small.max())} do not fit the fixed one-hot of num_classes="
                         f"{num_classes} (MAST: <= 6 objects); raise num_classes")
    return rearrange(F.one_hot(small, num_classes).float(), "h w k -> k h w")


def pad_to_size(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Edge-pad ``(h, w)`` ids to ``size``: ``(H - h) // 2`` rows on top (rest at the bottom), same for columns
    (CorrFlow's writer pads 3 px left and right for the 6 px cropped from 854/910-wide frames)."""
    dh, dw = int(size[0]) - ids.shape[0], int(size[1]) - ids.shape[1]
    if dh < 0 or dw < 0:
        raise ValueError(f"ids: {tuple(ids.shape)} is larger than the target size {tuple(size)}")
    if dh == 0 and dw == 0:
        return ids
    x = ids[None, None].float()
    x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="replicate")
    return x[0, 0].to(ids.dtype)


# ------------------------------------------------------------------------------------------ one frame

def mast_propagate_frame(query: torch.Tensor, ref_feats: Sequence[torch.Tensor], ref_labels: Sequence[torch.Tensor],
                         *, ref_indices: Sequence[int], target_index: int, radius: int = 12,
                         temperature: float = 1.0, out_of_image: Literal["zero", "mask"] = "zero", roi: bool = True,
                         roi_interval: int = 15, roi_max_dilation: int = 4, roi_radius: int = 12,
                         roi_label_offset: Literal["last", "own"] = "last", align_corners: bool = True
                         ) -> torch.Tensor:
    """MAST's colorizer at test time: labels of one target frame at feature resolution.

    Args:
        query: ``(C, h, w)`` target features.
        ref_feats: N reference features ``(C, h, w)``.
        ref_labels: N reference labels ``(K, h, w)`` (one-hot at feature size).
        ref_indices: the N reference frame indices (ascending: the ROI references come first, as in the code).
        target_index: the target frame index.
        radius, temperature, out_of_image, roi*, align_corners: see :class:`WindowPropagationConfig`.

    Returns:
        ``(K, h, w)`` label distribution (rows of the joint softmax; out-of-image mass is lost with ``"zero"``).
    """
    n = len(ref_feats)
    if n == 0 or len(ref_labels) != n or len(ref_indices) != n:
        raise ValueError(f"ref_feats/ref_labels/ref_indices: need the same number (>= 1) of references, got "
                         f"{len(ref_feats)}, {len(ref_labels)}, {len(ref_indices)}")
    if list(ref_indices) != sorted(ref_indices):
        raise ValueError(f"ref_indices: must be ascending, got {list(ref_indices)}")
    q = query[None]
    keys = [f[None] for f in ref_feats]
    vals = [y[None].to(q.dtype) for y in ref_labels]
    dil = [roi_dilation(target_index - r, interval=roi_interval, max_dilation=roi_max_dilation) if roi else 1
           for r in ref_indices]
    centres: list[torch.Tensor | None] = [None] * n
    for j in range(n):
        if dil[j] > 1:
            centres[j] = expected_offset(q, keys[j], radius=roi_radius, dilation=dil[j], temperature=temperature,
                                         out_of_image=out_of_image)
    value_centres = list(centres)
    roi_refs = [j for j in range(n) if centres[j] is not None]
    if roi_label_offset == "last" and roi_refs:
        value_centres = [centres[roi_refs[-1]] if centres[j] is not None else None for j in range(n)]
    elif roi_label_offset != "own" and roi_label_offset != "last":
        raise ValueError(f"roi_label_offset: {roi_label_offset!r}; expected 'last' or 'own'")
    out = local_attention(q, keys, vals, radius=radius, temperature=temperature, out_of_image=out_of_image,
                          centres=centres, value_centres=value_centres, align_corners=align_corners)
    return out[0]


def _ids_from_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    up = F.interpolate(labels[None].float(), size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return up[0].argmax(0)


def propagate_video_mast(feats: torch.Tensor | Callable[[int], torch.Tensor], first_ids: torch.Tensor, *,
                         num_frames: int | None = None, cfg: WindowPropagationConfig | None = None,
                         input_size: tuple[int, int] | None = None,
                         on_frame: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """MAST label propagation through a video (hard feedback at full resolution).

    Args:
        feats: ``(T, C, h, w)`` features, or a callable ``t -> (C, h, w)`` (each frame requested in increasing
            order; kept only while the memory schedule can still read it).
        first_ids: ``(H, W)`` int object ids of frame 0 (full resolution, ``h = ceil(H / 4)``).
        num_frames: ``T`` (required with a callable).
        cfg: protocol knobs (default :func:`mast_preset`).
        input_size: size the frames were encoded at when it differs from ``(H, W)`` (labels are nearest-resized to
            it before the strided subsampling; predictions are upsampled straight to ``(H, W)``).
        on_frame: callback ``(t, ids (H, W) int64)`` after each frame (frame 0 included).

    Returns:
        ``(T, H, W)`` uint8 object ids; entry 0 is ``first_ids``.
    """
    cfg = cfg or mast_preset()
    cfg.validate("")
    src = FeatureCache(feats, num_frames)
    height, width = first_ids.shape
    first = first_ids.long()
    f0 = src(0)
    size = tuple(f0.shape[-2:])
    labels: dict[int, torch.Tensor] = {0: labels_at_features(first, num_classes=cfg.num_classes, size=size,
                                                              mode=cfg.label_down, input_size=input_size)}
    ids_out = torch.empty(src.total, height, width, dtype=torch.uint8)
    ids_out[0] = first.to(torch.uint8)
    if on_frame is not None:
        on_frame(0, first)
    for t in range(1, src.total):
        refs = mast_memory_indices(t, memory=cfg.memory, long_term=cfg.long_term, short_term=cfg.short_term,
                                   short_gap=cfg.short_gap)
        y = mast_propagate_frame(src(t), [src(r) for r in refs], [labels[r] for r in refs], ref_indices=refs,
                                 target_index=t, radius=cfg.radius, temperature=cfg.temperature,
                                 out_of_image=cfg.out_of_image, roi=cfg.roi, roi_interval=cfg.roi_interval,
                                 roi_max_dilation=cfg.roi_max_dilation, roi_radius=cfg.roi_radius,
                                 roi_label_offset=cfg.roi_label_offset, align_corners=cfg.align_corners)
        ids = _ids_from_labels(y, (height, width))
        ids_out[t] = ids.to(torch.uint8)
        labels[t] = labels_at_features(ids, num_classes=cfg.num_classes, size=size, mode=cfg.label_down,
                                       input_size=input_size)
        if on_frame is not None:
            on_frame(t, ids)
        if t + 1 < src.total:
            needed = set(mast_memory_indices(t + 1, memory=cfg.memory, long_term=cfg.long_term,
                                             short_term=cfg.short_term, short_gap=cfg.short_gap))
            future = set(j for j in cfg.long_term if j > t) if cfg.memory == "long_short" else set()
            keep = needed | {j for j in range(max(0, t - cfg.short_term * cfg.short_gap), t + 1)} | {0} | future
            src.retain(keep)
            for j in [j for j in labels if j not in keep]:
                del labels[j]
    return ids_out


def propagate_video_corrflow(feats: torch.Tensor | Callable[[int], torch.Tensor], first_ids: torch.Tensor, *,
                             num_frames: int | None = None, cfg: WindowPropagationConfig | None = None,
                             on_frame: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """CorrFlow label propagation: previous frame only, hard feedback.

    Args:
        feats: ``(T, C, h, w)`` features of the *cropped* frames, or a callable ``t -> (C, h, w)``.
        first_ids: ``(H', W')`` int ids of frame 0 at the cropped size.
        num_frames, on_frame: as :func:`propagate_video_mast` (ids at the cropped size).
        cfg: protocol knobs (default :func:`corrflow_preset`).

    Returns:
        ``(T, H', W')`` uint8 object ids at the cropped size (pad with :func:`pad_to_size`).
    """
    cfg = cfg or corrflow_preset()
    cfg.validate("")
    src = FeatureCache(feats, num_frames)
    height, width = first_ids.shape
    prev_ids = first_ids.long()
    ids_out = torch.empty(src.total, height, width, dtype=torch.uint8)
    ids_out[0] = prev_ids.to(torch.uint8)
    if on_frame is not None:
        on_frame(0, prev_ids)
    for t in range(1, src.total):
        q, k = src(t)[None], src(t - 1)[None]
        size = tuple(q.shape[-2:])
        ref = labels_at_features(prev_ids, num_classes=cfg.num_classes, size=size, mode=cfg.label_down)[None]
        logits = local_correlation(q, k, radius=cfg.radius) / cfg.temperature
        if cfg.out_of_image == "mask":
            logits = logits.masked_fill(~window_valid(size[0], size[1], radius=cfg.radius, device=q.device)[None],
                                        float("-inf"))
        y = local_aggregate(torch.softmax(logits, dim=1), ref.to(logits.dtype), radius=cfg.radius)[0]
        prev_ids = _ids_from_labels(y, (height, width))
        ids_out[t] = prev_ids.to(torch.uint8)
        if on_frame is not None:
            on_frame(t, prev_ids)
        src.retain({t})
    return ids_out


def propagate_sequence_window(frames: Sequence[str | Path] | torch.Tensor, first_ids: torch.Tensor, *,
                              extractor: WindowFeatures, cfg: WindowPropagationConfig,
                              on_frame: Callable[[int, torch.Tensor], None] | None = None,
                              feature_batch: int = 4) -> torch.Tensor:
    """Run the MAST or CorrFlow protocol on one sequence.

    Args:
        frames: frame files (read with :func:`vidssl.io.images.read_image`) or ``uint8 (T, 3, H, W)``.
        first_ids: ``(H, W)`` object ids of frame 0 at the original size.
        extractor: a :class:`WindowFeatures` (cropping, colour space, encoder).
        cfg: :class:`WindowPropagationConfig` (``protocol`` picks MAST or CorrFlow).
        on_frame: callback ``(t, ids (H, W) int64)`` with ids at the original size (CorrFlow: edge-padded).
        feature_batch: frames encoded per extractor call.

    Returns:
        ``(T, H, W)`` uint8 object ids at the original size.
    """
    height, width = (int(first_ids.shape[0]), int(first_ids.shape[1]))
    provider = FrameFeatures(extractor, frames, size=(height, width), batch=feature_batch)
    n = len(provider)
    hc, wc = extractor.cropped_size(height, width)
    if cfg.protocol == "mast":
        if (hc, wc) != (height, width):
            raise ValueError("crop_multiple: the MAST protocol does not crop (crop_multiple=1)")
        return propagate_video_mast(provider, first_ids, num_frames=n, cfg=cfg, on_frame=on_frame,
                                    input_size=extractor.input_size(height, width))
    if cfg.protocol != "corrflow":
        raise ValueError(f"protocol: {cfg.protocol!r}; expected 'mast' or 'corrflow'")

    def padded(t: int, ids: torch.Tensor) -> None:
        if on_frame is not None:
            on_frame(t, first_ids.long() if t == 0 else pad_to_size(ids, (height, width)))

    cropped = propagate_video_corrflow(provider, first_ids[:hc, :wc], num_frames=n, cfg=cfg, on_frame=padded)
    out = torch.stack([pad_to_size(c, (height, width)) for c in cropped])
    out[0] = first_ids.to(torch.uint8)
    return out
