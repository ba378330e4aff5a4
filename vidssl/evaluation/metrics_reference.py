"""A deliberately plain per-frame implementation of the DAVIS measures, written from the spec, numpy only.

It loops over frames, builds each boundary map pixel rule by pixel rule, dilates it with the full disk footprint
(one shifted OR per disk offset, zeros outside the image) and computes precision/recall/F with Python scalars. It is
the "straightforward per-frame implementation": it cross-checks :mod:`vidssl.evaluation.metrics` in the tests (a
different algorithm for the disk test, same integer counts) and is the baseline ``tools/bench_evaluate.py`` times.
Same signatures as the fast module; use the fast one for real work.
"""

from __future__ import annotations

import math

import numpy as np

from vidssl.evaluation.metrics import bound_pix


def iou_frame(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """J of one frame: ``gt``, ``pred``, ``void`` are ``(H, W)`` bool."""
    keep = np.ones(gt.shape, dtype=bool) if void is None else ~void
    inter = int(np.sum(gt & pred & keep))
    union = int(np.sum((gt | pred) & keep))
    if union == 0:
        return 1.0
    return inter / union


def db_eval_iou(gt, pred, void=None) -> np.ndarray:
    """``(T,)`` J, one frame at a time; inputs ``(T, H, W)`` bool."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    out = np.zeros(gt.shape[0], dtype=np.float64)
    for t in range(gt.shape[0]):
        out[t] = iou_frame(gt[t], pred[t], None if void is None else np.asarray(void[t], dtype=bool))
    return out


def boundary_frame(mask: np.ndarray) -> np.ndarray:
    """Boundary map of one ``(H, W)`` mask (spec 2.3): S xor E, S xor S-neighbour, S xor SE (0 outside), with the
    last row using only E, the last column only the south neighbour, and the bottom-right pixel 0."""
    s = np.asarray(mask, dtype=bool)
    h, w = s.shape
    padded = np.zeros((h + 1, w + 1), dtype=bool)
    padded[:h, :w] = s
    east = padded[:h, 1:w + 1]
    south = padded[1:h + 1, :w]
    south_east = padded[1:h + 1, 1:w + 1]
    b = (s ^ east) | (s ^ south) | (s ^ south_east)
    b[h - 1, :] = s[h - 1, :] ^ east[h - 1, :]
    b[:, w - 1] = s[:, w - 1] ^ south[:, w - 1]
    b[h - 1, w - 1] = False
    return b


def seg2bmap(masks) -> np.ndarray:
    """``(T, H, W)`` boundary maps, one frame at a time."""
    masks = np.asarray(masks, dtype=bool)
    return np.stack([boundary_frame(m) for m in masks]) if len(masks) else np.zeros(masks.shape, dtype=bool)


def disk(radius: int) -> np.ndarray:
    """``(2r+1, 2r+1)`` bool footprint of ``x^2 + y^2 <= r^2`` (as ``skimage.morphology.disk``)."""
    coords = np.arange(-radius, radius + 1)
    return (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius * radius


def dilate_frame(b: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of ``(H, W)`` ``b`` by :func:`disk` (pixels outside the image are 0)."""
    h, w = b.shape
    out = np.zeros_like(b)
    fp = disk(radius)
    for i in range(2 * radius + 1):
        for j in range(2 * radius + 1):
            if not fp[i, j]:
                continue
            dy, dx = i - radius, j - radius
            # out[y, x] |= b[y + dy, x + dx] where both lie inside the image
            ys, ye = max(0, -dy), min(h, h - dy)
            xs, xe = max(0, -dx), min(w, w - dx)
            if ys < ye and xs < xe:
                out[ys:ye, xs:xe] |= b[ys + dy:ye + dy, xs + dx:xe + dx]
    return out


def f_frame(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = 0.008) -> float:
    """Boundary F of one frame (spec 2.3, steps 1-6)."""
    if void is not None:
        gt = gt & ~void
        pred = pred & ~void
    h, w = gt.shape
    r = bound_pix(h, w, bound_th)
    b_fg = boundary_frame(pred)
    b_gt = boundary_frame(gt)
    fg_dil = dilate_frame(b_fg, r)
    gt_dil = dilate_frame(b_gt, r)
    n_fg = int(b_fg.sum())
    n_gt = int(b_gt.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = int(np.sum(b_fg & gt_dil)) / n_fg
        recall = int(np.sum(b_gt & fg_dil)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def db_eval_boundary(gt, pred, void=None, bound_th: float = 0.008) -> np.ndarray:
    """``(T,)`` F, one frame at a time; inputs ``(T, H, W)`` bool."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    out = np.zeros(gt.shape[0], dtype=np.float64)
    for t in range(gt.shape[0]):
        v = None if void is None else np.asarray(void[t], dtype=bool)
        out[t] = f_frame(gt[t], pred[t], v, bound_th)
    return out


def decay_bin_ids(n: int) -> list[int]:
    """Bin edges ``round_half_up(1 + i (n - 1) / 4) - 1`` for i = 0..4, with Python integers."""
    return [math.floor(1 + i * (n - 1) / 4 + 0.5) - 1 for i in range(5)]


def db_statistics(v) -> tuple[float, float, float]:
    """Mean, Recall (strictly > 0.5) and Decay of ``(N,)`` per-frame values (no NaN support needed here)."""
    vals = [float(x) for x in np.asarray(v, dtype=np.float64)]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(vals) / n
    recall = sum(1 for x in vals if x > 0.5) / n
    ids = decay_bin_ids(n)
    first = vals[ids[0]:ids[1] + 1]
    last = vals[ids[3]:ids[4] + 1]
    return mean, recall, sum(first) / len(first) - sum(last) / len(last)
