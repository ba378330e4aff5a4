"""From a ``data:`` config to batches: entries (synthetic / frame folders / videos, through a manifest), the clip
dataset, sampling per rank, and the CPU (DataLoader workers) or GPU (main-process decode + batched augment) path.

Batches are dicts: ``"video"`` ``float32 (B, T, 3, S, S)`` on the requested device, ``"index"`` ``(B,)``,
``"frames"`` ``int64 (B, T)``, ``"skipped"`` ``(B,)`` (videos skipped to fill each item), ``"video_index"`` ``(B,)``.
Epoch ``e`` is the same batches, in the same order, whatever ``num_workers`` is: the order comes from a
``DistributedSampler`` seeded with ``seed`` (one replica when not distributed) and each item's randomness from its
own generator seeded from ``(seed, e, item)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from vidssl.config import ConfigError, to_dict
from vidssl.data.config import DataConfig
from vidssl.data.datasets import ClipDataset
from vidssl.data.images import ImageFolderDataset
from vidssl.data.manifest import (
    ManifestError,
    VideoEntry,
    build_manifest,
    load_manifest,
    read_split,
    select_entries,
)
from vidssl.data.transforms import BatchClipAugment, ClipTransform

_log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$VIDSSL_CACHE`` or ``~/.cache/vidssl``: generated synthetic data and cached manifests."""
    return Path(os.environ.get("VIDSSL_CACHE") or "~/.cache/vidssl").expanduser()


def _digest(obj: object) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _file_lock(path: Path, *, timeout_s: float = 1800.0, stale_s: float = 3600.0) -> Iterator[None]:
    """Exclusive lock by creating ``path`` (several ranks on one file system must not generate/index twice)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > stale_s:  # left behind by a killed process
                    path.unlink()
                    continue
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{path}: still locked after {timeout_s:.0f} s (delete it if no other process "
                                   "is indexing or generating data)") from None
            time.sleep(0.2)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------------------- entries

def synth_counts(cfg: DataConfig) -> tuple[int, int]:
    """``(num_train, num_val)`` generated for ``source: synthetic``: ``synth_videos`` and a quarter of it (>= 1)."""
    return cfg.synth_videos, max(1, cfg.synth_videos // 4)


def synthetic_root(cfg: DataConfig, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Generate (once) the synthetic DAVIS-layout tree of ``cfg`` and return its folder.

    The folder is ``cfg.root`` when set, else ``<cache_dir>/synth-<hash of the generator settings>``; the train split
    (``ImageSets/2017/train.txt``) has ``synth_videos`` videos, the val split :func:`synth_counts` ``[1]``.
    """
    from vidssl.data import synthetic

    if cfg.synth_videos < 1 or cfg.synth_frames < 1:
        raise ConfigError(f"data.synth_videos / data.synth_frames: must be >= 1, got {cfg.synth_videos}, "
                          f"{cfg.synth_frames}")
    scfg = synthetic.SynthConfig(num_frames=cfg.synth_frames, height=cfg.synth_size[0], width=cfg.synth_size[1],
                                 seed=cfg.synth_seed)
    num_train, num_val = synth_counts(cfg)
    key = {"config": to_dict(scfg), "num_train": num_train, "num_val": num_val,
           "version": getattr(synthetic, "GENERATOR_VERSION", 0)}
    root = Path(cfg.root) if cfg.root else Path(cache_dir or default_cache_dir()) / f"synth-{_digest(key)}"
    with _file_lock(root.parent / f".{root.name}.lock"):
        return Path(synthetic.write_davis(root, scfg, num_train=num_train, num_val=num_val))


def _cached_manifest_path(root: Path, cache_dir: Path) -> Path:
    return cache_dir / "manifests" / f"{root.name or 'root'}-{_digest(str(root.resolve()))}.jsonl"


def _manifest_entries(root: Path | None, manifest: Path | None, cache_dir: Path, *, progress: bool
                      ) -> list[VideoEntry]:
    """Entries from ``manifest`` (built there from ``root`` when missing), or from a cached manifest of ``root``."""
    if manifest is None:
        if root is None:
            raise ConfigError("data.root: required (a dataset folder) when data.manifest is empty")
        manifest = _cached_manifest_path(root, cache_dir)
    if not manifest.is_file():
        if root is None:
            raise ConfigError(f"data.manifest: {manifest} does not exist and data.root is empty (nothing to index)")
        if not root.exists():
            raise FileNotFoundError(f"data.root: {root} does not exist")
        with _file_lock(manifest.with_name(f".{manifest.name}.lock")):
            if not manifest.is_file():  # another rank may have built it while we waited
                _log.info("indexing %s into %s", root, manifest)
                _, failures = build_manifest(root, manifest, progress=progress)
                if failures:
                    _log.warning("%d unreadable video(s) left out of %s (listed in its .failures.jsonl)",
                                 len(failures), manifest)
    return load_manifest(manifest, missing="error")


def resolve_entries(cfg: DataConfig, *, cache_dir: str | os.PathLike | None = None, progress: bool = False
                    ) -> list[VideoEntry]:
    """The videos ``cfg`` selects, read from a manifest (built once and cached when needed).

    ``synthetic``: the generated tree's train split (or ``cfg.split``); ``frames``: a DAVIS/YouTube-VOS root or a
    folder of per-video frame folders; ``video``: encoded files. ``cfg.split`` (DAVIS ``ImageSets``) and
    ``cfg.sequences`` narrow the list. Errors name the root, manifest or missing videos.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    split = cfg.split
    if cfg.source == "synthetic":
        root: Path | None = synthetic_root(cfg, cache_dir=cache)
        split = split or "train"
        manifest = None
    else:
        root = Path(cfg.root) if cfg.root else None
        manifest = Path(cfg.manifest) if cfg.manifest else None
        if root is not None and not root.exists() and (manifest is None or not manifest.is_file()):
            raise FileNotFoundError(f"data.root: {root} does not exist")
    entries = _manifest_entries(root, manifest, cache, progress=progress)
    kind = "video" if cfg.source == "video" else "frames"
    wrong = [e for e in entries if e.kind != kind and cfg.source != "manifest"]
    entries = [e for e in entries if e.kind == kind or cfg.source == "manifest"]
    if not entries:
        where = cfg.manifest or str(root)
        raise ManifestError(f"{where}: no {'video files' if kind == 'video' else 'frame folders'} indexed for "
                            f"data.source={cfg.source!r}" + (f" ({len(wrong)} of the other kind)" if wrong else ""))
    if split:
        if root is None:
            raise ConfigError(f"data.split: {split!r} needs data.root (a DAVIS-style root with ImageSets/)")
        entries = select_entries(entries, read_split(root, split), where=f"{root} split {split!r}")
    if cfg.sequences:
        entries = select_entries(entries, list(cfg.sequences), where=f"data.sequences ({root or cfg.manifest})")
    return entries


# ---------------------------------------------------------------------------------------------------- loader

def collate(items: list[dict]) -> dict:
    """Batch items key by key: tensors stacked, numbers as a tensor (int64 / float32 / bool), anything else listed.

    Every key an item carries is passed through (labels, shot ids, paths ...).
    """
    out: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        first = values[0]
        if torch.is_tensor(first):
            out[key] = torch.stack(values)
        elif isinstance(first, (bool, int, float)):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out


class ClipLoader:
    """Batches of clips for one rank; see the module docstring for the batch layout.

    Build it with :func:`build_loader`. ``set_epoch(e)`` before iterating an epoch (forwards to the sampler and the
    dataset); ``len(loader)`` is the number of batches per epoch; ``skipped`` counts videos skipped so far (all
    epochs, all workers) and ``epoch_skipped`` those of the epoch being iterated.

    Args:
        dataset: the :class:`ClipDataset`.
        batch_size: clips per batch (per rank).
        seed: seeds the sampler's shuffling.
        rank, world_size: this process's share of every epoch (disjoint, equal-sized).
        device: where batches are delivered.
        num_workers: DataLoader worker processes (CPU path).
        gpu_augment: when given, the GPU path: items are decoded in this process on ``device`` and augmented in
            batches by it (the dataset must have ``transform=None`` and its readers on ``device``).
        gpu_threads: GPU path: concurrent decode sessions (threads of this process, each with its own decoders and
            CUDA stream; NVDEC engines work in parallel): :class:`vidssl.data.gpu_pipeline.ClipPipeline`. Clips of
            one file in a batch are decoded by one call, decoders are kept per session (``dataset.reader_cache``
            shared out among the sessions) and reconfigured rather than reopened where the backend can. The batches
            do not depend on it.
        gpu_prefetch: GPU path: batches decoded and augmented ahead of the training step (a bounded queue).
        drop_last: drop the last incomplete batch of an epoch.
    """

    def __init__(self, dataset: ClipDataset | ImageFolderDataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", num_workers: int = 0,
                 gpu_augment: BatchClipAugment | None = None, drop_last: bool = True, gpu_threads: int = 1,
                 gpu_prefetch: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.gpu_augment = gpu_augment
        if gpu_threads < 1:
            raise ValueError(f"gpu_threads: must be >= 1, got {gpu_threads}")
        self.gpu_threads = gpu_threads
        if gpu_prefetch < 1:
            raise ValueError(f"gpu_prefetch: must be >= 1, got {gpu_prefetch}")
        self.gpu_prefetch = gpu_prefetch
        self.pipeline = None  # the GPU path's ClipPipeline, made at the first epoch (its stats)
        self.drop_last = drop_last
        self.epoch = 0
        self.skipped = 0
        self.epoch_skipped = 0
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=world_size > 1)
        per_rank = len(self.sampler)
        if drop_last and per_rank < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {per_rank} clips per epoch of rank {rank} "
                             f"({len(dataset)} clips over {world_size} rank(s)): no full batch; lower the batch size "
                             "or raise data.clips_per_video")
        self._loader = None
        if gpu_augment is None:
            self._loader = DataLoader(
                dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                collate_fn=collate, pin_memory=self.device.type == "cuda", drop_last=drop_last,
                generator=torch.Generator().manual_seed(seed), persistent_workers=False)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order and randomness."""
        self.epoch = int(epoch)
        self.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        self.epoch_skipped = 0
        batches = self._iter_gpu() if self.gpu_augment is not None else self._iter_cpu()
        for batch in batches:
            n = int(batch["skipped"].sum())
            self.skipped += n
            self.epoch_skipped += n
            yield batch
        if self.epoch_skipped:
            _log.warning("epoch %d: %d unreadable video(s) skipped (total %d)", self.epoch, self.epoch_skipped,
                         self.skipped)

    def _iter_cpu(self) -> Iterator[dict]:
        for batch in self._loader:
            batch["video"] = batch["video"].to(self.device, non_blocking=True)
            yield batch

    def _iter_gpu(self) -> Iterator[dict]:
        from vidssl.data.gpu_pipeline import ClipPipeline

        order = list(iter(self.sampler))
        stop = len(self) * self.batch_size
        batches = [order[start:start + self.batch_size] for start in range(0, stop, self.batch_size)]
        if self.pipeline is None:  # one per loader: its sessions keep their decoders open from epoch to epoch
            cache = max(1, getattr(self.dataset, "reader_cache", 0) // self.gpu_threads)
            self.pipeline = ClipPipeline(self.dataset, self.gpu_augment, device=self.device,
                                         sessions=self.gpu_threads, cache_size=cache, prefetch=self.gpu_prefetch)
        yield from self.pipeline.iterate(batches)

    def close(self) -> None:
        """Stop the GPU path's decode sessions (their threads and open decoders); the CPU path has none."""
        if self.pipeline is not None:
            self.pipeline.close()


def build_loader(cfg: DataConfig, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                 drop_last: bool = True, progress: bool = False) -> ClipLoader:
    """The training loader of ``cfg`` for one rank.

    Args:
        cfg: the ``data:`` section (source, clips, augmentation, decoding, ``device``, ``num_workers``).
        batch_size: clips per batch on this rank.
        seed: base seed (shuffling and every item's augmentation).
        rank, world_size: distributed split (``DistributedSampler``: shuffled with ``seed``, equal disjoint shares).
        device: where batches end up; with ``cfg.device == "cuda"`` also where decoding and augmentation run (a CPU
            ``device`` then means the current CUDA device).
        cache_dir: synthetic data and cached manifests (default :func:`default_cache_dir`).
        drop_last: drop the last incomplete batch (an epoch with no full batch is an error).
        progress: progress bar while indexing.

    ``cfg.device == "cuda"`` decodes in the main process on the GPU (nvjpeg for JPEG folders, NVDEC for videos) and
    augments whole batches there with :class:`BatchClipAugment`; ``num_workers`` is then forced to 0 (logged).
    """
    cfg.validate()
    transform = ClipTransform.from_config(cfg)
    if cfg.source == "images":
        if cfg.device == "cuda":
            raise ConfigError("data.device: source 'images' is read on the CPU (data.device=cpu); batches still "
                              "go to the training device")
        images = ImageFolderDataset(cfg.root, transform=transform, seed=seed)
        return ClipLoader(images, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, device=device,
                          num_workers=cfg.num_workers, drop_last=drop_last)
    entries = resolve_entries(cfg, cache_dir=cache_dir, progress=progress)
    common = dict(clip_len=cfg.clip_len, stride=cfg.stride, sampler=cfg.sampler,
                  clips_per_video=cfg.clips_per_video, seed=seed, backend=cfg.decoder,
                  decode_threads=cfg.decode_threads, max_retries=cfg.max_retries,
                  keyframe_aligned=cfg.keyframe_aligned, num_shots=cfg.num_shots, shot_fps=cfg.shot_fps,
                  min_shot_len=cfg.min_shot_len, shot_policy=cfg.shot_policy)
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("data.device: 'cuda' but CUDA is not available (use data.device=cpu)")
        dev = torch.device(device)
        if dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        if cfg.num_workers:
            _log.info("data.device=cuda: decoding on %s in the main process; num_workers %d -> 0", dev,
                      cfg.num_workers)
        dataset = ClipDataset(entries, transform=None, device=dev, reader_cache=cfg.reader_cache, **common)
        return ClipLoader(dataset, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, device=dev,
                          gpu_threads=cfg.gpu_decode_threads, gpu_prefetch=cfg.gpu_prefetch,
                          num_workers=0, gpu_augment=BatchClipAugment.from_config(cfg), drop_last=drop_last)
    dataset = ClipDataset(entries, transform=transform, device="cpu", **common)
    return ClipLoader(dataset, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, device=device,
                      num_workers=cfg.num_workers, drop_last=drop_last)
