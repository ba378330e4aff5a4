#!/usr/bin/env python
"""Prepare a video dataset for fast training input: re-encode to short side 256 with a fixed keyframe interval, or
extract JPEG frames.

Why: a random clip must be decoded from the keyframe before it, so the keyframe interval (GOP) and the resolution
decide the data-loading speed far more than the choice of decoder (4x or more between a GOP-250 720p original and a
GOP-30 short-side-256 copy; see datasets/README.md).

    # re-encode every video under SRC (recursively) to OUT/<same relative path>.mp4
    python tools/prepare_videos.py videos SRC OUT --short-side 256 --gop 30 --workers 8
    # extract frames: OUT/<relative path without suffix>/00000.jpg, 00001.jpg, ...
    python tools/prepare_videos.py frames SRC OUT --short-side 256 --quality 90 --workers 8

Behaviour:
- Output video: H.264 (libx264, yuv420p, ``--crf``/``--preset``/``--tune``), keyframe exactly every ``--gop`` frames
  (``g = keyint_min = gop``, scene-cut keyframes off), the source's timestamps and frame rate kept (variable frame
  rate survives), audio dropped, rotation metadata applied to the pixels (outputs are upright). Videos whose short side
  is already <= ``--short-side`` are not upscaled (only cropped to even sizes). ``--short-side 0`` keeps the size.
- Frames: ``%05d.jpg`` from 00000 in presentation order (the index ``vidssl`` uses for every backend).
- Every output appears atomically: a video is written to a temporary file and renamed; a frame folder is filled under
  a hidden temporary name and renamed when complete. Finished outputs are skipped, so an interrupted run resumes.
- Failures (unreadable or corrupt inputs) are skipped, listed at the end and written to ``OUT/failures.txt``;
  the exit status is 0 unless ``--strict`` (then 2 when anything failed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import traceback
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np

from vidssl.io.atomic import atomic_write_text
from vidssl.io.writer import write_video

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts", ".3gp")


# ------------------------------------------------------------------------------------------------------------
# planning


def find_videos(src: str | os.PathLike, *, suffixes: Sequence[str] = VIDEO_SUFFIXES) -> list[Path]:
    """Video files under ``src`` (recursive, hidden files and folders ignored), sorted; ``src`` may be one file."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: source folder not found")
    if src.is_file():
        return [src]
    found = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(tuple(suffixes)):
                found.append(Path(dirpath) / f)
    return sorted(found)


def output_path(video: Path, *, src: Path, out: Path, mode: str) -> Path:
    """Where the prepared copy of ``video`` goes: ``out/<rel>.mp4`` (videos) or ``out/<rel without suffix>/``."""
    rel = video.relative_to(src) if src.is_dir() else Path(video.name)
    if mode == "videos":
        return out / rel.with_suffix(".mp4")
    return out / rel.with_suffix("")


def scaled_size(height: int, width: int, *, short_side: int, align: int = 2) -> tuple[int, int]:
    """``(h, w)`` with the short side ``short_side`` (no upscaling), aspect kept, both multiples of ``align``.

    ``short_side <= 0`` keeps the size (rounded down to ``align``).
    """
    if align < 1:
        raise ValueError(f"align: must be >= 1, got {align}")
    if short_side > 0 and min(height, width) > short_side:
        s = short_side / min(height, width)
        h, w = height * s, width * s
    else:
        h, w = height, width

    def fit(x: float) -> int:
        return max(align, int(round(x / align)) * align)

    if short_side > 0 and min(height, width) > short_side and short_side % align == 0:
        # keep the short side exact; round the long side to the alignment
        return (short_side, fit(w)) if height <= width else (fit(h), short_side)
    return max(align, int(h) // align * align), max(align, int(w) // align * align)


# ------------------------------------------------------------------------------------------------------------
# per-video work (runs in worker processes)


def _upright_hw(frame, rotation: int) -> tuple[int, int]:
    """``(height, width)`` of ``frame`` as displayed, after its ``rotation`` (degrees)."""
    return (frame.width, frame.height) if rotation % 180 else (frame.height, frame.width)


def _rotate(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate ``rgb: (H, W, 3)`` counter-clockwise by ``rotation`` degrees (multiple of 90)."""
    k = (int(round(rotation / 90)) % 4)
    return np.ascontiguousarray(np.rot90(rgb, k=k)) if k else rgb


def reencode_video(src: str | os.PathLike, dst: str | os.PathLike, *, short_side: int = 256, gop: int = 30,
                   crf: int = 23, preset: str = "medium", tune: str | None = None, align: int = 2,
                   threads: int = 1) -> dict:
    """Re-encode ``src`` to H.264 ``dst`` (atomically) at short side ``short_side`` with a keyframe every ``gop``.

    Returns ``{"frames", "height", "width"}`` of the output. Raises on unreadable input (the caller lists it).
    """
    import av

    if gop < 1:
        raise ValueError(f"gop: must be >= 1, got {gop}")
    src, dst = Path(src), Path(dst)
    facts: dict = {"frames": 0}
    with av.open(str(src)) as inp:
        if not inp.streams.video:
            raise ValueError(f"{src}: no video stream")
        ist = inp.streams.video[0]
        ist.codec_context.thread_count = threads
        rate = ist.average_rate or ist.guessed_rate or Fraction(30)
        time_base = ist.time_base or Fraction(1) / rate

        def frames():
            size = None
            last_pts = None
            for frame in inp.decode(ist):
                rotation = getattr(frame, "rotation", 0) or 0
                if size is None:
                    size = scaled_size(*_upright_hw(frame, rotation), short_side=short_side, align=align)
                    facts["height"], facts["width"] = size
                if rotation % 360:
                    rgb = _rotate(frame.to_ndarray(format="rgb24"), rotation)
                    frame_out = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                        width=size[1], height=size[0], format="yuv420p", interpolation="AREA")
                else:
                    frame_out = frame.reformat(width=size[1], height=size[0], format="yuv420p", interpolation="AREA")
                pts = frame.pts if frame.pts is not None else (last_pts + 1 if last_pts is not None else 0)
                if last_pts is not None and pts <= last_pts:
                    pts = last_pts + 1  # the encoder needs strictly increasing timestamps
                frame_out.pts = last_pts = pts
                facts["frames"] += 1
                yield frame_out
            if size is None:
                raise ValueError(f"{src}: no decodable frames")

        write_video(dst, frames(), fps=rate, time_base=time_base, gop=gop, crf=crf, preset=preset,
                    options={"threads": str(threads), **({"tune": tune} if tune else {})})
    return facts


def extract_frames(src: str | os.PathLike, dst_dir: str | os.PathLike, *, short_side: int = 0, quality: int = 90,
                   align: int = 2, threads: int = 1) -> dict:
    """Write every frame of ``src`` as ``dst_dir/00000.jpg ...`` (the folder appears only when complete).

    Returns ``{"frames", "height", "width"}``. Raises on unreadable input (the caller lists it).
    """
    import av
    from PIL import Image

    if not 1 <= quality <= 100:
        raise ValueError(f"quality: JPEG quality must be in 1..100, got {quality}")
    src, dst_dir = Path(src), Path(dst_dir)
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_dir.parent / f".{dst_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    n = 0
    size = None
    try:
        with av.open(str(src)) as inp:
            if not inp.streams.video:
                raise ValueError(f"{src}: no video stream")
            ist = inp.streams.video[0]
            ist.codec_context.thread_count = threads
            for frame in inp.decode(ist):
                rotation = getattr(frame, "rotation", 0) or 0
                if size is None:
                    size = scaled_size(*_upright_hw(frame, rotation), short_side=short_side, align=align)
                if rotation % 360:
                    rgb = _rotate(frame.to_ndarray(format="rgb24"), rotation)
                    rgb = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                        width=size[1], height=size[0], interpolation="AREA").to_ndarray()
                else:
                    rgb = frame.reformat(width=size[1], height=size[0], format="rgb24",
                                         interpolation="AREA").to_ndarray()
                Image.fromarray(np.ascontiguousarray(rgb)).save(tmp / f"{n:05d}.jpg", quality=quality)
                n += 1
        if n == 0:
            raise ValueError(f"{src}: no decodable frames")
        if dst_dir.exists():  # --overwrite: replace the old folder
            shutil.rmtree(dst_dir)
        os.replace(tmp, dst_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"frames": n, "height": size[0], "width": size[1]}


def _is_done(dst: Path, mode: str) -> bool:
    if mode == "videos":
        return dst.is_file() and dst.stat().st_size > 0
    return dst.is_dir() and any(dst.glob("*.jpg"))


def _job(args: tuple) -> tuple[str, str | None, dict | None]:
    """Worker entry: ``(src, error or None, result or None)``; never raises."""
    src, dst, mode, opts = args
    try:
        if mode == "videos":
            res = reencode_video(src, dst, **opts)
        else:
            res = extract_frames(src, dst, **opts)
        return str(src), None, res
    except Exception as e:  # noqa: BLE001 - every failure is listed, the run goes on
        msg = f"{type(e).__name__}: {e}".strip()
        if not str(e):
            msg += " " + traceback.format_exc(limit=1).strip().splitlines()[-1]
        return str(src), msg, None


def prepare(src: str | os.PathLike, out: str | os.PathLike, *, mode: str, workers: int = 1, overwrite: bool = False,
            progress: bool = True, **opts) -> dict:
    """Prepare every video under ``src`` into ``out`` (``mode``: ``"videos"`` or ``"frames"``).

    Returns ``{"done": n, "skipped": n, "failed": [(path, reason), ...]}``; failures are also written to
    ``out/failures.txt`` (removed when a later run has none).
    """
    if mode not in ("videos", "frames"):
        raise ValueError(f"mode: expected 'videos' or 'frames', got {mode!r}")
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    src, out = Path(src), Path(out)
    videos = find_videos(src)
    if not videos:
        raise FileNotFoundError(f"{src}: no video files found (suffixes {', '.join(VIDEO_SUFFIXES)})")
    out.mkdir(parents=True, exist_ok=True)
    jobs, skipped = [], 0
    for v in videos:
        dst = output_path(v, src=src, out=out, mode=mode)
        if not overwrite and _is_done(dst, mode):
            skipped += 1
            continue
        jobs.append((v, dst, mode, opts))
    failed: list[tuple[str, str]] = []
    done = 0
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"prepare {mode}", unit="video", disable=not progress or not jobs)
    if workers == 1 or len(jobs) <= 1:
        results = map(_job, jobs)
        pool = None
    else:
        # spawn, never fork: a forked child inherits FFmpeg's thread pools mid-state from a caller that has decoded
        # or converted frames before (libswscale's slice threads: the child then blocks for ever freeing them)
        pool = get_context("spawn").Pool(workers)
        results = pool.imap_unordered(_job, jobs)
    try:
        for path, err, _ in results:
            if err is None:
                done += 1
            else:
                failed.append((path, err))
                bar.set_postfix(failed=len(failed))
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    report = out / "failures.txt"
    if failed:
        atomic_write_text(report, "".join(f"{p}\t{e}\n" for p, e in sorted(failed)))
    elif report.exists():
        report.unlink()
    return {"done": done, "skipped": skipped, "failed": sorted(failed)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["videos", "frames"], help="re-encode videos, or extract JPEG frames")
    p.add_argument("src", help="folder of videos (searched recursively) or one video file")
    p.add_argument("out", help="output folder (the relative layout of SRC is kept)")
    p.add_argument("--short-side", type=int, default=256,
                   help="resize so the short side is this many pixels (no upscaling; 0 = keep; default 256)")
    p.add_argument("--align", type=int, default=2,
                   help="round output sizes to a multiple of this (2 for yuv420p; 32 speeds up torchcodec's colour "
                        "conversion)")
    p.add_argument("--gop", type=int, default=30, help="videos: a keyframe every GOP frames (default 30)")
    p.add_argument("--crf", type=int, default=23, help="videos: x264 constant rate factor (default 23)")
    p.add_argument("--preset", default="medium", help="videos: x264 preset (default medium)")
    p.add_argument("--tune", default=None,
                   help="videos: x264 tune, e.g. 'fastdecode' (no CABAC/deblocking: faster decoding, larger files)")
    p.add_argument("--quality", type=int, default=90, help="frames: JPEG quality 1..100 (default 90)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--strict", action="store_true", help="exit with status 2 when any video failed")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.mode == "videos":
        opts = dict(short_side=a.short_side, gop=a.gop, crf=a.crf, preset=a.preset, tune=a.tune, align=a.align)
    else:
        opts = dict(short_side=a.short_side, quality=a.quality, align=a.align)
    t0 = time.monotonic()
    try:
        res = prepare(a.src, a.out, mode=a.mode, workers=a.workers, overwrite=a.overwrite,
                      progress=not a.no_progress, **opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"prepare_videos: error: {e}", file=sys.stderr)
        return 1
    dt = time.monotonic() - t0
    print(f"{res['done']} prepared, {res['skipped']} already done, {len(res['failed'])} failed in {dt:.1f}s -> {a.out}")
    for path, err in res["failed"]:
        print(f"  FAILED {path}: {err}", file=sys.stderr)
    if res["failed"]:
        print(f"failures listed in {Path(a.out) / 'failures.txt'} (fix or delete them; rerun to retry)",
              file=sys.stderr)
    return 2 if (a.strict and res["failed"]) else 0


if __name__ == "__main__":
    sys.exit(main())
