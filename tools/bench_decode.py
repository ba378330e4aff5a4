#!/usr/bin/env python
"""Decode benchmark: random training clips per second, raw decoders used directly versus the vidssl dataset.

    python tools/bench_decode.py --quick            # a few minutes on 2 cores (test videos cached after the 1st run)
    python tools/bench_decode.py                    # the full grid (~30 minutes on 2 cores)
    python tools/bench_decode.py --device cuda      # the GPU grid (on a GPU machine; tools/gpu_benchmark.sh)
    python tools/bench_decode.py --device cpu --grid-smoke   # the GPU grid's code on the CPU, tiny videos

What it does:
1. Writes its own test videos with PyAV (textured, moving, with film grain; H.264 yuv420p 30 fps, 10 s, x264 preset
   fast, keyframe exactly every GOP frames): 854x480 and 1280x720 at GOP 30 and 250 (and 1920x1080 for --device
   cuda), cached in --workdir.
2. Wall clock: for (video, clip pattern, DataLoader workers) it measures clips/s of
   - ``raw-pyav``: PyAV used directly the careful way (open, seek to the first frame's timestamp, decode forward,
     ``to_ndarray`` only the frames kept),
   - ``raw-tc`` / ``raw-tc-approx``: ``torchcodec.decoders.VideoDecoder(num_ffmpeg_threads=1, seek_mode=exact |
     approximate).get_frames_at``,
   - ``raw-decord``: ``decord.VideoReader(num_threads=1).get_batch``,
   - ``vidssl``: ``vidssl.data.datasets.ClipDataset`` (backend "auto", no transform: uint8 clips, decode cost only),
   - (full mode) ``vidssl-<backend>``: vidssl's reader for each backend,
   on the same access pattern: every item draws its clip exactly as ClipDataset does (uniform random start, item
   generator seeded by the item index), one decoder opened per item, decoder threads 1, items served by a
   ``torch.utils.data.DataLoader(batch_size=None, num_workers=W)``. Backends are measured round-robin, each for a
   time budget after a warm-up, ``--reps`` times; the best rep is reported. Full mode: 4 videos x (8|16 frames) x
   (stride 1|2) x (1|2 workers); quick mode: 480p GOP 30 (8x1 and 16x2, 1 worker; 8x1, 2 workers) and 720p GOP 250.
3. CPU time per clip of the same backends and the vidssl dataset, decoding in this process (process CPU time is
   much less sensitive than wall time to other jobs on a shared machine): every video, 8x1 (and 16x2 at 480p GOP
   30) in quick mode, every pattern in full mode.
4. ``data.keyframe_aligned`` (clip starts on keyframes only: an option, off by default, that changes the sampling
   distribution) against uniform starts, wall clips/s and CPU ms per clip, 480p GOP 30 8x1.
5. A training step (ResNet-18 stride 8, forward+backward+SGD on the CPU; quick: 64x64 crops, 1 clip of 8 frames;
   full: 128x128, 2 clips) is fed by the vidssl DataLoader; the share of step time spent waiting for data is
   reported.
6. ``--device cuda`` (the GPU grid; issue #15): on 480p and 1080p videos at keyframe interval 30 and 8, clips of
   8x1 and 16x2 frames, over ``--files`` files (links to one video), batch ``--batch`` (20, CRW's): clips/s of the
   GPU pipeline (``vidssl.data.gpu_pipeline``: ``--sessions`` decode sessions, per-file batching, decoder cache,
   batched GPU augmentation, prefetch) for each NVDEC backend (PyAV's FFmpeg hwaccel, torchcodec's CUDA build,
   PyNvVideoCodec; a missing one is skipped with the reason), with 1 session on the first case, and of the CPU
   DataLoader with one worker per core, on the same clip list; NVDEC utilisation from NVML sampled during each GPU
   measurement and the GPU's maximum video clock; then data time vs step time of ``vidssl pretrain`` on the CRW
   recipe (configs/crw_kinetics.yaml, batch 20) for the GPU path and the CPU path. Prints a Markdown table
   (``--markdown``, ``--json``). ``--device cpu --grid-smoke`` runs the same code on the CPU twin with tiny videos.
   tools/gpu_benchmark.sh runs it on a lent GPU machine.

Targets checked at the end: the vidssl dataset reaches >= 0.95x the best raw backend on each pattern; the default
backend is the fastest available; random 8-frame clips at 480p GOP 30 reach >= 25 clips/s with one worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import traceback
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vidssl.data import samplers
from vidssl.io.atomic import atomic_write_text
from vidssl.io.video import available_backends, open_video, resolve_backend
from vidssl.io.writer import write_video

RAW_BACKENDS = ("raw-pyav", "raw-tc", "raw-tc-approx", "raw-decord")


# ------------------------------------------------------------------------------------------------------------
# test videos


def textured_frames(height: int, width: int, num_frames: int, *, seed: int = 0, grain: float = 2.0
                    ) -> Iterator[np.ndarray]:
    """``(H, W, 3) uint8`` frames: a multi-scale random texture panning diagonally, film grain, a moving square."""
    rng = np.random.default_rng(seed)
    big_h, big_w = height + 2 * num_frames + 8, width + 3 * num_frames + 8
    canvas = np.zeros((big_h, big_w, 3), np.float32)
    for cell, amp in [(32, 90.0), (8, 60.0), (2, 40.0)]:
        base = rng.normal(0, 1, (big_h // cell + 2, big_w // cell + 2, 3)).astype(np.float32)
        canvas += amp * np.kron(base, np.ones((cell, cell, 1), np.float32))[:big_h, :big_w]
    canvas = np.clip(canvas + 128, 0, 255)
    side = max(8, height // 6)
    for t in range(num_frames):
        y0, x0 = int(t * 1.5), int(t * 2.5)
        f = canvas[y0:y0 + height, x0:x0 + width].copy()
        f += rng.normal(0, grain, f.shape).astype(np.float32)
        cy = int(height / 2 + height / 4 * np.sin(t / 10))
        cx = int(width / 2 + width / 4 * np.cos(t / 13))
        f[max(0, cy - side):cy + side, max(0, cx - side):cx + side] = (230, (t * 5) % 256, 30)
        yield np.clip(f, 0, 255).astype(np.uint8)


def make_video(path: Path, *, height: int, width: int, gop: int, num_frames: int = 300, fps: int = 30,
               preset: str = "fast", seed: int = 0) -> Path:
    """Write (once; cached) an H.264 test video with a keyframe exactly every ``gop`` frames."""
    if path.is_file() and path.stat().st_size > 0:
        return path
    return write_video(path, textured_frames(height, width, num_frames, seed=seed), fps=fps, gop=gop, crf=23,
                       preset=preset)


# ------------------------------------------------------------------------------------------------------------
# access pattern and datasets


def _item_generator(seed: int, index: int) -> torch.Generator:
    try:  # the generator ClipDataset uses, so raw backends read exactly the dataset's clips
        from vidssl.data.datasets import item_generator
        return item_generator(seed, 0, index)
    except ImportError:
        return torch.Generator().manual_seed(seed * 1_000_003 + index)


def clip_indices(num_frames: int, clip_len: int, stride: int, index: int, *, seed: int = 0) -> list[int]:
    """Frame indices of item ``index``: a uniformly random clip (as ClipDataset's "random" sampler draws it)."""
    return samplers.random_clip(num_frames, clip_len, stride, _item_generator(seed, index))


def _raw_pyav(path: str, idx: list[int]) -> torch.Tensor:
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        s.codec_context.thread_count = 1
        fps, tb, start = s.average_rate, s.time_base, s.start_time or 0
        pts_of = {start + int(round(Fraction(i) / fps / tb)): i for i in set(idx)}
        last = max(pts_of)
        c.seek(min(pts_of), stream=s, backward=True)
        got: dict[int, np.ndarray] = {}
        for frame in c.decode(s):
            i = pts_of.get(frame.pts)
            if i is not None:
                got[i] = frame.to_ndarray(format="rgb24")
            if frame.pts is not None and frame.pts >= last:
                break
    return torch.from_numpy(np.stack([got[i] for i in idx])).permute(0, 3, 1, 2)


def _raw_torchcodec(path: str, idx: list[int], seek_mode: str) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(path, num_ffmpeg_threads=1, seek_mode=seek_mode).get_frames_at(indices=idx).data


def _raw_decord(path: str, idx: list[int]) -> torch.Tensor:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    return torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)


RAW_FUNCS: dict[str, Callable[[str, list[int]], torch.Tensor]] = {
    "raw-pyav": _raw_pyav,
    "raw-tc": lambda p, i: _raw_torchcodec(p, i, "exact"),
    "raw-tc-approx": lambda p, i: _raw_torchcodec(p, i, "approximate"),
    "raw-decord": _raw_decord,
}


class RawClips(Dataset):
    """Item ``i``: the clip :func:`clip_indices` draws, decoded by a raw library call (``uint8 (T, 3, H, W)``)."""

    def __init__(self, path: Path, num_frames: int, *, clip_len: int, stride: int, length: int, backend: str,
                 seed: int = 0) -> None:
        self.path, self.num_frames, self.clip_len, self.stride = str(path), num_frames, clip_len, stride
        self.length, self.seed = length, seed
        self.backend = backend

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        idx = clip_indices(self.num_frames, self.clip_len, self.stride, i, seed=self.seed)
        if self.backend in RAW_FUNCS:
            return RAW_FUNCS[self.backend](self.path, idx)
        name = self.backend.removeprefix("vidssl-")  # a vidssl reader
        with open_video(self.path, backend=name) as r:
            return r.get_frames(idx)


def vidssl_dataset(path: Path, num_frames: int, *, clip_len: int, stride: int, length: int, seed: int = 0,
                   transform=None, keyframe_aligned: bool = False):
    """``ClipDataset`` over one video, ``length`` random clips (uint8 frames when ``transform`` is None)."""
    from vidssl.data.datasets import ClipDataset
    from vidssl.data.manifest import VideoEntry

    entry = VideoEntry(name=path.stem, path=str(path), kind="video", num_frames=num_frames)
    return ClipDataset([entry], clip_len=clip_len, stride=stride, sampler="random", clips_per_video=length,
                       transform=transform, seed=seed, backend="auto", decode_threads=1,
                       keyframe_aligned=keyframe_aligned)


def measure(dataset: Dataset, *, workers: int, budget_s: float, min_items: int = 3) -> float:
    """Clips/s served by a DataLoader over ``dataset`` after a warm-up of ``workers`` items."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, shuffle=False,
                        prefetch_factor=2 if workers else None)
    it = iter(loader)
    try:
        for _ in range(max(1, workers)):
            next(it)
        t0 = time.perf_counter()
        n = 0
        while True:
            next(it)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= budget_s and n >= min_items:
                return n / dt
    except StopIteration:
        dt = time.perf_counter() - t0
        return n / dt if n else float("nan")
    finally:
        del it


# ------------------------------------------------------------------------------------------------------------
# CPU grid


def _nanmax(a: float, b: float) -> float:
    if a != a:
        return b
    return a if b != b else max(a, b)


def raw_columns() -> list[str]:
    """The raw backends installed here."""
    have = set(available_backends())
    lib = {"raw-pyav": "pyav", "raw-tc": "torchcodec", "raw-tc-approx": "torchcodec", "raw-decord": "decord"}
    return [b for b in RAW_BACKENDS if lib[b] in have]


def grid_plans(videos: dict[str, Path], *, quick: bool, workers: Sequence[int]) -> list[tuple]:
    """``(video name, path, clip_len, stride, workers)`` to measure (full: every combination)."""
    plans = []
    for vname, path in videos.items():
        if quick:
            pats = {"480p-g30": [(8, 1), (16, 2)], "720p-g250": [(8, 1)]}.get(vname, [])
            plans += [(vname, path, c, st, 1) for c, st in pats]
            if vname == "480p-g30" and 2 in workers:
                plans.append((vname, path, 8, 1, 2))
            continue
        for c, st in [(8, 1), (8, 2), (16, 1), (16, 2)]:
            plans += [(vname, path, c, st, w) for w in workers]
    return plans


def wall_grid(videos: dict[str, Path], *, quick: bool, budget_s: float, reps: int, seed: int,
              log: Callable[[str], None]) -> list[dict]:
    """Clips/s through a DataLoader (wall clock) for every plan of :func:`grid_plans`."""
    raw = raw_columns()
    readers = [] if quick else [f"vidssl-{b}" for b in available_backends()]
    plans = grid_plans(videos, quick=quick, workers=[1, 2])
    rows = []
    for vname, path, clip_len, stride, w in plans:
        with open_video(path) as r:
            n = r.num_frames
        names = raw + readers + ["vidssl"]
        best: dict[str, float] = {}
        for rep in range(reps):
            order = names[rep % len(names):] + names[:rep % len(names)]  # rotate the order between reps
            for name in order:
                length = 100_000
                if name == "vidssl":
                    ds = vidssl_dataset(path, n, clip_len=clip_len, stride=stride, length=length, seed=seed + rep)
                else:
                    ds = RawClips(path, n, clip_len=clip_len, stride=stride, length=length, backend=name,
                                  seed=seed + rep)
                try:
                    rate = measure(ds, workers=w, budget_s=budget_s)
                except Exception as e:  # noqa: BLE001 - a backend failing is a result too
                    log(f"  {name} failed on {vname}: {type(e).__name__}: {e}")
                    rate = float("nan")
                best[name] = _nanmax(best.get(name, float("nan")), rate)
        best_raw = max((best[b] for b in raw if best[b] == best[b]), default=float("nan"))
        row = {"video": vname, "clip_len": clip_len, "stride": stride, "workers": w, "clips_per_s": best,
               "best_raw": best_raw, "vidssl_vs_best_raw": best["vidssl"] / best_raw}
        rows.append(row)
        log(format_row(row, raw + readers))
    return rows


def format_header(cols: Sequence[str]) -> str:
    return (f"{'video':<10} {'clip':>5} {'W':>2} | " + " ".join(f"{c:>14}" for c in cols)
            + f" | {'vidssl':>8} {'vs best raw':>11}")


def format_row(row: dict, cols: Sequence[str]) -> str:
    c = row["clips_per_s"]
    return (f"{row['video']:<10} {row['clip_len']:>2}x{row['stride']:<2} {row['workers']:>2} | "
            + " ".join(f"{c.get(k, float('nan')):>14.1f}" for k in cols)
            + f" | {c['vidssl']:>8.1f} {row['vidssl_vs_best_raw']:>10.2f}x")


class DatasetClips(Dataset):
    """The vidssl dataset's item ``i`` as a bare ``uint8 (T, 3, H, W)`` tensor (for in-process timing)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ds[i]["video"]


def cpu_time_grid(videos: dict[str, Path], *, quick: bool, cpu_budget_s: float, reps: int, seed: int,
                  log: Callable[[str], None]) -> list[dict]:
    """CPU seconds per clip, decoding in this process (one decoder thread), for every backend and the vidssl dataset.

    Process CPU time is far less sensitive than wall time to other jobs sharing the machine (not immune: caches and
    SMT siblings are shared), so it is the number to compare on a busy machine; ``1 / cpu_s`` is the clips/s one
    worker reaches on an otherwise idle core. Each (name, pattern) runs until ``cpu_budget_s`` of CPU time (at least
    3 clips); names are interleaved and the best of ``reps`` is kept.
    """
    names = raw_columns() + [f"vidssl-{b}" for b in available_backends()] + ["vidssl"]
    plans = []
    for vname, path in videos.items():
        pats = ([(8, 1), (16, 2)] if vname == "480p-g30" else [(8, 1)]) if quick else \
            [(8, 1), (8, 2), (16, 1), (16, 2)]
        plans += [(vname, path, c, st) for c, st in pats]
    rows = []
    log(f"{'video':<10} {'clip':>5} | " + " ".join(f"{c:>14}" for c in names) + f" | {'vs best raw':>11}"
        + "   (CPU ms per clip)")
    for vname, path, clip_len, stride in plans:
        with open_video(path) as r:
            n = r.num_frames
        best: dict[str, float] = {}
        for rep in range(reps):
            for name in names:
                if name == "vidssl":
                    ds = DatasetClips(vidssl_dataset(path, n, clip_len=clip_len, stride=stride, length=100_000,
                                                     seed=seed + 11 + rep))
                else:
                    ds = RawClips(path, n, clip_len=clip_len, stride=stride, length=100_000, backend=name,
                                  seed=seed + 11 + rep)
                try:
                    k, t0 = 0, time.process_time()
                    while time.process_time() - t0 < cpu_budget_s or k < 3:
                        ds[k]
                        k += 1
                    per = (time.process_time() - t0) / k
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} failed on {vname}: {type(e).__name__}: {e}")
                    per = float("nan")
                best[name] = per if name not in best or best[name] != best[name] else min(best[name], per)
        raw = [best[b] for b in raw_columns() if best[b] == best[b]]
        ratio = min(raw) / best["vidssl"] if raw else float("nan")
        row = {"video": vname, "clip_len": clip_len, "stride": stride, "cpu_ms_per_clip":
               {k: 1000 * v for k, v in best.items()}, "vidssl_vs_best_raw": ratio}
        rows.append(row)
        log(f"{vname:<10} {clip_len:>2}x{stride:<2} | " + " ".join(f"{1000 * best[c]:>14.0f}" for c in names)
            + f" | {ratio:>10.2f}x")
    return rows


# ------------------------------------------------------------------------------------------------------------
# training-step data-time share


def train_share(path: Path, *, workers: int, steps: int, device: str = "cpu", crop: int = 128, batch: int = 2,
                clip_len: int = 8, seed: int = 0) -> dict:
    """Data-wait share of a training step fed by the vidssl DataLoader (ClipDataset + ClipTransform)."""
    from einops import rearrange

    from vidssl.data.transforms import ClipTransform
    from vidssl.models.encoders import build_encoder

    with open_video(path) as r:
        n = r.num_frames
    ds = vidssl_dataset(path, n, clip_len=clip_len, stride=1, length=100_000, seed=seed,
                        transform=ClipTransform(crop_size=crop))
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False)
    model = build_encoder("resnet18", out_layer="layer4").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    it = iter(loader)
    data_t = step_t = 0.0
    for k in range(steps + 1):
        t0 = time.perf_counter()
        video = next(it)["video"].to(device, non_blocking=True)  # (B, T, 3, S, S)
        t1 = time.perf_counter()
        feats = model(rearrange(video, "b t c h w -> (b t) c h w"))
        loss = feats.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if k:  # step 0 includes worker start-up
            data_t += t1 - t0
            step_t += t2 - t1
    del it
    total = data_t + step_t
    return {"workers": workers, "steps": steps, "data_s": data_t, "compute_s": step_t,
            "data_share": data_t / total, "clips_per_s": steps * batch / total}


# ------------------------------------------------------------------------------------------------------------
# GPU


class NvdecMonitor:
    """NVDEC utilisation sampled through NVML (``pynvml``, package nvidia-ml-py) while a block runs.

    ``nvmlDeviceGetDecoderUtilization`` is the share of time the decode engines were busy over the driver's last
    sampling period; samples every ``period_s``. ``available`` is False (and the readings None) without NVML.
    """

    def __init__(self, device_index: int = 0, period_s: float = 0.05) -> None:
        self.period_s = period_s
        self.samples: list[int] = []
        self._stop = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.available = True
        except Exception as e:  # noqa: BLE001 - no NVML library, no driver, no GPU
            self.available = False
            self.error = f"{type(e).__name__}: {e}"

    def clocks(self) -> dict:
        """The GPU's maximum and current video clock (MHz), or the reason they are unknown."""
        if not self.available:
            return {"error": self.error}
        n = self._nvml
        out = {}
        for name, fn in (("max_video_clock_mhz", n.nvmlDeviceGetMaxClockInfo),
                         ("video_clock_mhz", n.nvmlDeviceGetClockInfo)):
            try:
                out[name] = int(fn(self._handle, n.NVML_CLOCK_VIDEO))
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
        return out

    def __enter__(self) -> "NvdecMonitor":
        import threading

        self.samples = []
        if self.available:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append(int(self._nvml.nvmlDeviceGetDecoderUtilization(self._handle)[0]))
            except Exception:  # noqa: BLE001
                return

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"nvdec_util_mean": None, "nvdec_util_max": None}
        return {"nvdec_util_mean": round(float(np.mean(self.samples)), 1), "nvdec_util_max": max(self.samples)}


#: The GPU grid: (name, height, width, keyframe interval, frames) x (clip_len, stride).
GPU_VIDEOS = [("480p-g30", 480, 854, 30, 300), ("480p-g8", 480, 854, 8, 300),
              ("1080p-g30", 1080, 1920, 30, 150), ("1080p-g8", 1080, 1920, 8, 150)]
GPU_CLIPS = [(8, 1), (16, 2)]
#: ``--device cpu --grid-smoke``: the same code on tiny videos (checks the tool, measures nothing of interest)
SMOKE_VIDEOS = [("smoke-g8", 64, 96, 8, 40)]
SMOKE_CLIPS = [(4, 1)]


def clip_set(workdir: Path, name: str, height: int, width: int, gop: int, frames: int, *, files: int):
    """``files`` entries that all point at one generated video (symbolic links): a clip list over many files."""
    from vidssl.data.manifest import VideoEntry

    src = make_video(workdir / f"bench_{height}p_g{gop}_{frames}.mp4", height=height, width=width, gop=gop,
                     num_frames=frames)
    with open_video(src) as r:
        n = r.num_frames
    folder = workdir / f"set_{name}"
    folder.mkdir(exist_ok=True)
    entries = []
    for k in range(files):
        link = folder / f"{name}_{k:03d}.mp4"
        if not link.exists():
            link.symlink_to(src.resolve())
        entries.append(VideoEntry(name=link.stem, path=str(link), kind="video", num_frames=n))
    return folder, entries


def _loader(entries, *, clip_len: int, stride: int, batch: int, seed: int, mode: str, backend: str,
            device: str, sessions: int, workers: int):
    """A ClipLoader over ``entries``: the GPU pipeline (``mode="pipeline"``) or the CPU DataLoader path; both draw
    the same items in the same order (one sampler seed, per-item generators)."""
    from vidssl.data.config import DataConfig
    from vidssl.data.datasets import ClipDataset
    from vidssl.data.loader import ClipLoader
    from vidssl.data.transforms import BatchClipAugment, ClipTransform

    cfg = DataConfig(source="video", root="-", clip_len=clip_len, stride=stride, crop_size=256, flip=0.5)
    common = dict(clip_len=clip_len, stride=stride, sampler="random", clips_per_video=64, seed=seed, backend=backend)
    if mode == "pipeline":
        ds = ClipDataset(entries, transform=None, device=device, reader_cache=max(64, 4 * sessions), **common)
        return ClipLoader(ds, batch_size=batch, seed=seed, device=device, gpu_augment=BatchClipAugment.from_config(cfg),
                          gpu_threads=sessions, gpu_prefetch=2)
    ds = ClipDataset(entries, transform=ClipTransform.from_config(cfg), device="cpu", **common)
    return ClipLoader(ds, batch_size=batch, seed=seed, device=device, num_workers=workers)


def measure_loader(loader, *, budget_s: float, device: str, monitor: NvdecMonitor | None = None,
                   warmup: int = 2) -> dict:
    """Clips/s delivered by ``loader`` (batches on ``device``) after ``warmup`` batches, for ``budget_s``."""
    loader.set_epoch(0)
    it = iter(loader)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            next(it)
        sync()
        clips, t0 = 0, time.perf_counter()
        with monitor if monitor is not None else contextlib.nullcontext():
            while time.perf_counter() - t0 < budget_s:
                clips += next(it)["video"].shape[0]
            sync()
        dt = time.perf_counter() - t0
    finally:
        del it
    out = {"clips_per_s": round(clips / dt, 1), "clips": clips}
    if monitor is not None and monitor.available:
        out.update(monitor.summary())
    pipe = getattr(loader, "pipeline", None)
    if pipe is not None:
        c = pipe.stats.cache
        out["decoder_cache"] = {"opens": c.opens, "reconfigures": c.reconfigures, "hits": c.hits}
        loader.close()
    return out


def gpu_grid(workdir: Path, *, device: str, budget_s: float, seed: int, sessions: int, batch: int, files: int,
             smoke: bool, log: Callable[[str], None], on_row: Callable[[dict], None] = lambda out: None) -> dict:
    """Clips/s of every NVDEC backend through the pipeline (``sessions`` decode sessions, and 1 session on the first
    case) and of the CPU DataLoader with one worker per core, on the same clip list, for every video x clip case;
    NVDEC utilisation during each GPU measurement. ``device="cpu"`` (``smoke``) runs the same code on the CPU twin."""
    from vidssl.io.video import BackendUnavailableError, check_backend

    out: dict = {"device": device, "cpus": os.cpu_count(), "sessions": sessions, "batch": batch, "files": files}
    mon = NvdecMonitor() if device == "cuda" else None
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
        out["clocks"] = mon.clocks()
        log(f"GPU {out['gpu']}: video clock {out['clocks']}; NVML: {'yes' if mon.available else mon.error}")
    backends = []
    for b in (("pyav", "torchcodec", "pynvvideocodec") if device == "cuda" else ("pyav",)):
        try:
            check_backend(b, device)
            backends.append(b)
        except (BackendUnavailableError, ValueError) as e:
            out[f"{b}_skipped"] = str(e)
            log(f"  skipping {b}: {e}")
    out["backends"] = backends
    workers = 2 if smoke else (os.cpu_count() or 1)
    rows = []
    videos, clips = (SMOKE_VIDEOS, SMOKE_CLIPS) if smoke else (GPU_VIDEOS, GPU_CLIPS)
    for vi, (vname, h, w, gop, frames) in enumerate(videos):
        _, entries = clip_set(workdir, vname, h, w, gop, frames, files=files)
        for ci, (clip_len, stride) in enumerate(clips):
            modes = [(f"{b}-x{sessions}", "pipeline", b, sessions) for b in backends]
            if vi == 0 and ci == 0 and sessions > 1:
                modes += [(f"{b}-x1", "pipeline", b, 1) for b in backends]
            modes.append((f"cpu-loader-{workers}w", "cpu", "pyav", 0))
            row = {"video": vname, "clip": f"{clip_len}x{stride}", "modes": {}}
            for name, mode, b, k in modes:
                try:
                    loader = _loader(entries, clip_len=clip_len, stride=stride, batch=batch, seed=seed, mode=mode,
                                     backend=b, device=device, sessions=k, workers=workers)
                    res = measure_loader(loader, budget_s=budget_s, device=device,
                                         monitor=mon if mode == "pipeline" else None)
                except Exception as e:  # noqa: BLE001 - a backend failing is a result too
                    res = {"error": f"{type(e).__name__}: {e}"}
                    traceback.print_exc()
                row["modes"][name] = res
                log(f"  {vname} {clip_len}x{stride} {name}: " + (f"{res['clips_per_s']:.1f} clips/s" if "clips_per_s"
                    in res else res["error"]) + (f", NVDEC {res['nvdec_util_mean']}% mean / {res['nvdec_util_max']}% "
                                                 "max" if res.get("nvdec_util_mean") is not None else ""))
            cpu = row["modes"][f"cpu-loader-{workers}w"].get("clips_per_s")
            gpu = {n: r["clips_per_s"] for n, r in row["modes"].items() if "clips_per_s" in r and n.startswith(
                tuple(backends)) and n.endswith(f"x{sessions}")}
            if gpu and cpu:
                best = max(gpu, key=gpu.get)
                row["best_gpu"], row["gpu_over_cpu"] = best, round(gpu[best] / cpu, 2)
            rows.append(row)
            out["rows"] = rows
            on_row(out)  # partial results survive a time limit
    out["rows"] = rows
    return out


def crw_data_share(workdir: Path, folder: Path, *, device: str, steps: int, sessions: int, backends: Sequence[str],
                   log: Callable[[str], None], smoke: bool = False,
                   on_mode: Callable[[dict], None] = lambda out: None) -> dict:
    """Data time vs step time of ``vidssl pretrain`` on the CRW recipe (configs/crw_kinetics.yaml, batch 20) over
    the clip set in ``folder``: the GPU path with each backend, and the CPU path with one worker per core."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    workers = 2 if smoke else (os.cpu_count() or 1)
    plans = [(f"gpu-{b}-x{sessions}", ["data.device=cuda", f"data.decoder={b}", f"data.gpu_decode_threads={sessions}"])
             for b in backends] if device == "cuda" else []
    plans.append((f"cpu-loader-{workers}w", ["data.device=cpu", "data.decoder=pyav", f"data.num_workers={workers}"]))
    out = {}
    for name, sets in plans:
        run = workdir / "runs" / f"crw_{name}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        sets = sets + [f"data.root={folder}", "data.manifest=", f"train.steps={steps}", "train.log_every=5",
                       f"train.ckpt_every={steps}", "eval.enabled=false", f"train.device={device}"]
        if smoke:
            sets += ["train.batch_size=2", "data.crop_size=64", "objectives.0.patch_size=32",
                     "objectives.0.patch_stride=16", "train.threads=1"]
        cmd = [sys.executable, "-m", "vidssl", "pretrain", "--config", str(repo / "configs" / "crw_kinetics.yaml"),
               "--out", str(run)] + [a for s in sets for a in ("--set", s)]
        env = {**os.environ, "VIDSSL_CACHE": str(workdir / "cache"), "PYTHONPATH": str(repo) + os.pathsep +
               os.environ.get("PYTHONPATH", "")}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            out[name] = {"error": (proc.stderr or proc.stdout)[-800:]}
            log(f"  CRW {name}: failed: {out[name]['error'][-300:]}")
            continue
        recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
        recs = [r for r in recs if "data_time" in r]
        steady = recs[1:] or recs  # the first window holds start-up (workers, cuDNN autotune, decoder creation)
        data = float(np.mean([r["data_time"] for r in steady]))
        step = float(np.mean([r["step_time"] for r in steady]))
        out[name] = {"data_s": round(data, 4), "step_s": round(step, 4), "data_share": round(data / (data + step), 3),
                     "clips_per_s": round(float(np.mean([r["clips_per_s"] for r in steady])), 1),
                     "wall_s": round(time.perf_counter() - t0, 1)}
        log(f"  CRW {name}: data {data * 1000:.1f} ms vs step {step * 1000:.1f} ms -> data share "
            f"{out[name]['data_share']:.1%}, {out[name]['clips_per_s']} clips/s")
        on_mode(out)
    return out


def markdown(results: dict) -> str:
    """The GPU grid and the CRW data shares as Markdown tables."""
    grid = results.get("grid", {})
    rows = grid.get("rows", [])
    names: list[str] = []
    for r in rows:
        names += [n for n in r["modes"] if n not in names]
    lines = [f"GPU: {grid.get('gpu', '-')}, {grid.get('cpus')} CPUs, clocks {grid.get('clocks', '-')}; batch "
             f"{grid.get('batch')}, {grid.get('files')} files; clips/s (NVDEC utilisation mean %)", "",
             "| video | clip | " + " | ".join(names) + " | best GPU / CPU |", "|---|---|" + "---|" * (len(names) + 1)]
    for r in rows:
        cells = []
        for n in names:
            m = r["modes"].get(n, {})
            if "clips_per_s" in m:
                util = f" ({m['nvdec_util_mean']}%)" if m.get("nvdec_util_mean") is not None else ""
                cells.append(f"{m['clips_per_s']}{util}")
            else:
                cells.append("error" if "error" in m else "-")
        lines.append(f"| {r['video']} | {r['clip']} | " + " | ".join(cells) + f" | {r.get('gpu_over_cpu', '-')} |")
    crw = results.get("crw", {})
    if crw:
        lines += ["", "| CRW recipe, batch 20 | data ms | step ms | data share | clips/s |", "|---|---|---|---|---|"]
        for n, m in crw.items():
            lines.append(f"| {n} | " + (f"{1000 * m['data_s']:.1f} | {1000 * m['step_s']:.1f} | "
                                        f"{m['data_share']:.1%} | {m['clips_per_s']} |" if "data_s" in m
                                        else "error | | | |"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict], log: Callable[[str], None]) -> dict:
    ratios = [r["vidssl_vs_best_raw"] for r in rows if r["vidssl_vs_best_raw"] == r["vidssl_vs_best_raw"]]
    ok = sum(x >= 0.95 for x in ratios)
    auto = resolve_backend("auto")
    summary = {"auto_backend": auto, "ratio_min": min(ratios, default=float("nan")),
               "ratio_ok": f"{ok}/{len(ratios)}"}
    log(f"vidssl dataset vs best raw backend: >= 0.95x on {ok}/{len(ratios)} patterns "
        f"(min {summary['ratio_min']:.2f}x)")
    # the fastest backend per pattern: vidssl readers when measured (full mode), else raw calls as proxies
    wins: dict[str, int] = {}
    for r in rows:
        c = r["clips_per_s"]
        cand = {k.removeprefix("vidssl-"): v for k, v in c.items() if k.startswith("vidssl-") and v == v}
        if not cand:
            cand = {"pyav": c.get("vidssl", float("nan")),
                    "torchcodec": max(c.get("raw-tc", float("nan")), c.get("raw-tc-approx", float("nan"))),
                    "decord": c.get("raw-decord", float("nan"))}
        cand = {k: v for k, v in cand.items() if v == v}
        if cand:
            top = max(cand, key=cand.get)
            wins[top] = wins.get(top, 0) + 1
    summary["fastest_counts"] = wins
    log(f"default backend 'auto' = {auto}; fastest backend per pattern: {wins}")
    tgt = [r for r in rows if r["video"] == "480p-g30" and (r["clip_len"], r["stride"], r["workers"]) == (8, 1, 1)]
    if tgt:
        v = tgt[0]["clips_per_s"]["vidssl"]
        summary["480p_g30_8x1_1worker"] = v
        log(f"random 8-frame clips, 480p GOP 30, 1 worker: {v:.1f} clips/s (target >= 25)")
    return summary


def summarize_cpu(rows: list[dict], log: Callable[[str], None]) -> dict:
    ratios = [r["vidssl_vs_best_raw"] for r in rows if r["vidssl_vs_best_raw"] == r["vidssl_vs_best_raw"]]
    ok = sum(x >= 0.95 for x in ratios)
    wins: dict[str, int] = {}
    for r in rows:
        c = {k.removeprefix("vidssl-"): v for k, v in r["cpu_ms_per_clip"].items()
             if k.startswith("vidssl-") and v == v}
        if c:
            top = min(c, key=c.get)
            wins[top] = wins.get(top, 0) + 1
    out = {"ratio_ok": f"{ok}/{len(ratios)}", "ratio_min": min(ratios, default=float("nan")), "fastest_counts": wins}
    log(f"CPU time: vidssl dataset >= 0.95x the best raw backend on {ok}/{len(ratios)} patterns "
        f"(min {out['ratio_min']:.2f}x); fastest vidssl reader per pattern: {wins}")
    tgt = [r for r in rows if r["video"] == "480p-g30" and (r["clip_len"], r["stride"]) == (8, 1)]
    if tgt:
        ms = tgt[0]["cpu_ms_per_clip"]["vidssl"]
        out["480p_g30_8x1_clips_per_cpu_s"] = 1000 / ms
        log(f"random 8-frame clips, 480p GOP 30: {ms:.0f} CPU ms per clip = {1000 / ms:.1f} clips/s per worker on an "
            f"idle core (target >= 25)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a subset of the grid (~2 minutes on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: NVDEC and GPU-path measurements")
    p.add_argument("--workdir", default=os.environ.get("VIDSSL_BENCH_DIR", str(Path.home() / ".cache" / "vidssl"
                                                                                / "bench_decode")),
                   help="where test videos are written and cached")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement (quick 0.8, full 1.5)")
    p.add_argument("--reps", type=int, default=2, help="round-robin repetitions; the best is reported")
    p.add_argument("--train-steps", type=int, default=None, help="training steps for the data-time share")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sessions", type=int, default=8, help="GPU grid: decode sessions of the pipeline")
    p.add_argument("--batch", type=int, default=20, help="GPU grid: clips per batch (CRW's 20)")
    p.add_argument("--files", type=int, default=32, help="GPU grid: files per clip set (links to one video)")
    p.add_argument("--crw-steps", type=int, default=30, help="GPU grid: CRW training steps per mode (0: skip)")
    p.add_argument("--grid-smoke", action="store_true", help="run the GPU grid's code on the CPU on tiny videos")
    p.add_argument("--markdown", default=None, help="GPU grid: also write the Markdown table here")
    a = p.parse_args(argv)
    if a.grid_smoke:
        a.sessions, a.batch, a.files = min(a.sessions, 2), min(a.batch, 4), min(a.files, 3)
        a.crw_steps = min(a.crw_steps, 4)
    budget = a.budget or (0.5 if a.grid_smoke else 2.5 if a.device == "cuda" else 0.8 if a.quick else 1.5)
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    log(f"vidssl decode benchmark ({'quick' if a.quick else 'full'}): {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; backends available: {available_backends()}; "
        f"auto = {resolve_backend('auto')}")
    results: dict = {"mode": "quick" if a.quick else "full", "cpus": os.cpu_count(), "torch": torch.__version__,
                     "backends": available_backends(), "budget_s": budget, "reps": a.reps}
    if a.device == "cuda" or a.grid_smoke:
        device = a.device
        if device == "cuda" and not torch.cuda.is_available():
            log("--device cuda: no CUDA GPU visible; nothing to measure")
            return 1
        if a.grid_smoke and device != "cpu":
            log("--grid-smoke runs the GPU grid's code on the CPU twin: use it with --device cpu")
            return 2
        smoke = a.grid_smoke
        log(f"GPU grid on {device}{' (smoke: tiny videos, CPU twin)' if smoke else ''}: {a.sessions} decode "
            f"sessions, batch {a.batch}, {a.files} files per clip set, {budget:.1f}s per measurement")
        def save(partial: dict | None = None) -> None:
            if partial is not None:
                results["grid"] = partial
            if a.json:
                atomic_write_text(a.json, json.dumps(results, indent=1, default=str))
            if a.markdown:
                atomic_write_text(a.markdown, markdown(results) + "\n")

        results["grid"] = gpu_grid(workdir, device=device, budget_s=budget, seed=a.seed, sessions=a.sessions,
                                   batch=a.batch, files=a.files, smoke=smoke, log=log, on_row=save)
        if a.crw_steps:
            name, h, w, gop, frames = (SMOKE_VIDEOS if smoke else GPU_VIDEOS)[0]
            folder, _ = clip_set(workdir, name, h, w, gop, frames, files=a.files)
            log(f"CRW recipe (configs/crw_kinetics.yaml, batch 20) data time vs step time on {name}:")
            results["crw"] = crw_data_share(workdir, folder, device=device, steps=a.crw_steps, sessions=a.sessions,
                                            backends=[b for b in results["grid"]["backends"] if b != "pyav"] or
                                            results["grid"]["backends"], log=log, smoke=smoke,
                                            on_mode=lambda crw: (results.__setitem__("crw", crw), save()))
        results["elapsed_s"] = time.perf_counter() - t_start
        save()
        log(markdown(results))
        log(f"done in {results['elapsed_s']:.0f}s")
        return 0
    log("writing/caching test videos ...")
    specs = {"480p-g30": (480, 854, 30), "480p-g250": (480, 854, 250), "720p-g30": (720, 1280, 30),
             "720p-g250": (720, 1280, 250)}
    videos = {name: make_video(workdir / f"bench_{h}p_g{g}.mp4", height=h, width=w, gop=g)
              for name, (h, w, g) in specs.items()}
    log(f"videos ready in {time.perf_counter() - t_start:.0f}s; measuring clips/s (best of {a.reps} reps x "
        f"{budget:.1f}s, one decoder per clip, 1 decoder thread; W = DataLoader workers)")
    cols = raw_columns()
    if not a.quick:
        cols += [f"vidssl-{b}" for b in available_backends()]
    log(format_header(cols))
    rows = wall_grid(videos, quick=a.quick, budget_s=budget, reps=a.reps, seed=a.seed, log=log)
    results["rows"] = rows
    results["summary"] = summarize(rows, log)
    log("CPU time per clip, in-process, 1 decoder thread (less sensitive to other jobs on the machine; "
        "1000 / ms = clips/s of one worker on an idle core):")
    cpu_rows = cpu_time_grid(videos, quick=a.quick, cpu_budget_s=0.5 if a.quick else 1.5, reps=a.reps, seed=a.seed,
                             log=log)
    results["cpu_rows"] = cpu_rows
    results["cpu_summary"] = summarize_cpu(cpu_rows, log)
    path = videos["480p-g30"]
    with open_video(path) as r:
        n = r.num_frames
    key_rates: dict = {}
    for rep in range(a.reps):
        for name, aligned in [("vidssl", False), ("vidssl-keyframe-aligned", True)]:
            ds = vidssl_dataset(path, n, clip_len=8, stride=1, length=100_000, seed=a.seed + rep,
                                keyframe_aligned=aligned)
            key_rates[name] = _nanmax(key_rates.get(name, float("nan")), measure(ds, workers=1, budget_s=budget))
            k, t0 = 0, time.process_time()
            while time.process_time() - t0 < budget or k < 3:
                ds[k]
                k += 1
            cpu_ms = 1000 * (time.process_time() - t0) / k
            key_rates[f"{name}-cpu-ms"] = min(key_rates.get(f"{name}-cpu-ms", cpu_ms), cpu_ms)
    results["keyframe_aligned_480p_g30_8x1"] = key_rates
    log(f"data.keyframe_aligned (option, off by default: clips start only on keyframes), 480p GOP 30 8x1, 1 worker: "
        f"{key_rates['vidssl-keyframe-aligned']:.1f} clips/s wall, "
        f"{key_rates['vidssl-keyframe-aligned-cpu-ms']:.1f} CPU ms/clip "
        f"(= {1000 / key_rates['vidssl-keyframe-aligned-cpu-ms']:.1f} clips/s on an idle core) vs "
        f"{key_rates['vidssl']:.1f} clips/s, {key_rates['vidssl-cpu-ms']:.1f} CPU ms "
        f"(= {1000 / key_rates['vidssl-cpu-ms']:.1f}) with uniform starts; target 25 clips/s per worker")
    steps = a.train_steps or (2 if a.quick else 6)
    crop, batch = (64, 1) if a.quick else (128, 2)
    log(f"CPU training step (ResNet-18 stride 8, {crop}px crops, batch {batch} x 8 frames, forward+backward+SGD; "
        f"480p GOP 30) fed by the vidssl DataLoader:")
    shares = []
    for w in ([1, 2] if (os.cpu_count() or 1) <= 4 else [1, 2, 4]):
        try:
            s = train_share(videos["480p-g30"], workers=w, steps=steps, seed=a.seed, crop=crop, batch=batch)
        except Exception as e:  # noqa: BLE001
            log(f"  workers={w}: failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            continue
        shares.append(s)
        log(f"  workers={w}: data-time share {s['data_share']:.0%} ({s['data_s']:.2f}s waiting for data, "
            f"{s['compute_s']:.2f}s computing, {s['clips_per_s']:.1f} clips/s over {steps} steps)")
    results["train_share"] = shares
    results["elapsed_s"] = time.perf_counter() - t_start
    log(f"done in {results['elapsed_s']:.0f}s")
    if a.json:
        atomic_write_text(a.json, json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
