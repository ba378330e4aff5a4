"""DPC's "2d3d" ResNet (Han, Xie, Zisserman 2019, TengdaHan/DPC ``backbone/resnet_2d3d.py``), registered as the
encoders ``r2d3d18`` and ``r2d3d34`` (``model.encoder``), so checkpoints round-trip through
:func:`vidssl.engine.encoder_from_checkpoint` into propagation.

Layout (spec section 3.2): ``conv1`` 1x7x7 stride (1, 2, 2) + max-pool 1x3x3 stride (1, 2, 2); ``layer1``/``layer2``
are 2-D residual stages (1x3x3 kernels), ``layer3``/``layer4`` 3-D (3x3x3, first block stride 2 in time and space);
``layer4`` is 256 wide (not 512) and its last block ends without a ReLU. R18 = [2, 2, 2, 2], R34 = [3, 4, 6, 3].
BatchNorm uses ``track_running_stats=False`` as in DPC's pre-training (batch statistics at evaluation too; the
released weights therefore carry no running statistics, DPC #10).

Input: a block ``(B, 3, T, H, W)`` gives ``(B, C, T', h, w)``; a frame ``(B, 3, H, W)`` is a one-frame block and gives
``(B, C, h, w)`` (how label propagation reads it; the temporal kernels then see zero padding on both sides).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["R2D3D", "r2d3d_from_config"]

_DEPTHS = {"r2d3d18": (2, 2, 2, 2), "r2d3d34": (3, 4, 6, 3)}
_WIDTHS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 256}
_STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _bn(c: int) -> nn.BatchNorm3d:
    return nn.BatchNorm3d(c, track_running_stats=False)


class _Block(nn.Module):
    """Basic residual block; ``temporal``: 3x3x3 kernels (else 1x3x3); ``final_relu=False`` on DPC's last block."""

    def __init__(self, cin: int, cout: int, stride: int, temporal: bool, final_relu: bool = True) -> None:
        super().__init__()
        k, p = ((3, 3, 3), (1, 1, 1)) if temporal else ((1, 3, 3), (0, 1, 1))
        s = (stride, stride, stride) if temporal else (1, stride, stride)
        self.conv1 = nn.Conv3d(cin, cout, k, stride=s, padding=p, bias=False)
        self.bn1 = _bn(cout)
        self.conv2 = nn.Conv3d(cout, cout, k, padding=p, bias=False)
        self.bn2 = _bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.final_relu = final_relu
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=s, bias=False), _bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)  # b c' t' h' w'
        out = self.relu(self.bn1(self.conv1(x)))  # b c' t' h' w'
        out = self.bn2(self.conv2(out)) + idt  # b c' t' h' w'
        return self.relu(out) if self.final_relu else out


class R2D3D(nn.Module):
    """DPC's 2d3d ResNet trunk.

    Args:
        arch: ``"r2d3d18"`` or ``"r2d3d34"``.
        out_layer: last stage built (``"layer1"`` .. ``"layer4"``).

    Shapes: ``(B, 3, T, H, W) -> (B, C, ceil(T / t_s), H / s, W / s)`` with ``s = stride_at(layer)`` and ``t_s`` 1,
    1, 2, 4 after layer1..4; ``(B, 3, H, W) -> (B, C, H / s, W / s)``.
    """

    takes_blocks = True  #: objectives may feed (B, 3, T, H, W) blocks (DPC); frames also work
    padding_mode = "zeros"

    def __init__(self, arch: str = "r2d3d18", *, out_layer: str = "layer4") -> None:
        super().__init__()
        if arch not in _DEPTHS:
            raise ValueError(f"arch: unknown 2d3d ResNet {arch!r}; expected one of {sorted(_DEPTHS)}")
        if out_layer not in _LAYERS:
            raise ValueError(f"out_layer: {out_layer!r}; expected one of {list(_LAYERS)}")
        self.arch, self.out_layer = arch, out_layer
        self.conv1 = nn.Conv3d(3, 64, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False)
        self.bn1 = _bn(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.layers: tuple[str, ...] = _LAYERS[: _LAYERS.index(out_layer) + 1]
        cin = 64
        for i, name in enumerate(self.layers):
            width, temporal = _WIDTHS[name], name in ("layer3", "layer4")
            n = _DEPTHS[arch][i]
            blocks = [_Block(cin if j == 0 else width, width, 2 if (j == 0 and i > 0) else 1, temporal,
                             final_relu=not (name == "layer4" and j == n - 1)) for j in range(n)]
            setattr(self, name, nn.Sequential(*blocks))
            cin = width
        self.out_channels = _WIDTHS[out_layer]
        self.stride = _STRIDES[out_layer]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, T, H, W) -> (B, 64, T, H/4, W/4)``."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor, *, upto: str | None = None) -> torch.Tensor:
        """Blocks ``(B, 3, T, H, W)`` or frames ``(B, 3, H, W)``; ``upto`` stops after an earlier stage."""
        stop = upto or self.out_layer
        if stop not in self.layers:
            raise ValueError(f"upto: {stop!r} is not built in this encoder (has {list(self.layers)})")
        if x.ndim not in (4, 5):
            raise ValueError(f"x: expected (B, 3, T, H, W) blocks or (B, 3, H, W) frames, got {tuple(x.shape)}")
        frames = x.ndim == 4
        if frames:
            x = x[:, :, None]  # b 3 1 h w
        x = self.stem(x)  # b 64 t h/4 w/4
        for name in self.layers:
            x = getattr(self, name)(x)  # b c t' h' w'
            if name == stop:
                break
        return x.mean(dim=2) if frames else x  # b c h w | b c t' h w

    def channels_at(self, layer: str) -> int:
        """Feature channels after ``layer``."""
        return _WIDTHS[layer]

    def stride_at(self, layer: str) -> int:
        """Spatial output stride after ``layer``."""
        return _STRIDES[layer]


def r2d3d_from_config(cfg) -> R2D3D:
    """Registry factory (``model.encoder: r2d3d18 | r2d3d34``; ``out_layer`` applies, ``stride8`` does not)."""
    return R2D3D(cfg.encoder, out_layer=cfg.out_layer)
