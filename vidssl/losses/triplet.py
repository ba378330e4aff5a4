"""Batch-hard triplet loss (Hermans, Beyer, Leibe 2017), the form of the Exemplar baseline that VIVI builds on.

For every anchor ``a`` of a batch of labelled embeddings, the hardest positive (the farthest embedding with the same
label, ``a`` itself excluded) and the hardest negative (the nearest embedding with another label) give

    ``L = mean_a [ margin + max_{p: y_p = y_a, p != a} d(a, p) - min_{n: y_n != y_a} d(a, n) ]_+``

over the anchors that have at least one positive and one negative (others are left out of the mean; a batch with
none gives a zero loss that still backpropagates). An optional ``ignore`` mask takes pairs out of both sets (VIVI
with pseudo-shots cut from one continuous take: the other segments of the anchor's own video are neither).
Distances: ``"euclidean"`` (the paper's), ``"sqeuclidean"`` or ``"cosine"`` (``1 - cos``). Computed in float32 with
autocast off.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BatchHardTripletLoss", "TripletMining", "batch_hard_triplet", "pairwise_distances"]

Metric = Literal["euclidean", "sqeuclidean", "cosine"]


def pairwise_distances(x: torch.Tensor, metric: Metric = "euclidean", *, eps: float = 1e-12) -> torch.Tensor:
    """``(N, D)`` -> ``(N, N)`` float32 distances; the Euclidean root is taken of ``max(d^2, 0) + eps`` (finite
    gradients at zero distance)."""
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(x.shape)}")
    if metric not in ("euclidean", "sqeuclidean", "cosine"):
        raise ValueError(f"metric: expected euclidean, sqeuclidean or cosine, got {metric!r}")
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()  # (N, D)
        if metric == "cosine":
            xn = F.normalize(x, dim=-1)  # (N, D)
            return 1.0 - einops.einsum(xn, xn, "n d, m d -> n m")
        sq = einops.reduce(x * x, "n d -> n", "sum")  # (N,)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * einops.einsum(x, x, "n d, m d -> n m")).clamp_min(0.0)  # (N, N)
        return d2 if metric == "sqeuclidean" else (d2 + eps).sqrt()


class TripletMining(NamedTuple):
    """What batch-hard mining chose: per anchor ``(N,)`` the hardest positive / negative distance and index, and
    ``valid`` (the anchor has both)."""

    pos_dist: torch.Tensor
    neg_dist: torch.Tensor
    pos_index: torch.Tensor
    neg_index: torch.Tensor
    valid: torch.Tensor


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.5,
                       metric: Metric = "euclidean", soft: bool = False, ignore: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, TripletMining]:
    """Batch-hard triplet loss.

    Args:
        embeddings: ``(N, D)``.
        labels: ``(N,)`` integer ids (VIVI: the shot of each frame).
        margin: ``m`` of the hinge.
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.
        soft: ``softplus(d_p - d_n)`` instead of the hinge (Hermans et al.'s soft margin; ``margin`` unused).
        ignore: optional ``(N, N)`` bool, ``True`` where a pair is neither a positive nor a negative.

    Returns:
        ``(loss, mining)``: the float32 mean over valid anchors (0 when none), and the :class:`TripletMining`.
    """
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"labels must be (N,)=({embeddings.shape[0]},), got {tuple(labels.shape)}")
    dist = pairwise_distances(embeddings, metric)  # (N, N)
    n = dist.shape[0]
    same = labels[:, None] == labels[None, :]  # (N, N)
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    pos_mask, neg_mask = same & ~eye, ~same  # (N, N)
    if ignore is not None:
        if ignore.shape != (n, n) or ignore.dtype != torch.bool:
            raise ValueError(f"ignore must be a (N, N)=({n}, {n}) bool mask, got {tuple(ignore.shape)} {ignore.dtype}")
        pos_mask, neg_mask = pos_mask & ~ignore, neg_mask & ~ignore  # (N, N)
    pos_dist, pos_index = dist.masked_fill(~pos_mask, float("-inf")).max(dim=1)  # (N,)
    neg_dist, neg_index = dist.masked_fill(~neg_mask, float("inf")).min(dim=1)  # (N,)
    valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)  # (N,)
    gap = torch.where(valid, pos_dist - neg_dist, torch.zeros_like(pos_dist))  # (N,), finite everywhere
    per_anchor = F.softplus(gap) if soft else F.relu(gap + margin)  # (N,)
    loss = (per_anchor * valid).sum() / valid.sum().clamp_min(1)
    return loss, TripletMining(pos_dist, neg_dist, pos_index, neg_index, valid)


class BatchHardTripletLoss(nn.Module):
    """Module form of :func:`batch_hard_triplet`; logs ``loss``, ``valid`` (fraction of anchors that have both a
    positive and a negative: the others add nothing to the loss), ``active`` (fraction of valid anchors with a
    positive hinge), ``pos_dist`` / ``neg_dist`` (means of the mined distances), ``top1`` (fraction of valid anchors
    whose nearest other embedding shares their label). With no valid anchor (one shot, one frame per shot, or every
    negative or positive ignored) the loss is 0 and ``valid`` is 0: the other scalars then describe nothing.

    Args:
        margin: hinge margin.
        metric: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.
        soft: soft-margin form.
    """

    def __init__(self, margin: float = 0.5, metric: Metric = "euclidean", soft: bool = False) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin: must be >= 0, got {margin}")
        self.margin, self.metric, self.soft = float(margin), metric, bool(soft)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """``embeddings (N, D)``, ``labels (N,)``, optional ``ignore (N, N)`` -> ``(loss, logs)``."""
        loss, m = batch_hard_triplet(embeddings, labels, margin=self.margin, metric=self.metric, soft=self.soft,
                                     ignore=ignore)
        with torch.no_grad():
            v = m.valid
            k = max(int(v.sum()), 1)
            hinge = (m.pos_dist - m.neg_dist + (0.0 if self.soft else self.margin) > 0) & v  # (N,)
            dist = pairwise_distances(embeddings.detach(), self.metric)  # (N, N)
            same = labels[:, None] == labels[None, :]  # (N, N)
            same.fill_diagonal_(False)
            if ignore is not None:
                same &= ~ignore
            near_pos = dist.masked_fill(~same, float("inf")).min(dim=1).values  # (N,)
            logs = {"loss": float(loss.detach()), "valid": float(v.float().mean()), "active": float(hinge.sum()) / k,
                    "pos_dist": float(m.pos_dist[v].sum()) / k, "neg_dist": float(m.neg_dist[v].sum()) / k,
                    "top1": float(((near_pos < m.neg_dist) & v).sum()) / k}
        return loss, logs
