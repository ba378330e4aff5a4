"""TimeCycle: learning correspondence from the cycle-consistency of time (Wang, Jabri, Efros, CVPR 2019).

Follows the official code (xiaolonw/TimeCycle 16d33ac, ``models/videos/model_simple.py``), on current PyTorch:

* **Features.** The shared stride-8 encoder up to res4 (``layer3``: ResNet-50 1024-d as published, ResNet-18 256-d
  as the small option) followed by :class:`TimeCycleHead`, a 1x1 convolution to 512 channels + ReLU; the affinity
  uses the L2-normalised features, the spatial transformer crops the un-normalised ones. A 240 x 240 frame gives a
  30 x 30 map, the 80 x 80 patch a 10 x 10 map.
* **Affinity** (:func:`patch_affinity`): ``A[i, j] = softmax_i(<f_I[i], f_p[j]> / tau)`` over the ``H*W`` frame cells
  ``i`` for every patch cell ``j``, ``tau = 512^-1/2``.
* **Localiser** (:class:`Localizer`): the affinity as an ``H*W``-channel ``h x w`` image -> conv 4x4 -> LeakyReLU(0.1)
  -> conv 4x4 -> LeakyReLU -> linear -> ``(t_x, t_y, phi)`` -> ``theta = [[s cos, -s sin, t_x], [s sin, s cos, t_y]]``
  with the scale ``s`` fixed to patch/frame (1/3).
* **Spatial transformer** (:func:`spatial_transform`): bilinear sampling of the ``h x w`` patch that ``theta`` selects
  (``align_corners=True``, zero padding, translation times 227/210 in the feature sampler as the official code).
* **Tracker** (:func:`track`, :func:`cycle_tracks`): from the target patch backward through the last ``c`` past frames,
  forward again to the newest, then into the target frame, for ``c = 1..T``; skip cycles go from the patch into each
  past frame and straight back.
* **Patch sampling** (:func:`sample_patch_theta`): a random rotation in +-45 degrees, scale 1/3, centred on one of the
  10 highest-motion cells of a 7 x 7 grid of 3x3-cell windows on ``|I_target - I_next|``, jittered by +-1/12.

:class:`TimeCycle` is the training objective over a shared encoder; ``forward(batch)`` reads ``batch["video"]
(B, L, 3, S, S)``: past frames ``0..num_past-1``, the target frame ``target_index`` and the frame after it (motion).
With the data clip stride set to the official ``frame_gap`` 2 and ``clip_len 10`` this is the official sample:
past frames 0, 2, 4, 6 and the target 16 frames after the clip start (``(videoLen + predDistance) * frame_gap``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F

from vidssl.config import ConfigError, to_dict
from vidssl.losses.cycle import OFFSET_FACTOR, affine_grid, timecycle_loss
from vidssl.models.objective import BuildContext, DataNeeds, Objective

LocalizerFn = Callable[[torch.Tensor], torch.Tensor]
# ------------------------------------------------------------------------------------------------------ geometry


def theta_from_params(params: torch.Tensor, *, scale: float = 1 / 3) -> torch.Tensor:
    """Affine matrices from the localiser's ``(t_x, t_y, phi)``.

    Args:
        params: ``(N, 3)``: translation ``(t_x, t_y)`` in normalised map coordinates and rotation ``phi`` (radians).
        scale: fixed patch scale ``s`` (patch side / frame side; official 1/3).

    Returns:
        ``(N, 2, 3)`` = ``[[s cos phi, -s sin phi, t_x], [s sin phi, s cos phi, t_y]]``.
    """
    if params.ndim != 2 or params.shape[1] != 3:
        raise ValueError(f"params: expected (N, 3) = (t_x, t_y, phi), got shape {tuple(params.shape)}")
    tx, ty, phi = params.unbind(dim=1)
    c, s = torch.cos(phi) * scale, torch.sin(phi) * scale
    return einops.rearrange(torch.stack([c, -s, tx, s, c, ty], dim=1), "n (i j) -> n i j", i=2)


def spatial_transform(feats: torch.Tensor, theta: torch.Tensor, *, size: tuple[int, int],
                      offset_factor: float = 1.0) -> torch.Tensor:
    """Spatial transformer: bilinearly sample the ``size`` patch that ``theta`` selects in ``feats``.

    Output cell ``(i, j)`` reads ``feats`` at ``A u_ij + offset_factor * t`` with ``u_ij`` on the ``align_corners=True``
    grid of ``size`` (see :mod:`vidssl.losses.cycle`); outside the map the value is 0.

    Args:
        feats: ``(N, C, H, W)`` images or feature maps.
        theta: ``(N, 2, 3)``.
        size: output ``(h, w)``.
        offset_factor: translation factor (1 for the image patch; :data:`~vidssl.losses.cycle.OFFSET_FACTOR` in the
            official feature sampler).

    Returns:
        ``(N, C, h, w)``.
    """
    if feats.ndim != 4:
        raise ValueError(f"feats: expected (N, C, H, W), got shape {tuple(feats.shape)}")
    if theta.shape[0] != feats.shape[0]:
        raise ValueError(f"theta has {theta.shape[0]} transformations for {feats.shape[0]} maps")
    grid = affine_grid(theta, size=size, offset_factor=offset_factor)
    return F.grid_sample(feats, grid.to(feats.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


def sample_patch_theta(target: torch.Tensor, following: torch.Tensor | None = None, *, scale: float = 1 / 3,
                       grid: int = 9, top: int = 10, max_rotation: float = 45.0, jitter: float = 1 / 12,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the ground-truth patch transformation of each clip (the official ``VlogSet`` sampler).

    The frame is cut into ``grid x grid`` cells of ``S // grid`` pixels; each of the ``(grid-2)^2`` windows of 3 x 3
    cells is scored by the summed ``|target - following|``; the centre is the window's cell index ``(i, j)`` of one
    of the ``top`` highest-scoring windows (uniformly chosen), mapped to ``(i / (grid-3), j / (grid-3))``, jittered by
    ``U(-jitter, jitter)``, clamped to ``[0, 1]`` and scaled to a translation ``(2 loc - 1) (1 - scale)``. The rotation
    is ``U(-max_rotation, max_rotation)`` degrees. Without ``following`` the window is uniform.

    Args:
        target: ``(B, 3, S, S)`` the frame the patch is cut from.
        following: ``(B, 3, S, S)`` the next sampled frame (motion cue), or ``None``.
        scale: patch scale (1/3); grid, top, max_rotation, jitter: as above (official 9, 10, 45, 1/12).
        generator: random source (on ``target.device``).

    Returns:
        ``theta_gt (B, 2, 3)``.
    """
    if target.ndim != 4:
        raise ValueError(f"target: expected (B, 3, S, S), got shape {tuple(target.shape)}")
    B, _, H, W = target.shape
    cells = grid - 2
    if cells < 1:
        raise ValueError(f"grid: need >= 3 cells per side, got {grid}")
    dev = target.device
    if following is not None:
        box_h, box_w = H // grid, W // grid
        if box_h < 1 or box_w < 1:
            raise ValueError(f"frames of {H}x{W} are too small for a {grid}x{grid} motion grid")
        motion = einops.reduce((target - following).abs(), "b c h w -> b 1 h w", "sum")
        motion = motion[:, :, : box_h * grid, : box_w * grid]
        cell = F.avg_pool2d(motion, kernel_size=(box_h, box_w))  # b 1 grid grid (mean per cell)
        window = einops.rearrange(F.avg_pool2d(cell, kernel_size=3, stride=1), "b 1 y x -> b (y x)")
        k = min(top, cells * cells)
        best = window.topk(k, dim=1).indices  # b k
        pick = torch.randint(k, (B, 1), generator=generator, device=dev)
        idx = best.gather(1, pick).squeeze(1)
    else:
        idx = torch.randint(cells * cells, (B,), generator=generator, device=dev)
    iy, ix = idx // cells, idx % cells
    denom = max(cells - 1, 1)
    u = torch.rand(B, 3, generator=generator, device=dev)
    xloc = (ix.float() / denom + (u[:, 0] - 0.5) * 2 * jitter).clamp(0.0, 1.0)
    yloc = (iy.float() / denom + (u[:, 1] - 0.5) * 2 * jitter).clamp(0.0, 1.0)
    alpha = (u[:, 2] - 0.5) * 2 * math.radians(max_rotation)
    params = torch.stack([(xloc * 2 - 1) * (1 - scale), (yloc * 2 - 1) * (1 - scale), alpha], dim=1)
    return theta_from_params(params, scale=scale).to(target.dtype)


# --------------------------------------------------------------------------------------------- affinity, localiser

def patch_affinity(query: torch.Tensor, frame: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Affinity of every patch cell to every frame cell, softmax over the frame cells.

    Args:
        query: ``(N, C, h, w)`` patch features (L2-normalised over C).
        frame: ``(N, C, H, W)`` frame features (L2-normalised over C).
        temperature: ``tau`` (official ``512^-0.5``).

    Returns:
        ``(N, H*W, h, w)``, each ``[:, :, y, x]`` a distribution over the frame cells (row-major ``Y * W + X``).
    """
    if query.ndim != 4 or frame.ndim != 4 or query.shape[:2] != frame.shape[:2]:
        raise ValueError(f"query (N, C, h, w) and frame (N, C, H, W) must agree in N and C, got "
                         f"{tuple(query.shape)} and {tuple(frame.shape)}")
    logits = einops.einsum(frame, query, "n c H W, n c h w -> n H W h w") / temperature
    return F.softmax(einops.rearrange(logits, "n H W h w -> n (H W) h w"), dim=1)


class Localizer(nn.Module):
    """Regress the patch transformation from a patch-to-frame affinity (the official ``afterconv3/4_trans`` +
    ``linear2``).

    Args:
        map_cells: frame cells ``H*W`` (input channels; 900 for a 30 x 30 map).
        patch_size: patch map ``(h, w)`` (10 x 10); both sides must be > ``2 * (kernel_size - 1)``.
        hidden: channels of the two convolutions ((128, 64)).
        kernel_size: side of both (unpadded) convolutions (4).
        negative_slope: LeakyReLU slope (0.1).
        scale: fixed patch scale of the output transformation (1/3).

    ``forward(affinity (N, H*W, h, w)) -> theta (N, 2, 3)``; :meth:`regress` gives the raw ``(t_x, t_y, phi)``.
    Initialisation as the official code: convolutions Kaiming-normal (fan-out), linear ``N(0, 0.01)`` with zero
    bias, so an untrained localiser returns the centred, unrotated patch.
    """

    def __init__(self, *, map_cells: int, patch_size: tuple[int, int] = (10, 10), hidden: tuple[int, int] = (128, 64),
                 kernel_size: int = 4, negative_slope: float = 0.1, scale: float = 1 / 3) -> None:
        super().__init__()
        h, w = int(patch_size[0]), int(patch_size[1])
        oh, ow = h - 2 * (kernel_size - 1), w - 2 * (kernel_size - 1)
        if oh < 1 or ow < 1:
            raise ValueError(f"patch_size: {h}x{w} is too small for two unpadded {kernel_size}x{kernel_size} "
                             f"convolutions (need > {2 * (kernel_size - 1)} per side)")
        self.map_cells, self.patch_size, self.scale = int(map_cells), (h, w), float(scale)
        self.conv1 = nn.Conv2d(map_cells, hidden[0], kernel_size=kernel_size, bias=False)
        self.conv2 = nn.Conv2d(hidden[0], hidden[1], kernel_size=kernel_size, bias=False)
        self.act = nn.LeakyReLU(negative_slope)
        self.fc = nn.Linear(hidden[1] * oh * ow, 3)
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def regress(self, affinity: torch.Tensor) -> torch.Tensor:
        """``affinity (N, H*W, h, w)`` -> ``(N, 3)`` = ``(t_x, t_y, phi)``."""
        if affinity.ndim != 4 or affinity.shape[1] != self.map_cells or tuple(affinity.shape[2:]) != self.patch_size:
            raise ValueError(f"affinity: expected (N, {self.map_cells}, {self.patch_size[0]}, {self.patch_size[1]}), "
                             f"got {tuple(affinity.shape)}")
        x = self.act(self.conv2(self.act(self.conv1(affinity))))
        return self.fc(einops.rearrange(x, "n c h w -> n (c h w)"))

    def forward(self, affinity: torch.Tensor) -> torch.Tensor:
        """``affinity (N, H*W, h, w)`` -> ``theta (N, 2, 3)``."""
        return theta_from_params(self.regress(affinity), scale=self.scale)


def localise(query: torch.Tensor, frame: torch.Tensor, *, localizer: LocalizerFn,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where is the patch in the frame: ``(theta (N, 2, 3), affinity (N, H*W, h, w))``.

    Args:
        query: ``(N, C, h, w)`` normalised patch features; frame: ``(N, C, H, W)`` normalised frame features.
        localizer: maps an affinity to ``theta`` (a :class:`Localizer`, or any function for tests/analysis).
        temperature: affinity temperature.
    """
    affinity = patch_affinity(query, frame, temperature=temperature)
    return localizer(affinity), affinity


# -------------------------------------------------------------------------------------------------------- tracker

def track(query: torch.Tensor, frames: torch.Tensor, frames_norm: torch.Tensor, *, order: Sequence[int],
          localizer: LocalizerFn, temperature: float,
          offset_factor: float = OFFSET_FACTOR) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Track a patch through ``frames[:, order]``: localise, crop, use the normalised crop as the next query.

    Args:
        query: ``(B, C, h, w)`` normalised features of the patch to follow.
        frames: ``(B, T, C, H, W)`` un-normalised features (what the spatial transformer crops).
        frames_norm: ``(B, T, C, H, W)`` the same, L2-normalised over C (what the affinity uses).
        order: frame indices to visit, in order.
        localizer, temperature: see :func:`localise`.
        offset_factor: translation factor of the feature sampler.

    Returns:
        ``(thetas, crops)``: one ``(B, 2, 3)`` and one un-normalised ``(B, C, h, w)`` per visited frame.
    """
    size = (int(query.shape[-2]), int(query.shape[-1]))
    thetas, crops = [], []
    q = query
    for t in order:
        theta, _ = localise(q, frames_norm[:, t], localizer=localizer, temperature=temperature)
        crop = spatial_transform(frames[:, t], theta, size=size, offset_factor=offset_factor)
        thetas.append(theta)
        crops.append(crop)
        q = F.normalize(crop, dim=1)
    return thetas, crops


def cycle_tracks(patch_norm: torch.Tensor, past: torch.Tensor, past_norm: torch.Tensor,
                 target_norm: torch.Tensor, *, localizer: LocalizerFn, temperature: float,
                 offset_factor: float = OFFSET_FACTOR,
                 lengths: Sequence[int] | None = None) -> list[torch.Tensor]:
    """The tracking cycles: backward through the last ``c`` past frames, forward to the newest, into the target.

    For cycle length ``c`` the patch is tracked through past frames ``T-1, ..., T-c`` (newest first), then forward
    through ``T-c+1, ..., T-1``, then localised in the target frame. The backward legs of all cycles are prefixes of
    one backward track, computed once (the official code recomputes them; the result is the same).

    Args:
        patch_norm: ``(B, C, h, w)`` normalised target-patch features.
        past, past_norm: ``(B, T, C, H, W)`` past-frame features, un-normalised and normalised.
        target_norm: ``(B, C, H, W)`` normalised target-frame features.
        lengths: cycle lengths (default ``1..T``).

    Returns:
        one ``theta (B, 2, 3)`` per cycle length: where the patch lands in the target frame.
    """
    T = past.shape[1]
    lengths = list(range(1, T + 1)) if lengths is None else list(lengths)
    if any(not 1 <= c <= T for c in lengths):
        raise ValueError(f"lengths: cycle lengths must lie in 1..{T}, got {lengths}")
    common = dict(localizer=localizer, temperature=temperature, offset_factor=offset_factor)
    _, back = track(patch_norm, past, past_norm, order=list(range(T - 1, T - 1 - max(lengths), -1)), **common)
    out = []
    for c in lengths:
        _, fwd = track(F.normalize(back[c - 1], dim=1), past, past_norm, order=list(range(T - c + 1, T)), **common)
        last = fwd[-1] if fwd else back[c - 1]
        theta, _ = localise(F.normalize(last, dim=1), target_norm, localizer=localizer, temperature=temperature)
        out.append(theta)
    return out


# ------------------------------------------------------------------------------------------------ the objective

class TimeCycleHead(nn.Module):
    """1x1 convolution ``in_channels -> out_channels`` (no bias) + ReLU on the res4 features (official
    ``afterconv1``, Kaiming-normal fan-out init). ``(N, in, H, W) -> (N, out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int = 512) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


@dataclass
class CycleOutputs:
    """Everything the TimeCycle loss reads (see :func:`vidssl.losses.cycle.timecycle_loss`).

    Attributes:
        cycle_thetas: one ``(B, 2, 3)`` per cycle length 1..T.
        skip_thetas: ``(B, T, 2, 3)``.
        direct_thetas: ``(B*T, 2, 3)`` the patch localised in every past frame.
        affinity: ``(B*T, H*W, h, w)`` patch-to-past-frame affinities.
        map_size: ``(H, W)``.
    """

    cycle_thetas: list[torch.Tensor]
    skip_thetas: torch.Tensor
    direct_thetas: torch.Tensor
    affinity: torch.Tensor
    map_size: tuple[int, int]


@dataclass
class TimeCycleParams:
    """TimeCycle (xiaolonw/TimeCycle train_video_cycle_simple.py / model_simple.py defaults)."""

    feat_dim: int = 512  #: channels of the 1x1 conv head on res4
    temperature: float = 0.044194173824159216  #: affinity temperature, 512 ** -0.5
    num_past: int = 4  #: past frames tracked through (videoLen)
    target_index: int = 8  #: clip position of the target frame ((videoLen + predDistance) * frame_gap / data.stride)
    frame_size: int = 240  #: training frame side (must equal data.crop_size)
    patch_size: int = 80  #: target patch side in pixels (cropSize2); patch_size / frame_size is the fixed scale
    offset_factor: float = 1.0809523809523809  #: 227/210 translation factor of the feature sampler (official quirk)
    motion_patches: bool = True  #: centre patches on high-motion windows (needs the frame after the target)
    motion_grid: int = 9  #: grid cells per side for the motion score (gridSize)
    motion_top: int = 10  #: patch centre drawn among this many highest-motion windows
    max_rotation: float = 45.0  #: patch rotation drawn in +-max_rotation degrees
    jitter: float = 0.08333333333333333  #: +-1/12 jitter of the patch centre
    cycle_weight: float = 0.02  #: weight of the tracking-cycle L_theta (0.2 * lamda 0.1)
    skip_weight: float = 0.1  #: weight of the skip-cycle L_theta (lamda)
    sim_weight: float = 1.0  #: weight of the feature-similarity (inlier count) term
    grid_size: int = 20  #: points per side of the L_theta grid

    def validate(self, prefix: str = "") -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: must be > 0, got {self.temperature}")
        if self.num_past < 1 or self.target_index < self.num_past:
            raise ConfigError(f"{prefix}.num_past/target_index: need num_past >= 1 and target_index >= num_past, "
                              f"got {self.num_past}, {self.target_index}")
        if not 0 < self.patch_size < self.frame_size:
            raise ConfigError(f"{prefix}.patch_size: must lie in (0, frame_size={self.frame_size}), got "
                              f"{self.patch_size}")
        if self.motion_grid < 3 or self.motion_top < 1:
            raise ConfigError(f"{prefix}.motion_grid/motion_top: need motion_grid >= 3 and motion_top >= 1")


class TimeCycle(Objective):
    """TimeCycle objective over a shared frame encoder.

    Args:
        encoder: maps ``(N, 3, S, S)`` to ``(N, C, S/stride, S/stride)``; needs ``out_channels`` and ``stride``
            (the stride-8 :class:`~vidssl.models.encoders.ResNetEncoder` cut at ``layer3``).
        feat_dim: channels of :class:`TimeCycleHead` (512).
        temperature: affinity temperature (``512^-0.5``).
        num_past: past frames per clip ``T`` (``videoLen`` 4).
        target_index: clip position of the target frame (8 with clip stride 2: 16 frames after the start).
        frame_size: side ``S`` of the square training frames (240).
        patch_size: side of the target patch in pixels (80); ``patch_size / frame_size`` is the fixed scale.
        offset_factor: translation factor of the feature sampler and the inlier counter (official 227/210).
        motion_patches: centre patches on high-motion windows (needs the frame after the target in the clip).
        motion_grid, motion_top, max_rotation, jitter: see :func:`sample_patch_theta` (9, 10, 45, 1/12).
        cycle_weight, skip_weight, sim_weight: loss weights (official ``0.2 * 0.1``, ``0.1``, 1).
        grid_size: points per side of the ``L_theta`` grid (20).

    ``forward(batch, generator=None) -> (loss, logs)`` with ``batch["video"]: (B, L, 3, S, S)``, ``L >
    target_index`` (``> target_index + 1`` with motion patches).
    """

    Params = TimeCycleParams

    @classmethod
    def data_needs(cls, params: TimeCycleParams, data=None) -> DataNeeds:
        """Past frames ``0..num_past-1``, the target ``target_index`` and, for motion patches, the frame after it."""
        return DataNeeds(clip_len=params.target_index + (2 if params.motion_patches else 1))

    @classmethod
    def from_params(cls, encoder: nn.Module, params: TimeCycleParams, ctx: BuildContext) -> "TimeCycle":
        return cls(encoder, **to_dict(params))

    def __init__(self, encoder: nn.Module, *, feat_dim: int = 512, temperature: float = 512 ** -0.5,
                 num_past: int = 4, target_index: int = 8, frame_size: int = 240, patch_size: int = 80,
                 offset_factor: float = OFFSET_FACTOR, motion_patches: bool = True, motion_grid: int = 9,
                 motion_top: int = 10, max_rotation: float = 45.0, jitter: float = 1 / 12,
                 cycle_weight: float = 0.02, skip_weight: float = 0.1, sim_weight: float = 1.0,
                 grid_size: int = 20) -> None:
        super().__init__()
        stride = int(getattr(encoder, "stride", 8))
        if num_past < 1:
            raise ValueError(f"num_past: need >= 1 past frame, got {num_past}")
        if target_index < num_past:
            raise ValueError(f"target_index: {target_index} must come after the {num_past} past frames")
        if frame_size % stride or patch_size % stride:
            raise ValueError(f"frame_size {frame_size} and patch_size {patch_size} must be multiples of the encoder "
                             f"stride {stride}")
        if not 0 < patch_size < frame_size:
            raise ValueError(f"patch_size: must lie in (0, frame_size={frame_size}), got {patch_size}")
        self.encoder = encoder
        self.head = TimeCycleHead(encoder.out_channels, feat_dim)
        self.map_size = frame_size // stride
        self.patch_cells = patch_size // stride
        self.localizer = Localizer(map_cells=self.map_size ** 2, patch_size=(self.patch_cells, self.patch_cells),
                                   scale=patch_size / frame_size)
        self.temperature, self.num_past, self.target_index = temperature, num_past, target_index
        self.frame_size, self.patch_size, self.offset_factor = frame_size, patch_size, offset_factor
        self.scale = patch_size / frame_size
        self.motion_patches, self.motion_grid, self.motion_top = motion_patches, motion_grid, motion_top
        self.max_rotation, self.jitter = max_rotation, jitter
        self.cycle_weight, self.skip_weight, self.sim_weight = cycle_weight, skip_weight, sim_weight
        self.grid_size = grid_size
        #: frames a clip needs: up to the target, plus the next one for motion-biased patches
        self.min_clip_len = target_index + (2 if motion_patches else 1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, 3, S, S)`` -> ``(raw, normalised)`` head features, each ``(N, feat_dim, S/8, S/8)``."""
        raw = self.head(self.encoder(x))
        return raw, F.normalize(raw, dim=1)

    def track_clip(self, past: torch.Tensor, target: torch.Tensor, patch: torch.Tensor) -> CycleOutputs:
        """Run every cycle of one batch of clips.

        Args:
            past: ``(B, T, 3, S, S)`` past frames (oldest first).
            target: ``(B, 3, S, S)`` target frame.
            patch: ``(B, 3, P, P)`` the patch cut from the target frame.
        """
        B, T = past.shape[:2]
        past_raw, past_norm = self.features(einops.rearrange(past, "b t c h w -> (b t) c h w"))
        patch_raw, patch_norm = self.features(patch)
        _, target_norm = self.features(target)
        H, W = past_raw.shape[-2:]
        if (H, W) != (self.map_size, self.map_size) or tuple(patch_raw.shape[-2:]) != (self.patch_cells,) * 2:
            raise ValueError(f"feature maps {H}x{W} / patch {tuple(patch_raw.shape[-2:])} differ from the localiser's "
                             f"{self.map_size}x{self.map_size} / {self.patch_cells}x{self.patch_cells}")
        size = (self.patch_cells, self.patch_cells)
        common = dict(localizer=self.localizer, temperature=self.temperature)
        # the patch localised in every past frame (the inlier term's affinity) and the skip cycles back
        direct, affinity = localise(einops.repeat(patch_norm, "b c h w -> (b t) c h w", t=T), past_norm, **common)
        crops = spatial_transform(past_raw, direct, size=size, offset_factor=self.offset_factor)
        skip, _ = localise(F.normalize(crops, dim=1), einops.repeat(target_norm, "b c h w -> (b t) c h w", t=T),
                           **common)
        past_raw = einops.rearrange(past_raw, "(b t) c h w -> b t c h w", b=B)
        past_norm = einops.rearrange(past_norm, "(b t) c h w -> b t c h w", b=B)
        cycles = cycle_tracks(patch_norm, past_raw, past_norm, target_norm, offset_factor=self.offset_factor,
                              **common)
        return CycleOutputs(cycle_thetas=cycles, skip_thetas=einops.rearrange(skip, "(b t) i j -> b t i j", b=B),
                            direct_thetas=direct, affinity=affinity, map_size=(H, W))

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        """``batch["video"]: (B, L, 3, S, S)`` -> ``(loss, logs)``."""
        video = batch["video"]
        if video.ndim != 5:
            raise ValueError(f"batch['video']: expected (B, L, 3, S, S), got shape {tuple(video.shape)}")
        B, L, _, H, W = video.shape
        if L < self.min_clip_len:
            raise ValueError(f"TimeCycle needs clips of >= {self.min_clip_len} frames (num_past={self.num_past}, "
                             f"target_index={self.target_index}, motion_patches={self.motion_patches}); got "
                             f"{L}: raise data.clip_len")
        if (H, W) != (self.frame_size, self.frame_size):
            raise ValueError(f"TimeCycle was built for {self.frame_size}x{self.frame_size} frames, got {H}x{W}: "
                             f"set data.crop_size={self.frame_size} (or the objective's frame_size)")
        target = video[:, self.target_index]
        following = video[:, self.target_index + 1] if self.motion_patches else None
        with torch.no_grad():
            theta_gt = sample_patch_theta(target, following, scale=self.scale, grid=self.motion_grid,
                                          top=self.motion_top, max_rotation=self.max_rotation, jitter=self.jitter,
                                          generator=generator)
        patch = spatial_transform(target, theta_gt, size=(self.patch_size, self.patch_size))
        out = self.track_clip(video[:, : self.num_past], target, patch)
        return timecycle_loss(cycle_thetas=out.cycle_thetas, skip_thetas=out.skip_thetas, theta_gt=theta_gt,
                              affinity=out.affinity, direct_thetas=out.direct_thetas, map_size=out.map_size,
                              offset_factor=self.offset_factor, cycle_weight=self.cycle_weight,
                              skip_weight=self.skip_weight, sim_weight=self.sim_weight, grid_size=self.grid_size)
