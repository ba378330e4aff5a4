"""CPC in image mode (van den Oord et al. 2018) as Greedy InfoMax's vision code runs it (spec sections 1 and 2.3).

An image is cut into a grid of overlapping patches (GIM: 64x64 crop, 16x16 patches at stride 8 -> 7x7 grid); the
encoder maps every patch to a code (its feature map average-pooled); the context of a grid cell is its own code
(GIM vision has no autoregressor). For each horizon ``k = 1..K`` the code ``skip + k`` rows below is the positive:

    s_k(i -> j) = (W_k z_j) . z_i,   W_k a bias-free 1x1 convolution applied to the *future* codes

and the loss is :func:`vidssl.losses.info_nce` over the candidates chosen by ``negatives`` (spec 1.3):

* ``"batch_sampled"`` (GIM): ``num_negatives`` codes drawn uniformly with replacement from every row-below position
  of the whole batch (the positive can be redrawn, as in GIM), positive in column 0;
* ``"batch_all"``: every row-below position of the batch (a dense score matrix, positive on the diagonal).

Losses are averaged over positions, then over ``k`` (GIM divides the sum over k by K). Deviations from the official
code: log-sum-exp cross-entropy instead of ``log(softmax + 1e-11)`` (spec 5.9.1); the end-to-end CPC baseline
(``objectives: [{name: cpc}]``) uses the code itself as context like GIM's modules, not the 4-layer PixelCNN context
of GIM's ``model_splits=1`` baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.config import ConfigError
from vidssl.losses.contrastive import contrastive_logs, in_batch_scores, info_nce
from vidssl.models.objective import BuildContext, DataNeeds, Objective

__all__ = ["CPC", "RowCPCHead", "patch_grid", "patchify", "row_cpc_loss", "trunk_input"]

NEGATIVES = ("batch_sampled", "batch_all")


def patchify(images: torch.Tensor, *, patch: int = 16, stride: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Overlapping square patches of every image.

    Args:
        images: ``(B, C, H, W)``.

    Returns:
        ``(B * gh * gw, C, patch, patch)`` patches in row-major grid order and the grid ``(gh, gw)``.
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected (B, C, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h < patch or w < patch:
        raise ValueError(f"images: {h}x{w} is smaller than one {patch}x{patch} patch; raise data.crop_size")
    gh, gw = (h - patch) // stride + 1, (w - patch) // stride + 1
    cols = F.unfold(images, kernel_size=patch, stride=stride)  # b (c p p) (gh gw)
    out = einops.rearrange(cols, "b (c p q) (gh gw) -> (b gh gw) c p q", p=patch, q=patch, gh=gh, gw=gw)
    return out, (gh, gw)


def trunk_input(patches: torch.Tensor) -> torch.Tensor:
    """The patch batch ``(N, C, p, p)`` in channels-last memory, as both CPC and every GIM mode feed it to the
    trunk: the CPU's oneDNN convolutions then read and write NHWC directly, where NCHW costs a reordered copy of the
    input and of the output (forward) and of the gradients (backward) -- about two extra maps alive inside every
    convolution at the full patch resolution. Same values; convolutions may round differently."""
    return patches.contiguous(memory_format=torch.channels_last)  # N C p p (NHWC strides)


def patch_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Average-pool per-patch maps and lay them back on the grid: ``(B * gh * gw, C, h, w) -> (B, C, gh, gw)``.

    Channels-last maps are averaged through their NHWC view, so the gradient comes back channels-last too (the mean
    over an NCHW view returns an NCHW gradient, which every convolution of a channels-last backward then copies)."""
    if features.is_contiguous(memory_format=torch.channels_last):
        pooled = einops.rearrange(features, "n c h w -> n h w c").mean(dim=(1, 2))  # (b gh gw) c
    else:
        pooled = features.mean(dim=(-2, -1))  # (b gh gw) c
    return einops.rearrange(pooled, "(b gh gw) c -> b c gh gw", gh=grid[0], gw=grid[1])


def row_cpc_loss(codes: torch.Tensor, predictors: nn.ModuleList, *, skip: int = 1,
                 negatives: Literal["batch_sampled", "batch_all"] = "batch_sampled", num_negatives: int = 16,
                 temperature: float = 0.0, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """GIM's vision InfoNCE over a code grid (see the module docstring).

    Args:
        codes: ``(B, C, R, W)`` patch codes (context = target space).
        predictors: ``K`` bias-free 1x1 convolutions ``C -> C`` (``W_k``).
        skip: rows skipped before the first target row (GIM: 1, the adjacent overlapping row).
        negatives: ``"batch_sampled"`` or ``"batch_all"``.
        num_negatives: negatives per row for ``batch_sampled``.
        temperature: 0 = raw dot products (CPC/GIM); > 0 = cosine similarity divided by it (bounded logits, spec
            5.9.2; not in GIM).

    Returns:
        the loss averaged over horizons, and logs (``loss``, ``mi_bound_nats``, ``top1``, ``num_candidates``,
        averaged over horizons).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives: {negatives!r}; expected one of {NEGATIVES}")
    b, c, rows, _ = codes.shape
    horizons = [k for k in range(1, len(predictors) + 1) if k + skip < rows]
    if not horizons:
        raise ValueError(f"codes: a grid of {rows} rows has no target row for skip={skip}; raise data.crop_size")
    losses, acc = [], {"mi_bound_nats": 0.0, "top1": 0.0, "num_candidates": 0.0}
    for k in horizons:
        off = k + skip
        future = predictors[k - 1](codes[:, :, off:])  # b c (R-off) W, W_k applied to future codes
        context = codes[:, :, : rows - off]  # b c (R-off) W
        ctx_rows = einops.rearrange(context, "b c r w -> (b r w) c")  # M c
        fut_rows = einops.rearrange(future, "b c r w -> (b r w) c")  # M c
        if negatives == "batch_all":  # M M, positive on the diagonal
            scores, target = in_batch_scores(ctx_rows, fut_rows, temperature=temperature or 1.0,
                                             normalize=temperature > 0)
        else:
            if temperature > 0:
                ctx_rows = F.normalize(ctx_rows.float(), dim=-1) / temperature  # M c
                fut_rows = F.normalize(fut_rows.float(), dim=-1)  # M c
            m = ctx_rows.shape[0]
            idx = torch.randint(0, m, (m, num_negatives), generator=generator,
                                device=generator.device if generator is not None else codes.device)
            idx = idx.to(codes.device)  # M n
            pos = einops.einsum(ctx_rows, fut_rows, "m c, m c -> m")[:, None]  # M 1
            if m <= num_negatives * c:  # every pair's score, then the drawn ones: M M instead of M n c saved
                every = einops.einsum(ctx_rows, fut_rows, "m c, j c -> m j")  # M M, not saved (gather keeps idx)
                neg = every.gather(1, idx)  # M n
                del every
            else:  # more rows than one row's gathered candidates hold: gather the codes
                neg = einops.einsum(ctx_rows, fut_rows[idx], "m c, m n c -> m n")  # M n
            scores, target = torch.cat([pos, neg], dim=1), 0  # M (1+n), positive in column 0
        loss, n = info_nce(scores, target)
        logs = contrastive_logs(loss, n, scores, target)
        losses.append(loss)
        for key in acc:
            acc[key] += logs[key] / len(horizons)
    total = torch.stack(losses).mean()  # float32 (info_nce's)
    return total, {"loss": float(total.detach()), **acc}


class RowCPCHead(nn.Module):
    """One CPC head over a patch-code grid: ``K`` predictors ``W_k`` (GIM: one per module).

    Args:
        channels: code width C.
        pred_steps: K, the horizons (GIM: 5).
        skip: rows skipped before the first target (GIM ``skip_step``: 1).
        negatives: ``"batch_sampled"`` (GIM) or ``"batch_all"``.
        num_negatives: negatives per row for ``batch_sampled`` (GIM: 16).
        temperature: 0 = raw dot products (GIM); > 0 = cosine / temperature (not in GIM).
    """

    def __init__(self, channels: int, *, pred_steps: int = 5, skip: int = 1,
                 negatives: Literal["batch_sampled", "batch_all"] = "batch_sampled", num_negatives: int = 16,
                 temperature: float = 0.0) -> None:
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives: {negatives!r}; expected one of {NEGATIVES}")
        self.predictors = nn.ModuleList(nn.Conv2d(channels, channels, 1, bias=False) for _ in range(pred_steps))
        self.skip, self.negatives, self.num_negatives, self.temperature = skip, negatives, num_negatives, temperature

    def forward(self, codes: torch.Tensor, generator: torch.Generator | None = None):
        """``codes`` ``(B, C, R, W)`` -> ``(loss, logs)``."""
        return row_cpc_loss(codes, self.predictors, skip=self.skip, negatives=self.negatives,
                            num_negatives=self.num_negatives, temperature=self.temperature, generator=generator)


@dataclass
class CPCParams:
    """Image-mode CPC, end to end (GIM vision loss over the whole encoder; see :mod:`vidssl.models.cpc`)."""

    pred_steps: int = 5  #: K horizons (GIM: 5)
    skip: int = 1  #: rows skipped before the first target row (GIM skip_step: 1)
    negatives: Literal["batch_sampled", "batch_all"] = "batch_sampled"  #: GIM draws 16 from the batch
    num_negatives: int = 16  #: negatives per row (batch_sampled)
    temperature: float = 0.0  #: 0 = raw dot-product scores (GIM); > 0 = cosine / temperature (not in GIM)
    patch: int = 16  #: patch side in pixels (GIM: 16)
    patch_stride: int = 8  #: patch step (GIM: 8, half-overlapping)

    def validate(self, prefix: str = "") -> None:
        if self.pred_steps < 1:
            raise ConfigError(f"{prefix}.pred_steps: must be >= 1, got {self.pred_steps}")
        if self.skip < 0:
            raise ConfigError(f"{prefix}.skip: must be >= 0, got {self.skip}")
        if self.num_negatives < 1:
            raise ConfigError(f"{prefix}.num_negatives: must be >= 1, got {self.num_negatives}")
        if self.temperature < 0:
            raise ConfigError(f"{prefix}.temperature: must be >= 0 (0 = raw dot products), got {self.temperature}")
        if self.patch < 1 or self.patch_stride < 1:
            raise ConfigError(f"{prefix}.patch / patch_stride: must be >= 1")


def frames_as_images(batch: dict) -> torch.Tensor:
    """Every frame of ``batch["video"]`` ``(B, T, 3, H, W)`` as an image ``(B * T, 3, H, W)``."""
    video = batch["video"]
    if video.ndim != 5:
        raise ValueError(f"batch['video']: expected (B, T, 3, H, W), got shape {tuple(video.shape)}")
    return einops.rearrange(video, "b t c h w -> (b t) c h w")


class CPC(Objective):
    """End-to-end image-mode CPC: patches -> encoder -> pooled code grid -> :class:`RowCPCHead`.

    Args:
        encoder: frame encoder ``(M, 3, p, p) -> (M, C, h, w)`` (any registered one; GIM's is ``gim_resnet50``).
        pred_steps, skip, negatives, num_negatives, temperature: see :class:`RowCPCHead`.
        patch, patch_stride: the patch grid (GIM: 16, 8).
    """

    Params = CPCParams

    @classmethod
    def data_needs(cls, params: CPCParams, data=None) -> DataNeeds:
        """Frames are images: one frame per clip suffices (more are all used)."""
        return DataNeeds(clip_len=1)

    @classmethod
    def from_params(cls, encoder: nn.Module, params: CPCParams, ctx: BuildContext) -> "CPC":
        return cls(encoder, pred_steps=params.pred_steps, skip=params.skip, negatives=params.negatives,
                   num_negatives=params.num_negatives, temperature=params.temperature, patch=params.patch,
                   patch_stride=params.patch_stride)

    def __init__(self, encoder: nn.Module, *, pred_steps: int = 5, skip: int = 1,
                 negatives: Literal["batch_sampled", "batch_all"] = "batch_sampled", num_negatives: int = 16,
                 temperature: float = 0.0, patch: int = 16, patch_stride: int = 8) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = RowCPCHead(encoder.out_channels, pred_steps=pred_steps, skip=skip, negatives=negatives,
                               num_negatives=num_negatives, temperature=temperature)
        self.patch, self.patch_stride = patch, patch_stride

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        """``batch["video"]`` ``(B, T, 3, H, W)`` (frames used as images) -> ``(loss, logs)``."""
        patches, grid = patchify(frames_as_images(batch), patch=self.patch, stride=self.patch_stride)  # (n g) 3 p p
        codes = patch_grid(self.encoder(trunk_input(patches)), grid)  # n C gh gw
        return self.head(codes, generator)
