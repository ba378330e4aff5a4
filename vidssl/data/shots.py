"""Shot boundaries of videos: detect them (or take the user's), write a resumable JSONL shots file.

``vidssl data shots PATH... --out shots.jsonl`` is :func:`run_shots`. A PATH is a video file, a frame folder, a
folder of videos (walked like ``vidssl data index``) or a JSONL manifest (:mod:`vidssl.data.manifest`). One output
line per video::

    {"path": "/abs/a.mp4", "num_frames": 250, "fps": 25.0, "shots": [[0, 30], [30, 76], ...],
     "cuts": [30, 76, ...], "detector": {"name": "content", "bins": 16, ...}}

``shots`` are ``[start, end)`` frame ranges covering the video, ``cuts`` the first frame of shots 2..K. A video that
cannot be read gives ``{"path": ..., "error": "DecodeError: ..."}`` instead; it is retried by the next run.

Where the boundaries come from, per video (the first that applies):

1. a manifest line with a ``shots`` column: taken as they are (``detector: {"name": "manifest", "file": ...}``);
2. a PySceneDetect scene list beside the video, ``<video stem>-Scenes.csv`` (the name ``scenedetect ...
   list-scenes`` writes): its ``Start Frame`` and ``End Frame`` columns are read. PySceneDetect writes the start
   1-based and the end as the 1-based last frame, so a row ``Start Frame = s, End Frame = e`` is the shot
   ``[s - 1, e)`` (:func:`read_scenedetect_csv`). The optional ``Timecode List:`` first row is skipped;
3. a detector on the decoded frames: ``content`` (:mod:`vidssl.data.shot_detect`: colour histograms with an adaptive
   threshold, flash and fade rules) or ``pyscenedetect`` (PySceneDetect's ``ContentDetector`` fed the same decoded
   frames, ``pip install vidssl[scenedetect]``).

Frames are read through :func:`vidssl.io.open_reader` in batches of ``batch_size``; videos are processed by
``workers`` threads (decoders and torch ops release the GIL). The run is resumable: videos already in the output
file are not read again, and the file is rewritten atomically (temporary file + rename) at most every
``save_every_s`` seconds, on an interruption (Ctrl-C) and at the end, so an interrupted run leaves a valid file
(after a hard kill: the one of the last save) and the next run reads only what is missing.

:func:`manifest_with_shots` (``--manifest-out``) copies a manifest with its ``shots`` column filled from the records,
for ``data.sampler: shots``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from einops import rearrange

from vidssl.config import ConfigError, to_dict
from vidssl.data.manifest import ManifestError, find_videos, load_manifest, write_manifest
from vidssl.data.shot_detect import ContentParams, detect_boundaries
from vidssl.io.atomic import atomic_write_text
from vidssl.io.readers import VIDEO_SUFFIXES, open_reader, probe

_log = logging.getLogger(__name__)

DETECTORS = ("content", "pyscenedetect")
#: Suffix of the PySceneDetect scene list read beside a video (``<stem>-Scenes.csv``, PySceneDetect's default name).
SCENES_CSV_SUFFIX = "-Scenes.csv"


@dataclass
class PySceneDetectParams:
    """PySceneDetect ``ContentDetector`` settings (its Python-API defaults)."""

    threshold: float = 27.0  #: ContentDetector threshold on its weighted HSV + edge score (0..255)
    min_scene_len: int = 15  #: frames; the Python API's default (the scenedetect CLI uses 0.6 s)
    downscale: int = 0  #: 0 = SceneManager's automatic factor (width / 256), else this integer factor

    def validate(self, prefix: str = "") -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        p = f"{prefix}." if prefix else ""
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ConfigError(f"{p}threshold: expected a number >= 0, got {self.threshold!r}")
        for name in ("min_scene_len", "downscale"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{p}{name}: expected an integer >= 0, got {v!r}")


def detector_params(detector: str) -> type:
    """The parameter dataclass of ``detector`` (``content`` or ``pyscenedetect``)."""
    if detector == "content":
        return ContentParams
    if detector == "pyscenedetect":
        return PySceneDetectParams
    raise ValueError(f"detector: expected one of {', '.join(DETECTORS)}, got {detector!r}")


# ------------------------------------------------------------------------------------------------- boundaries

def shots_from_cuts(cuts: Iterable[int], num_frames: int) -> list[list[int]]:
    """``[start, end)`` ranges covering ``num_frames`` frames, a new one at each cut (cuts in ``1..num_frames-1``)."""
    edges = [0] + sorted({int(c) for c in cuts if 0 < int(c) < num_frames}) + [num_frames]
    return [[a, b] for a, b in zip(edges[:-1], edges[1:])]


def read_scenedetect_csv(path: str | os.PathLike) -> list[tuple[int, int]]:
    """Shots ``[start, end)`` (0-based) from a PySceneDetect scene-list CSV (``scenedetect list-scenes``).

    Reads the ``Start Frame`` (1-based first frame) and ``End Frame`` (1-based last frame) columns: a row ``s, e`` is
    the shot ``[s - 1, e)``. An optional first row starting with ``Timecode List:`` is skipped. Raises
    :class:`ManifestError` naming ``file:line`` for a missing column, a non-integer or an empty shot.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(i, r) for i, r in enumerate(csv.reader(f), 1) if any(c.strip() for c in r)]
    if rows and rows[0][1][0].strip().startswith("Timecode List"):
        rows = rows[1:]
    if not rows:
        raise ManifestError(f"{path}: empty scene list (expected a header row with 'Start Frame' and 'End Frame')")
    line, header = rows[0]
    names = [c.strip() for c in header]
    for col in ("Start Frame", "End Frame"):
        if col not in names:
            raise ManifestError(f"{path}:{line}: no {col!r} column in the header (found: {', '.join(names)})")
    i_start, i_end = names.index("Start Frame"), names.index("End Frame")
    shots = []
    for line, row in rows[1:]:
        try:
            start, end = int(row[i_start]) - 1, int(row[i_end])
        except (IndexError, ValueError) as exc:
            raise ManifestError(f"{path}:{line}: expected integer 'Start Frame' and 'End Frame' ({exc})") from exc
        if not 0 <= start < end:
            raise ManifestError(f"{path}:{line}: Start Frame {start + 1} / End Frame {end} is not a non-empty shot "
                                "(1-based first frame, 1-based last frame)")
        shots.append((start, end))
    return shots


# -------------------------------------------------------------------------------------------------- detection

def frame_batches(reader, batch_size: int) -> Iterator[torch.Tensor]:
    """All frames of ``reader`` in order, ``uint8 (<= batch_size, 3, H, W)`` per batch."""
    n = reader.num_frames
    for start in range(0, n, batch_size):
        yield reader.get_frames(list(range(start, min(start + batch_size, n))))  # (B, 3, H, W)


def content_cuts(batches: Iterable[torch.Tensor], params: ContentParams) -> list[int]:
    """Cuts found by the content detector over ``batches`` of consecutive frames (features per batch, then rules)."""
    return detect_boundaries(batches, params).cuts


def rgb_to_bgr_frames(batches: Iterable[torch.Tensor]) -> Iterator[np.ndarray]:
    """``uint8 (B, 3, H, W)`` RGB batches -> contiguous ``(H, W, 3)`` BGR arrays (what OpenCV decoders return)."""
    for frames in batches:
        bgr = rearrange(frames.cpu(), "b c h w -> b h w c").numpy()[..., ::-1]  # (B, H, W, 3) BGR view
        yield from (np.ascontiguousarray(f) for f in bgr)


def scenedetect_bgr_cuts(frames: Iterable[np.ndarray], params: PySceneDetectParams, fps: float | None) -> list[int]:
    """Cuts found by PySceneDetect's ``ContentDetector`` on BGR frames, fed as its SceneManager feeds them
    (downscaled with ``cv2.resize`` linear to a width of at least 256 unless ``params.downscale`` is set)."""
    try:
        import cv2
        from scenedetect import ContentDetector, FrameTimecode
    except ImportError as exc:
        raise ImportError(f"detector 'pyscenedetect' needs PySceneDetect: pip install 'vidssl[scenedetect]' "
                          f"({exc})") from exc
    rate = float(fps) if fps else 25.0  # frame numbers are what matter; the rate only labels timecodes
    det = ContentDetector(threshold=float(params.threshold), min_scene_len=int(params.min_scene_len))
    found = []
    i = 0
    for img in frames:                                                        # (H, W, 3) BGR
        h, w = img.shape[:2]
        factor = params.downscale or (w / 256.0 if w >= 256 else 1.0)
        if factor > 1:
            img = cv2.resize(img, (max(1, round(w / factor)), max(1, round(h / factor))),
                             interpolation=cv2.INTER_LINEAR)                  # (h', w', 3)
        found += det.process_frame(FrameTimecode(i, rate), img)
        i += 1
    if i:
        found += det.post_process(FrameTimecode(i - 1, rate))
    return sorted({int(c.frame_num) for c in found} - {0})


def pyscenedetect_cuts(batches: Iterable[torch.Tensor], params: PySceneDetectParams, fps: float | None) -> list[int]:
    """:func:`scenedetect_bgr_cuts` on RGB frame batches."""
    return scenedetect_bgr_cuts(rgb_to_bgr_frames(batches), params, fps)


def detect_cuts(batches: Iterable[torch.Tensor], detector: str = "content", params=None,
                fps: float | None = None) -> list[int]:
    """Cuts (first frame of each new shot) in consecutive frame ``batches`` with ``detector`` and its ``params``."""
    cls = detector_params(detector)
    params = cls() if params is None else params
    if not isinstance(params, cls):
        raise TypeError(f"detector {detector!r} takes {cls.__name__}, got {type(params).__name__}")
    if detector == "content":
        return content_cuts(batches, params)
    return pyscenedetect_cuts(batches, params, fps)


def detect_video(path: str | os.PathLike, detector: str = "content", params=None, *, batch_size: int = 64,
                 backend: str = "auto", device: str | torch.device = "cpu") -> dict:
    """Decode ``path`` (video file or frame folder) once, in batches, and return its shots-file record."""
    params = detector_params(detector)() if params is None else params
    reader = open_reader(path, backend=backend, device=device)
    try:
        cuts = detect_cuts(frame_batches(reader, batch_size), detector, params, reader.fps)
        n, fps = reader.num_frames, reader.fps
    finally:
        reader.close()
    return _record(path, n, fps, cuts, {"name": detector, **to_dict(params)})


def _record(path, num_frames: int, fps: float | None, cuts: Sequence[int], detector: dict) -> dict:
    shots = shots_from_cuts(cuts, num_frames)
    return {"path": str(path), "num_frames": int(num_frames), "fps": float(fps) if fps else None, "shots": shots,
            "cuts": [s for s, _ in shots[1:]], "detector": detector}


# ---------------------------------------------------------------------------------------------------- inputs

@dataclass
class ShotSource:
    """One video to process: its path and, when the user supplied them, its shots and where they came from."""

    path: str
    shots: list[tuple[int, int]] | None = None
    origin: dict | None = None  #: e.g. {"name": "manifest", "file": ...}
    num_frames: int | None = None
    fps: float | None = None


def collect_sources(paths: Sequence[str | os.PathLike]) -> list[ShotSource]:
    """Expand command-line PATHs (videos, frame folders, folders of videos, ``.jsonl`` manifests) into sources.

    Duplicates (same absolute path) are kept once, first occurrence wins. Raises ``FileNotFoundError`` for a PATH
    that does not exist and :class:`ManifestError` for a file that is neither a video nor a manifest.
    """
    out: dict[str, ShotSource] = {}
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such video, folder or manifest")
        if p.is_file() and p.suffix.lower() == ".jsonl":
            for e in load_manifest(p, check_exists=False):
                src = ShotSource(path=e.path, num_frames=e.num_frames, fps=e.fps)
                if e.shots is not None:
                    src.shots, src.origin = list(e.shots), {"name": "manifest", "file": str(p.resolve())}
                out.setdefault(src.path, src)
            continue
        if p.is_file() and p.suffix.lower() not in VIDEO_SUFFIXES:
            raise ManifestError(f"{p}: expected a video ({', '.join(VIDEO_SUFFIXES)}), a folder or a .jsonl "
                                "manifest")
        found = [(p.stem, p.resolve())] if p.is_file() else find_videos(p)
        for _, vp in found:
            out.setdefault(str(vp), ShotSource(path=str(vp)))
    return list(out.values())


def _scenes_csv(video: str) -> Path | None:
    p = Path(video)
    cand = p.with_name(p.stem + SCENES_CSV_SUFFIX)
    return cand if p.is_file() and cand.is_file() else None


def process_source(src: ShotSource, detector: str = "content", params=None, **kwargs) -> dict:
    """The record of one source: user-supplied shots as they are, else the detector (``kwargs``: detect_video's)."""
    if src.shots is not None:
        return _supplied(src.path, src.num_frames, src.fps, src.shots, src.origin or {"name": "user"})
    csv_path = _scenes_csv(src.path)
    if csv_path is not None:
        info = probe(src.path)  # frame count and rate only: no frame is decoded for its shots
        return _supplied(src.path, info["num_frames"], info.get("fps"), read_scenedetect_csv(csv_path),
                         {"name": "pyscenedetect-csv", "file": str(csv_path)})
    return detect_video(src.path, detector, params, **kwargs)


def _supplied(path: str, num_frames: int | None, fps: float | None, shots: Sequence[tuple[int, int]],
              origin: dict) -> dict:
    shots = sorted((int(a), int(b)) for a, b in shots)
    n = int(num_frames) if num_frames else (shots[-1][1] if shots else 0)
    for a, b in shots:
        if not 0 <= a < b <= n:
            raise ValueError(f"{origin.get('file', path)}: shot [{a}, {b}) is empty or outside the {n} frames "
                             f"of {path}")
    return {"path": str(path), "num_frames": n, "fps": float(fps) if fps else None,
            "shots": [[a, b] for a, b in shots], "cuts": [a for a, _ in shots[1:]], "detector": origin}


# ------------------------------------------------------------------------------------------------ shots file

def load_shots_file(path: str | os.PathLike) -> list[dict]:
    """Lines of a shots file (records and ``{"path", "error"}`` failures); errors name ``file:line``."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict) or "path" not in rec or not ({"shots", "error"} & set(rec)):
                raise ManifestError(f"{path}:{lineno}: expected an object with 'path' and 'shots' (or 'error')")
            out.append(rec)
    return out


def write_shots_file(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Write ``records`` as JSONL atomically (temporary file + rename), sorted by path."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["path"])))


@dataclass
class ShotsSummary:
    """What :func:`run_shots` did."""

    records: list[dict]  #: every successful record in the output (old and new)
    failures: list[dict]  #: ``{"path", "error"}`` of the videos that failed in this run
    processed: int  #: videos read (or whose user shots were taken) in this run
    skipped: int  #: videos already in the output file, not read again


def run_shots(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
              detector: Literal["content", "pyscenedetect"] = "content", params=None, workers: int = 2,
              resume: bool = True, batch_size: int = 64, backend: str = "auto", device: str = "cpu",
              progress: bool = True, save_every_s: float = 5.0,
              process: Callable[..., dict] = process_source) -> ShotsSummary:
    """Shots of every video in ``paths`` into the JSONL file ``out`` (see the module docstring).

    Args:
        paths: videos, frame folders, folders of videos and ``.jsonl`` manifests.
        out: the shots file; with ``resume`` the videos already recorded there are skipped.
        detector, params: detector name and its parameter dataclass (defaults when ``None``).
        workers: videos processed at once (threads).
        batch_size: frames decoded and featurised per batch.
        backend, device: decoding backend and device (``cuda``: NVDEC and features on the GPU).
        save_every_s: the output is rewritten (atomically) at most this often while running, and at the end.
        process: the per-video function (tests count calls through it).

    Failures (unreadable or corrupt videos, bad user shots) never stop the run: they are written as
    ``{"path", "error"}`` lines and returned; a missing decoding backend (``ImportError``) does stop it.
    """
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    params = detector_params(detector)() if params is None else params
    out = Path(out)
    sources = collect_sources(paths)
    done: dict[str, dict] = {}
    if resume and out.is_file():
        done = {r["path"]: r for r in load_shots_file(out) if "error" not in r}
    todo = [s for s in sources if s.path not in done]
    failures: list[dict] = []
    state = {"last_save": time.monotonic()}

    def save() -> None:
        write_shots_file(out, list(done.values()) + failures)
        state["last_save"] = time.monotonic()

    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(todo), desc="shots", unit="video", disable=not progress) as bar:
        futures = {pool.submit(process, s, detector, params, batch_size=batch_size, backend=backend,
                               device=device): s for s in todo}
        try:
            for fut in as_completed(futures):
                src = futures[fut]
                try:
                    rec = fut.result()
                except ImportError:
                    raise
                except Exception as exc:  # a bad video is listed with the reason, never fatal
                    failures.append({"path": src.path, "error": f"{type(exc).__name__}: {exc}"})
                    _log.warning("shots: %s failed: %s", src.path, failures[-1]["error"])
                else:
                    done[src.path] = rec
                    bar.set_postfix_str(f"{len(rec['shots'])} shots", refresh=False)
                bar.update(1)
                if time.monotonic() - state["last_save"] >= save_every_s:
                    save()
        except BaseException:  # interrupted: keep what is finished, then stop
            for f in futures:
                f.cancel()
            save()
            raise
    save()
    return ShotsSummary(records=sorted(done.values(), key=lambda r: r["path"]), failures=failures,
                        processed=len(todo), skipped=len(sources) - len(todo))


def manifest_with_shots(manifest: str | os.PathLike, records: Sequence[dict], out: str | os.PathLike) -> int:
    """Write ``manifest``'s entries to ``out`` (atomically) with the ``shots`` column set from ``records`` (the
    ``shots`` sampler reads it). Entries without a record keep their shots. Returns how many entries got shots."""
    by_path = {r["path"]: r for r in records if "shots" in r}
    entries = load_manifest(manifest, check_exists=False)
    done = 0
    for e in entries:
        rec = by_path.get(e.path)
        if rec is not None:
            if rec["num_frames"] != e.num_frames:
                raise ManifestError(f"{manifest}: video {e.name!r} has num_frames {e.num_frames} but its shots cover "
                                    f"{rec['num_frames']} frames; re-index it (vidssl data index)")
            e.shots = [(a, b) for a, b in rec["shots"]]
            done += 1
    write_manifest(out, entries)
    return done
