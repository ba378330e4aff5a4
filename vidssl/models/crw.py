"""Contrastive random walk (CRW, Jabri, Owens, Efros, NeurIPS 2020) as a training objective.

Each frame of a clip is cut into a grid of patches (the nodes of a space-time graph); each patch is jittered by an
independent random resized crop, encoded, average-pooled and projected (linear 512 -> 128), then L2-normalised.
The loss is the contrastive random walk over palindromes (:func:`vidssl.losses.walk_loss`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align

from vidssl.config import ConfigError
from vidssl.losses.walk import walk_loss
from vidssl.models.objective import BuildContext, DataNeeds, Objective


def grid_patches(video: torch.Tensor, *, patch_size: int, patch_stride: int) -> torch.Tensor:
    """Cut every frame into a regular grid of square patches.

    Args:
        video: ``(B, T, C, H, W)``.
        patch_size: patch side in pixels.
        patch_stride: step between patches (``patch_size // 2`` in CRW: 64-pixel patches every 32 pixels).

    Returns:
        ``(B, T, N, C, patch_size, patch_size)`` with ``N = nh * nw`` in row-major grid order.
    """
    B, T, C, H, W = video.shape
    if patch_size > min(H, W):
        raise ValueError(f"patch_size {patch_size} larger than the frame ({H}x{W})")
    cols = F.unfold(einops.rearrange(video, "b t c h w -> (b t) c h w"), kernel_size=patch_size,
                    stride=patch_stride)  # (b t) (c p q) n
    return einops.rearrange(cols, "(b t) (c p q) n -> b t n c p q", b=B, c=C, p=patch_size)


def jitter_patches(patches: torch.Tensor, *, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent random resized crop of every patch, resized back to the patch size (bilinear, roi_align).

    Args:
        patches: ``(..., C, P, P)``.
        scale, ratio: area fraction and aspect-ratio ranges of the crop (CRW: scale 0.7-0.9).

    Returns:
        ``(..., C, P, P)``.
    """
    *lead, C, P, _ = patches.shape
    flat = patches.reshape(-1, C, P, P)  # m c p p
    m = flat.shape[0]
    dev = flat.device
    rdev = generator.device if generator is not None else dev  # draw where the generator lives (CPU or CUDA)
    area = torch.empty(m, device=rdev).uniform_(scale[0], scale[1], generator=generator) * P * P
    log_r = torch.empty(m, device=rdev).uniform_(*[float(torch.log(torch.tensor(r))) for r in ratio],
                                                 generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(1, P)
    h = torch.sqrt(area / aspect).clamp(1, P)
    x0 = torch.rand(m, generator=generator, device=rdev) * (P - w)
    y0 = torch.rand(m, generator=generator, device=rdev) * (P - h)
    index = torch.arange(m, dtype=torch.float32, device=rdev)
    boxes = torch.stack([index, x0, y0, x0 + w, y0 + h], dim=1).to(dev, flat.dtype)  # (m, 5)
    out = roi_align(flat, boxes, output_size=(P, P), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return out.reshape(*lead, C, P, P)


@dataclass
class CRWParams:
    """Contrastive random walk (videowalk defaults)."""

    embed_dim: int = 128  #: node embedding size after the linear head
    temperature: float = 0.05  #: transition softmax temperature
    edge_dropout: float = 0.1  #: edge dropout rate
    patch_size: int = 64  #: node patch side (pixels)
    patch_stride: int = 32  #: grid step between node patches
    patch_jitter: tuple[float, float] | None = (0.7, 0.9)  #: per-patch random resized crop area range; null = off
    min_length: int = 2  #: shortest palindrome half-length (the official code skips 1)

    def validate(self, prefix: str = "") -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: must be > 0, got {self.temperature}")
        if not 0 <= self.edge_dropout < 1:
            raise ConfigError(f"{prefix}.edge_dropout: must lie in [0, 1), got {self.edge_dropout}")
        if self.patch_size < 8 or self.patch_stride < 1:
            raise ConfigError(f"{prefix}.patch_size/patch_stride: need patch_size >= 8 and patch_stride >= 1")


class CRW(Objective):
    """Contrastive random walk objective over a shared frame encoder.

    Args:
        encoder: frame encoder mapping ``(M, 3, P, P)`` to ``(M, C, h, w)`` with attribute ``out_channels``.
        embed_dim: node embedding size after the linear head (128).
        temperature: transition softmax temperature tau (0.05).
        edge_dropout: edge dropout rate (0.1).
        patch_size: node patch side in pixels (64 on 256-pixel frames).
        patch_stride: grid step between patches (32).
        patch_jitter: area-scale range of the per-patch random resized crop ((0.7, 0.9)); ``None`` disables it.
        min_length: shortest palindrome half-length used by the loss (2, as the official code).
    """

    Params = CRWParams

    @classmethod
    def data_needs(cls, params: CRWParams, data=None) -> DataNeeds:
        """Every frame of the clip is a walk step; palindromes need ``min_length + 1`` frames."""
        return DataNeeds(clip_len=params.min_length + 1)

    @classmethod
    def from_params(cls, encoder: nn.Module, params: CRWParams, ctx: BuildContext) -> "CRW":
        return cls(encoder, **dataclasses.asdict(params))

    def __init__(self, encoder: nn.Module, *, embed_dim: int = 128, temperature: float = 0.05,
                 edge_dropout: float = 0.1, patch_size: int = 64, patch_stride: int = 32,
                 patch_jitter: tuple[float, float] | None = (0.7, 0.9), min_length: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_channels, embed_dim)
        self.temperature, self.edge_dropout = temperature, edge_dropout
        self.patch_size, self.patch_stride = patch_size, patch_stride
        self.patch_jitter, self.min_length = patch_jitter, min_length

    def embed_nodes(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``video (B, T, 3, H, W)`` -> L2-normalised node embeddings ``(B, T, N, D)``."""
        B, T = video.shape[:2]
        patches = grid_patches(video, patch_size=self.patch_size, patch_stride=self.patch_stride)  # b t n c p p
        if self.training and self.patch_jitter is not None:
            patches = jitter_patches(patches, scale=self.patch_jitter, generator=generator)
        N = patches.shape[2]
        feats = self.encoder(einops.rearrange(patches, "b t n c p q -> (b t n) c p q"))  # (b t n) c h w
        pooled = einops.reduce(feats, "m c h w -> m c", "mean")
        q = F.normalize(self.head(pooled), dim=-1)  # (b t n) d
        return einops.rearrange(q, "(b t n) d -> b t n d", b=B, t=T, n=N)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        """``batch["video"]: (B, T, 3, H, W)`` -> ``(loss, logs)``."""
        q = self.embed_nodes(batch["video"], generator=generator)
        return walk_loss(q, temperature=self.temperature, edge_dropout=self.edge_dropout if self.training else 0.0,
                         min_length=self.min_length, generator=generator)
