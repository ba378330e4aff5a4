"""Frames and label maps on disk.

Layouts: frames are returned as ``uint8`` tensors ``(C=3, H, W)`` (RGB); label maps as ``uint8`` numpy arrays
``(H, W)`` of object ids (palette indices for mode ``P`` PNGs).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vidssl.io.atomic import atomic_path


def _voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map used by DAVIS-2017 annotations (0 black, 1 (128,0,0), 2 (0,128,0), ...)."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


#: 768 ints (256 RGB triples): the palette DAVIS-2017 annotation PNGs carry.
DAVIS_PALETTE: tuple[int, ...] = tuple(_voc_palette())


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read a JPEG/PNG frame as an RGB ``uint8`` tensor ``(3, H, W)``.

    Raises ``ValueError`` naming the file when it cannot be decoded.
    """
    from torchvision.io import ImageReadMode, decode_image, read_file

    path = Path(path)
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except Exception as exc:  # torchvision raises RuntimeError with a terse message
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc


def read_label_png(path: str | os.PathLike) -> tuple[np.ndarray, list[int] | None]:
    """Read a label PNG as ``(ids (H, W) uint8, palette or None)``.

    Mode ``P`` gives palette indices and the file's palette; mode ``L`` gives the grey values (DAVIS-2016 masks are
    0/255) and ``None``. Any other mode is an error naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P":
                return np.array(im, dtype=np.uint8), im.getpalette()
            if mode in ("L", "1"):
                return np.array(im.convert("L"), dtype=np.uint8), None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read label PNG ({exc})") from exc
    raise ValueError(f"{path}: label PNG has mode {mode!r}; expected an indexed 'P' or greyscale 'L' image")


def write_label_png(path: str | os.PathLike, ids: np.ndarray | torch.Tensor,
                    palette: list[int] | tuple[int, ...] | None = None) -> None:
    """Write object ids ``(H, W)`` as an indexed (mode ``P``) PNG, atomically.

    ``palette`` defaults to :data:`DAVIS_PALETTE`.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D (H, W), got shape {ids.shape}")
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 255:
        raise ValueError(f"{path}: label ids must lie in 0..255")
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette(list(palette if palette is not None else DAVIS_PALETTE))
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
