"""The video index: scan a dataset folder once, write a JSONL manifest, read it instead of rescanning.

One line per video, a JSON object with the fields of :class:`VideoEntry`. Layouts recognised by :func:`find_videos`:

- DAVIS / YouTube-VOS: ``ROOT/JPEGImages/480p/<seq>/*.jpg`` (DAVIS) or ``ROOT/JPEGImages/<video>/*.jpg``; the video
  name is the folder name;
- anything else is walked recursively: every folder that holds frames is a video (Kinetics-as-frames
  ``ROOT/<class>/<video>/img_00001.jpg``), and so is every file with a video suffix; names are paths relative to
  ``ROOT`` (without the video suffix).

:func:`build_manifest` probes the videos in parallel with a progress bar, is resumable (videos already in the
manifest are not probed again; progress is saved every few seconds), writes atomically, and lists unreadable videos
with the reason instead of failing (also in ``<manifest stem>.failures.jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

from vidssl.io.atomic import atomic_write_text
from vidssl.io.frames import FRAME_SUFFIXES
from vidssl.io.readers import VIDEO_SUFFIXES, probe

_log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """A manifest (or split file) is malformed or names something that does not exist; the message says where."""


@dataclass
class VideoEntry:
    """One video of a dataset.

    Attributes:
        name: identifier (DAVIS sequence name, or the path relative to the dataset root).
        path: absolute path of the frame folder or video file.
        kind: ``"frames"`` (folder of JPEG/PNG) or ``"video"`` (encoded file).
        num_frames: frame count.
        fps: frames per second (``None`` for frame folders).
        height, width: frame size in pixels.
        codec: ``"jpeg"``/``"png"``/``"mixed"`` for folders, the codec name (``"h264"``) for files.
        duration: seconds (``None`` for frame folders).
        shots: optional ``[start, end)`` frame ranges of the shots (for shot-group samplers), ``None`` if unknown.
    """

    name: str
    path: str
    kind: Literal["frames", "video"]
    num_frames: int
    fps: float | None = None
    height: int = 0
    width: int = 0
    codec: str = ""
    duration: float | None = None
    shots: list[tuple[int, int]] | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.shots is not None:
            d["shots"] = [[int(a), int(b)] for a, b in self.shots]
        return d

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "entry") -> "VideoEntry":
        """Build an entry from a manifest line's object; errors name ``where`` (``file:line``) and the field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ManifestError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
        for key in ("name", "path", "kind", "num_frames"):
            if key not in data:
                raise ManifestError(f"{where}: missing field {key!r}")
        if data["kind"] not in ("frames", "video"):
            raise ManifestError(f"{where}: kind must be 'frames' or 'video', got {data['kind']!r}")
        n = data["num_frames"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ManifestError(f"{where}: num_frames must be an integer >= 1, got {n!r}")
        shots = data.get("shots")
        if shots is not None:
            try:
                shots = [(int(a), int(b)) for a, b in shots]
            except (TypeError, ValueError) as exc:
                raise ManifestError(f"{where}: shots must be a list of [start, end) pairs ({exc})") from exc
            for a, b in shots:
                if not 0 <= a < b <= n:
                    raise ManifestError(f"{where}: shot [{a}, {b}) is empty or outside the {n} frames")
        return cls(**{**data, "shots": shots})


# ----------------------------------------------------------------------------------------------------- discovery

def _has_frames(names: Iterable[str]) -> bool:
    return any(n.lower().endswith(FRAME_SUFFIXES) and not n.startswith(".") for n in names)


def davis_frames_dir(root: str | os.PathLike) -> Path | None:
    """The folder holding one sub-folder per sequence for a DAVIS/YouTube-VOS root, or ``None`` for other layouts.

    ``ROOT/JPEGImages/480p`` (DAVIS) wins over ``ROOT/JPEGImages`` (YouTube-VOS, or DAVIS without resolutions).
    """
    root = Path(root)
    for cand in (root / "JPEGImages" / "480p", root / "JPEGImages"):
        if cand.is_dir():
            return cand
    return None


def find_videos(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(name, path)`` of every video candidate under ``root``, sorted by name (see the module docstring).

    Leaf folders without frames are returned too, so that :func:`scan_root` reports them as empty. Raises
    ``FileNotFoundError`` when ``root`` does not exist and :class:`ManifestError` when it holds no candidate.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: dataset root not found")
    if root.is_file():
        if root.suffix.lower() in VIDEO_SUFFIXES:
            return [(root.stem, root.resolve())]
        raise ManifestError(f"{root}: not a folder or a video file (known suffixes: {', '.join(VIDEO_SUFFIXES)})")
    out: list[tuple[str, Path]] = []
    davis = davis_frames_dir(root)
    if davis is not None:
        for e in os.scandir(davis):
            if e.is_dir() and not e.name.startswith("."):
                out.append((e.name, Path(e.path).resolve()))
    else:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            here = Path(dirpath)
            rel = here.relative_to(root)
            if _has_frames(filenames) or (not dirnames and here != root
                                          and not any(f.lower().endswith(VIDEO_SUFFIXES) for f in filenames)):
                out.append((rel.as_posix(), here.resolve()))
            for f in filenames:
                if f.lower().endswith(VIDEO_SUFFIXES) and not f.startswith("."):
                    out.append(((rel / Path(f).stem).as_posix(), (here / f).resolve()))
    if not out:
        raise ManifestError(f"{root}: no frame folders or video files found (expected JPEGImages/480p/<seq>/, "
                            f"<video>/*.jpg|png folders or {'/'.join(VIDEO_SUFFIXES)} files)")
    out.sort(key=lambda item: (item[0], str(item[1])))
    return out


def _probe_entry(name: str, path: Path) -> VideoEntry:
    info = probe(path)
    n = info.get("num_frames")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{path}: no decodable frames (num_frames={n!r})")
    return VideoEntry(name=name, path=str(path), kind=info["kind"], num_frames=n, fps=info.get("fps"),
                      height=int(info.get("height") or 0), width=int(info.get("width") or 0),
                      codec=str(info.get("codec") or ""), duration=info.get("duration"))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def scan_root(root: str | os.PathLike, *, workers: int = 2, progress: bool = True,
              skip_paths: Iterable[str] = (), on_entry=None) -> tuple[list[VideoEntry], list[dict]]:
    """Probe every video under ``root`` in ``workers`` threads.

    Args:
        root: dataset folder (layouts in the module docstring).
        workers: probing threads (decoders and file I/O release the GIL).
        progress: show a tqdm bar (frames, fps, size, codec of the last video in its postfix).
        skip_paths: absolute paths not to probe (already indexed).
        on_entry: optional callback ``f(entry_or_None, failure_or_None)`` called in the main thread per video.

    Returns ``(entries sorted by name, failures)``; a failure is ``{"path", "name", "reason"}`` and never fatal.
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    skip = set(skip_paths)
    todo = [(n, p) for n, p in find_videos(root) if str(p) not in skip]
    entries: list[VideoEntry] = []
    failures: list[dict] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(todo), desc=f"index {Path(root).name}", unit="video", disable=not progress) as bar:
        futures = {pool.submit(_probe_entry, n, p): (n, p) for n, p in todo}
        for fut in as_completed(futures):
            name, path = futures[fut]
            try:
                entry = fut.result()
            except ImportError:  # a missing decoding backend is not a bad file: stop with its install hint
                for f in futures:
                    f.cancel()
                raise
            except Exception as exc:  # unreadable video: listed with the reason, not fatal
                failure = {"path": str(path), "name": name, "reason": _reason(exc)}
                failures.append(failure)
                _log.warning("skipped %s: %s", path, failure["reason"])
                if on_entry is not None:
                    on_entry(None, failure)
            else:
                entries.append(entry)
                bar.set_postfix_str(f"{entry.num_frames} frames, {entry.width}x{entry.height}, {entry.codec}"
                                    + (f", {entry.fps:.3g} fps" if entry.fps else ""), refresh=False)
                if on_entry is not None:
                    on_entry(entry, None)
            bar.update(1)
    entries.sort(key=lambda e: (e.name, e.path))
    failures.sort(key=lambda f: f["path"])
    return entries, failures


# ------------------------------------------------------------------------------------------------ reading/writing

def _dump(entries: Sequence[VideoEntry]) -> str:
    return "".join(json.dumps(e.to_dict(), sort_keys=False) + "\n" for e in entries)


def failures_path(manifest_path: str | os.PathLike) -> Path:
    """Where :func:`build_manifest` lists unreadable videos: ``<stem>.failures.jsonl`` beside the manifest."""
    p = Path(manifest_path)
    return p.with_name(p.stem + ".failures.jsonl")


def write_manifest(path: str | os.PathLike, entries: Sequence[VideoEntry]) -> None:
    """Write ``entries`` as JSONL, atomically."""
    atomic_write_text(path, _dump(entries))


def load_manifest(path: str | os.PathLike, *, missing: Literal["error", "warn"] = "error",
                  check_exists: bool = True) -> list[VideoEntry]:
    """Read a JSONL manifest.

    Relative ``path`` fields are resolved against the manifest's folder. With ``check_exists`` every listed video
    must exist: a missing one raises ``FileNotFoundError`` naming the manifest line and the file
    (``missing="error"``), or is logged as a warning and left out (``missing="warn"``). Malformed lines raise
    :class:`ManifestError` naming ``file:line``.
    """
    if missing not in ("error", "warn"):
        raise ValueError(f"missing: expected 'error' or 'warn', got {missing!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found")
    entries = []
    base = path.parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: invalid JSON ({exc.msg})") from exc
            entry = VideoEntry.from_dict(data, where=where)
            p = Path(entry.path)
            if not p.is_absolute():
                entry.path = str((base / p).resolve())
            if check_exists and not os.path.exists(entry.path):
                msg = f"{where}: video {entry.name!r} not found at {entry.path}"
                if missing == "error":
                    raise FileNotFoundError(msg + " (rebuild the manifest, or load it with missing='warn')")
                _log.warning("%s; skipped", msg)
                continue
            entries.append(entry)
    return entries


def build_manifest(root: str | os.PathLike, out_path: str | os.PathLike, *, workers: int = 2, resume: bool = True,
                   progress: bool = True, save_every_s: float = 10.0) -> tuple[list[VideoEntry], list[dict]]:
    """Index ``root`` into the JSONL manifest ``out_path``; returns ``(entries, failures)``.

    With ``resume`` an existing manifest is read first and its videos are not probed again (entries whose file is
    gone are dropped; fields added by hand, such as ``shots``, are kept). Progress is saved atomically at least every
    ``save_every_s`` seconds, so an interrupted scan resumes where it stopped. Unreadable videos are listed (with the
    reason) in the returned failures and in :func:`failures_path`, and retried by the next build.
    """
    out_path = Path(out_path)
    known: dict[str, VideoEntry] = {}
    if resume and out_path.is_file():
        for e in load_manifest(out_path, missing="warn"):
            known[str(Path(e.path).resolve())] = e
    present = {str(p) for _, p in find_videos(root)}
    kept = [e for p, e in known.items() if p in present]
    state = {"entries": list(kept), "last_save": time.monotonic()}

    def on_entry(entry: VideoEntry | None, failure: dict | None) -> None:
        if entry is None:
            return
        state["entries"].append(entry)
        if time.monotonic() - state["last_save"] >= save_every_s:
            write_manifest(out_path, sorted(state["entries"], key=lambda e: (e.name, e.path)))
            state["last_save"] = time.monotonic()

    new, failures = scan_root(root, workers=workers, progress=progress, skip_paths=known.keys(), on_entry=on_entry)
    entries = sorted(kept + new, key=lambda e: (e.name, e.path))
    write_manifest(out_path, entries)
    fpath = failures_path(out_path)
    if failures:
        atomic_write_text(fpath, "".join(json.dumps(f) + "\n" for f in failures))
    elif fpath.exists():
        fpath.unlink()
    return entries, failures


# ---------------------------------------------------------------------------------------------------- selection

def _split_names(path: Path) -> list[str]:
    """Names from a split file: one name per line, or DAVIS-2016 pair lines ``/JPEGImages/480p/<seq>/00000.jpg ...``."""
    names: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        tokens = line.split()
        if not tokens:
            continue
        first = tokens[0].replace("\\", "/")
        name = Path(first).parent.name if "/" in first else first
        if name and name not in names:
            names.append(name)
    if not names:
        raise ManifestError(f"{path}: split file is empty")
    return names


def read_split(root: str | os.PathLike, split: str) -> list[str]:
    """Video names of a DAVIS-style split: ``ROOT/ImageSets/<year>/<split>.txt``, the newest year that has it.

    ``split`` may name the folder explicitly (``"2016/train"``); the original DAVIS-2016 ``ImageSets/480p`` pair
    lists are the last fallback. Raises :class:`ManifestError` naming the root and the split files that exist.
    """
    root = Path(root)
    sets = root / "ImageSets"
    if "/" in split:
        cands = [sets / f"{split}.txt"]
    else:
        years = sorted((d for d in sets.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name),
                       reverse=True) if sets.is_dir() else []
        cands = [y / f"{split}.txt" for y in years] + [sets / f"{split}.txt", sets / "480p" / f"{split}.txt"]
    for c in cands:
        if c.is_file():
            return _split_names(c)
    avail = sorted(p.relative_to(sets).with_suffix("").as_posix() for p in sets.rglob("*.txt")) \
        if sets.is_dir() else []
    raise ManifestError(f"{root}: split {split!r} not found (looked for ImageSets/<year>/{split}.txt); "
                        f"available: {', '.join(avail) or 'none'}")


def select_entries(entries: Sequence[VideoEntry], names: Sequence[str], *, where: str = "manifest"
                   ) -> list[VideoEntry]:
    """The entries called ``names``, in the order of ``names``; an unknown name raises :class:`ManifestError`."""
    by_name = {e.name: e for e in entries}
    lost = [n for n in names if n not in by_name]
    if lost:
        raise ManifestError(f"{where}: {len(lost)} requested video(s) not indexed: {', '.join(lost[:5])}"
                            + (" ..." if len(lost) > 5 else ""))
    return [by_name[n] for n in names]
