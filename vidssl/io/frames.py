"""Folders of JPEG/PNG frames as videos (DAVIS, YouTube-VOS, Kinetics-as-frames).

A frame folder holds one image per frame; frame ``k`` is the ``k``-th file in natural order (``img_2`` before
``img_10``). :class:`FrameFolderReader` implements :class:`vidssl.io.base.FrameReader`: it reads and decodes only the
frames asked for, JPEGs in one batched ``torchvision.io.decode_jpeg`` call (nvjpeg when ``device`` is CUDA), PNGs
with ``decode_png``, and returns ``uint8 (T, 3, H, W)`` RGB on ``device``.

Errors name the folder or file: a missing folder raises ``FileNotFoundError``; an empty folder, frames of mixed
sizes and unreadable images raise :class:`FrameFolderError` (a :class:`~vidssl.io.base.DecodeError`).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from vidssl.io.base import DecodeError

#: File suffixes (lower case) read as frames.
FRAME_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
_JPEG_SUFFIXES = (".jpg", ".jpeg")


class FrameFolderError(DecodeError, ValueError):
    """A frame folder is empty, holds frames of different sizes, or an image in it cannot be decoded."""


def _natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers by value: ``f2.jpg`` < ``f10.jpg``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def list_frames(folder: str | os.PathLike) -> list[Path]:
    """The frame files of ``folder`` (``*.jpg``, ``*.jpeg``, ``*.png``, any case) in natural order.

    Raises ``FileNotFoundError`` when the folder does not exist and :class:`FrameFolderError` when it holds no frame.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: frame folder not found")
    names = [e.name for e in os.scandir(folder)
             if e.name.lower().endswith(FRAME_SUFFIXES) and not e.name.startswith(".") and e.is_file()]
    if not names:
        raise FrameFolderError(f"{folder}: empty frame folder (no *.jpg, *.jpeg or *.png files)")
    names.sort(key=_natural_key)
    return [folder / n for n in names]


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image from its header only (no pixel decoding); errors name the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as exc:  # PIL raises UnidentifiedImageError / OSError / SyntaxError
        raise FrameFolderError(f"{path}: unreadable image ({exc})") from exc
    return h, w


def _read_bytes(path: Path) -> torch.Tensor:
    from torchvision.io import read_file

    try:
        return read_file(str(path))
    except Exception as exc:
        raise FrameFolderError(f"{path}: cannot read image file ({exc})") from exc


def _decode_one(data: torch.Tensor, path: Path, device: torch.device) -> torch.Tensor:
    """Decode one JPEG/PNG byte tensor to ``uint8 (3, H, W)`` on ``device``; errors name ``path``."""
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    try:
        if path.suffix.lower() in _JPEG_SUFFIXES:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return decode_png(data, mode=ImageReadMode.RGB).to(device)
    except Exception as exc:  # torchvision raises RuntimeError with a terse message
        raise FrameFolderError(f"{path}: unreadable image ({exc})") from exc


class FrameFolderReader:
    """Random access to the frames of one frame folder.

    Args:
        path: folder of ``*.jpg`` / ``*.jpeg`` / ``*.png`` frames.
        device: where decoded frames go; ``"cuda"`` decodes JPEGs with nvjpeg (PNGs decode on the CPU and are moved).
        threads: CPU decoding threads for one :meth:`get_frames` call (the decoders release the GIL).

    Attributes: ``path`` (str), ``num_frames``, ``fps`` (``None``: folders carry no timing), ``height``, ``width``
    (from the first frame's header, read on first access), ``files`` (the frame paths in order).
    """

    fps: float | None = None

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device = "cpu", threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        self.path = str(path)
        self.files = list_frames(path)
        self.num_frames = len(self.files)
        self.device = torch.device(device)
        self.threads = threads
        self._size: tuple[int, int] | None = None

    @property
    def height(self) -> int:
        return self._frame_size()[0]

    @property
    def width(self) -> int:
        return self._frame_size()[1]

    def _frame_size(self) -> tuple[int, int]:
        if self._size is None:
            self._size = image_size(self.files[0])
        return self._size

    def __repr__(self) -> str:
        return f"FrameFolderReader({self.path!r}, num_frames={self.num_frames}, device={str(self.device)!r})"

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at ``indices`` (any order, repeats decoded once) as ``uint8 (len(indices), 3, H, W)`` RGB.

        Raises ``IndexError`` for an index outside ``[0, num_frames)`` and :class:`FrameFolderError` naming the file
        for an unreadable image, or the folder and both sizes when the requested frames differ in size.
        """
        indices = [int(i) for i in indices]
        if not indices:
            raise ValueError(f"{self.path}: get_frames needs at least one index")
        for i in indices:
            if not 0 <= i < self.num_frames:
                raise IndexError(f"{self.path}: frame {i} out of range (folder has {self.num_frames} frames)")
        unique = sorted(set(indices))
        paths = [self.files[i] for i in unique]
        decoded = self._decode(paths)  # list of (3, H_k, W_k)
        first = decoded[0].shape[-2:]
        for p, img in zip(paths, decoded):
            if img.shape[-2:] != first:
                raise FrameFolderError(
                    f"{self.path}: frames of mixed sizes: {paths[0].name} is {first[1]}x{first[0]} but {p.name} is "
                    f"{img.shape[-1]}x{img.shape[-2]} (WxH); all frames of a video must share one size")
        if self._size is None:
            self._size = (int(first[0]), int(first[1]))
        stacked = torch.stack(decoded)  # (U, 3, H, W)
        if unique == indices:
            return stacked
        pos = {i: k for k, i in enumerate(unique)}
        return stacked[torch.tensor([pos[i] for i in indices], device=stacked.device)]

    def _decode(self, paths: list[Path]) -> list[torch.Tensor]:
        """Decode ``paths`` to a list of ``uint8 (3, H, W)``: JPEGs batched, PNGs one by one."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [_read_bytes(p) for p in paths]
        out: list[torch.Tensor | None] = [None] * len(paths)
        jpeg = [k for k, p in enumerate(paths) if p.suffix.lower() in _JPEG_SUFFIXES]
        jpeg_set = set(jpeg)
        other = [k for k in range(len(paths)) if k not in jpeg_set]
        if jpeg and (self.device.type == "cuda" or self.threads == 1):
            try:  # one batched call (nvjpeg batches on CUDA)
                imgs = decode_jpeg([data[k] for k in jpeg], mode=ImageReadMode.RGB, device=self.device)
                for k, img in zip(jpeg, imgs):
                    out[k] = img
            except Exception:  # find the file that broke the batch and name it
                for k in jpeg:
                    out[k] = _decode_one(data[k], paths[k], self.device)
            todo = other
        else:
            todo = jpeg + other
        if self.threads > 1 and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=self.threads) as pool:
                imgs = list(pool.map(lambda k: _decode_one(data[k], paths[k], self.device), todo))
            for k, img in zip(todo, imgs):
                out[k] = img
        else:
            for k in todo:
                out[k] = _decode_one(data[k], paths[k], self.device)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        """Nothing to release: files are opened per call."""

    def __enter__(self) -> "FrameFolderReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_frames(path: str | os.PathLike) -> dict:
    """Metadata of a frame folder without decoding pixels.

    Returns ``{"num_frames", "fps": None, "height", "width", "codec": "jpeg"|"png"|"mixed", "duration": None}``.
    The sizes of the first and the last frame are compared (mixed sizes -> :class:`FrameFolderError` naming the
    folder and both sizes); the reader checks every frame it decodes.
    """
    files = list_frames(path)
    h, w = image_size(files[0])
    h2, w2 = image_size(files[-1])
    if (h, w) != (h2, w2):
        raise FrameFolderError(f"{path}: frames of mixed sizes: {files[0].name} is {w}x{h} but {files[-1].name} is "
                               f"{w2}x{h2} (WxH); all frames of a video must share one size")
    kinds = {"jpeg" if f.suffix.lower() in _JPEG_SUFFIXES else "png" for f in files}
    return {"num_frames": len(files), "fps": None, "height": h, "width": w,
            "codec": kinds.pop() if len(kinds) == 1 else "mixed", "duration": None}
