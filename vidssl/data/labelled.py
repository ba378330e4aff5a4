"""Labelled clips for frozen-feature probes: which frames of which file, which class, which split.

Four inputs, each turned into a :class:`ProbeSet` of :class:`ProbeItem` (one item = one clip, or one image):

* :func:`image_folder_set` -- ``root/<class>/<image>``; a ``root/train`` + ``root/test`` (or ``val``) pair of class
  folders is used as given, otherwise each class's images are split by a seeded permutation (``test_fraction``).
  Items are 1-frame clips.
* :func:`video_folder_set` -- ``root/<class>/<video file or frame folder>``; clips sampled uniformly over each video
  (:func:`vidssl.data.samplers.uniform_clips`). Split by whole videos: UCF101 (``classInd.txt`` +
  ``trainlist0K.txt`` / ``testlist0K.txt``) or HMDB51 (``<class>_test_split<K>.txt``, 1 = train, 2 = test,
  0 = unused) split files when ``splits`` is given, else a seeded per-class permutation of the videos.
* :func:`frame_folders_set` -- ``root/<sequence>/<frames>`` where every frame folder is one class (the mode used on the
  DAVIS sample sequences): frames are split by time, the first half (``n // 2`` frames) is train, the rest test, and
  clips are sampled uniformly inside each half. Train and test share videos, so this measures how well features
  recognise the same scene later in time, not category generalisation.

Every error names the path (folder, split file, video) and what was expected. Nothing here touches a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from vidssl.data.images import IMAGE_SUFFIXES, scan_image_folder
from vidssl.data.samplers import uniform_clips
from vidssl.io.frames import list_frames
from vidssl.io.images import read_image
from vidssl.io.readers import VIDEO_SUFFIXES, open_reader

__all__ = [
    "ProbeItem",
    "ProbeSet",
    "frame_folders_set",
    "image_folder_set",
    "read_hmdb51_splits",
    "read_item_frames",
    "read_ucf101_splits",
    "video_folder_set",
]


@dataclass(frozen=True)
class ProbeItem:
    """One labelled clip.

    ``path`` is an image file (``frames`` is ``(0,)``), a video file or a frame folder; ``frames`` are the frame
    indices of the clip in temporal order; ``video`` names the source video (items of one video share it: held-out
    parts and the arrow-of-time split never separate one video's clips).
    """

    path: str
    frames: tuple[int, ...]
    label: int
    video: str
    split: str  #: "train" or "test"


@dataclass
class ProbeSet:
    """Items of both splits, the class names (label ``i`` is ``classes[i]``) and how the split was made."""

    items: list[ProbeItem]
    classes: list[str]
    mode: str  #: "images", "videos" or "frames"
    protocol: str  #: one sentence: how items were sampled and split
    root: str
    clip_len: int = 1
    extra: dict = field(default_factory=dict)

    def split(self, name: str) -> list[ProbeItem]:
        return [it for it in self.items if it.split == name]

    def counts(self) -> dict:
        """Clips, videos and clips per class of each split (for the report)."""
        out = {}
        for s in ("train", "test"):
            items = self.split(s)
            out[s] = {"clips": len(items), "videos": len({it.video for it in items}),
                      "per_class": {c: sum(it.label == i for it in items) for i, c in enumerate(self.classes)}}
        return out


def _check_classes(root: Path, classes: Sequence[str]) -> None:
    if len(classes) < 2:
        raise ValueError(f"{root}: {len(classes)} class(es) ({', '.join(classes) or 'none'}); a probe needs at least "
                         "2 (expected one subfolder per class)")


def _split_indices(n: int, test_fraction: float, generator: torch.Generator, where: str) -> tuple[list, list]:
    """Seeded permutation of ``range(n)`` cut into (train, test), each non-empty."""
    if n < 2:
        raise ValueError(f"{where}: {n} item(s); at least 2 needed to give both train and test one")
    perm = torch.randperm(n, generator=generator).tolist()
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    return sorted(perm[n_test:]), sorted(perm[:n_test])


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")


# ---------------------------------------------------------------------------------------------------- images
def image_folder_set(root: str | os.PathLike, *, test_fraction: float = 0.3, seed: int = 0) -> ProbeSet:
    """Images as 1-frame items. ``root/train/<class>`` + ``root/test/<class>`` (or ``val``) is used as given;
    otherwise ``root/<class>/<image>`` is split per class by a ``seed``-ed permutation, ``test_fraction`` to test."""
    root = Path(root)
    _check_fraction(test_fraction)
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, classes = scan_image_folder(root / "train", min_classes=2)
        test, test_classes = scan_image_folder(test_dir, min_classes=2)
        if test_classes != classes:
            raise ValueError(f"{test_dir}: classes {test_classes} differ from {root / 'train'}'s {classes}")
        items = [ProbeItem(str(p), (0,), y, str(p), "train") for p, y in train]
        items += [ProbeItem(str(p), (0,), y, str(p), "test") for p, y in test]
        how = f"image folder: {root / 'train'} is train, {test_dir} is test"
    else:
        samples, classes = scan_image_folder(root, min_classes=2)
        g = torch.Generator().manual_seed(int(seed))
        items = []
        for y, name in enumerate(classes):
            paths = [p for p, lab in samples if lab == y]
            tr, te = _split_indices(len(paths), test_fraction, g, str(root / name))
            items += [ProbeItem(str(paths[i]), (0,), y, str(paths[i]), "train") for i in tr]
            items += [ProbeItem(str(paths[i]), (0,), y, str(paths[i]), "test") for i in te]
        how = (f"image folder: each class's images split by a permutation with seed {seed}, "
               f"{test_fraction:g} of them (at least 1) to test")
    _check_classes(root, classes)
    return ProbeSet(items, classes, "images", how + "; each image is a 1-frame clip", str(root))


# ---------------------------------------------------------------------------------------------------- videos
def _videos_in(folder: Path) -> list[Path]:
    """Video files and frame folders of one class folder, sorted by name."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            out.append(p)
        elif p.is_dir():
            out.append(p)
    return out


def _resolve_video(root: Path, cls: str, name: str) -> Path | None:
    """``root/cls/name``, or the frame folder ``root/cls/<stem>`` of an extracted video; ``None`` if neither."""
    p = root / cls / name
    if p.exists():
        return p
    q = root / cls / Path(name).stem
    return q if q.is_dir() else None


def _missing_error(split_file: Path, root: Path, missing: list[str]) -> ValueError:
    shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
    return ValueError(f"{split_file}: names {len(missing)} video(s) not found under {root}: {shown}")


def read_ucf101_splits(splits: str | os.PathLike, root: str | os.PathLike, split_id: int = 1
                       ) -> tuple[list[str], list[tuple[Path, int, str]]]:
    """UCF101 split files: ``classInd.txt`` (``<1-based index> <class>``), ``trainlist0K.txt``
    (``<class>/<video> <index>``) and ``testlist0K.txt`` (``<class>/<video>``).

    Returns ``(classes, [(video path, label, "train"|"test")])``; every named video must exist under ``root``.
    """
    splits, root = Path(splits), Path(root)
    ind = splits / "classInd.txt"
    classes_by_idx: dict[int, str] = {}
    for n, line in enumerate(_lines(ind), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{ind}:{n}: expected '<index> <class>', got {line!r}")
        classes_by_idx[int(parts[0])] = parts[1]
    classes = [classes_by_idx[i] for i in sorted(classes_by_idx)]
    label_of = {c: i for i, c in enumerate(classes)}
    out: list[tuple[Path, int, str]] = []
    for split, stem in (("train", "trainlist"), ("test", "testlist")):
        f = splits / f"{stem}{split_id:02d}.txt"
        missing = []
        for n, line in enumerate(_lines(f), 1):
            rel = line.split()[0]
            cls = rel.split("/")[0]
            if "/" not in rel or cls not in label_of:
                raise ValueError(f"{f}:{n}: expected '<class>/<video>' with a class of {ind}, got {line!r}")
            p = _resolve_video(root, cls, rel.split("/", 1)[1])
            if p is None:
                missing.append(str(root / rel))
            else:
                out.append((p, label_of[cls], split))
        if missing:
            raise _missing_error(f, root, missing)
    return classes, out


def read_hmdb51_splits(splits: str | os.PathLike, root: str | os.PathLike, split_id: int = 1
                       ) -> tuple[list[str], list[tuple[Path, int, str]]]:
    """HMDB51 split files ``<class>_test_split<K>.txt`` with lines ``<video> <0|1|2>`` (1 train, 2 test, 0 unused).

    Returns ``(classes, [(video path, label, "train"|"test")])``; every named train/test video must exist.
    """
    splits, root = Path(splits), Path(root)
    files = sorted(splits.glob(f"*_test_split{split_id}.txt"))
    if not files:
        raise FileNotFoundError(f"{splits}: no classInd.txt (UCF101) and no *_test_split{split_id}.txt files (HMDB51)")
    classes = [f.name[: -len(f"_test_split{split_id}.txt")] for f in files]
    out: list[tuple[Path, int, str]] = []
    for label, (cls, f) in enumerate(zip(classes, files)):
        missing = []
        for n, line in enumerate(_lines(f), 1):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{f}:{n}: expected '<video> <0|1|2>', got {line!r}")
            if parts[1] == "0":
                continue
            p = _resolve_video(root, cls, parts[0])
            if p is None:
                missing.append(str(root / cls / parts[0]))
            else:
                out.append((p, label, "train" if parts[1] == "1" else "test"))
        if missing:
            raise _missing_error(f, root, missing)
    return classes, out


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def _clips(num_frames: int, clip_len: int, stride: int, num_clips: int, offset: int = 0) -> list[tuple[int, ...]]:
    """Distinct uniformly spread clips of a span of ``num_frames`` frames starting at ``offset`` (in order)."""
    out: list[tuple[int, ...]] = []
    for c in uniform_clips(num_frames, clip_len, stride, num_clips):
        clip = tuple(offset + i for i in c)
        if clip not in out:
            out.append(clip)
    return out


def _num_frames(path: Path) -> int:
    reader = open_reader(path)
    try:
        n = int(reader.num_frames)
    finally:
        reader.close()
    if n < 1:
        raise ValueError(f"{path}: no frames")
    return n


def video_folder_set(root: str | os.PathLike, *, clip_len: int = 8, stride: int = 1, clips_per_video: int = 4,
                     splits: str | os.PathLike | None = None, split_id: int = 1, test_fraction: float = 0.3,
                     seed: int = 0) -> ProbeSet:
    """Clips of labelled videos (see the module docstring); train and test never share a video."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: video folder not found (expected root/<class>/<video>)")
    if splits is not None:
        splits = Path(splits)
        if (splits / "classInd.txt").is_file():
            classes, videos = read_ucf101_splits(splits, root, split_id)
            how = f"UCF101 split {split_id} ({splits})"
        else:
            classes, videos = read_hmdb51_splits(splits, root, split_id)
            how = f"HMDB51 split {split_id} ({splits})"
    else:
        _check_fraction(test_fraction)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        _check_classes(root, classes)
        g = torch.Generator().manual_seed(int(seed))
        videos = []
        for y, name in enumerate(classes):
            vids = _videos_in(root / name)
            if not vids:
                raise ValueError(f"{root / name}: empty class folder (no video files {'/'.join(VIDEO_SUFFIXES)} "
                                 "or frame folders)")
            tr, te = _split_indices(len(vids), test_fraction, g, str(root / name))
            videos += [(vids[i], y, "train") for i in tr] + [(vids[i], y, "test") for i in te]
        how = (f"each class's videos split by a permutation with seed {seed}, {test_fraction:g} of them "
               "(at least 1) to test")
    _check_classes(root, classes)
    for y, name in enumerate(classes):
        for s in ("train", "test"):
            if not any(lab == y and sp == s for _, lab, sp in videos):
                raise ValueError(f"{root / name}: class {name!r} has no {s} video ({how})")
    items = []
    for path, label, split in videos:
        for clip in _clips(_num_frames(path), clip_len, stride, clips_per_video):
            items.append(ProbeItem(str(path), clip, label, str(path), split))
    protocol = (f"video folder: {how}; {clips_per_video} clips of {clip_len} frames, stride {stride}, starts spread "
                "uniformly over each video (duplicates dropped)")
    return ProbeSet(items, classes, "videos", protocol, str(root), clip_len=clip_len)


# ---------------------------------------------------------------------------------------------------- frames
def frame_folders_set(root: str | os.PathLike, *, sequences: Sequence[str] | None = None, clip_len: int = 8,
                      stride: int = 1, clips_per_video: int = 8,
                      test_sequences: Sequence[str] | None = None) -> ProbeSet:
    """Every frame folder ``root/<sequence>`` is one class; its first ``n // 2`` frames give the train clips and the
    rest the test clips (clips sampled uniformly inside each half, never crossing it).

    With ``test_sequences``, the split is by video instead: every frame of ``sequences`` gives train clips and every
    frame of ``test_sequences`` test clips (``clips_per_video`` clips spread over each whole sequence). Train and test
    then share no class, so only the arrow-of-time probe applies (it is trained on the train videos and tested on
    the others, e.g. a pretraining run's own sequences and its held-out ones)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: frames root not found (expected root/<sequence>/<frames>)")
    if sequences is None:
        sequences = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    sequences = list(sequences)
    if test_sequences is not None:
        return _frame_folders_by_video(root, sequences, list(test_sequences), clip_len=clip_len, stride=stride,
                                       clips_per_video=clips_per_video)
    if len(set(sequences)) != len(sequences):
        raise ValueError(f"sequences: {sequences} names a sequence twice")
    _check_classes(root, sequences)
    items = []
    for y, name in enumerate(sequences):
        folder = root / name
        n = len(list_frames(folder))  # errors name a missing or empty folder
        if n < 2:
            raise ValueError(f"{folder}: {n} frame; at least 2 needed (first half train, second half test)")
        half = n // 2
        for split, lo, count in (("train", 0, half), ("test", half, n - half)):
            for clip in _clips(count, clip_len, stride, clips_per_video, offset=lo):
                items.append(ProbeItem(str(folder), clip, y, str(folder), split))
    protocol = (f"frame folders: each folder is one class; frames split by time, the first n//2 frames train and "
                f"the rest test; {clips_per_video} clips of {clip_len} frames, stride {stride}, starts spread "
                "uniformly inside each half (duplicates dropped)")
    return ProbeSet(items, sequences, "frames", protocol, str(root), clip_len=clip_len)


def _frame_folders_by_video(root: Path, train: list[str], test: list[str], *, clip_len: int, stride: int,
                            clips_per_video: int) -> ProbeSet:
    """:func:`frame_folders_set` split by whole sequences (``train`` / ``test``), each sequence its own class."""
    names = train + test
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"sequences / test_sequences: {twice} named twice (train and test videos must differ)")
    if not train or not test:
        raise ValueError(f"{root}: a split by video needs train and test sequences, got {len(train)} train / "
                         f"{len(test)} test")
    items = []
    for y, name in enumerate(names):
        folder = root / name
        n = len(list_frames(folder))  # errors name a missing or empty folder
        split = "train" if y < len(train) else "test"
        for clip in _clips(n, clip_len, stride, clips_per_video):
            items.append(ProbeItem(str(folder), clip, y, str(folder), split))
    protocol = (f"frame folders split by video: {len(train)} train sequences, {len(test)} test sequences (no shared "
                f"video or class: arrow of time only); {clips_per_video} clips of {clip_len} frames, stride {stride}, "
                "starts spread uniformly over each sequence (duplicates dropped)")
    return ProbeSet(items, names, "frames", protocol, str(root), clip_len=clip_len)


# ---------------------------------------------------------------------------------------------------- reading
def read_item_frames(path: str, frames: Sequence[int]) -> torch.Tensor:
    """``uint8 (len(frames), 3, H, W)`` RGB of an image file (``frames == (0,)``), video file or frame folder."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return read_image(p)[None].expand(len(frames), -1, -1, -1)  # t 3 h w
    reader = open_reader(p)
    try:
        return reader.get_frames(list(frames))  # t 3 h w
    finally:
        reader.close()
