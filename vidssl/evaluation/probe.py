"""Frozen-feature evaluation (``vidssl probe``): linear probe, weighted kNN, clip retrieval, arrow of time.

Protocol functions are pure tensor functions on features and integer labels (any device, no model, no files), so an
objective can call them as an in-training monitor (:class:`ProbeMonitor` does: features of the live encoder, left as
it was; a recipe's ``monitor.probe`` section runs it from ``vidssl pretrain``):

* :func:`linear_probe` -- standardise with train statistics, multinomial logistic regression (full-batch L-BFGS,
  float64) for each L2 strength of a log-spaced sweep, pick the best on a held-out part of the train split (whole
  videos when a class has several, else the class's last items in order), retrain on the whole train split, score
  test top-1 (and top-5 above 5 classes).
* :func:`knn_classify` -- weighted kNN of Wu et al. 2018 / DINO: cosine similarity on L2-normalised features, the
  ``k`` most similar train items (``k`` capped at the train size, recorded) vote for their class with weight
  ``exp(sim / T)``, ``T = 0.07``.
* :func:`retrieval_recall` -- test clips query the train clips by cosine similarity; Recall@k is the fraction of
  queries with a same-class train clip among the top ``k`` (``k`` capped at the train size, recorded).
* :func:`arrow_of_time_probe` -- a linear head (the linear probe above, two classes) on frozen clip features predicts
  forward vs time-reversed, trained and tested on disjoint videos. The clip feature keeps the order: the per-frame
  pooled features concatenated over the clip frames in time order (``T * C`` dims); for a per-frame encoder the
  reversed clip's feature is the same per-frame features concatenated in reverse order (exactly what encoding the
  reversed frames gives).

:func:`run_probe` evaluates a checkpoint (or a built-in encoder) and, always, the same architecture at random init
(seeded) on a :class:`vidssl.data.labelled.ProbeSet`, and writes one JSON report atomically. Features are the global
average pool of the encoder output at ``model.eval_layer`` for ResNets (the final output for other encoders) of
frames resized (short side) and centre-cropped to ``size`` without augmentation; a clip's feature for the
classification protocols is the mean over its frames.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange, reduce

from vidssl.data.labelled import ProbeItem, ProbeSet, read_item_frames
from vidssl.evaluation.features import recalibrating_batchnorm
from vidssl.io.atomic import atomic_write_text
from vidssl.models.encoders import ModelConfig, build_model_encoder
from vidssl.models.lab import normalise_lab, rgb_to_lab

if TYPE_CHECKING:
    from vidssl.engine.config import RunConfig

__all__ = [
    "DEFAULT_L2",
    "KNN_KS",
    "PROTOCOLS",
    "RETRIEVAL_KS",
    "FrameFeatures",
    "ProbeMonitor",
    "arrow_folds",
    "arrow_of_time_probe",
    "batch_statistics_layers",
    "clip_features",
    "default_protocols",
    "eval_mode",
    "evaluate_features",
    "fit_logistic",
    "holdout_split",
    "knn_classify",
    "knn_scores",
    "linear_probe",
    "monitors_from_config",
    "random_init_encoder",
    "recalibrate_batchnorm",
    "retrieval_recall",
    "run_probe",
    "topk_accuracy",
]

DEFAULT_L2: tuple[float, ...] = tuple(10.0 ** e for e in range(-6, 1))  #: L2 sweep 1e-6 .. 1e0
KNN_KS: tuple[int, ...] = (20, 200)
KNN_TEMPERATURE = 0.07
RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10, 20)
PROTOCOLS: tuple[str, ...] = ("linear", "knn", "retrieval", "arrow")
REPORT_NAME = "probe.json"


# ================================================================================================ pure protocols
def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows of ``scores (N, K)`` whose label is among the ``k`` highest scores."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # n k
    return float((top == labels[:, None]).any(dim=1).double().mean())


def _check_xy(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}_x: expected (N, D) features, got shape {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}_y: expected ({x.shape[0]},) labels, got shape {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}_x: no items")
    if y.dtype.is_floating_point or y.dtype == torch.bool or int(y.min()) < 0:
        raise ValueError(f"{name}_y: expected non-negative integer class labels, got {y.dtype} min {y.min()}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}_x: features contain NaN or inf")


def _num_classes(num_classes: int | None, train_y: torch.Tensor, test_y: torch.Tensor) -> int:
    top = 1 + max(int(train_y.max()), int(test_y.max()))
    if num_classes is not None and top > num_classes:
        raise ValueError(f"num_classes: {num_classes}, but the labels go up to {top - 1}")
    return int(num_classes or top)


def standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Subtract the train mean and divide by the train std (constant dimensions are divided by 1)."""
    mean = reduce(train_x, "n d -> d", "mean")  # d
    std = train_x.std(dim=0, unbiased=False)  # d
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # d
    return [(x - mean) / std for x in (train_x, *others)]  # each (n, d)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *, max_iter: int = 500
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, loss ``mean CE + l2 / 2 * ||W||^2`` (bias not penalised), full-batch
    L-BFGS with a strong-Wolfe line search from zero, in float64. Returns ``(W (D, K), b (K,))``."""
    x = x.detach().to(torch.float64).clone()  # n d
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)  # d k
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)  # k
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = einsum(x, w, "n d, d k -> n k") + b  # n k
        loss = F.cross_entropy(logits, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return einsum(x.to(torch.float64), w, "n d, d k -> n k") + b  # n k


def holdout_split(labels: torch.Tensor, groups: Sequence[Any] | None = None, fraction: float = 0.2
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-class held-out split of a train split: ``(fit indices, held-out indices)``.

    For each class: when its items come from at least 2 groups (videos), the last ``ceil(fraction * groups)`` groups
    (in order of first appearance) are held out, so no video is on both sides; otherwise its last
    ``ceil(fraction * n)`` items (in order: the latest frames for a frame folder). A class with 1 item stays in fit.
    """
    n = labels.shape[0]
    groups = list(range(n)) if groups is None else list(groups)
    if len(groups) != n:
        raise ValueError(f"groups: expected {n} entries (one per item), got {len(groups)}")
    held: list[int] = []
    for c in labels.unique().tolist():
        idx = [i for i in range(n) if int(labels[i]) == c]
        order = list(dict.fromkeys(groups[i] for i in idx))
        if len(order) >= 2:
            out = set(order[len(order) - math.ceil(fraction * len(order)):])
            held += [i for i in idx if groups[i] in out]
        elif len(idx) >= 2:
            held += idx[len(idx) - math.ceil(fraction * len(idx)):]
    held_t = torch.tensor(sorted(held), dtype=torch.long)  # n_held
    keep = torch.ones(n, dtype=torch.bool)  # n
    keep[held_t] = False
    return keep.nonzero().flatten(), held_t  # (n_fit,), (n_held,)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 l2_grid: Sequence[float] = DEFAULT_L2, groups: Sequence[Any] | None = None,
                 val_fraction: float = 0.2, num_classes: int | None = None, max_iter: int = 500) -> dict[str, Any]:
    """Linear probe on frozen features (see the module docstring).

    Args:
        train_x, test_x: ``(N, D)`` / ``(M, D)`` features; train_y, test_y: integer labels in ``[0, K)``.
        l2_grid: L2 strengths swept; the best held-out top-1 wins (ties: lower held-out loss, then stronger L2).
        groups: the video of each train item (held-out videos never share a video with the fit part).
        val_fraction: share of each class's videos (or items) held out for the sweep.
        num_classes: ``K`` (default: 1 + the largest label).

    Returns floats: ``top1`` (test), ``top5`` (above 5 classes), ``l2``, ``train_top1``, the ``sweep`` rows, counts.
    """
    _check_xy(train_x, train_y, "train")
    _check_xy(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"test_x: {test_x.shape[1]} dims, train_x has {train_x.shape[1]}")
    if not l2_grid:
        raise ValueError("l2_grid: give at least one L2 strength")
    k = _num_classes(num_classes, train_y, test_y)
    fit_i, val_i = holdout_split(train_y.cpu(), groups, val_fraction)
    if len(val_i) == 0 or len(fit_i) == 0:
        raise ValueError("linear probe: the train split is too small to hold out items for the L2 choice "
                         f"({len(train_y)} items; need at least 2 of some class)")
    fit_i, val_i = fit_i.to(train_x.device), val_i.to(train_x.device)
    fx, vx = standardise(train_x[fit_i].double(), train_x[val_i].double())  # (n_fit, d), (n_val, d)
    sweep = []
    for l2 in l2_grid:
        w, b = fit_logistic(fx, train_y[fit_i], k, float(l2), max_iter=max_iter)
        logits = _logits(vx, w, b)  # n_val k
        sweep.append({"l2": float(l2), "val_top1": topk_accuracy(logits, train_y[val_i]),
                      "val_loss": float(F.cross_entropy(logits, train_y[val_i]))})
    best = max(sweep, key=lambda r: (r["val_top1"], -r["val_loss"], r["l2"]))
    tx, sx = standardise(train_x.double(), test_x.double())  # (n, d), (m, d)
    w, b = fit_logistic(tx, train_y, k, best["l2"], max_iter=max_iter)
    test_logits = _logits(sx, w, b)  # m k
    out = {"top1": topk_accuracy(test_logits, test_y), "l2": best["l2"],
           "train_top1": topk_accuracy(_logits(tx, w, b), train_y), "num_train": int(train_y.shape[0]),
           "num_fit": int(len(fit_i)), "num_heldout": int(len(val_i)), "num_test": int(test_y.shape[0]),
           "num_classes": k, "dim": int(train_x.shape[1]), "chance": 1.0 / k,
           "majority": float(torch.bincount(test_y, minlength=k).max()) / len(test_y), "sweep": sweep}
    if k > 5:
        out["top5"] = topk_accuracy(test_logits, test_y, 5)
    return out


def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, *, k: int = 20,
               temperature: float = KNN_TEMPERATURE, num_classes: int | None = None, chunk: int = 1024
               ) -> torch.Tensor:
    """Class votes ``(M, K)`` of the weighted kNN: for each test row the ``min(k, N)`` train rows of highest cosine
    similarity ``s`` add ``exp(s / temperature)`` to their class."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn: need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    num_classes = int(num_classes or 1 + int(train_y.max()))
    bank = F.normalize(train_x.float(), dim=1)  # n d
    kk = min(k, bank.shape[0])
    out = []
    for q in F.normalize(test_x.float(), dim=1).split(chunk):  # q: (m_chunk, d)
        sims = einsum(q, bank, "m d, n d -> m n")  # m n
        top_s, top_i = sims.topk(kk, dim=1)  # (m, kk), (m, kk)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)  # m k
        votes.scatter_add_(1, train_y[top_i], (top_s / temperature).exp())  # m k
        out.append(votes)
    return torch.cat(out)  # m k


def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 k: int = 20, temperature: float = KNN_TEMPERATURE, num_classes: int | None = None
                 ) -> dict[str, Any]:
    """Weighted kNN accuracy (:func:`knn_scores`): ``top1`` (``top5`` above 5 classes), ``k`` used and requested."""
    _check_xy(train_x, train_y, "train")
    _check_xy(test_x, test_y, "test")
    num_classes = _num_classes(num_classes, train_y, test_y)
    votes = knn_scores(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes)  # m k
    out = {"top1": topk_accuracy(votes, test_y), "k": min(k, train_x.shape[0]), "k_requested": k,
           "temperature": temperature, "num_train": int(train_x.shape[0]), "num_test": int(test_x.shape[0])}
    if num_classes > 5:
        out["top5"] = topk_accuracy(votes, test_y, 5)
    return out


def retrieval_recall(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                     ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, Any]:
    """Recall@k of test queries against the train gallery (cosine similarity; a hit is a same-class clip among the
    ``min(k, N)`` most similar). Returns ``{"R@k": float, ..., "k_used": {"R@k": int}}``."""
    _check_xy(train_x, train_y, "train")
    _check_xy(test_x, test_y, "test")
    sims = einsum(F.normalize(test_x.float(), dim=1), F.normalize(train_x.float(), dim=1), "m d, n d -> m n")  # m n
    order = sims.argsort(dim=1, descending=True, stable=True)  # m n
    same = train_y[order] == test_y[:, None]  # m n, ranked
    first_hit = torch.where(same.any(1), same.float().argmax(1), torch.full_like(test_y, sims.shape[1]))  # m
    out: dict[str, Any] = {}
    used = {}
    for k in ks:
        kk = min(int(k), sims.shape[1])
        out[f"R@{k}"] = float((first_hit < kk).double().mean())
        used[f"R@{k}"] = kk
    out["k_used"] = used
    out["num_gallery"], out["num_queries"] = int(sims.shape[1]), int(sims.shape[0])
    return out


def arrow_of_time_probe(train_seq: torch.Tensor, test_seq: torch.Tensor, *, train_groups: Sequence[Any] | None = None,
                        **probe_kwargs: Any) -> dict[str, Any]:
    """Forward vs reversed with a linear head on order-keeping clip features.

    Args:
        train_seq, test_seq: per-frame features ``(N, T, C)`` / ``(M, T, C)`` of clips of disjoint videos, in time
            order. Each clip gives a forward sample (frames concatenated in order, label 1) and a reversed one (the
            same frames concatenated in reverse order, label 0).
        train_groups: the video of each train clip (the held-out part of the sweep keeps videos and both directions
            of a clip together; default: each clip its own group).
        probe_kwargs: passed to :func:`linear_probe`.
    """
    for name, s in (("train_seq", train_seq), ("test_seq", test_seq)):
        if s.ndim != 3 or s.shape[1] < 2:
            raise ValueError(f"{name}: expected (N, T >= 2, C) per-frame features, got shape {tuple(s.shape)}")

    def both(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fwd = rearrange(seq, "n t c -> n (t c)")
        rev = rearrange(seq.flip(1), "n t c -> n (t c)")
        x = torch.cat([fwd, rev])  # 2n (t c)
        y = torch.cat([torch.ones(len(seq)), torch.zeros(len(seq))]).long().to(seq.device)  # 2n
        return x, y

    groups = list(train_groups) if train_groups is not None else list(range(len(train_seq)))
    tx, ty = both(train_seq)
    sx, sy = both(test_seq)
    out = linear_probe(tx, ty, sx, sy, groups=groups + groups, num_classes=2, **probe_kwargs)
    out["num_clips_train"], out["num_clips_test"] = int(len(train_seq)), int(len(test_seq))
    return out


# ============================================================================================ features from models
@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; on exit every submodule's ``training`` flag is what it was (a
    training encoder whose frozen BatchNorm layers are in eval mode keeps them so)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _module_device(module: nn.Module) -> torch.device | None:
    """Device of the first parameter (or buffer) of ``module``; ``None`` for a module without tensors."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


@dataclass
class FrameFeatures:
    """Frozen per-frame features: resize (short side, bilinear with antialiasing) and centre-crop to ``size``, the
    encoder's input colour space, encoder to ``layer`` (``None``: its final output), global average pool.

    ``__call__``: ``uint8 (N, 3, H, W)`` -> ``float32 (N, C)`` on ``device``. The encoder runs in eval mode under
    ``no_grad``; the caller's module is never changed: it must already be on ``device``, and its training flags are
    restored after each call (:func:`eval_mode`), so a live training encoder can be probed mid-run.
    """

    encoder: nn.Module
    layer: str | None
    colour: str = "rgb"  #: "rgb" (normalised with mean/std) or "lab" (MAST's normalised Lab)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size: int = 224
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.colour not in ("rgb", "lab"):
            raise ValueError(f"colour: {self.colour!r}; expected 'rgb' or 'lab'")
        if self.size < 8:
            raise ValueError(f"size: expected at least 8 pixels, got {self.size}")
        have, want = _module_device(self.encoder), torch.device(self.device)
        if have is not None and (have.type != want.type or None not in (have.index, want.index)
                                 and have.index != want.index):
            raise ValueError(f"device: the encoder is on {have}, features were asked on {want}; move the encoder "
                             "first (FrameFeatures never moves the caller's module)")

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 (N, 3, H, W)`` -> encoder input ``float32 (N, 3, size, size)``."""
        x = frames.to(self.device).float() / 255.0  # n 3 h w
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        nh, nw = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)  # n 3 nh nw
        top, left = (nh - self.size) // 2, (nw - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0.0, 1.0)  # n 3 s s
        if self.colour == "lab":
            return normalise_lab(rgb_to_lab(x))  # n 3 s s
        mean = torch.tensor(self.mean, device=x.device)[None, :, None, None]  # 1 3 1 1
        std = torch.tensor(self.std, device=x.device)[None, :, None, None]  # 1 3 1 1
        return (x - mean) / std  # n 3 s s

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encode(self.preprocess(frames))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(N, 3, size, size)`` -> pooled ``float32 (N, C)`` (eval mode, ``no_grad``; the encoder's
        training flags are restored afterwards). ``no_grad`` rather than ``inference_mode``: a live encoder may
        cache tensors in a forward that its training steps later save for backward."""
        with eval_mode(self.encoder), torch.no_grad():
            fmap = self.encoder(x, upto=self.layer) if self.layer is not None else self.encoder(x)  # n c h w
            feats = reduce(fmap.float(), "n c h w -> n c", "mean")  # n c
        return feats

    def describe(self) -> str:
        norm = (f"RGB/255 normalised with mean {list(self.mean)} std {list(self.std)}" if self.colour == "rgb"
                else "normalised Lab ((L-50)/50, a/127, b/127)")
        return (f"resize short side to {self.size} (bilinear, antialiased), centre crop {self.size}x{self.size}, "
                f"{norm}; no augmentation; global average pool of {self.layer or 'the final output'}")


def batch_statistics_layers(encoder: nn.Module) -> int:
    """BatchNorm layers of ``encoder`` without running statistics (DPC's 2d3d ResNet): they normalise with the
    statistics of the batch at evaluation too, so a frame's features depend on the batch it is encoded in."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats
               for m in encoder.modules())


def _frame_batches(items: Sequence[ProbeItem], features: FrameFeatures, batch_size: int, *, mixed: bool = False
                   ) -> Iterator[tuple[list[tuple[str, int]], torch.Tensor]]:
    """``(keys, preprocessed frames (b, 3, s, s))`` with ``b <= batch_size``: each distinct ``(path, frame)`` of
    ``items`` once, read file by file; ``mixed``: in an order drawn at random (seed 0) across all videos, so
    batch-statistics normalisation sees a batch like a training batch, not the frames of one video."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    unique: dict[str, dict[int, None]] = {}
    for it in items:
        unique.setdefault(it.path, {}).update(dict.fromkeys(it.frames))
    groups: Iterable[tuple[str, list[int]]] = ((p, sorted(f)) for p, f in unique.items())
    if mixed:  # one frame per group, in a seeded random order
        flat = [(p, f) for p, fs in unique.items() for f in sorted(fs)]
        order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(0)).tolist()
        groups = ((flat[i][0], [flat[i][1]]) for i in order)
    keys: list[tuple[str, int]] = []
    pending: list[torch.Tensor] = []
    for path, frames in groups:
        start = 0
        while start < len(frames):  # every batch holds at most batch_size frames
            idx = frames[start:start + batch_size - len(keys)]
            pending.append(features.preprocess(read_item_frames(path, idx)))  # t 3 s s
            keys.extend((path, i) for i in idx)
            start += len(idx)
            if len(keys) >= batch_size:
                yield keys, torch.cat(pending)  # b 3 s s
                keys, pending = [], []
    if keys:
        yield keys, torch.cat(pending)  # b 3 s s


def clip_features(items: Sequence[ProbeItem], features: FrameFeatures, *, batch_size: int = 32,
                  progress: bool = False) -> torch.Tensor:
    """Per-frame features of every clip, ``(N, T, C)`` on the CPU. Each distinct frame is encoded once, in batches
    of at most ``batch_size`` frames read file by file (frames of all videos mixed at random when the encoder
    normalises with batch statistics, :func:`batch_statistics_layers`)."""
    from tqdm import tqdm

    lens = {len(it.frames) for it in items}
    if len(lens) != 1:
        raise ValueError(f"items: clips of different lengths {sorted(lens)}; expected one clip length")
    total = len({(it.path, f) for it in items for f in it.frames})
    rows: dict[tuple[str, int], torch.Tensor] = {}
    with tqdm(total=total, desc="features", unit="frame", disable=not progress, leave=False) as bar:
        mixed = batch_statistics_layers(features.encoder) > 0
        for keys, x in _frame_batches(items, features, batch_size, mixed=mixed):
            rows.update(zip(keys, features.encode(x).cpu()))  # b c
            bar.update(len(keys))
    return _stack_clips(items, rows)  # n t c


def _stack_clips(items: Sequence[ProbeItem], rows: dict[tuple[str, int], torch.Tensor]) -> torch.Tensor:
    """Per-frame features ``{(path, frame): (C,)}`` -> clip features ``(N, T, C)`` in the order of ``items``."""
    return torch.stack([torch.stack([rows[(it.path, f)] for f in it.frames]) for it in items])  # n t c


def recalibrate_batchnorm(items: Sequence[ProbeItem], features: FrameFeatures, *, batch_size: int = 32) -> int:
    """Replace the running statistics of every BatchNorm of ``features.encoder`` (that keeps them) by their
    cumulative average over the frames of ``items`` (no augmentation; weights untouched). Returns the layers reset.
    See :func:`vidssl.evaluation.features.recalibrating_batchnorm`.
    """
    with recalibrating_batchnorm(features.encoder) as count, torch.no_grad():
        for _, x in _frame_batches(items, features, batch_size):
            if features.layer is not None:
                features.encoder(x, upto=features.layer)  # b c h w (statistics updated)
            else:
                features.encoder(x)  # b c h w (statistics updated)
    return count


# ============================================================================================ protocols on a set
def arrow_folds(items: Sequence[ProbeItem]) -> tuple[list[tuple[list[int], list[int]]], str]:
    """Folds ``[(train clip indices, test clip indices)]`` on disjoint videos for the arrow-of-time probe.

    When the train and test splits share no video they are the one fold. Otherwise (frame folders: both halves come
    from every video) leave-one-video-out: each video (sorted by name) is the test set once, with all its clips (both
    time halves), and the other videos train.
    """
    train_v = {it.video for it in items if it.split == "train"}
    test_v = {it.video for it in items if it.split == "test"}
    if not train_v & test_v:
        return ([([i for i, it in enumerate(items) if it.split == "train"],
                  [i for i, it in enumerate(items) if it.split == "test"])], "the train/test split (disjoint videos)")
    videos = sorted(train_v | test_v)
    if len(videos) < 2:
        raise ValueError("arrow-of-time probe: needs clips of at least 2 videos (train and test videos differ)")
    folds = [([i for i, it in enumerate(items) if it.video != v], [i for i, it in enumerate(items) if it.video == v])
             for v in videos]
    return folds, (f"leave-one-video-out over {len(videos)} videos (all clips of a video, both time halves, in the "
                   "same fold); top1 pooled over the folds' test samples")


def protocol_strings(*, l2_grid: Sequence[float] = DEFAULT_L2, knn_ks: Sequence[int] = KNN_KS,
                     retrieval_ks: Sequence[int] = RETRIEVAL_KS, val_fraction: float = 0.2) -> dict[str, str]:
    """One sentence per protocol, recorded in the report."""
    grid = ", ".join(f"{v:g}" for v in l2_grid)
    return {
        "linear": (f"multinomial logistic regression on clip features (mean over frames) standardised with train "
                   f"statistics; full-batch L-BFGS (strong Wolfe, float64) on mean CE + l2/2 ||W||^2; l2 in [{grid}] "
                   f"chosen by top-1 on a held-out {val_fraction:g} of each class's train videos (or its last items "
                   "when a class has one train video), then retrained on the whole train split; test top-1"),
        "knn": (f"knn cosine k={'/'.join(str(k) for k in knn_ks)} (capped at the train size) T={KNN_TEMPERATURE} on "
                "L2-normalised clip features (mean over frames), votes exp(sim/T) summed per class; test top-1"),
        "retrieval": (f"test clips query train clips by cosine similarity of L2-normalised clip features; "
                      f"Recall@{'/'.join(str(k) for k in retrieval_ks)} = fraction of queries with a same-class "
                      "train clip among the top k (k capped at the train size)"),
        "arrow": ("forward vs time-reversed: clip feature = per-frame pooled features concatenated in time order "
                  "(T*C dims; the reversed clip = the same frames concatenated in reverse order), label 1 forward / "
                  "0 reversed, the linear-probe protocol above (2 classes) trained and tested on disjoint videos "
                  "(the train/test split when its videos are disjoint, else leave-one-video-out); test top-1 "
                  "(chance 0.5)"),
    }


def evaluate_features(seq: torch.Tensor, data: ProbeSet, *, protocols: Sequence[str] = PROTOCOLS,
                      l2_grid: Sequence[float] = DEFAULT_L2, knn_ks: Sequence[int] = KNN_KS,
                      retrieval_ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, Any]:
    """Run the chosen protocols on per-frame clip features ``seq (N, T, C)`` of ``data.items`` (same order)."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"protocols: unknown {unknown}; expected some of {list(PROTOCOLS)}")
    items = data.items
    labels = torch.tensor([it.label for it in items])  # n
    clip = reduce(seq, "n t c -> n c", "mean")  # n c
    tr = torch.tensor([i for i, it in enumerate(items) if it.split == "train"])  # n_train
    te = torch.tensor([i for i, it in enumerate(items) if it.split == "test"])  # n_test
    k = len(data.classes)
    class_protocols = sorted({"linear", "knn", "retrieval"} & set(protocols))
    if class_protocols and not _shared_classes(data):
        raise ValueError(f"protocols {class_protocols}: train and test share no class ({data.protocol}); these "
                         "protocols score test items against train classes -- use protocols=['arrow'] for a split "
                         "by video")
    out: dict[str, Any] = {}
    timings: dict[str, float] = {}
    args = (clip[tr], labels[tr], clip[te], labels[te])
    if "linear" in protocols:
        t0 = time.perf_counter()
        out["linear"] = linear_probe(*args, l2_grid=l2_grid, groups=[items[i].video for i in tr], num_classes=k)
        timings["linear"] = time.perf_counter() - t0
    if "knn" in protocols:
        t0 = time.perf_counter()
        out["knn"] = {f"k={kk}": knn_classify(*args, k=kk, num_classes=k) for kk in knn_ks}
        timings["knn"] = time.perf_counter() - t0
    if "retrieval" in protocols:
        t0 = time.perf_counter()
        out["retrieval"] = retrieval_recall(*args, ks=retrieval_ks)
        timings["retrieval"] = time.perf_counter() - t0
    if "arrow" in protocols:
        t0 = time.perf_counter()
        if seq.shape[1] < 2:
            out["arrow"] = {"skipped": "clips of 1 frame have no temporal order (images, or clip_len 1)"}
        else:
            folds, how = arrow_folds(items)
            rows = []
            for a_tr, a_te in folds:
                r = arrow_of_time_probe(seq[a_tr], seq[a_te], train_groups=[items[i].video for i in a_tr],
                                        l2_grid=l2_grid)
                rows.append({"test_videos": sorted({Path(items[i].video).name for i in a_te}), "top1": r["top1"],
                             "l2": r["l2"], "num_test": r["num_test"], "train_top1": r["train_top1"]})
            n_test = sum(r["num_test"] for r in rows)
            videos = {v for r in rows for v in r["test_videos"]}
            # all clips of a video share its motion, so the test videos, not the clips, are the independent samples
            out["arrow"] = {"top1": sum(r["top1"] * r["num_test"] for r in rows) / n_test, "num_test": n_test,
                            "num_test_videos": len(videos),
                            "dim": int(seq.shape[1] * seq.shape[2]), "chance": 0.5, "split": how, "folds": rows}
        timings["arrow"] = time.perf_counter() - t0
    out["timings_s"] = timings
    return out


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of one encoder's results: ``{"linear.top1": ..., "knn.k=20.top1": ..., ...}``."""
    out = {}
    if "linear" in results:
        out["linear.top1"] = results["linear"]["top1"]
    for name, r in results.get("knn", {}).items():
        out[f"knn.{name}.top1"] = r["top1"]
    for name, v in results.get("retrieval", {}).items():
        if name.startswith("R@"):
            out[f"retrieval.{name}"] = v
    if "top1" in results.get("arrow", {}):
        out["arrow.top1"] = results["arrow"]["top1"]
    return out


# ================================================================================================= the runner
def _resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} but CUDA is not available (use --device cpu)")
    return str(device)


def _layer_name(model_cfg: ModelConfig, layer: str | None) -> str | None:
    """``layer`` or ``model.eval_layer`` for the ResNet trunks (v1 and v2); ``None`` (final output) for others."""
    if model_cfg.encoder not in ("resnet18", "resnet34", "resnet50", "resnet18v2", "resnet34v2", "resnet50v2"):
        if layer is not None:
            raise ValueError(f"layer: only ResNet encoders take a feature layer; {model_cfg.encoder} is read at its "
                             "final output")
        return None
    return layer or model_cfg.eval_layer


def _check_layer(encoder: nn.Module, layer: str | None, where: str = "layer") -> None:
    """Refuse a stage ``layer`` the encoder does not build (``where``: the key the error names)."""
    layers = getattr(encoder, "layers", None)
    if layer is not None and layers is not None and layer not in layers:
        raise ValueError(f"{where}: {layer!r} is not built in this encoder (has {list(layers)})")


def _feature_layer(encoder: nn.Module, model_cfg: ModelConfig, layer: str | None) -> str | None:
    """The stage read from ``encoder`` (:func:`_layer_name`), checked to be built."""
    layer = _layer_name(model_cfg, layer)
    _check_layer(encoder, layer)
    return layer


def default_protocols(data: ProbeSet) -> tuple[str, ...]:
    """Every protocol that applies to ``data``: all of :data:`PROTOCOLS`, or only arrow of time when train and test
    share no class (a split by video)."""
    return PROTOCOLS if _shared_classes(data) else ("arrow",)


def _shared_classes(data: ProbeSet) -> set[int]:
    split = {s: {it.label for it in data.items if it.split == s} for s in ("train", "test")}
    return split["train"] & split["test"]


def random_init_encoder(model_cfg: ModelConfig, seed: int) -> nn.Module:
    """The architecture of ``model_cfg`` at random init from ``seed`` (a forked RNG; the global one is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_model_encoder(model_cfg).eval()


def _sources(checkpoint: str | Path | None, encoder: str | None, seeds: Sequence[int]
             ) -> tuple[list[tuple[str, nn.Module, dict[str, Any]]], ModelConfig, dict[str, Any]]:
    """``[(role, encoder, description)]``: the trained checkpoint encoder (if any) then one random init per seed."""
    if (checkpoint is None) == (encoder is None):
        raise ValueError("give exactly one feature source: a checkpoint or an encoder name")
    if not seeds:
        raise ValueError("seeds: give at least one random-init seed")
    out = []
    config: dict[str, Any] = {}
    if checkpoint is not None:
        from vidssl.engine import encoder_from_checkpoint
        from vidssl.engine.checkpoint import resolve_checkpoint

        ckpt = resolve_checkpoint(checkpoint)
        enc, model_cfg, config, step = encoder_from_checkpoint(ckpt)
        out.append(("trained", enc, {"source": "checkpoint", "checkpoint": str(ckpt), "run": config.get("name"),
                                     "step": step}))
    else:
        from vidssl.models.encoders import encoder_names

        if encoder not in encoder_names():
            raise ValueError(f"encoder: unknown {encoder!r}; available: {', '.join(encoder_names())}")
        model_cfg = ModelConfig(encoder=encoder, colour="lab" if encoder == "mast_resnet18" else "rgb")
    for seed in seeds:
        out.append(("random_init", random_init_encoder(model_cfg, seed),
                    {"source": "random-init", "seed": int(seed)}))
    return out, model_cfg, config


def _mean_std(config: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The data normalisation the run trained with (ImageNet's when absent)."""
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    mean = tuple(float(v) for v in data.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in data.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def _peak_rss_bytes() -> int | None:
    """Peak resident memory of this process (Linux/macOS), ``None`` where unknown."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)


def run_probe(data: ProbeSet, out_dir: str | Path | None = None, *, checkpoint: str | Path | None = None,
              encoder: str | None = None, seeds: Sequence[int] = (0,), layer: str | None = None,
              protocols: Sequence[str] = PROTOCOLS, device: str | None = "auto", size: int = 224,
              batch_size: int = 32, l2_grid: Sequence[float] = DEFAULT_L2, knn_ks: Sequence[int] = KNN_KS,
              retrieval_ks: Sequence[int] = RETRIEVAL_KS, bn_stats: str = "stored", force: bool = False,
              progress: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a checkpoint's encoder (or a built-in ``encoder``) and the same architecture at random init (one per
    seed) with the frozen-feature protocols on ``data``; write ``out_dir/probe.json`` atomically and return it.

    ``bn_stats``: ``"stored"`` (BatchNorm running statistics as built or trained) or ``"train"`` (every encoder's
    statistics recomputed on the train-split frames first, :func:`recalibrate_batchnorm`). An existing report is an
    error unless ``force`` (it is replaced only once the new one is complete).
    """
    t_start = time.perf_counter()
    report_path = Path(out_dir) / REPORT_NAME if out_dir is not None else None
    if report_path is not None and report_path.exists() and not force:
        raise FileExistsError(f"{report_path}: a probe report exists already (pass --force to replace it)")
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown or not protocols:
        raise ValueError(f"protocols: {unknown or 'none given'}; expected some of {list(PROTOCOLS)}")
    if bn_stats not in ("stored", "train"):
        raise ValueError(f"bn_stats: {bn_stats!r}; expected 'stored' or 'train'")
    device = _resolve_device(device)
    sources, model_cfg, config = _sources(checkpoint, encoder, seeds)
    mean, std = _mean_std(config)
    colour = model_cfg.colour if model_cfg.colour != "auto" else "rgb"
    feat_layer = _feature_layer(sources[0][1], model_cfg, layer)
    encoders = []
    for role, enc, desc in sources:
        enc.to(device)  # run_probe owns these encoders (built or loaded here)
        ff = FrameFeatures(enc, feat_layer, colour=colour, mean=mean, std=std, size=size, device=device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if bn_stats == "train":
            desc = {**desc, "bn_layers_recalibrated": recalibrate_batchnorm(data.split("train"), ff,
                                                                            batch_size=batch_size)}
        seq = clip_features(data.items, ff, batch_size=batch_size, progress=progress)  # n t c
        t_feat = time.perf_counter() - t0
        results = evaluate_features(seq, data, protocols=protocols, l2_grid=l2_grid, knn_ks=knn_ks,
                                    retrieval_ks=retrieval_ks)
        results["timings_s"]["features"] = t_feat
        encoders.append({"role": role, **desc, "batch_statistics_layers": batch_statistics_layers(enc),
                         "feature_dim": int(seq.shape[-1]),
                         "arrow_dim": int(seq.shape[1] * seq.shape[2]), "results": results,
                         "headline": headline(results)})
        if device.startswith("cuda"):
            encoders[-1]["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    summary: dict[str, Any] = {}
    for metric in encoders[0]["headline"]:
        rand = [e["headline"][metric] for e in encoders if e["role"] == "random_init"]
        row: dict[str, Any] = {"random_init": rand,
                               "random_init_mean": sum(rand) / len(rand),
                               "random_init_std": float(torch.tensor(rand).std()) if len(rand) > 1 else 0.0}
        trained = [e["headline"][metric] for e in encoders if e["role"] == "trained"]
        if trained:
            row["trained"] = trained[0]
        summary[metric] = row
    arch = f"{model_cfg.encoder}" + (f".{feat_layer}" if feat_layer else ".final")
    report = {
        "kind": "vidssl probe",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoder": {"arch": model_cfg.encoder, "layer": feat_layer or "final output", "description": arch,
                    "model": {k: getattr(model_cfg, k) for k in ("encoder", "out_layer", "eval_layer", "stride8",
                                                                 "padding_mode", "norm", "colour")},
                    "input": ff.describe(),
                    "bn_stats": ("BatchNorm running statistics recomputed on the train-split frames (cumulative "
                                 "average over the batches) for every encoder" if bn_stats == "train" else
                                 "BatchNorm running statistics as stored (a random init: mean 0, variance 1)")
                    + "; layers without running statistics (batch_statistics_layers > 0) normalise with each "
                      "batch's statistics, and their frames are then encoded in batches mixed at random across "
                      "all videos (seed 0)",
                    "clip_feature": "mean over the clip's frames of the per-frame pooled features",
                    "arrow_feature": "per-frame pooled features concatenated over the clip frames in time order"},
        "data": {"mode": data.mode, "root": data.root, "protocol": data.protocol, "classes": data.classes,
                 "clip_len": data.clip_len, "counts": data.counts(), **data.extra},
        "protocols": {k: v for k, v in protocol_strings(l2_grid=l2_grid, knn_ks=knn_ks,
                                                        retrieval_ks=retrieval_ks).items() if k in protocols},
        "device": device + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""),
        "host": {"python": platform.python_version(), "torch": torch.__version__,
                 "threads": torch.get_num_threads()},
        "summary": summary,
        "encoders": encoders,
        **(extra or {}),
    }
    report["timings_s"] = {"total": time.perf_counter() - t_start}
    report["host"]["peak_rss_bytes"] = _peak_rss_bytes()
    if report_path is not None:
        atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    return report


def format_summary(report: dict[str, Any]) -> str:
    """A table of the headline metrics: trained (if any) and random init (mean +- std over seeds)."""
    rows = [f"{'metric':22s} {'trained':>9s} {'random init':>18s}"]
    for metric, r in report["summary"].items():
        tr = f"{r['trained']:.4f}" if "trained" in r else "-"
        n = len(r["random_init"])
        rnd = f"{r['random_init_mean']:.4f}" + (f" +- {r['random_init_std']:.4f}" if n > 1 else "")
        rows.append(f"{metric:22s} {tr:>9s} {rnd:>18s}")
    return "\n".join(rows)


# ====================================================================================== in-training monitor
class ProbeMonitor:
    """The probe as an in-training monitor: ``monitor(step, encoder) -> {"knn.k=20.top1": ..., ...}``.

    Pass it to :func:`vidssl.engine.train` (``monitors=[...]``, a :class:`vidssl.engine.trainer.Monitor`; recipes:
    the ``monitor.probe`` section, :func:`monitors_from_config`) or call it from an objective. Each call encodes the
    clips of ``data`` with the LIVE encoder as :class:`FrameFeatures` does (eval mode, ``no_grad``, on the encoder's
    device; every submodule's training flag is restored afterwards, nothing else of the encoder is touched and no
    random number is drawn), runs :func:`evaluate_features` with ``protocols`` and returns the :func:`headline`
    scalars plus ``time_s`` (the call's wall time). The scores are those ``vidssl probe`` reports for a checkpoint of
    that step (same preprocessing, layer and protocols; ``stored`` BatchNorm statistics, i.e. the running ones).

    Frames are read and preprocessed (resize, crop, colour space, normalisation; on the CPU) on the first call, and
    with ``cache`` (the default) kept in CPU memory for the later calls: ``frames x 3 x size^2 x 4`` bytes for the
    distinct frames of the clips (``len(monitor)``), e.g. 600 KB per frame at size 224, 150 KB at 112 -- 8 sequences
    with the default 8 clips of 8 frames per half hold at most 1,024 frames, about 600 MB at 224. With
    ``cache=False`` every call reads the files again. Cost per call: one forward per distinct frame (batches of
    ``batch_size``) plus the protocols on the CPU (the linear probe and arrow of time fit an L-BFGS per L2 value and
    fold: seconds to a minute on small sets). Under DDP the trainer calls it on the main process only while the other
    processes wait at their next gradient reduction, so keep a call well under the process group's timeout.

    Args:
        data: the labelled clips (:mod:`vidssl.data.labelled`, e.g. :func:`~vidssl.data.labelled.frame_folders_set`).
        protocols: some of :data:`PROTOCOLS` (default: every one that applies: arrow only when train and test share
            no class).
        size, colour, mean, std: the encoder's input as in :class:`FrameFeatures` (a run's ``model.colour``,
            ``data.mean`` / ``data.std``).
        layer: the stage read (``encoder(x, upto=layer)``); ``None``: the final output.
        every: steps between calls in :func:`~vidssl.engine.train` (it also calls at the last step).
        name: the prefix of the scalars in the training log (``probe/knn.k=20.top1``).
        where: the config key errors name.
    """

    def __init__(self, data: ProbeSet, *, protocols: Sequence[str] | None = None, size: int = 224,
                 layer: str | None = None, colour: str = "rgb",
                 mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
                 std: tuple[float, float, float] = (0.229, 0.224, 0.225), every: int = 100, batch_size: int = 32,
                 cache: bool = True, name: str = "probe", where: str = "monitor.probe") -> None:
        shared = _shared_classes(data)
        if protocols is None or not len(protocols):
            protocols = default_protocols(data)
        unknown = sorted(set(protocols) - set(PROTOCOLS))
        if unknown:
            raise ValueError(f"{where}.protocols: unknown {unknown}; expected some of {list(PROTOCOLS)}")
        if not shared and set(protocols) - {"arrow"}:
            raise ValueError(f"{where}.protocols: {sorted(set(protocols) - {'arrow'})} score test items against "
                             f"train classes, but train and test share no class ({data.protocol}); use arrow")
        for key, value, lo in (("every", every, 1), ("batch_size", batch_size, 1), ("size", size, 8)):
            if value < lo:
                raise ValueError(f"{where}.{key}: must be >= {lo}, got {value}")
        if len({len(it.frames) for it in data.items}) != 1:
            raise ValueError(f"{where}: clips of different lengths; expected one clip length")
        self.data, self.protocols, self.layer = data, tuple(protocols), layer
        self.every, self.batch_size, self.cache, self.name, self.where = int(every), int(batch_size), cache, name, where
        # preprocessing only (no encoder: the live one is given at each call)
        self._prep = FrameFeatures(nn.Identity(), None, colour=colour, mean=tuple(mean), std=tuple(std), size=size,
                                   device="cpu")
        self._inputs: list[tuple[list[tuple[str, int]], torch.Tensor]] | None = None

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "ProbeMonitor":
        """The monitor of a run config's ``monitor.probe`` section (input read like ``vidssl probe --frames``;
        encoder input and layer as ``vidssl probe --checkpoint`` reads that run's checkpoints)."""
        from vidssl.config import ConfigError
        from vidssl.data import labelled

        mc, where = cfg.monitor.probe, "monitor.probe"
        try:
            layer = _layer_name(cfg.model, mc.layer)
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc} (leave it null)") from exc
        try:
            data = labelled.frame_folders_set(mc.frames, sequences=mc.sequences or None, clip_len=mc.clip_len,
                                              stride=mc.stride, clips_per_video=mc.clips_per_video,
                                              test_sequences=mc.test_sequences or None)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{where}.frames: {exc}") from exc
        colour = cfg.model.colour if cfg.model.colour != "auto" else "rgb"
        return cls(data, protocols=mc.protocols or None, size=mc.size, layer=layer, colour=colour,
                   mean=tuple(cfg.data.mean), std=tuple(cfg.data.std), every=mc.every, batch_size=mc.batch_size,
                   cache=mc.cache, where=where)

    def __len__(self) -> int:
        """Distinct frames encoded per call."""
        return len({(it.path, f) for it in self.data.items for f in it.frames})

    def check(self, encoder: nn.Module) -> None:
        """Refuse an encoder that lacks the stage read (called by the trainer before the run folder is written)."""
        from vidssl.config import ConfigError

        try:
            _check_layer(encoder, self.layer, f"{self.where}.layer")
        except ValueError as exc:
            raise ConfigError(f"{exc}; the default is model.eval_layer") from exc

    def _batches(self, mixed: bool = False) -> list[tuple[list[tuple[str, int]], torch.Tensor]] | Iterator:
        if self._inputs is not None:
            return self._inputs
        batches = _frame_batches(self.data.items, self._prep, self.batch_size, mixed=mixed)  # read + preprocess
        if not self.cache:
            return batches
        self._inputs = list(batches)
        return self._inputs

    def features(self, encoder: nn.Module) -> torch.Tensor:
        """Per-frame clip features ``(N, T, C)`` (CPU) of ``data.items`` from ``encoder`` as it is now."""
        device = _module_device(encoder) or torch.device("cpu")
        ff = FrameFeatures(encoder, self.layer, colour=self._prep.colour, mean=self._prep.mean, std=self._prep.std,
                           size=self._prep.size, device=str(device))
        rows: dict[tuple[str, int], torch.Tensor] = {}
        for keys, x in self._batches(mixed=batch_statistics_layers(encoder) > 0):  # x: b 3 s s
            rows.update(zip(keys, ff.encode(x.to(device)).cpu()))  # b c
        return _stack_clips(self.data.items, rows)  # n t c

    def __call__(self, step: int, encoder: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        results = evaluate_features(self.features(encoder), self.data, protocols=self.protocols)
        return {**headline(results), "time_s": time.perf_counter() - t0}


def monitors_from_config(cfg: "RunConfig") -> list[ProbeMonitor]:
    """The monitors a run config enables (``monitor.probe``), for ``train(cfg, out, monitors=...)``."""
    return [ProbeMonitor.from_config(cfg)] if cfg.monitor.probe.enabled else []
