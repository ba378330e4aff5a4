"""Frame encoders: torchvision ResNets with the correspondence-learning modifications.

The stride-8 modification (CRW, TimeCycle, UVC, VFS) sets the stride of the first block of ``layer3`` and
``layer4`` to 1, so ``layer3`` and ``layer4`` keep the ``layer2`` resolution (output stride 8). CRW trains from
scratch with every convolution's zero padding replaced by ``reflect`` padding.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so any torchvision ResNet
``state_dict`` loads with :meth:`ResNetEncoder.load_torchvision_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torchvision

from vidssl.config import ConfigError

TRUNK_STAGES = ("layer1", "layer2", "layer3", "layer4")  #: the stages of every ResNet trunk (v1 and v2)
_LAYERS = TRUNK_STAGES
_CHANNELS = {
    "resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet34": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
}


#: output stride after each stage of a ResNet trunk (torchvision's strides, before the stride-8 modification)
_STAGE_STRIDE = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}


def check_trunk_args(out_layer: str, padding_mode: str) -> None:
    """The arguments every ResNet trunk (v1 and v2) shares: ``out_layer`` a stage, ``padding_mode`` zeros/reflect."""
    if out_layer not in _LAYERS:
        raise ValueError(f"out_layer: {out_layer!r}; expected one of {list(_LAYERS)}")
    if padding_mode not in ("zeros", "reflect"):
        raise ValueError(f"padding_mode: {padding_mode!r}; expected 'zeros' or 'reflect'")


def trunk_stride(layer: str, stride8: bool) -> int:
    """Output stride after ``layer`` of a ResNet trunk, with or without the stride-8 modification."""
    return min(_STAGE_STRIDE[layer], 8) if stride8 else _STAGE_STRIDE[layer]


class ResNetEncoder(nn.Module):
    """ResNet trunk returning a dense feature map.

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        out_layer: last stage kept (``"layer1"`` .. ``"layer4"``); later stages are not built.
        stride8: set ``layer3``/``layer4`` first-block strides to 1 (output stride 8 instead of 16/32).
        padding_mode: ``"zeros"`` (torchvision) or ``"reflect"`` (CRW ``scratch``) for every padded convolution.

    Shapes: ``forward(x)`` maps ``(B, 3, H, W)`` to ``(B, C, H/s, W/s)`` with ``s = self.stride`` and
    ``C = self.out_channels`` (spatial sizes rounded up like the convolutions do).
    """

    def __init__(self, arch: str = "resnet18", *, out_layer: str = "layer4", stride8: bool = True,
                 padding_mode: str = "reflect") -> None:
        super().__init__()
        if arch not in _CHANNELS:
            raise ValueError(f"arch: unknown encoder {arch!r}; expected one of {sorted(_CHANNELS)}")
        check_trunk_args(out_layer, padding_mode)
        self.arch, self.out_layer, self.stride8, self.padding_mode = arch, out_layer, stride8, padding_mode
        net = getattr(torchvision.models, arch)(weights=None)
        if stride8:
            for name in ("layer3", "layer4"):
                block = getattr(net, name)[0]
                for conv in (block.conv1, getattr(block, "conv2", None)):
                    if conv is not None and conv.stride == (2, 2):
                        conv.stride = (1, 1)
                if block.downsample is not None:
                    block.downsample[0].stride = (1, 1)
        if padding_mode != "zeros":
            for m in net.modules():
                if isinstance(m, nn.Conv2d) and m.padding != (0, 0):
                    m.padding_mode = padding_mode
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        keep = _LAYERS[: _LAYERS.index(out_layer) + 1]
        for name in keep:
            setattr(self, name, getattr(net, name))
        self.layers: tuple[str, ...] = keep  #: stages built, in order
        self.out_channels = _CHANNELS[arch][out_layer]
        self.stride = trunk_stride(out_layer, stride8)

    def forward(self, x: torch.Tensor, *, upto: str | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, h, w)``; ``upto`` stops at an earlier stage (e.g. ``"layer3"`` for CRW eval)."""
        stop = upto or self.out_layer
        if stop not in self.layers:
            raise ValueError(f"upto: {stop!r} is not built in this encoder (has {list(self.layers)})")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # b 64 h/4 w/4
        for name in self.layers:
            x = getattr(self, name)(x)
            if name == stop:
                break
        return x

    def channels_at(self, layer: str) -> int:
        """Feature channels after ``layer``."""
        return _CHANNELS[self.arch][layer]

    def stride_at(self, layer: str) -> int:
        """Output stride after ``layer``."""
        return trunk_stride(layer, self.stride8)

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a torchvision ResNet ``state_dict`` (``fc.*`` and stages not built are ignored).

        Returns the names of encoder parameters the file did not provide (an error if any is missing).
        """
        own = self.state_dict()
        state = {k.removeprefix("module."): v for k, v in state.items()}
        picked = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(picked))
        if missing:
            raise ValueError(f"weights: the state_dict lacks {len(missing)} encoder tensors, e.g. {missing[:3]}; "
                             f"expected a torchvision {self.arch} state_dict")
        for k, v in picked.items():
            if own[k].shape != v.shape:
                raise ValueError(f"weights: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict(picked, strict=True)
        return missing


@runtime_checkable
class Encoder(Protocol):
    """What the engine and the evaluation need from a frame encoder.

    ``forward(x, upto=None)`` maps ``(B, C_in, H, W)`` to ``(B, out_channels, H/stride, W/stride)`` and stops after
    stage ``upto`` when given; ``layers`` lists the stages in order (the last is the training output);
    ``channels_at`` / ``stride_at`` describe each stage; ``arch`` names it in the encoder registry.
    """

    arch: str
    stride: int
    out_channels: int
    layers: tuple[str, ...]

    def forward(self, x: torch.Tensor, *, upto: str | None = None) -> torch.Tensor: ...

    def channels_at(self, layer: str) -> int: ...

    def stride_at(self, layer: str) -> int: ...


@dataclass
class ModelConfig:
    """The shared frame encoder (the ``model:`` section of a recipe; all an evaluation needs from a checkpoint)."""

    #: a registered encoder: torchvision ResNets resnet18/34/50 (stride 8 with ``stride8``), or ``mast_resnet18``,
    #: the CorrFlow/MAST stride-4 ResNet-18 (vidssl/models/mast_encoder.py; its features are the 64-d ``head``
    #: output; ``out_layer: layer2`` or ``layer3`` instead ends the trunk there, without the head -- ours, a cheaper
    #: encoder for CPU budgets; ``eval_layer``/``stride8`` do not apply); ``r2d3d18``/``r2d3d34``, DPC's 2d3d ResNet
    #: (blocks or frames, vidssl/models/r2d3d.py); ``gim_resnet50``/``gim_resnet34``, GIM's no-BN pre-activation
    #: trunk (stages layer1..layer3, vidssl/models/gim.py); ``resnet50v2`` (VIVI/VTAB/BiT's pre-activation
    #: ResNet-50 v2) and ``resnet18v2``/``resnet34v2`` (vidssl/models/resnet_v2.py; ``out_layer``/``eval_layer``/
    #: ``stride8`` apply, each stage's features BN+ReLU-normalised); plugins add more with :func:`register_encoder`
    encoder: str = "resnet18"
    out_layer: Literal["layer1", "layer2", "layer3", "layer4"] = "layer4"  #: last stage used in training
    eval_layer: Literal["layer1", "layer2", "layer3", "layer4"] = "layer3"  #: stage used for label propagation
    stride8: bool = True  #: layer3/layer4 stride 1 (output stride 8)
    padding_mode: Literal["zeros", "reflect"] = "reflect"
    norm: Literal["batch", "group"] = "batch"  #: group norm makes CPU DDP exactly equal to one process
    sync_bn: bool = True  #: convert BatchNorm to SyncBatchNorm under DDP on GPU
    #: colour space of the frames the encoder reads (propagation feeds the same); auto = the objectives' (MAST: lab)
    colour: Literal["auto", "rgb", "lab"] = "auto"

    def validate(self, prefix: str = "model") -> None:
        order = ["layer1", "layer2", "layer3", "layer4"]
        if self.encoder == "mast_resnet18":  # reads its last built stage; eval_layer does not apply
            if self.out_layer == "layer1":
                raise ConfigError(f"{prefix}.out_layer: 'layer1' is at stride 2; mast_resnet18 ends at layer2, "
                                  "layer3 (truncated, stride 4) or layer4 (the official encoder with its head)")
            return
        if order.index(self.eval_layer) > order.index(self.out_layer):
            raise ConfigError(f"{prefix}.eval_layer: {self.eval_layer!r} comes after out_layer {self.out_layer!r}")


def _resnet(cfg: ModelConfig) -> nn.Module:
    return ResNetEncoder(cfg.encoder, out_layer=cfg.out_layer, stride8=cfg.stride8, padding_mode=cfg.padding_mode)


def _mast(cfg: ModelConfig) -> nn.Module:
    from vidssl.models.mast_encoder import MASTEncoder

    return MASTEncoder(padding_mode=cfg.padding_mode, out_layer="head" if cfg.out_layer == "layer4" else cfg.out_layer)


def _r2d3d(cfg: ModelConfig) -> nn.Module:
    from vidssl.models.r2d3d import r2d3d_from_config

    return r2d3d_from_config(cfg)


def _gim_resnet(cfg: ModelConfig) -> nn.Module:
    from vidssl.models.gim import gim_resnet_from_config

    return gim_resnet_from_config(cfg)


def _resnet_v2(cfg: ModelConfig) -> nn.Module:
    from vidssl.models.resnet_v2 import resnet_v2_from_config

    return resnet_v2_from_config(cfg)


def _builtin_encoders() -> dict[str, Callable[[ModelConfig], nn.Module]]:
    return {"resnet18": _resnet, "resnet34": _resnet, "resnet50": _resnet, "mast_resnet18": _mast,
            "r2d3d18": _r2d3d, "r2d3d34": _r2d3d,  # DPC's 2d3d ResNet (vidssl/models/r2d3d.py)
            "gim_resnet50": _gim_resnet, "gim_resnet34": _gim_resnet,  # GIM's no-BN pre-act ResNet (models/gim.py)
            "resnet18v2": _resnet_v2, "resnet34v2": _resnet_v2, "resnet50v2": _resnet_v2}  # models/resnet_v2.py


_ENCODERS: dict[str, Callable[[ModelConfig], nn.Module]] = _builtin_encoders()  #: the encoder registry


def register_encoder(name: str, factory: Callable[[ModelConfig], nn.Module], *, replace: bool = False) -> None:
    """Make ``model.encoder: <name>`` build ``factory(model_config)`` (an :class:`Encoder`)."""
    if name in _ENCODERS and not replace and _ENCODERS[name] is not factory:
        raise ValueError(f"encoder {name!r} is already registered")
    _ENCODERS[name] = factory


def encoder_names() -> list[str]:
    return sorted(_ENCODERS)


def _batchnorm_to_groupnorm(module: nn.Module, groups: int = 32) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(min(groups, child.num_features), child.num_features))
        else:
            _batchnorm_to_groupnorm(child, groups)


def build_model_encoder(cfg: ModelConfig) -> nn.Module:
    """The encoder a ``model:`` section describes: the one place training and evaluation build encoders."""
    if cfg.encoder not in _ENCODERS:
        raise ConfigError(f"model.encoder: unknown encoder {cfg.encoder!r}; available: {', '.join(encoder_names())} "
                          "(others: register_encoder from a --plugin module)")
    enc = _ENCODERS[cfg.encoder](cfg)
    if cfg.norm == "group":
        _batchnorm_to_groupnorm(enc)
    return enc


def build_encoder(name: str = "resnet18", *, out_layer: str = "layer4", stride8: bool = True,
                  padding_mode: str = "reflect") -> nn.Module:
    """Build a registered frame encoder by name (keyword arguments as in :class:`ModelConfig`)."""
    return build_model_encoder(ModelConfig(encoder=name, out_layer=out_layer, stride8=stride8,
                                           padding_mode=padding_mode))


ENCODERS = tuple(_CHANNELS)  #: the torchvision ResNet trunks
