"""The stride-4 ResNet-18 shared by CorrFlow (Lai & Xie, BMVC 2019) and MAST (Lai, Lu, Xie, CVPR 2020).

Architecture (official code, ``models/submodule.py``): 7x7 conv stride 2 + BN + ReLU (no max-pool); ``layer1`` 64,
``layer2`` 128 (stride 2), ``layer3`` 256 (stride 1), ``layer4`` 256 (stride 1), two basic residual blocks each
(3x3 conv-BN-ReLU-3x3 conv-BN plus a 1x1 conv-BN shortcut when the shape changes, then ReLU); then a 3x3 conv
256 -> 64 with bias (``head``). Output stride 4, 64 channels, features neither normalised nor temperature-scaled.

Ours, not the papers': ``out_layer="layer2"`` or ``"layer3"`` builds the trunk only up to that stage (no head; its
128 or 256 channels at stride 4 are the features), a cheaper encoder for CPU runs such as the demo recipe.

Submodule names mirror the official ones (``conv1.0`` conv, ``conv1.1`` BN, blocks with ``left`` / ``shortcut``), so
an official CorrFlow/MAST checkpoint loads with :meth:`MASTEncoder.load_official_state_dict`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

_LAYERS = ("layer1", "layer2", "layer3", "layer4", "head")
_CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 256}
_STRIDES = {"layer1": 2, "layer2": 4, "layer3": 4, "layer4": 4, "head": 4}
_TRUNCATIONS = ("layer2", "layer3", "head")  #: where the trunk may end (stride 4)


class ResidualBlock(nn.Module):
    """Basic residual block: ``(B, in, H, W) -> (B, out, ceil(H/stride), ceil(W/stride))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False, padding_mode=padding_mode),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False, padding_mode=padding_mode),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.left(x) + self.shortcut(x))


def _make_layer(in_channels: int, out_channels: int, stride: int, padding_mode: str) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(in_channels, out_channels, stride, padding_mode),
                         ResidualBlock(out_channels, out_channels, 1, padding_mode))


class MASTEncoder(nn.Module):
    """CorrFlow/MAST frame encoder: ``(B, in_channels, H, W) -> (B, 64, ceil(H/4), ceil(W/4))``.

    Args:
        in_channels: input channels (3: RGB in [0, 1] for CorrFlow, normalised Lab for MAST).
        out_channels: channels of the final 3x3 conv (64).
        padding_mode: ``"zeros"`` (official) or ``"reflect"`` for the 3x3/7x7 convolutions.
        out_layer: last stage built: ``"head"`` (official) or ``"layer2"`` / ``"layer3"`` (a truncated trunk whose
            output is that stage's, at stride 4; ours, for CPU budgets).

    Attributes: ``stride`` (4), ``out_channels`` (64; the stage's channels when truncated), ``arch``
    (``"mast_resnet18"``). ``forward(x, upto=...)`` stops after an earlier built stage (default: the last, the
    features used for correspondence).
    """

    arch = "mast_resnet18"

    def __init__(self, *, in_channels: int = 3, out_channels: int = 64, padding_mode: str = "zeros",
                 out_layer: str = "head") -> None:
        super().__init__()
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"padding_mode: {padding_mode!r}; expected 'zeros' or 'reflect'")
        if out_layer not in _TRUNCATIONS:
            raise ValueError(f"out_layer: {out_layer!r}; expected one of {list(_TRUNCATIONS)} (stride-4 stages)")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels/out_channels: must be >= 1, got {in_channels}, {out_channels}")
        self.padding_mode = padding_mode
        self.in_channels = in_channels
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False, padding_mode=padding_mode),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.layers: tuple[str, ...] = _LAYERS[: _LAYERS.index(out_layer) + 1]  #: stages built, in order
        stages = {"layer1": lambda: _make_layer(64, 64, 1, padding_mode),
                  "layer2": lambda: _make_layer(64, 128, 2, padding_mode),
                  "layer3": lambda: _make_layer(128, 256, 1, padding_mode),
                  "layer4": lambda: _make_layer(256, 256, 1, padding_mode),
                  "head": lambda: nn.Conv2d(256, out_channels, 3, stride=1, padding=1, padding_mode=padding_mode)}
        for name in self.layers:
            self.add_module(name, stages[name]())
        self.out_channels = out_channels if out_layer == "head" else _CHANNELS[out_layer]
        self.stride = 4

    def forward(self, x: torch.Tensor, *, upto: str | None = None) -> torch.Tensor:
        """``x: (B, in_channels, H, W)`` -> ``(B, C, h, w)``; ``upto`` stops after an earlier stage."""
        stop = upto or self.layers[-1]
        if stop not in self.layers:
            raise ValueError(f"upto: {stop!r}; expected one of the built stages {list(self.layers)}")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        x = self.conv1(x)
        for name in self.layers:
            x = getattr(self, name)(x)
            if name == stop:
                break
        return x

    def channels_at(self, layer: str) -> int:
        """Feature channels after ``layer``."""
        return self.out_channels if layer == self.layers[-1] else _CHANNELS[layer]

    def stride_at(self, layer: str) -> int:
        """Output stride after ``layer``."""
        return _STRIDES[layer]

    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of the stride-4 output for an ``height x width`` input (``ceil(ceil(H/2)/2)``)."""
        return math.ceil(math.ceil(height / 2) / 2), math.ceil(math.ceil(width / 2) / 2)

    def load_official_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a zlai0/CorrFlow or zlai0/MAST checkpoint ``state_dict`` (``feature_extraction.*``,
        ``post_convolution.*``; a ``module.`` prefix from DataParallel is removed). Raises ``ValueError`` naming the
        missing or mismatched tensors."""
        mapped = {}
        for k, v in state.items():
            k = k.removeprefix("module.")
            if k.startswith("feature_extraction."):
                mapped[k[len("feature_extraction."):]] = v
            elif k.startswith("post_convolution."):
                mapped["head." + k[len("post_convolution."):]] = v
        own = self.state_dict()
        missing = sorted(set(own) - set(mapped))
        if missing:
            raise ValueError(f"weights: {len(missing)} encoder tensors missing, e.g. {missing[:3]} (expected an "
                             "official CorrFlow/MAST state_dict with feature_extraction.* and post_convolution.*)")
        for k in own:
            if own[k].shape != mapped[k].shape:
                raise ValueError(f"weights: {k} has shape {tuple(mapped[k].shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict({k: mapped[k] for k in own}, strict=True)


__all__ = ["MASTEncoder", "ResidualBlock"]
