"""Reading the DAVIS layout: sequence lists, frame/annotation paths and annotation masks.

Layout (DAVIS-2016 and DAVIS-2017)::

    <root>/JPEGImages/<resolution>/<seq>/00000.jpg ...
    <root>/Annotations/<resolution>/<seq>/00000.png ...
    <root>/ImageSets/2017/<split>.txt          one sequence name per line (DAVIS-2017)
    <root>/ImageSets/2016/<split>.txt          one sequence name per line (vidssl sample, later 2016 copies)
    <root>/ImageSets/480p/<split>.txt          original DAVIS-2016: "/JPEGImages/480p/<seq>/00000.jpg /Annotations/..."

Annotation conventions (the official davis2017-evaluation rules):

* ``year="2017"``: mode ``P`` PNGs of palette indices 0..K (0 = background); index 255 is *void*: it goes to the
  ``void`` mask and is set to 0 in ``ids``. The number of objects is ``K = max(ids of the FIRST frame)``; ids above K
  in later frames are ignored by the official scorer (they are reported in ``DavisMasks.unexpected_ids`` and warned
  about, or rejected with ``strict=True``).
* ``year="2016"``: one merged foreground per sequence (``num_objects = 1``), mode ``L`` PNGs with values {0, 255}:
  id 1 where the value is > 127, no void. Mode ``P`` files with indices {0, 1} are accepted as already converted.

Every error names the file or folder involved and what was expected.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vidssl.io.images import read_label_png

#: Frame file suffixes accepted under ``JPEGImages/<resolution>/<seq>/``.
FRAME_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
#: Years understood by the mask loader.
YEARS: tuple[str, ...] = ("2016", "2017")
#: Palette index DAVIS-2017 uses for void (ignored) pixels.
VOID_ID: int = 255


class DavisLayoutError(ValueError):
    """A DAVIS file exists but its content does not match the expected layout or conventions."""


@dataclass
class DavisMasks:
    """The annotation masks of one sequence.

    Attributes:
        ids: ``(T, H, W) uint8`` object ids 0..K (void pixels already set to 0).
        void: ``(T, H, W) bool`` void pixels (DAVIS-2017 palette index 255; all False for 2016).
        num_objects: K, the largest id in the FIRST frame (the official 2017 rule); always 1 for ``year="2016"``.
        palette: the first PNG's palette (768 ints) for mode ``P`` files, ``None`` for mode ``L`` (2016) files.
        paths: the annotation files read, in frame order.
        unexpected_ids: ``{file name: ids > K found in it}`` for later frames holding objects absent from frame 0.
    """

    ids: np.ndarray
    void: np.ndarray
    num_objects: int
    palette: list[int] | None
    paths: list[Path]
    unexpected_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.ids.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the masks."""
        return int(self.ids.shape[1]), int(self.ids.shape[2])

    @property
    def stems(self) -> list[str]:
        """File names without suffix (``00000``, ...), the names result PNGs must carry."""
        return [p.stem for p in self.paths]


def _check_year(year: str) -> str:
    year = str(year)
    if year not in YEARS:
        raise ValueError(f"year: expected one of {list(YEARS)}, got {year!r}")
    return year


def _existing_imagesets(root: Path) -> list[str]:
    base = root / "ImageSets"
    if not base.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in base.glob("*/*.txt"))


def _parse_sequence_list(path: Path) -> list[str]:
    """Names from a plain list (``bear``) or the DAVIS-2016 pair format (``/JPEGImages/480p/bear/00000.jpg ...``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DavisLayoutError(f"{path}: cannot read the sequence list ({exc})") from exc
    names: list[str] = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        first = tokens[0]
        if "/" in first or "\\" in first:
            name = Path(first.replace("\\", "/")).parent.name
            if not name:
                raise DavisLayoutError(f"{path}:{lineno}: cannot find a sequence folder in {first!r}")
        elif len(tokens) == 1:
            name = first
        else:
            raise DavisLayoutError(f"{path}:{lineno}: expected one sequence name or a frame/annotation path pair, "
                                   f"got {line.strip()!r}")
        if name not in seen:
            seen.add(name)
            names.append(name)
    if not names:
        raise DavisLayoutError(f"{path}: the sequence list is empty")
    return names


def _missing_sequences(root: Path, names: list[str], resolution: str) -> list[str]:
    return [n for n in names
            if not (root / "Annotations" / resolution / n).is_dir()
            and not (root / "JPEGImages" / resolution / n).is_dir()]


def read_sequence_list(root: str | os.PathLike, *, year: str = "2017", split: str = "val",
                       sequences: list[str] | None = None, resolution: str = "480p") -> list[str]:
    """The sequences to use, in order.

    ``sequences`` given: those names (duplicates dropped), each checked to have an ``Annotations/<resolution>/<seq>``
    or ``JPEGImages/<resolution>/<seq>`` folder. Otherwise the names listed in ``ImageSets/<year>/<split>.txt``
    (one per line); for ``year="2016"`` the original release's ``ImageSets/<resolution>/<split>.txt`` pair-line
    format is the fallback.

    Raises ``FileNotFoundError`` naming the root, the list file tried (and listing the ImageSets files that exist),
    or the sequences without folders.
    """
    root = Path(root)
    year = _check_year(year)
    if not root.is_dir():
        raise FileNotFoundError(f"DAVIS root {root} does not exist or is not a folder")
    if sequences is not None:
        if isinstance(sequences, str):
            sequences = [sequences]
        names = list(dict.fromkeys(str(s) for s in sequences))
        if not names:
            raise ValueError("sequences: the explicit sequence list is empty")
        source = "sequences"
    else:
        candidates = [root / "ImageSets" / year / f"{split}.txt"]
        if year == "2016":
            candidates.append(root / "ImageSets" / resolution / f"{split}.txt")
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            existing = _existing_imagesets(root)
            tried = " or ".join(str(c) for c in candidates)
            raise FileNotFoundError(
                f"sequence list for split {split!r} (year {year}) not found: tried {tried}; ImageSets files present: "
                f"{', '.join(existing) if existing else 'none'} (pick one with split/year or pass sequences=...)")
        names = _parse_sequence_list(found)
        source = str(found)
    missing = _missing_sequences(root, names, resolution)
    if missing:
        raise FileNotFoundError(
            f"{source}: {len(missing)} sequence(s) have no folder under {root / 'Annotations' / resolution} or "
            f"{root / 'JPEGImages' / resolution}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return names


def _listed(folder: Path, suffixes: tuple[str, ...], what: str) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                   and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{what} folder {folder} holds no {'/'.join(suffixes)} files")
    return files


def frame_paths(root: str | os.PathLike, seq: str, *, resolution: str = "480p") -> list[Path]:
    """Sorted frame files ``JPEGImages/<resolution>/<seq>/*.jpg|*.png``.

    Raises ``FileNotFoundError`` when the folder is missing or holds no frames.
    """
    return _listed(Path(root) / "JPEGImages" / resolution / seq, FRAME_SUFFIXES, "frame")


def annotation_paths(root: str | os.PathLike, seq: str, *, resolution: str = "480p") -> list[Path]:
    """Sorted annotation files ``Annotations/<resolution>/<seq>/*.png``.

    Raises ``FileNotFoundError`` when the folder is missing or holds no PNGs.
    """
    return _listed(Path(root) / "Annotations" / resolution / seq, (".png",), "annotation")


def _frame_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the image header (no decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except OSError as exc:
        raise DavisLayoutError(f"{path}: cannot read the frame ({exc})") from exc
    return h, w


def _to_ids(raw: np.ndarray, palette: list[int] | None, *, year: str,
            path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Raw PNG values ``(H, W)`` -> ``(ids uint8 (H, W), void bool (H, W))`` under the year's convention."""
    if year == "2016":
        if palette is None:  # mode L: 0/255 grey masks
            return (raw > 127).astype(np.uint8), np.zeros(raw.shape, dtype=bool)
        bad = np.unique(raw[raw > 1])
        if bad.size:
            raise DavisLayoutError(
                f"{path}: year 2016 expects one object (mode 'L' 0/255 or mode 'P' 0/1), found palette indices "
                f"{bad[:8].tolist()}; multi-object DAVIS-2017 masks need year '2017' (--year 2017)")
        return raw.astype(np.uint8), np.zeros(raw.shape, dtype=bool)
    void = raw == VOID_ID
    ids = np.where(void, 0, raw).astype(np.uint8)
    return ids, void


def load_annotations(root: str | os.PathLike, seq: str, *, year: str = "2017", resolution: str = "480p",
                     first_only: bool = False, strict: bool = False) -> DavisMasks:
    """Read the annotation masks of ``seq`` under the ``year``'s conventions (module docstring).

    Args:
        root: DAVIS root folder.
        seq: sequence name.
        year: ``"2017"`` (palette ids, 255 = void) or ``"2016"`` (0/255 greyscale, one object).
        resolution: the layout's resolution folder (``480p``, ``Full-Resolution``).
        first_only: read only the first annotation (test-dev style trees annotate only frame 0); the
            annotation/frame count check is skipped then.
        strict: raise instead of warning when a later frame holds ids above the first frame's ``num_objects``.

    Returns:
        :class:`DavisMasks` with ``ids``/``void`` of shape ``(T, H, W)`` (``T = 1`` with ``first_only``).

    Raises:
        FileNotFoundError: missing annotation folder / files.
        DavisLayoutError (a ValueError): unreadable PNG; annotation count differing from the frame count (when the
            frame folder exists); a mask size differing from the first frame's or from the first JPEG's; 0/255
            greyscale masks under ``year="2017"``; multi-object masks under ``year="2016"``; with ``strict``,
            ids beyond the first frame's objects.
    """
    year = _check_year(year)
    root = Path(root)
    paths = annotation_paths(root, seq, resolution=resolution)
    frame_dir = root / "JPEGImages" / resolution / seq
    frames = frame_paths(root, seq, resolution=resolution) if frame_dir.is_dir() else []
    if frames and not first_only and len(frames) != len(paths):
        raise DavisLayoutError(
            f"{paths[0].parent}: {len(paths)} annotation PNGs but {len(frames)} frames in {frame_dir}; the "
            f"evaluation needs one annotation per frame")
    if first_only:
        paths = paths[:1]

    raw0, palette = read_label_png(paths[0])
    h, w = raw0.shape
    if frames:
        fh, fw = _frame_size(frames[0])
        if (fh, fw) != (h, w):
            raise DavisLayoutError(f"{paths[0]}: mask is {w}x{h} (WxH) but the frame {frames[0]} is {fw}x{fh}")
    ids = np.empty((len(paths), h, w), dtype=np.uint8)
    void = np.empty((len(paths), h, w), dtype=bool)
    ids[0], void[0] = _to_ids(raw0, palette, year=year, path=paths[0])
    # 2017: K = the first frame's largest id (official rule); 2016: always one (merged) object
    num_objects = 1 if year == "2016" else int(ids[0].max(initial=0))
    unexpected: dict[str, list[int]] = {}
    for t, p in enumerate(paths[1:], start=1):
        raw, pal = read_label_png(p)
        if raw.shape != (h, w):
            raise DavisLayoutError(f"{p}: mask is {raw.shape[1]}x{raw.shape[0]} (WxH) but {paths[0].name} of the "
                                   f"same sequence is {w}x{h}")
        ids[t], void[t] = _to_ids(raw, pal, year=year, path=p)
        if int(ids[t].max(initial=0)) > num_objects:
            extra = np.unique(ids[t][ids[t] > num_objects]).tolist()
            unexpected[p.name] = extra
    if year == "2017" and palette is None and void.any() and not ids.any():
        first_void = paths[int(np.flatnonzero(void.any(axis=(1, 2)))[0])]
        raise DavisLayoutError(
            f"{first_void}: greyscale (mode 'L') mask with values 0/255 only: a DAVIS-2016 style mask, which the 2017 "
            f"rules read as void with zero objects; pass year '2016' (--year 2016)")
    if unexpected:
        first_name = next(iter(unexpected))
        msg = (f"{paths[0].parent}: {len(unexpected)} annotation(s) hold object ids beyond the {num_objects} "
               f"object(s) of the first frame {paths[0].name} (first: {first_name} has {unexpected[first_name]}); "
               f"the official scorer ignores them")
        if strict:
            raise DavisLayoutError(msg)
        warnings.warn(msg, stacklevel=2)
    return DavisMasks(ids=ids, void=void, num_objects=num_objects, palette=palette, paths=list(paths),
                      unexpected_ids=unexpected)
