"""Shot boundary detection on decoded frames: colour histograms, an adaptive threshold, a flash rule and a fade rule.

The content detector (the toolkit's own; VIVI's paper names no detector, see the temporal-methods notes §4.5):

1. **Features** (:func:`frame_features`, batched tensor ops on the frames' device): every frame is subsampled by the
   integer stride that keeps its short side >= ``2 * size``, then resized (bilinear, antialiased) to ``size x size``,
   converted to HSV (or kept RGB) and split into a ``grid x grid`` layout; each cell gets one ``bins``-bin histogram
   per channel, normalised to sum 1. The mean luma (BT.601) of the frame is kept for the fade rule.
2. **Distance** (:func:`histogram_distance`): half the L1 distance between two histograms (total variation, 0 for
   equal, 1 for disjoint), averaged over cells and channels. ``d[t]`` compares frame ``t - 1`` with frame ``t``.
3. **Hard cuts** (:func:`find_cuts`): frame ``t`` starts a new shot when
   ``d[t] > max(min_threshold, mean_w + k * std_w)`` where mean/std are taken over ``d`` in ``[t - window,
   t + window]`` without ``t``, its two neighbours and the ``trim`` largest values (so that a flash or another cut
   nearby does not raise the threshold), and ``d[t]`` is the largest distance within ``local_max`` frames.
4. **Flash rule**: a candidate is dropped when the content comes back within ``flash_len`` frames: frame ``t - 1``
   is close (distance ``< flash_ratio * d[t]``) to one of frames ``t + 1 .. t + flash_len`` (the start of a flash)
   or frame ``t`` is close to one of frames ``t - 1 - flash_len .. t - 2`` (the end of one). A camera flash or a
   single corrupted frame therefore gives no cut.
5. **Fade rule**: a run of dark frames (mean luma ``< black_level``, at most ``max_black_len`` frames) strictly
   inside the video is a fade through black. Its boundary is placed at the run's middle frame
   (``start + len // 2``: that frame is the first of the new shot); the luma ramps on both sides (at most
   ``fade_len`` frames each, while every step falls into the run / rises out of it by at least ``fade_step`` of the
   brighter frame's luma) form the fade's span, and
   hard-cut candidates inside the span are dropped, so a fade is detected once. A dark run at the start or the end
   of the video (fade-in from / fade-out to black) is no boundary; a dip to black that comes back to the same
   content (distance before/after ``< min_threshold``) is none either. Dissolves between two lit shots are not
   modelled: they are found only when one step of the dissolve passes the hard-cut rule.
6. Boundaries closer than ``min_shot_len`` frames are merged, keeping the stronger (fades win).

Everything here is pure: frames in, cut indices out. Reading videos and the shots files are in
:mod:`vidssl.data.shots`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from vidssl.config import ConfigError


@dataclass
class ContentParams:
    """Hyperparameters of the content detector (the toolkit's own defaults, tuned on synthetic and DAVIS cuts)."""

    bins: int = 16  #: histogram bins per channel
    grid: int = 2  #: histograms per cell of a grid x grid layout (1 = whole frame)
    size: int = 32  #: frames are resized (antialiased) to size x size pixels before the histograms
    colour: Literal["hsv", "rgb"] = "hsv"  #: colour space of the histograms
    window: int = 12  #: half-width in frames of the sliding window of the adaptive threshold
    trim: int = 4  #: the window's largest distances are left out of its mean/std (flashes, nearby cuts)
    k: float = 3.0  #: a cut needs a distance above mean + k * std of its window
    min_threshold: float = 0.25  #: ... and above this absolute floor (distances lie in [0, 1])
    local_max: int = 2  #: a cut's distance is the largest within this many frames on either side
    flash_len: int = 3  #: content that returns within this many frames is a flash, not a cut
    flash_ratio: float = 0.5  #: "returns" = distance below flash_ratio times the candidate's distance
    black_level: float = 0.06  #: frames with mean luma (0..1) below this are black (fade rule)
    max_black_len: int = 50  #: a longer dark run is content (night scene), not a fade
    fade_len: int = 30  #: longest luma ramp (frames) on either side of the black run counted as the fade
    fade_step: float = 0.02  #: a ramp frame changes the luma by at least this fraction of the brighter frame
    min_shot_len: int = 8  #: boundaries closer than this many frames are merged (the stronger is kept)

    def validate(self, prefix: str = "") -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        p = f"{prefix}." if prefix else ""
        ints = {"bins": 2, "grid": 1, "size": 4, "window": 3, "trim": 0, "local_max": 0, "flash_len": 0,
                "max_black_len": 1, "fade_len": 0, "min_shot_len": 1}
        for name, low in ints.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"{p}{name}: expected an integer >= {low}, got {v!r}")
        if self.size < self.grid:
            raise ConfigError(f"{p}size: must be >= grid ({self.grid}), got {self.size}")
        if self.colour not in ("hsv", "rgb"):
            raise ConfigError(f"{p}colour: expected 'hsv' or 'rgb', got {self.colour!r}")
        if self.trim > 2 * self.window - 4:
            raise ConfigError(f"{p}trim: must leave >= 2 distances of the window (<= {2 * self.window - 4}), "
                              f"got {self.trim}")
        for name in ("k", "min_threshold", "flash_ratio", "black_level", "fade_step"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{p}{name}: expected a finite number >= 0, got {v!r}")
        if self.min_threshold > 1 or self.black_level > 1:
            raise ConfigError(f"{p}min_threshold/black_level: must be <= 1 (distances and luma lie in [0, 1])")


# ---------------------------------------------------------------------------------------------------- features

def _bins(x: torch.Tensor, colour: str, nb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel bin (``0 .. nb - 1``, float) of each channel of ``x`` (``(B, 3, s, s)`` RGB, 0..255 float).

    ``hsv``: hue is the angle of the opponent-colour vector (2R - G - B, sqrt(3) (G - B)) -- the circular form of the
    hexagonal HSV hue --, saturation (max - min) / max, value max. ``rgb``: the channels themselves.
    """
    r, g, b = x.unbind(1)                                                     # each (B, s, s)
    if colour == "rgb":
        return r * (nb / 256), g * (nb / 256), b * (nb / 256)
    vmax = torch.maximum(torch.maximum(r, g), b)                              # (B, s, s)
    vmin = torch.minimum(torch.minimum(r, g), b)                              # (B, s, s)
    hue = (torch.atan2(math.sqrt(3.0) * (g - b), 2 * r - g - b) * (nb / (2 * math.pi))).remainder_(nb)  # (B, s, s)
    sat = (vmax - vmin) * nb / vmax.clamp_min(1.0)                            # (B, s, s)
    return hue, sat, vmax * (nb / 256)


def frame_features(frames: torch.Tensor, params: ContentParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Histograms and mean luma of a batch of frames.

    Args:
        frames: ``uint8 (B, 3, H, W)`` RGB on any device.
        params: detector hyperparameters (``size``, ``grid``, ``bins``, ``colour``).

    Returns:
        ``(hist, luma)``: ``hist`` float32 ``(B, 3 * grid * grid, bins)`` (channel-major) with each histogram summing
        to 1, ``luma`` float32 ``(B,)`` in [0, 1], both on ``frames.device``.
    """
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames: expected (B, 3, H, W), got {tuple(frames.shape)}")
    s, g, nb = params.size, params.grid, params.bins
    step = max(1, min(frames.shape[2:]) // (2 * s))  # keep >= 2 size pixels on the short side before resizing
    sub = frames[:, :, ::step, ::step]                                        # (B, 3, H / step, W / step)
    if frames.device.type == "cpu":  # antialiased uint8 resize: ~15x faster than float on CPU
        x = F.interpolate(sub, size=(s, s), mode="bilinear", antialias=True).float()  # (B, 3, s, s) 0..255
    else:
        x = F.interpolate(sub.float(), size=(s, s), mode="bilinear", antialias=True)  # (B, 3, s, s) 0..255
    b, cells, dev = x.shape[0], g * g, x.device
    luma = reduce(x[:, 0] * 0.299 + x[:, 1] * 0.587 + x[:, 2] * 0.114, "b h w -> b", "mean") / 255.0  # (B,)
    rows = torch.arange(s, device=dev, dtype=torch.int32) * g // s           # (s,) cell row of each pixel row
    cell = rearrange(rows, "h -> 1 h 1") * g + rearrange(rows, "w -> 1 1 w")  # (1, s, s) cell of each pixel
    first = (rearrange(torch.arange(b, device=dev, dtype=torch.int32), "b -> b 1 1") * cells + cell) * nb  # (B, s, s)
    hists = []
    for chan in _bins(x, params.colour, nb):                                  # (B, s, s) each
        idx = chan.to(torch.int32).clamp_(0, nb - 1) + first                  # (B, s, s) flat bin index
        counts = torch.bincount(idx.flatten(), minlength=b * cells * nb).float()  # (B G G nb)
        hists.append(rearrange(counts, "(b k n) -> b k n", b=b, n=nb))         # (B, G G, nb)
    hist = torch.cat(hists, 1)                                                # (B, 3 G G, nb)
    return hist / hist.sum(-1, keepdim=True), luma


def histogram_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half L1 (total-variation) distance, averaged over histograms: ``(..., K, bins) x2 -> (...)`` in [0, 1]."""
    return reduce((a - b).abs(), "... k n -> ...", "sum") / (2 * a.shape[-2])


# ---------------------------------------------------------------------------------------------------- decision

@dataclass
class Boundaries:
    """What :func:`find_cuts` found: ``cuts`` (first frame of each new shot, sorted) and the evidence."""

    cuts: list[int]
    distances: torch.Tensor  #: (N,) d[t] between frames t - 1 and t (d[0] = 0)
    thresholds: torch.Tensor  #: (N,) adaptive threshold of each frame
    fades: list[tuple[int, int, int]]  #: (span start, boundary, span end exclusive) of each fade through black


def _window_stats(d: torch.Tensor, window: int, trim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``d`` over ``[t - window, t + window]`` without ``t - 1, t, t + 1`` and without the ``trim``
    largest values (edges replicated)."""
    padded = F.pad(d[None, None], (window, window), mode="replicate")[0, 0]   # (N + 2w,)
    win = padded.unfold(0, 2 * window + 1, 1)                                 # (N, 2w + 1)
    keep = torch.ones(2 * window + 1, dtype=torch.bool, device=d.device)      # (2w + 1,)
    keep[window - 1: window + 2] = False
    vals = win[:, keep].sort(1).values[:, : 2 * window - 2 - trim]            # (N, 2w - 2 - trim) smallest
    return vals.mean(1), vals.std(1, unbiased=False)                          # (N,), (N,)


def _dark_runs(dark: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, flag in enumerate(dark + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _fades(hist: torch.Tensor, luma: list[float], p: ContentParams) -> tuple[list[tuple[int, int, int]],
                                                                              list[tuple[int, int]]]:
    """Fades through black: ``(span start, boundary, span end)`` of interior ones and the spans of all dark runs."""
    n = len(luma)
    fades, spans = [], []
    for a, b in _dark_runs([v < p.black_level for v in luma]):
        if b - a > p.max_black_len:
            continue
        lo = a
        while lo > 0 and a - lo < p.fade_len and luma[lo - 1] - luma[lo] >= p.fade_step * luma[lo - 1]:
            lo -= 1
        hi = b  # exclusive
        while hi < n and hi - b < p.fade_len and luma[hi] - luma[hi - 1] >= p.fade_step * luma[hi]:
            hi += 1
        spans.append((lo, hi))
        if a == 0 or b == n:
            continue  # fade-in from black at the start / fade-out at the end: no boundary
        before, after = max(lo - 1, 0), min(hi, n - 1)
        if float(histogram_distance(hist[before], hist[after])) < p.min_threshold:
            continue  # dipped to black and came back to the same content
        fades.append((lo, a + (b - a) // 2, hi))
    return fades, spans


def _is_flash(hist: torch.Tensor, t: int, dist: float, p: ContentParams) -> bool:
    n = hist.shape[0]
    after = hist[t + 1: min(t + 1 + p.flash_len, n)]                           # (<= flash_len, K, nb)
    before = hist[max(t - 1 - p.flash_len, 0): max(t - 1, 0)]                 # (<= flash_len, K, nb)
    limit = p.flash_ratio * dist
    if after.shape[0] and float(histogram_distance(hist[t - 1][None], after).min()) < limit:
        return True
    return bool(before.shape[0]) and float(histogram_distance(hist[t][None], before).min()) < limit


def find_cuts(hist: torch.Tensor, luma: torch.Tensor, params: ContentParams) -> Boundaries:
    """Shot boundaries of one video from its per-frame features (rules in the module docstring).

    Args:
        hist: ``(N, K, bins)`` histograms of every frame, in order (from :func:`frame_features`).
        luma: ``(N,)`` mean luma of every frame.
        params: detector hyperparameters.

    Returns:
        :class:`Boundaries`; ``cuts`` never contains 0 and every cut is ``< N``.
    """
    n = hist.shape[0]
    if luma.shape != (n,):
        raise ValueError(f"luma: expected shape ({n},), got {tuple(luma.shape)}")
    d = torch.zeros(n, device=hist.device)                                    # (N,)
    if n > 1:
        d[1:] = histogram_distance(hist[:-1], hist[1:])                       # (N - 1,)
    mean, std = _window_stats(d, params.window, params.trim) if n > 1 else (d, d)          # (N,), (N,)
    thresh = torch.clamp(mean + params.k * std, min=params.min_threshold)     # (N,)
    m = params.local_max
    peak = F.max_pool1d(d[None, None], 2 * m + 1, stride=1, padding=m)[0, 0] if n > 1 else d  # (N,)
    cand = ((d > thresh) & (d >= peak)).nonzero().flatten().tolist()
    fades, spans = _fades(hist, luma.tolist(), params)
    scored: list[tuple[float, int]] = []
    for t in cand:
        if t == 0 or any(lo <= t <= hi for lo, hi in spans):
            continue
        dist = float(d[t])
        if not _is_flash(hist, t, dist, params):
            scored.append((dist, t))
    scored += [(math.inf, c) for _, c, _ in fades]
    kept: list[int] = []
    for _, t in sorted(scored, reverse=True):  # strongest first; fades (inf) win
        if all(abs(t - u) >= params.min_shot_len for u in kept):
            kept.append(t)
    return Boundaries(cuts=sorted(kept), distances=d, thresholds=thresh, fades=fades)


def detect_boundaries(batches: Iterable[torch.Tensor], params: ContentParams) -> Boundaries:
    """:func:`find_cuts` over consecutive frame ``batches`` (``uint8 (B, 3, H, W)``), featurised batch by batch."""
    hists, lumas = [], []
    for frames in batches:
        hist, luma = frame_features(frames, params)                           # (B, K, bins), (B,)
        hists.append(hist)
        lumas.append(luma)
    if not hists:
        return Boundaries(cuts=[], distances=torch.zeros(0), thresholds=torch.zeros(0), fades=[])
    return find_cuts(torch.cat(hists), torch.cat(lumas), params)
