"""Objectives registry: the only place the engine learns which methods exist.

An objective is an ``nn.Module`` built from the shared encoder and its own parameter dataclass; its ``forward(batch,
generator=None)`` returns ``(loss, logs)``. Several objectives share one encoder and one data stream;
:class:`MultiObjective` sums their weighted losses. New methods call :func:`register_objective` and need no engine
change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from vidssl.config import ConfigError, from_dict, to_dict
from vidssl.models.corrflow import CorrFlow
from vidssl.models.crw import CRW
from vidssl.models.mast import MAST
from vidssl.models.timecycle import TimeCycle


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


@dataclass
class CorrFlowParams:
    """Correspondence Flow (zlai0/CorrFlow defaults; see :class:`vidssl.models.CorrFlow`)."""

    radius: int = 6  #: restricted-attention half-size (13x13)
    num_colours: int = 16  #: quantised ab colours
    centroids: list[list[float]] | None = None  #: K (a, b) pairs; null = k-means on the first training batch
    keep_prob: float = 0.3  #: probability of no RGB channel dropout
    long_weight: float = 0.1  #: weight of the long-term cycle loss
    ss_start: float = 0.9  #: scheduled sampling: P(ground-truth colours at step 2) at the start ...
    ss_end: float = 0.6  #: ... and after schedule_steps
    schedule_steps: int = 100_000  #: set to train.steps
    ref_downsample: Literal["ids_bilinear", "onehot_bilinear"] = "ids_bilinear"  #: official: bilinear on ids
    numerics: Literal["logsumexp", "official"] = "logsumexp"  #: exact log-probabilities, or log(p + 1e-8)
    temperature: float = 1.0  #: correlation divisor (1 = official raw dot products)
    jitter_prob: float = 0.1  #: ColorJitter probability per clip (encoder input only)
    jitter_strength: float = 0.1
    input_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  #: data normalisation to undo (recipes: none)
    input_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    kmeans_samples: int = 100_000

    def validate(self, prefix: str = "") -> None:
        if self.radius < 1 or self.num_colours < 2 or self.schedule_steps < 1:
            raise ConfigError(f"{prefix}: radius >= 1, num_colours >= 2 and schedule_steps >= 1 are required")
        if not 0 <= self.keep_prob <= 1 or not 0 <= self.jitter_prob <= 1:
            raise ConfigError(f"{prefix}.keep_prob/jitter_prob: must lie in [0, 1]")
        if self.centroids is not None and (len(self.centroids) != self.num_colours
                                           or any(len(c) != 2 for c in self.centroids)):
            raise ConfigError(f"{prefix}.centroids: expected {self.num_colours} [a, b] pairs")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: must be > 0, got {self.temperature}")


@dataclass
class MASTParams:
    """MAST (zlai0/MAST defaults + the sqrt(C) fix; see :class:`vidssl.models.MAST`)."""

    stage: Literal["pairwise", "multiframe"] = "pairwise"  #: multiframe = paper stage 2, not in the official code
    radius: int = 6  #: training window half-size (13x13)
    sqrt_c_scaling: bool = True  #: divide correlations by sqrt(C) (needed on current PyTorch); false = official
    out_of_image: Literal["zero", "mask"] = "zero"  #: official sampler: out-of-image entries score 0, copy 0
    huber_scale: float = 20.0
    pair_gaps: list[int] | None = None  #: pairwise target frame gap choices (official [2, 5, 8]); null = last frame
    pair_probs: list[float] | None = None  #: their probabilities (official [0.4, 0.4, 0.2])
    long_term: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  #: multiframe references
    short_term: list[int] = dataclasses.field(default_factory=lambda: [-3, -2])
    roi: bool = True  #: ROI localisation of long-term references (multiframe)
    roi_radius: int | None = None  #: coarse search half-size (default: radius)
    roi_dilation: int = 2
    input_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    input_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def validate(self, prefix: str = "") -> None:
        if self.radius < 1 or self.roi_dilation < 1:
            raise ConfigError(f"{prefix}: radius and roi_dilation must be >= 1")
        if self.pair_probs is not None and self.pair_gaps is None:
            raise ConfigError(f"{prefix}.pair_probs: needs pair_gaps")


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


def _build_timecycle(encoder: nn.Module, p: TimeCycleParams) -> nn.Module:
    return TimeCycle(encoder, feat_dim=p.feat_dim, temperature=p.temperature, num_past=p.num_past,
                     target_index=p.target_index, frame_size=p.frame_size, patch_size=p.patch_size,
                     offset_factor=p.offset_factor, motion_patches=p.motion_patches, motion_grid=p.motion_grid,
                     motion_top=p.motion_top, max_rotation=p.max_rotation, jitter=p.jitter,
                     cycle_weight=p.cycle_weight, skip_weight=p.skip_weight, sim_weight=p.sim_weight,
                     grid_size=p.grid_size)


@dataclass
class ObjectiveEntry:
    """How to build one objective: its parameter dataclass, a builder, and the minimum clip length it needs."""

    params: type
    build: Callable[[nn.Module, Any], nn.Module]
    min_clip_len: int = 1


def _build_crw(encoder: nn.Module, p: CRWParams) -> nn.Module:
    return CRW(encoder, embed_dim=p.embed_dim, temperature=p.temperature, edge_dropout=p.edge_dropout,
               patch_size=p.patch_size, patch_stride=p.patch_stride, patch_jitter=p.patch_jitter,
               min_length=p.min_length)


def _build_corrflow(encoder: nn.Module, p: CorrFlowParams) -> nn.Module:
    return CorrFlow(encoder, **to_dict(p))


def _build_mast(encoder: nn.Module, p: MASTParams) -> nn.Module:
    return MAST(encoder, **to_dict(p))


def default_registry() -> dict[str, ObjectiveEntry]:
    """The built-in objectives."""
    return {"crw": ObjectiveEntry(CRWParams, _build_crw, min_clip_len=3),
            "corrflow": ObjectiveEntry(CorrFlowParams, _build_corrflow, min_clip_len=3),
            "mast": ObjectiveEntry(MASTParams, _build_mast, min_clip_len=2),
            "timecycle": ObjectiveEntry(TimeCycleParams, _build_timecycle, min_clip_len=3)}


_REGISTRY: dict[str, ObjectiveEntry] = default_registry()


def register_objective(name: str, entry: ObjectiveEntry) -> None:
    """Add an objective to the registry (later issues: corrflow, mast, timecycle, cpc, vivi)."""
    if name in _REGISTRY:
        raise ValueError(f"objective {name!r} is already registered")
    _REGISTRY[name] = entry


def objective_names() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str, prefix: str) -> ObjectiveEntry:
    if name not in _REGISTRY:
        raise ConfigError(f"{prefix}.name: unknown objective {name!r}; available: {', '.join(objective_names())}")
    return _REGISTRY[name]


def check_objective_params(name: str, params: dict[str, Any], prefix: str = "objective") -> dict[str, Any]:
    """Type-check an objective's parameters; returns the full resolved dict (defaults filled in)."""
    entry = _entry(name, prefix)
    return to_dict(from_dict(entry.params, params, prefix=prefix))


class MultiObjective(nn.Module):
    """Weighted sum of objectives sharing one encoder.

    Args:
        encoder: the shared frame encoder (registered first, so its weights are saved under ``encoder.*``).
        specs: ``[(name, weight, params dict)]``.
    """

    def __init__(self, encoder: nn.Module, specs: list[tuple[str, float, dict[str, Any]]]) -> None:
        super().__init__()
        self.encoder = encoder
        self.objectives = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.min_clip_len = 1  #: the longest clip any objective needs
        for i, (name, weight, params) in enumerate(specs):
            entry = _entry(name, f"objectives.{i}")
            key = name if name not in self.objectives else f"{name}_{i}"
            self.objectives[key] = entry.build(encoder, from_dict(entry.params, params, prefix=f"objectives.{i}"))
            self.weights[key] = weight
            self.min_clip_len = max(self.min_clip_len, entry.min_clip_len)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        """``batch`` -> ``(total loss, logs)``; logs are prefixed with the objective's name."""
        total = None
        logs: dict[str, float] = {}
        for key, obj in self.objectives.items():
            loss, obj_logs = obj(batch, generator=generator)
            w = self.weights[key]
            total = w * loss if total is None else total + w * loss
            logs.update({f"{key}/{k}": v for k, v in obj_logs.items()})
        logs["loss"] = float(total.detach())
        return total, logs
