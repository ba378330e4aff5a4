"""TimeCycle losses (Wang, Jabri, Efros, CVPR 2019), following the official code (xiaolonw/TimeCycle 16d33ac).

Geometry convention shared with :mod:`vidssl.models.timecycle`: an affine ``theta (N, 2, 3) = [A | t]`` maps a point
``u = (x, y)`` of the output patch, in normalised coordinates ``[-1, 1]^2`` (``x`` along the width), to the point
``A u + t`` of the input map, in the ``align_corners=True`` convention (``-1`` and ``1`` are the centres of the first
and last feature cells), as ``F.affine_grid``/``F.grid_sample`` did in the PyTorch 0.4 the official code ran on.

* :func:`transformed_grid_loss` -- ``L_theta``: mean squared distance between a 20 x 20 grid of points mapped by the
  predicted and by the ground-truth transformation (the tracking-cycle and skip-cycle losses).
* :func:`inlier_score` -- the normalised "weak inlier count" (Rocco et al.) the official code uses as the
  feature-similarity term: the affinity mass of every patch position at the location the predicted ``theta`` sends
  it to (``L_sim`` is its negated mean).
* :func:`timecycle_loss` -- the official weighting ``0.2 * lam * mean_c L_theta(cycle c) + lam * L_theta(skip)
  + L_sim`` with ``lam = 0.1``.
"""

from __future__ import annotations

from typing import Sequence

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

#: The official code's translation factor of the feature sampler and the inlier counter (a CNNGeometric leftover:
#: sampling grids are divided by 227/210, transformed, multiplied back, which scales only the translation).
OFFSET_FACTOR = 227 / 210


def _check_theta(theta: torch.Tensor, name: str = "theta") -> None:
    if theta.ndim != 3 or tuple(theta.shape[1:]) != (2, 3):
        raise ValueError(f"{name}: expected (N, 2, 3) affine matrices, got shape {tuple(theta.shape)}")


def unit_grid(height: int, width: int, *, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised coordinates of an ``height x width`` grid, ``align_corners=True`` style.

    Returns:
        ``(height, width, 2)`` with ``[..., 0] = x = linspace(-1, 1, width)`` and ``[..., 1] = y``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"grid size must be >= 1, got {height}x{width}")
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype) if height > 1 else \
        torch.zeros(1, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype) if width > 1 else \
        torch.zeros(1, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def affine_points(theta: torch.Tensor, points: torch.Tensor, *, offset_factor: float = 1.0) -> torch.Tensor:
    """Map points with affine transformations: ``A p + offset_factor * t``.

    Args:
        theta: ``(N, 2, 3)``.
        points: ``(..., 2)`` normalised ``(x, y)``, shared by the batch.
        offset_factor: multiplies the translation (1 for a plain affine map; :data:`OFFSET_FACTOR` reproduces
            the official feature sampler).

    Returns:
        ``(N, ..., 2)``.
    """
    _check_theta(theta)
    A, t = theta[:, :, :2], theta[:, :, 2]
    mapped = einops.einsum(A, points.to(theta.dtype), "n i j, ... j -> n ... i")
    shape = (t.shape[0],) + (1,) * (points.ndim - 1) + (2,)
    return mapped + offset_factor * t.reshape(shape)


def affine_grid(theta: torch.Tensor, *, size: tuple[int, int], offset_factor: float = 1.0) -> torch.Tensor:
    """Sampling grid of an ``size = (h, w)`` output patch for ``F.grid_sample(..., align_corners=True)``.

    Args:
        theta: ``(N, 2, 3)``.
        size: output ``(h, w)``.
        offset_factor: translation factor (see :func:`affine_points`).

    Returns:
        ``(N, h, w, 2)``; with ``offset_factor=1`` equal to ``F.affine_grid(theta, (N, C, h, w),
        align_corners=True)``.
    """
    base = unit_grid(int(size[0]), int(size[1]), device=theta.device, dtype=theta.dtype)
    return affine_points(theta, base, offset_factor=offset_factor)


def transformed_grid_loss(theta: torch.Tensor, theta_gt: torch.Tensor, *, grid_size: int = 20) -> torch.Tensor:
    """``L_theta``: mean over the batch and a ``grid_size^2`` grid of points ``u`` in ``[-1, 1]^2`` of
    ``||theta u - theta_gt u||^2`` (the official ``TransformedGridLoss``).

    Args:
        theta, theta_gt: ``(N, 2, 3)``.
        grid_size: points per side (20).

    Returns:
        scalar; 0 iff the two maps agree on the grid.
    """
    _check_theta(theta)
    _check_theta(theta_gt, "theta_gt")
    if theta.shape != theta_gt.shape:
        raise ValueError(f"theta {tuple(theta.shape)} and theta_gt {tuple(theta_gt.shape)} differ in shape")
    pts = unit_grid(grid_size, grid_size, device=theta.device, dtype=theta.dtype)
    diff = affine_points(theta - theta_gt, pts)  # n g g 2
    return einops.reduce(diff.pow(2), "n a b i -> n a b", "sum").mean()


def inlier_score(affinity: torch.Tensor, theta: torch.Tensor, *, map_size: tuple[int, int],
                 offset_factor: float = OFFSET_FACTOR, eps: float = 1e-5) -> torch.Tensor:
    """Normalised weak inlier count of a patch-to-map affinity under a predicted transformation.

    The official ``WeakInlierCountPool(normalize_inlier_count=True, dilation_filter=0)`` warps an identity-match mask
    (a one-hot ``(H*W, H, W)`` volume) with ``theta`` to the patch grid and sums ``mask * affinity`` divided by
    ``sum(mask + eps)``. The warped one-hot channel ``k`` at patch position ``q`` is the bilinear weight of map cell
    ``k`` at the sampling point ``theta(u_q)``, so the numerator is the bilinear interpolation of the affinity column
    of ``q`` (seen as an ``H x W`` map) at ``theta(u_q)``; this computes it that way, without the mask volume.

    Args:
        affinity: ``(N, H*W, h, w)``: for each patch position ``(h, w)`` a distribution over the ``H x W`` cells
            (row-major ``y * W + x``) of the map, as returned by :func:`vidssl.models.timecycle.patch_affinity`.
        theta: ``(N, 2, 3)`` predicted patch transformation in the map.
        map_size: ``(H, W)``.
        offset_factor: translation factor of the warp (official: 227/210).
        eps: added to every mask element in the normaliser (official 1e-5).

    Returns:
        ``(N,)`` scores in ``[0, 1]`` (about the mean affinity mass at the predicted match).
    """
    _check_theta(theta)
    if affinity.ndim != 4:
        raise ValueError(f"affinity: expected (N, H*W, h, w), got shape {tuple(affinity.shape)}")
    n, hw, h, w = affinity.shape
    H, W = int(map_size[0]), int(map_size[1])
    if hw != H * W:
        raise ValueError(f"affinity has {hw} map cells, map_size {H}x{W} = {H * W}")
    if theta.shape[0] != n:
        raise ValueError(f"theta has {theta.shape[0]} transformations for {n} affinities")
    grid = affine_grid(theta, size=(h, w), offset_factor=offset_factor)  # n h w 2
    pts = einops.rearrange(grid, "n h w c -> (n h w) 1 1 c")
    maps = einops.rearrange(affinity, "n (H W) h w -> (n h w) 1 H W", H=H)
    hit = F.grid_sample(maps, pts.to(maps.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    ones = torch.ones(1, 1, H, W, device=affinity.device, dtype=maps.dtype).expand(pts.shape[0], 1, H, W)
    mass = F.grid_sample(ones, pts.to(maps.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    hit = einops.reduce(hit, "(n q) 1 1 1 -> n", "sum", n=n)
    mass = einops.reduce(mass, "(n q) 1 1 1 -> n", "sum", n=n)
    return hit / (mass + eps * hw * h * w)


def timecycle_loss(*, cycle_thetas: Sequence[torch.Tensor], skip_thetas: torch.Tensor, theta_gt: torch.Tensor,
                   affinity: torch.Tensor, direct_thetas: torch.Tensor, map_size: tuple[int, int],
                   offset_factor: float = OFFSET_FACTOR, cycle_weight: float = 0.02, skip_weight: float = 0.1,
                   sim_weight: float = 1.0, grid_size: int = 20) -> tuple[torch.Tensor, dict[str, float]]:
    """The TimeCycle training loss as the official code weights it.

    ``L = cycle_weight * mean_c L_theta(cycle_thetas[c], theta_gt) + skip_weight * L_theta(skip, theta_gt)
    + sim_weight * L_sim(affinity, direct_thetas)``; official weights ``0.2 * 0.1``, ``0.1`` (``--lamda``), ``1``.

    Args:
        cycle_thetas: one ``(B, 2, 3)`` per cycle length ``c = 1..T``: where the patch lands in the target frame
            after tracking back through ``c`` past frames and forward again.
        skip_thetas: ``(B, T, 2, 3)``: patch -> past frame ``t`` -> straight back to the target frame.
        theta_gt: ``(B, 2, 3)``: where the patch was cut from the target frame.
        affinity: ``(B*T, H*W, h, w)``: target patch against every past frame (``b``-major).
        direct_thetas: ``(B*T, 2, 3)``: the localiser's transformation of the patch in every past frame.
        map_size: ``(H, W)`` of the frame feature maps.

    Returns:
        ``(loss, logs)``; logs: ``loss``, ``theta_cycle`` (mean over c), ``theta_cycle_<c>``, ``theta_skip``,
        ``inlier`` (mean score, higher is better).
    """
    if not cycle_thetas:
        raise ValueError("cycle_thetas: need at least one cycle")
    _check_theta(theta_gt, "theta_gt")
    B = theta_gt.shape[0]
    if skip_thetas.ndim != 4 or skip_thetas.shape[0] != B:
        raise ValueError(f"skip_thetas: expected (B={B}, T, 2, 3), got {tuple(skip_thetas.shape)}")
    T = skip_thetas.shape[1]
    per_cycle = [transformed_grid_loss(th, theta_gt, grid_size=grid_size) for th in cycle_thetas]
    l_cycle = torch.stack(per_cycle).mean()
    gt_rep = einops.repeat(theta_gt, "b i j -> (b t) i j", t=T)
    l_skip = transformed_grid_loss(einops.rearrange(skip_thetas, "b t i j -> (b t) i j"), gt_rep,
                                   grid_size=grid_size)
    score = inlier_score(affinity, direct_thetas, map_size=map_size, offset_factor=offset_factor)
    l_sim = -score.mean()
    loss = cycle_weight * l_cycle + skip_weight * l_skip + sim_weight * l_sim
    logs = {"loss": float(loss.detach()), "theta_cycle": float(l_cycle.detach()),
            "theta_skip": float(l_skip.detach()), "inlier": float(score.detach().mean())}
    logs.update({f"theta_cycle_{c}": float(v.detach()) for c, v in enumerate(per_cycle, start=1)})
    return loss, logs


class CycleLoss(nn.Module):
    """Module form of :func:`timecycle_loss` holding the weights and geometry constants.

    Example:
        >>> loss_fn = CycleLoss(map_size=(30, 30))
        >>> loss, logs = loss_fn(cycle_thetas=..., skip_thetas=..., theta_gt=..., affinity=..., direct_thetas=...)
    """

    def __init__(self, *, map_size: tuple[int, int], offset_factor: float = OFFSET_FACTOR,
                 cycle_weight: float = 0.02, skip_weight: float = 0.1, sim_weight: float = 1.0,
                 grid_size: int = 20) -> None:
        super().__init__()
        self.map_size = (int(map_size[0]), int(map_size[1]))
        self.offset_factor, self.grid_size = offset_factor, grid_size
        self.cycle_weight, self.skip_weight, self.sim_weight = cycle_weight, skip_weight, sim_weight

    def forward(self, *, cycle_thetas: Sequence[torch.Tensor], skip_thetas: torch.Tensor, theta_gt: torch.Tensor,
                affinity: torch.Tensor, direct_thetas: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """See :func:`timecycle_loss`."""
        return timecycle_loss(cycle_thetas=cycle_thetas, skip_thetas=skip_thetas, theta_gt=theta_gt,
                              affinity=affinity, direct_thetas=direct_thetas, map_size=self.map_size,
                              offset_factor=self.offset_factor, cycle_weight=self.cycle_weight,
                              skip_weight=self.skip_weight, sim_weight=self.sim_weight, grid_size=self.grid_size)
