"""sRGB <-> CIE L*a*b* in torch (the conversion CorrFlow and MAST get from OpenCV's float ``cvtColor``).

OpenCV's float path (``COLOR_RGB2Lab`` on ``float32`` in ``[0, 1]``): sRGB gamma expansion, the sRGB/D65 matrix
below, division by the D65 white ``(0.950456, 1, 1.088754)`` and the CIE ``f(t)`` with threshold ``(6/29)^3``;
``L`` in ``[0, 100]``, ``a``/``b`` in about ``[-127, 127]``. (OpenCV evaluates it with lookup tables, so its
``a``/``b`` are rounded to about 1/64; this module computes the formula exactly.)

MAST normalises Lab as ``((L - 50) / 50, a / 127, b / 127)`` (:func:`normalise_lab`).

Layout: the colour channel is dimension ``-3`` (``(3, H, W)``, ``(B, 3, H, W)``, ``(B, T, 3, H, W)``).
"""

from __future__ import annotations

import torch
from einops import einsum

#: linear sRGB -> XYZ (D65), as OpenCV.
SRGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
#: D65 reference white used by OpenCV.
D65_WHITE = (0.950456, 1.0, 1.088754)
#: MAST's Lab normalisation: ``(lab - LAB_SHIFT) / LAB_SCALE``.
LAB_SHIFT = (50.0, 0.0, 0.0)
LAB_SCALE = (50.0, 127.0, 127.0)

_DELTA = 6.0 / 29.0

__all__ = ["D65_WHITE", "LAB_SCALE", "LAB_SHIFT", "SRGB_TO_XYZ", "denormalise_lab", "lab_to_rgb", "normalise_lab",
           "rgb_to_lab"]


def _check(x: torch.Tensor, name: str) -> None:
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"{name}: expected (..., 3, H, W) with the colour channel at dim -3, got {tuple(x.shape)}")


def _channel_view(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in ``[0, 1]`` -> CIE Lab (D65, OpenCV constants).

    Args:
        rgb: ``(..., 3, H, W)`` float.

    Returns:
        ``(..., 3, H, W)``: ``L`` in ``[0, 100]``, ``a``, ``b`` roughly in ``[-127, 127]``; white -> ``(100, 0, 0)``.
    """
    _check(rgb, "rgb")
    x = rgb if rgb.is_floating_point() else rgb.float()
    linear = torch.where(x > 0.04045, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.tensor(SRGB_TO_XYZ, dtype=x.dtype, device=x.device)
    xyz = einsum(m, linear, "o i, ... i h w -> ... o h w") / _channel_view(D65_WHITE, x)
    f = torch.where(xyz > _DELTA ** 3, xyz.clamp_min(_DELTA ** 3) ** (1.0 / 3.0), xyz / (3 * _DELTA ** 2) + 4.0 / 29.0)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_lab` (no clipping: out-of-gamut colours leave ``[0, 1]``).

    Args:
        lab: ``(..., 3, H, W)``.

    Returns:
        ``(..., 3, H, W)`` sRGB.
    """
    _check(lab, "lab")
    L, a, b = lab.unbind(dim=-3)
    fy = (L + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, fy - b / 200.0], dim=-3)
    xyz = torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4.0 / 29.0)) * _channel_view(D65_WHITE, lab)
    m_inv = torch.linalg.inv(torch.tensor(SRGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    linear = einsum(m_inv, xyz, "o i, ... i h w -> ... o h w")
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055,
                       12.92 * linear)


def normalise_lab(lab: torch.Tensor) -> torch.Tensor:
    """MAST's input scaling ``((L - 50) / 50, a / 127, b / 127)``: ``(..., 3, H, W) -> (..., 3, H, W)``."""
    _check(lab, "lab")
    return (lab - _channel_view(LAB_SHIFT, lab)) / _channel_view(LAB_SCALE, lab)


def denormalise_lab(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalise_lab`."""
    _check(x, "x")
    return x * _channel_view(LAB_SCALE, x) + _channel_view(LAB_SHIFT, x)
