"""YUV -> RGB on tensors: the colour conversion of the NVDEC path, done where the frames already are (the GPU).

NVDEC returns 4:2:0 frames as NV12 (a full-resolution luma plane and a half-resolution plane of interleaved Cb/Cr).
:func:`nv12_to_rgb` turns them into ``uint8 (H, W, 3)`` RGB with the same conventions FFmpeg's swscale applies when
PyAV's CPU path calls ``reformat(format="rgb24")``: the frame's matrix (BT.709 when the stream says so, BT.601
otherwise, which is swscale's default for untagged video), limited ("MPEG", 16-235) range unless the stream says full
range, chroma upsampled bilinearly. The outputs agree with swscale to within interpolation round-off (tested on CPU
against PyAV in ``tests/test_video_nvdec.py``); they are not bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

# (Kr, Kb) of the luma equation Y = Kr R + (1 - Kr - Kb) G + Kb B
MATRICES: dict[str, tuple[float, float]] = {
    "bt601": (0.299, 0.114),
    "bt709": (0.2126, 0.0722),
    "bt2020": (0.2627, 0.0593),
}

# FFmpeg's AVColorSpace codes -> our matrix names (everything else, including "unspecified", is BT.601 as in swscale)
_AVCOL_SPC = {1: "bt709", 9: "bt2020", 10: "bt2020"}


def matrix_for_colorspace(code: int | None) -> str:
    """The matrix swscale uses for FFmpeg colour-space code ``code`` (``AVColorSpace``; None = unspecified)."""
    return _AVCOL_SPC.get(int(code) if code is not None else 2, "bt601")


def yuv_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor, *, matrix: str = "bt601",
               full_range: bool = False) -> torch.Tensor:
    """Planar YCbCr 4:2:0 (or 4:4:4) -> RGB.

    Args:
        y: ``uint8 (H, W)`` luma.
        cb, cr: ``uint8 (Hc, Wc)`` chroma, ``Hc = ceil(H / 2)`` and ``Wc = ceil(W / 2)`` for 4:2:0, or ``(H, W)``.
        matrix: ``"bt601"``, ``"bt709"`` or ``"bt2020"`` (non-constant luminance).
        full_range: True for full-range ("JPEG", 0-255) input, False for limited range (16-235 / 16-240).

    Returns:
        ``uint8 (H, W, 3)`` RGB on the input's device.
    """
    if matrix not in MATRICES:
        raise ValueError(f"matrix: expected one of {sorted(MATRICES)}, got {matrix!r}")
    if y.dim() != 2 or cb.shape != cr.shape or cb.dim() != 2:
        raise ValueError(f"expected y (H, W) and cb, cr of one shape (Hc, Wc); got {tuple(y.shape)}, "
                         f"{tuple(cb.shape)}, {tuple(cr.shape)}")
    h, w = y.shape
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    yf = y.float()                                                              # (H, W)
    c = rearrange(torch.stack([cb, cr]).float(), "c h w -> 1 c h w")           # (1, 2, Hc, Wc)
    if c.shape[-2:] != (h, w):
        # chroma at full resolution; exact size= (4:2:0 planes of odd frames are ceil(H/2) x ceil(W/2))
        c = F.interpolate(c, size=(h, w), mode="nearest-exact")
    c = rearrange(c, "1 c h w -> c h w") - 128.0                                # (2, H, W) centred
    if full_range:
        ys, cs = yf, c
    else:
        ys = (yf - 16.0) * (255.0 / 219.0)
        cs = c * (255.0 / 224.0)
    pb, pr = cs[0], cs[1]
    r = ys + 2.0 * (1.0 - kr) * pr
    b = ys + 2.0 * (1.0 - kb) * pb
    g = ys - (2.0 * kb * (1.0 - kb) / kg) * pb - (2.0 * kr * (1.0 - kr) / kg) * pr
    rgb = torch.stack([r, g, b], dim=-1)                                        # (H, W, 3)
    return rgb.round_().clamp_(0, 255).to(torch.uint8)


def nv12_to_rgb(y: torch.Tensor, uv: torch.Tensor, *, matrix: str = "bt601", full_range: bool = False) -> torch.Tensor:
    """NV12 -> RGB.

    Args:
        y: ``uint8 (H, W)`` luma (a view may be wider than the picture: pass it cropped).
        uv: ``uint8 (Hc, 2 * Wc)`` interleaved Cb/Cr (``Cb0 Cr0 Cb1 Cr1 ...``), ``Hc = ceil(H/2)``, ``Wc = ceil(W/2)``.
        matrix, full_range: as :func:`yuv_to_rgb`.

    Returns:
        ``uint8 (H, W, 3)`` RGB on the input's device.
    """
    if uv.dim() != 2 or uv.shape[1] % 2:
        raise ValueError(f"uv: expected (Hc, 2*Wc) interleaved chroma, got {tuple(uv.shape)}")
    cbcr = rearrange(uv, "h (w c) -> c h w", c=2)                               # (2, Hc, Wc)
    return yuv_to_rgb(y, cbcr[0], cbcr[1], matrix=matrix, full_range=full_range)
