"""Map-style clip datasets over frame folders and encoded videos (one index, shared samplers, bounded retries).

:class:`ClipDataset` has ``len(entries) * clips_per_video`` items; item ``i`` is clip ``i % clips_per_video`` of
video ``i // clips_per_video``. Every item draws its randomness from its own generator seeded from
``(seed, epoch, i)``, so a batch does not depend on the number of DataLoader workers or on which worker reads it.
Frame indices come first (:mod:`vidssl.data.samplers`), then only those frames are decoded
(:func:`vidssl.io.readers.open_reader`, one reader per item, never shared between workers).

A video that fails to open or decode is retried ``max_retries`` times (same indices each time), then skipped: the
item is read from the next video in the index instead (deterministically), a warning names the file and the reason,
and the item reports ``"skipped": n`` so the training log can count skips across worker processes. Videos that
failed once are remembered by the dataset copy and skipped at once afterwards (still counted).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.data import Dataset

from vidssl.data import samplers
from vidssl.data.manifest import VideoEntry
from vidssl.data.transforms import ClipTransform
from vidssl.io.base import DecodeError

_log = logging.getLogger(__name__)

#: Sampler names understood by :class:`ClipDataset`.
SAMPLERS: tuple[str, ...] = ("random", "uniform", "consecutive", "pair", "shots")


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of ``epoch`` (a hash, so nearby triples give unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`item_seed`."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


@dataclass
class LoadedClip:
    """Decoded frames of one item before augmentation.

    Attributes:
        frames: ``uint8 (T, 3, H, W)`` on the reader's device.
        indices: the frame indices decoded (``T`` of them).
        generator: the item's generator, positioned after drawing ``indices`` (draw augmentation from it).
        video: index of the video read (differs from ``item // clips_per_video`` after a skip).
        skipped: videos skipped to produce this item.
    """

    frames: torch.Tensor
    indices: list[int]
    generator: torch.Generator
    video: int
    skipped: int


class ClipDataset(Dataset):
    """Clips of ``clip_len`` frames, ``stride`` apart, from a list of :class:`VideoEntry`.

    Args:
        entries: the videos (from :func:`vidssl.data.manifest.load_manifest` or built by hand).
        clip_len: frames per clip ``T`` (``"shots"``: frames per shot; ``"pair"``: must be 2).
        stride: frame step inside a clip (shrunk for short videos, see :mod:`vidssl.data.samplers`);
            ``"pair"``: the largest gap between the two frames.
        sampler: ``"random"`` (uniform random start), ``"uniform"`` (``clips_per_video`` evenly spread clips,
            deterministic), ``"consecutive"`` (non-overlapping clips from frame 0; item ``j`` takes clip ``j`` modulo
            their number), ``"pair"`` (two frames 1..``stride`` apart) or ``"shots"`` (``num_shots`` consecutive
            shots of the entry's ``shots``, ``clip_len`` sorted frames each; a video without shots is one shot).
        clips_per_video: items per video and epoch.
        transform: a :class:`ClipTransform`, or ``None`` to return the decoded ``uint8 (T, 3, H, W)`` frames.
        seed: base seed of the per-item generators.
        backend: video decoder for encoded files (``"auto"``, ``"torchcodec"``, ``"pyav"``, ``"decord"``).
        decode_threads: decoder threads per reader.
        max_retries: decode attempts per video before it is skipped.
        return_uint8: with a transform, stop after the geometric part (crop, resize, flip) and return ``uint8 (T, 3,
            S, S)``; jitter and normalisation are then the caller's (e.g. on the GPU).
        device: where readers decode (``"cuda"``: nvjpeg / NVDEC; only in the main process).
        num_shots: shots per item for ``sampler="shots"``.
        keyframe_aligned: ``sampler="random"`` only: start every clip on a keyframe of the video
            (:func:`~vidssl.data.samplers.keyframe_clip`), so no frame before the clip is decoded. Changes the
            sampling distribution (starts only on keyframes); off by default. Frame folders are unaffected.
        reader_cache: keep up to this many idle readers open (least recently used closed first) instead of
            opening one per item: for the GPU path in the main process, where opening an NVDEC decoder costs more
            than a clip. Thread-safe (a reader is used by one thread at a time). ``0`` (default) opens one per item,
            which is what DataLoader workers do (the pool is dropped in a forked or unpickled copy, never shared).
        shot_fps: ``"shots"``: frames per second read inside a shot; a video with a known fps reads every
            ``round(fps / shot_fps)``-th frame of a shot. ``0`` (default), or a frame folder: every ``stride``-th.
        min_shot_len: ``"shots"``: shots with fewer source frames are left out.
        shot_policy: ``"shots"``, a shot with fewer than ``clip_len`` frames at the frame step, or a video with fewer
            than ``num_shots`` such shots: ``"repeat"`` (default; repeat frames of a short shot, repeat the last
            shot), ``"skip"`` (short shots are dropped, then videos with too few shots; both counted in
            ``shot_skipped`` and logged once; an error if no video is left) or ``"error"`` (a ``ValueError`` naming
            the video's path and the shot).

    Items: ``{"video": (T', 3, S, S) float32 (or uint8), "index": int, "frames": int64 (T',), "skipped": int,
    "video_index": int}`` with ``T' = clip_len`` (``num_shots * clip_len`` for ``"shots"``). ``"shots"`` items
    also carry ``"shot_ids"`` int64 ``(T',)``: the shot of every frame, numbered ``0..`` in time order within the
    item (equal ids = the same shot), and ``"shots"`` int64 ``(num_shots, 2)``: the ``[start, end)`` of each.
    """

    def __init__(self, entries: Sequence[VideoEntry], *, clip_len: int, stride: int = 1, sampler: str = "random",
                 clips_per_video: int = 1, transform: ClipTransform | None = None, seed: int = 0,
                 backend: str = "auto", decode_threads: int = 1, max_retries: int = 3, return_uint8: bool = False,
                 device: str | torch.device = "cpu", num_shots: int = 1, reader_cache: int = 0,
                 keyframe_aligned: bool = False, shot_fps: float = 0.0, min_shot_len: int = 1,
                 shot_policy: str = "repeat") -> None:
        if not entries:
            raise ValueError("entries: no videos to read (empty index)")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if clip_len < 1 or stride < 1 or clips_per_video < 1 or num_shots < 1:
            raise ValueError(f"clip_len, stride, clips_per_video, num_shots must be >= 1, got "
                             f"{clip_len}, {stride}, {clips_per_video}, {num_shots}")
        if sampler == "pair" and clip_len != 2:
            raise ValueError(f"clip_len: sampler 'pair' returns 2 frames, got clip_len={clip_len}")
        if max_retries < 1:
            raise ValueError(f"max_retries: must be >= 1, got {max_retries}")
        if keyframe_aligned and sampler != "random":
            raise ValueError(f"keyframe_aligned: applies to sampler 'random' only, got sampler={sampler!r}")
        if reader_cache < 0:
            raise ValueError(f"reader_cache: must be >= 0, got {reader_cache}")
        if shot_policy not in ("repeat", "skip", "error"):
            raise ValueError(f"shot_policy: expected 'repeat', 'skip' or 'error', got {shot_policy!r}")
        if shot_fps < 0 or min_shot_len < 1:
            raise ValueError(f"shot_fps must be >= 0 and min_shot_len >= 1, got {shot_fps}, {min_shot_len}")
        self.shot_fps, self.min_shot_len, self.shot_policy = float(shot_fps), int(min_shot_len), shot_policy
        #: ``"shots"`` with ``shot_policy="skip"``: shots and videos left out at construction
        self.shot_skipped = {"shots": 0, "videos": 0}
        self.entries = list(entries)
        self.clip_len = clip_len
        self.stride = stride
        self.sampler = sampler
        self.clips_per_video = clips_per_video
        self.transform = transform
        self.seed = seed
        self.backend = backend
        self.decode_threads = decode_threads
        self.max_retries = max_retries
        self.return_uint8 = return_uint8
        self.device = torch.device(device)
        self.num_shots = num_shots
        self.reader_cache = reader_cache
        self.keyframe_aligned = keyframe_aligned
        if sampler == "shots":
            self.entries = self._usable_shots(self.entries)
        self._readers: OrderedDict[tuple[int, int], object] = OrderedDict()  # (video, serial) -> idle reader, LRU
        self._readers_pid = os.getpid()
        self._serial = 0
        self._lock = threading.Lock()  # pool and skip bookkeeping (the GPU path loads clips from threads)
        self.epoch = 0
        self.skipped = 0  #: videos skipped by this copy of the dataset (per process)
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries) * self.clips_per_video

    def shot_step(self, entry: VideoEntry) -> int:
        """Frame step inside a shot of ``entry``: ``round(fps / shot_fps)`` when both are known, else ``stride``."""
        if self.shot_fps > 0 and entry.fps:
            return max(1, round(entry.fps / self.shot_fps))
        return self.stride

    def _usable_shots(self, entries: list[VideoEntry]) -> list[VideoEntry]:
        """Check every entry's shots; drop too-short shots (``min_shot_len``; with ``"skip"``/``"error"`` also
        shots with fewer than ``clip_len`` frames at the step) and, unless ``"repeat"``, videos with too few."""
        kept = []
        for e in entries:
            shots = list(e.shots) if e.shots else [(0, e.num_frames)]
            for a, b in shots:
                if not 0 <= a < b <= e.num_frames:
                    raise ValueError(f"{e.path}: shot [{a}, {b}) is empty or outside the video's {e.num_frames} "
                                     "frames (manifest field 'shots')")
            step = self.shot_step(e)
            long_enough = [(a, b) for a, b in shots if b - a >= self.min_shot_len and
                           (self.shot_policy == "repeat" or math.ceil((b - a) / step) >= self.clip_len)]
            short = len(shots) - len(long_enough)
            if self.shot_policy == "error" and short:
                a, b = next(sh for sh in shots if sh not in long_enough)
                raise ValueError(f"{e.path}: shot [{a}, {b}) has {b - a} frames, fewer than min_shot_len="
                                 f"{self.min_shot_len} or data.clip_len={self.clip_len} at frame step {step} "
                                 "(data.shot_policy=error; 'skip' leaves such shots out)")
            if self.shot_policy == "repeat":
                kept.append(e if long_enough == shots else
                            VideoEntry(**{**e.__dict__, "shots": long_enough or [(0, e.num_frames)]}))
                continue
            self.shot_skipped["shots"] += short
            if len(long_enough) < self.num_shots:
                if self.shot_policy == "error":
                    raise ValueError(f"{e.path}: {len(long_enough)} shot(s), data.num_shots={self.num_shots} "
                                     "needed (data.shot_policy=error; 'skip' leaves such videos out)")
                self.shot_skipped["videos"] += 1
                continue
            kept.append(VideoEntry(**{**e.__dict__, "shots": long_enough}))
        if self.shot_skipped["shots"] or self.shot_skipped["videos"]:
            _log.warning("shots: left out %d shot(s) shorter than %d frames (min_shot_len %d, frame step) and %d "
                         "video(s) with fewer than %d such shots", self.shot_skipped["shots"], self.clip_len,
                         self.min_shot_len, self.shot_skipped["videos"], self.num_shots)
        if not kept:
            raise ValueError(f"shots: no video has {self.num_shots} shot(s) of >= {self.clip_len} frames "
                             f"({self.shot_skipped['videos']} left out; first: {entries[0].path if entries else '-'})")
        return kept

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = OrderedDict()  # decoders never travel to another process
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _open(self, v: int):
        """A reader of video ``v``: an idle one from the pool when enabled (this process's own), else a new one.

        The pool holds idle readers only, so threads never share one (several may hold readers of one video).
        """
        from vidssl.io.readers import open_reader

        if self.reader_cache:
            with self._lock:
                if self._readers_pid != os.getpid():  # a forked copy: the parent's decoders are not ours
                    self._readers = OrderedDict()
                    self._readers_pid = os.getpid()
                for key in reversed(self._readers):
                    if key[0] == v:
                        return self._readers.pop(key)
        return open_reader(self.entries[v].path, backend=self.backend, device=self.device,
                           threads=self.decode_threads)

    def _release(self, v: int, reader, *, failed: bool) -> None:
        """Return a reader after use: back to the pool (least recently used closed beyond the limit) or closed."""
        if not self.reader_cache or failed:
            reader.close()
            return
        evicted = []
        with self._lock:
            if self._readers_pid != os.getpid():
                reader.close()
                return
            self._serial += 1
            self._readers[(v, self._serial)] = reader
            while len(self._readers) > self.reader_cache:
                evicted.append(self._readers.popitem(last=False)[1])
        for r in evicted:
            r.close()

    def close(self) -> None:
        """Close the pooled readers (no-op without a pool)."""
        with self._lock:
            readers, self._readers = list(self._readers.values()), OrderedDict()
        for r in readers:
            r.close()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose randomness items use (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def frame_indices(self, num_frames: int, clip: int, generator: torch.Generator,
                      keyframes: Sequence[int] | None = None) -> list[int]:
        """Frame indices of clip number ``clip`` (``0 <= clip < clips_per_video``) of a ``num_frames`` video
        (``keyframes``: the video's keyframe indices, used by ``keyframe_aligned``)."""
        if self.sampler == "random":
            if self.keyframe_aligned:
                return samplers.keyframe_clip(num_frames, self.clip_len, self.stride, keyframes, generator)
            return samplers.random_clip(num_frames, self.clip_len, self.stride, generator)
        if self.sampler == "uniform":
            return samplers.uniform_clips(num_frames, self.clip_len, self.stride, self.clips_per_video)[clip]
        if self.sampler == "consecutive":
            clips = samplers.consecutive_clips(num_frames, self.clip_len, self.stride)
            return clips[clip % len(clips)]
        if self.sampler == "pair":
            return samplers.random_pair(num_frames, self.stride, generator)
        raise AssertionError(self.sampler)  # "shots" goes through _shot_indices

    def _shot_indices(self, entry: VideoEntry, num_frames: int, generator: torch.Generator) -> list[int]:
        shots = [(a, min(b, num_frames)) for a, b in (entry.shots or [(0, num_frames)]) if a < num_frames]
        shots = shots or [(0, num_frames)]
        step = self.shot_step(entry)
        sizes = [math.ceil((b - a) / step) for a, b in shots]  # frames of each shot at the step
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        grid = [(o, o + n) for o, n in zip(offsets, sizes)]  # the shots on the stepped frame grid
        groups = samplers.shot_frames(grid, self.clip_len, self.num_shots, generator)
        groups += [groups[-1]] * (self.num_shots - len(groups))  # fewer shots than asked: repeat the last
        out = []
        for group in groups:
            k = next(k for k, (g0, g1) in enumerate(grid) if g0 <= group[0] < g1)
            out += [shots[k][0] + (j - grid[k][0]) * step for j in group]
        return out

    def item_indices(self, v: int, num_frames: int, clip: int, generator: torch.Generator,
                     keyframes: Sequence[int] | None = None) -> list[int]:
        """Frame indices an item reads from video ``v`` (``num_frames`` long): the shots sampler or
        :meth:`frame_indices` (what :meth:`load_clip` decodes; the GPU pipeline batches them per file)."""
        if self.sampler == "shots":
            return self._shot_indices(self.entries[v], num_frames, generator)
        return self.frame_indices(num_frames, clip, generator, keyframes)

    def known_bad(self, v: int) -> bool:
        """Whether video ``v`` already failed ``max_retries`` times in this process (it is skipped from now on)."""
        return v in self._bad

    @staticmethod
    def shot_ids(entry: VideoEntry, indices: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """The shot of every frame index, numbered ``0..`` in time order among those read, and their ranges."""
        shots = entry.shots or [(0, entry.num_frames)]
        which = [next((k for k, (a, b) in enumerate(shots) if a <= i < b), len(shots) - 1) for i in indices]
        order = sorted(set(which))
        return [order.index(k) for k in which], [tuple(shots[k]) for k in order]

    def load_clip(self, index: int) -> LoadedClip:
        """Decode the frames of item ``index`` (retrying, then skipping unreadable videos)."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range ({len(self)} items)")
        first, clip = divmod(index, self.clips_per_video)
        skipped = 0
        for hop in range(len(self.entries)):
            v = (first + hop) % len(self.entries)
            if v in self._bad:
                skipped += 1
                with self._lock:
                    self.skipped += 1
                continue
            entry = self.entries[v]
            error: BaseException | None = None
            for _ in range(self.max_retries):
                g = item_generator(self.seed, self.epoch, index)
                try:
                    reader = self._open(v)
                except (DecodeError, OSError) as exc:
                    error = exc
                    continue
                failed = True
                try:
                    ids = self.item_indices(v, reader.num_frames, clip, g, getattr(reader, "keyframe_indices", None))
                    frames = reader.get_frames(ids)
                    failed = False
                except (DecodeError, OSError) as exc:
                    error = exc
                    continue
                finally:
                    self._release(v, reader, failed=failed)
                return LoadedClip(frames=frames, indices=ids, generator=g, video=v, skipped=skipped)
            skipped += 1
            with self._lock:
                self._bad.add(v)
                self.skipped += 1
            _log.warning("skipping video %s after %d failed attempt(s): %s", entry.path, self.max_retries, error)
        raise RuntimeError(f"no readable video among the {len(self.entries)} indexed (first: {self.entries[0].path})")

    def __getitem__(self, index: int) -> dict:
        clip = self.load_clip(index)
        video = clip.frames  # (T, 3, H, W) uint8
        if self.transform is not None:
            t, _, h, w = video.shape
            params = self.transform.sample_params(t, h, w, generator=clip.generator)
            video = (self.transform.geometric(video, params) if self.return_uint8
                     else self.transform.apply(video, params))
        item = {"video": video, "index": index, "frames": torch.tensor(clip.indices, dtype=torch.int64),
                "skipped": clip.skipped, "video_index": clip.video}
        if self.sampler == "shots":
            item.update(self.shot_fields(clip.video, clip.indices))
        return item

    def shot_fields(self, video: int, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A ``"shots"`` item's ``shot_ids`` int64 ``(K*L,)`` and ``shots`` int64 ``(K, 2)`` (the CPU items and the
        GPU pipeline's batches carry the same fields)."""
        ids, ranges = self.shot_ids(self.entries[video], indices)
        ranges += [ranges[-1]] * (self.num_shots - len(ranges))  # repeat policy: the last shot repeated
        return {"shot_ids": torch.tensor(ids, dtype=torch.int64), "shots": torch.tensor(ranges, dtype=torch.int64)}
