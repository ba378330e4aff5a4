"""One entry point for every frame source: a folder of frames or an encoded video file.

:func:`open_reader` is the seam the datasets use: a directory becomes a
:class:`~vidssl.io.frames.FrameFolderReader`, a file goes to ``vidssl.io.video.open_video`` (imported when first
needed, so frame folders work without any video backend). :func:`probe` returns the metadata a manifest stores.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vidssl.io.base import FrameReader

#: Suffixes (lower case) treated as encoded videos when scanning folders.
VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts")


def open_reader(path: str | os.PathLike, *, backend: str = "auto", device: str | torch.device = "cpu",
                threads: int = 1) -> FrameReader:
    """Open ``path`` for random frame access.

    Args:
        path: a frame folder or an encoded video file.
        backend: video decoder for files (``"auto"``, ``"torchcodec"``, ``"pyav"``, ``"decord"``); ignored for
            folders. ``"frames"`` insists on a frame folder.
        device: where frames are decoded/returned (``"cuda"``: nvjpeg for JPEG folders, NVDEC for videos).
        threads: decoder threads.

    Raises ``FileNotFoundError`` naming ``path`` when it does not exist.
    """
    p = Path(path)
    if p.is_dir():
        from vidssl.io.frames import FrameFolderReader

        return FrameFolderReader(p, device=device, threads=threads)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such video file or frame folder")
    if backend == "frames":
        raise ValueError(f"{p}: backend 'frames' needs a folder of frames, got a file")
    from vidssl.io.video import open_video

    return open_video(p, backend=backend, device=device, threads=threads)


def probe(path: str | os.PathLike) -> dict:
    """Metadata of a frame folder or video file without decoding every frame.

    Returns ``{"kind": "frames"|"video", "num_frames", "fps", "height", "width", "codec", "duration"}`` (``fps`` and
    ``duration`` are ``None`` for frame folders). Errors name ``path``.
    """
    p = Path(path)
    if p.is_dir():
        from vidssl.io.frames import probe_frames

        return {"kind": "frames", **probe_frames(p)}
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such video file or frame folder")
    from vidssl.io.video import probe_video

    info = probe_video(p)
    return {"kind": "video", **{k: info.get(k) for k in ("num_frames", "fps", "height", "width", "codec",
                                                          "duration")}}
