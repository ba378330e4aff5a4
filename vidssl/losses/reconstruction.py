"""Reconstruction losses of the colour-copying learners (CorrFlow, MAST) and their colour targets.

* CorrFlow: negative log-likelihood of the quantised colour (``ab`` of Lab snapped to ``K`` k-means centroids).
  :func:`colour_nll` is the official ``nll(log(p + 1e-8))`` on upsampled probabilities; :func:`colour_nll_log` takes
  exact log-probabilities (the spec's recommended numerics, with :func:`log_bilinear_upsample` doing the official
  bilinear x4 upsampling in log space).
* MAST: Huber (smooth-L1) on the reconstructed Lab channel, both sides scaled by 20 (:func:`huber_reconstruction`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

__all__ = ["colour_nll", "colour_nll_log", "huber_reconstruction", "kmeans", "log_bilinear_upsample",
           "one_hot_map", "quantise_ab"]


def quantise_ab(ab: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of every pixel (Euclidean in the ``ab`` plane).

    Args:
        ab: ``(..., 2, H, W)`` Lab ``a``, ``b``.
        centroids: ``(K, 2)``.

    Returns:
        ``(..., H, W)`` int64 in ``[0, K)``.
    """
    if ab.ndim < 3 or ab.shape[-3] != 2:
        raise ValueError(f"ab: expected (..., 2, H, W), got shape {tuple(ab.shape)}")
    if centroids.ndim != 2 or centroids.shape[1] != 2:
        raise ValueError(f"centroids: expected (K, 2), got shape {tuple(centroids.shape)}")
    c = centroids.to(ab.dtype)
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; the |x|^2 term does not change the argmin
    score = einsum(ab, c, "... i h w, k i -> ... k h w") * 2 - (c * c).sum(1)[:, None, None]
    return score.argmax(dim=-3)


def kmeans(samples: torch.Tensor, *, k: int, iters: int = 25, generator: torch.Generator | None = None
           ) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (deterministic given ``generator``).

    Args:
        samples: ``(N, D)`` with ``N >= k``.
        k: number of clusters.
        iters: Lloyd iterations.

    Returns:
        ``(k, D)`` centroids (sorted by their first coordinate, then the second, for a stable order).
    """
    if samples.ndim != 2 or samples.shape[0] < k or k < 1:
        raise ValueError(f"samples: need (N, D) with N >= k={k}, got shape {tuple(samples.shape)}")
    x = samples.double()
    dev = x.device
    first = int(torch.randint(x.shape[0], (1,), generator=generator, device=generator.device if generator else None))
    cents = [x[first]]
    d2 = ((x - cents[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / d2.numel())
        u = torch.rand((), generator=generator, device=generator.device if generator else None).to(dev)
        idx = int(torch.searchsorted(torch.cumsum(probs, 0), u.double() * probs.sum()).clamp(max=x.shape[0] - 1))
        cents.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(cents)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    order = torch.argsort(c[:, 0] * 1e6 + (c[:, 1] if c.shape[1] > 1 else 0))
    return c[order].to(samples.dtype)


def colour_nll(prob: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Official CorrFlow loss: ``nll(log(prob + eps), target)``, mean over pixels.

    Args:
        prob: ``(B, K, H, W)`` probabilities.
        target: ``(B, H, W)`` int64 colour ids.

    Returns:
        scalar.
    """
    return F.nll_loss(torch.log(prob + eps), target)


def colour_nll_log(log_prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood from log-probabilities ``(B, K, H, W)`` of ``target`` ``(B, H, W)``, mean over pixels."""
    return F.nll_loss(log_prob, target)


def _source_index(out_size: int, in_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch's bilinear source indices (``align_corners=False``): ``i0``, ``i1`` and the weight of ``i1``."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = src - i0.double()
    return i0, i1, lam


def log_bilinear_upsample(log_p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``log(interpolate(exp(log_p), size, bilinear, align_corners=False))`` without leaving log space.

    Separable: along each axis ``logaddexp(log(1 - lam) + x[i0], log(lam) + x[i1])`` with PyTorch's source indices, so
    tiny probabilities keep exact logs and gradients.

    Args:
        log_p: ``(B, K, h, w)`` log-probabilities (finite).
        size: output ``(H, W)``.

    Returns:
        ``(B, K, H, W)``.
    """
    out = log_p
    for dim, n_out in ((2, int(size[0])), (3, int(size[1]))):
        n_in = out.shape[dim]
        i0, i1, lam = _source_index(n_out, n_in, out.device)
        a = out.index_select(dim, i0)
        b = out.index_select(dim, i1)
        shape = [1, 1, 1, 1]
        shape[dim] = n_out
        with torch.no_grad():
            la = torch.log1p(-lam).to(out.dtype).reshape(shape)  # log(1 - lam) (-inf where lam == 1: never here)
            lb = torch.log(lam).to(out.dtype).reshape(shape)  # -inf where lam == 0
        out = torch.logaddexp(a + la, b + lb)
    return out


def huber_reconstruction(pred: torch.Tensor, target: torch.Tensor, *, scale: float = 20.0) -> torch.Tensor:
    """MAST's loss ``smooth_l1(scale * pred, scale * target)`` (beta 1), mean over all elements.

    Args:
        pred, target: same shape, e.g. ``(B, 1, H, W)`` normalised Lab channel values.

    Returns:
        scalar.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred/target: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    return F.smooth_l1_loss(pred * scale, target * scale, reduction="mean")


def one_hot_map(ids: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, H, W)`` int ids -> ``(B, K, H, W)`` one-hot; ids outside ``[0, K)`` raise ``ValueError``."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise ValueError(f"ids: values must lie in [0, {num_classes}), got [{int(ids.min())}, {int(ids.max())}]")
    return rearrange(F.one_hot(ids.long(), num_classes).to(dtype), "b h w k -> b k h w")
