"""Encoding video files with PyAV: :func:`write_video`, the one encode loop of vidssl, its tools and its tests."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from vidssl.io.atomic import atomic_path

if TYPE_CHECKING:
    import av

__all__ = ["CONTAINER_FORMATS", "write_video"]

#: Container format (FFmpeg muxer) chosen from the file suffix.
CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
                     ".avi": "avi", ".ts": "mpegts"}


def write_video(path: str | os.PathLike, frames: np.ndarray | Iterable[np.ndarray | "av.VideoFrame"], *,
                fps: int | float | Fraction = 25, codec: str | None = None, pix_fmt: str | None = None,
                lossless: bool = False, crf: int | float | None = None, preset: str | None = None,
                gop: int | None = None, options: Mapping[str, str] | None = None,
                time_base: Fraction | None = None, pts: Sequence[int] | None = None, rotation: int | None = None,
                container_format: str | None = None) -> Path:
    """Encode RGB frames into a video file with PyAV, atomically (temporary file in the same folder, then rename).

    Args:
        path: output file; the container follows the suffix (:data:`CONTAINER_FORMATS`) unless
            ``container_format`` names an FFmpeg muxer.
        frames: ``uint8 (T, H, W, 3)`` RGB, or an iterable (a generator is fine) of ``(H, W, 3)`` uint8 arrays or of
            ``av.VideoFrame`` (encoded as they are; their own ``pts`` is kept when set). The size is the first
            frame's.
        fps: frame rate (``Fraction(30000, 1001)`` for NTSC; floats are turned into a fraction).
        codec: encoder (default ``libx264``; ``libx264rgb`` with ``lossless``).
        pix_fmt: encoder pixel format (default ``rgb24`` for ``libx264rgb``, else ``yuv420p``, which needs an even
            height and width).
        lossless: ``libx264rgb`` at ``crf 0`` in ``rgb24``: frames decode back bit-exactly, any size.
        crf, preset: x264 rate factor and speed preset (encoder defaults when None).
        gop: a keyframe exactly every ``gop`` frames (``g = keyint_min = gop``, no scene-cut keyframes); encoder
            default when None.
        options: further encoder options (strings), applied last (e.g. ``{"bframes": "0", "threads": "1"}``).
        time_base: stream time base (default ``1 / fps``); timestamps are in it.
        pts: timestamp of each frame (default ``0, 1, 2, ...``; variable frame rates with ``time_base``).
        rotation: display-matrix rotation in degrees (counter-clockwise), written as metadata.

    Returns:
        ``path``. Nothing is left at ``path`` (or next to it) when encoding fails.

    Example::

        write_video("clip.mp4", frames, fps=30, crf=23, gop=30)      # H.264, a keyframe every second
        write_video("exact.mkv", frames, lossless=True)               # bit-exact round trip
    """
    import av

    path = Path(path)
    fmt = container_format or CONTAINER_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported suffix {path.suffix!r}; expected one of "
                         f"{', '.join(CONTAINER_FORMATS)} (or pass container_format)")
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1_000_000)
    if rate <= 0:
        raise ValueError(f"{path}: fps must be > 0, got {fps}")
    if gop is not None and gop < 1:
        raise ValueError(f"{path}: gop must be >= 1, got {gop}")
    codec = codec or ("libx264rgb" if lossless else "libx264")
    pix_fmt = pix_fmt or ("rgb24" if codec == "libx264rgb" else "yuv420p")
    opts: dict[str, str] = {}
    if preset is not None:
        opts["preset"] = str(preset)
    if gop is not None:
        opts.update({"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"})
    if lossless or crf is not None:
        opts["crf"] = "0" if lossless else f"{crf:g}"
    opts.update({str(k): str(v) for k, v in (options or {}).items()})
    time_base = time_base or 1 / rate
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8
                                           or frames.shape[0] < 1):
        raise ValueError(f"{path}: frames must be uint8 (T>=1, H, W, 3) RGB, got {frames.dtype} {frames.shape}")
    n = 0
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format=fmt) as container:
            stream = None
            for item in frames:
                if isinstance(item, av.VideoFrame):
                    frame = item
                else:
                    img = np.asarray(item)
                    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
                        raise ValueError(f"{path}: frame {n} must be uint8 (H, W, 3) RGB, got {img.dtype} "
                                         f"{img.shape}")
                    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                if stream is None:
                    if pix_fmt == "yuv420p" and (frame.height % 2 or frame.width % 2):
                        raise ValueError(f"{path}: {pix_fmt} needs an even frame size, got {frame.height}x"
                                         f"{frame.width}; crop or pad by one pixel, or write with lossless=True")
                    stream = container.add_stream(codec, rate=rate)
                    stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, pix_fmt
                    stream.time_base = stream.codec_context.time_base = time_base
                    if opts:
                        stream.options = opts
                    if rotation is not None:
                        stream.set_display_rotation(rotation)
                elif (frame.height, frame.width) != (stream.height, stream.width):
                    raise ValueError(f"{path}: frame {n} is {frame.height}x{frame.width}, the first frame "
                                     f"{stream.height}x{stream.width}")
                if not isinstance(item, av.VideoFrame) or frame.pts is None:
                    frame.pts = pts[n] if pts is not None else n
                frame.time_base = time_base
                container.mux(stream.encode(frame))
                n += 1
            if stream is None:
                raise ValueError(f"{path}: no frames to encode")
            container.mux(stream.encode(None))
    return path
