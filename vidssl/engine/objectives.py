"""Objectives registry: the only place the engine learns which methods exist.

An objective is an ``nn.Module`` built from the shared encoder and its own parameter dataclass; its ``forward(batch,
generator=None)`` returns ``(loss, logs)``. Several objectives share one encoder and one data stream;
:class:`MultiObjective` sums their weighted losses. New methods call :func:`register_objective` and need no engine
change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from vidssl.config import ConfigError, from_dict, to_dict
from vidssl.models.crw import CRW


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
class ObjectiveEntry:
    """How to build one objective: its parameter dataclass, a builder, and the minimum clip length it needs."""

    params: type
    build: Callable[[nn.Module, Any], nn.Module]
    min_clip_len: int = 1


def _build_crw(encoder: nn.Module, p: CRWParams) -> nn.Module:
    return CRW(encoder, embed_dim=p.embed_dim, temperature=p.temperature, edge_dropout=p.edge_dropout,
               patch_size=p.patch_size, patch_stride=p.patch_stride, patch_jitter=p.patch_jitter,
               min_length=p.min_length)


def default_registry() -> dict[str, ObjectiveEntry]:
    """The built-in objectives."""
    return {"crw": ObjectiveEntry(CRWParams, _build_crw, min_clip_len=3)}


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
