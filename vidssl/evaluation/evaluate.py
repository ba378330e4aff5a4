"""DAVIS semi-supervised evaluation: the numbers and CSVs of davisvideochallenge/davis2017-evaluation.

Protocol (``evaluation_method.py --task semi-supervised`` at ac7c43f):

* GT: ``Annotations/<resolution>/<seq>/*.png`` read by :func:`vidssl.data.davis.load_annotations` (2017: void 255
  set to 0, ``K`` = the first frame's largest id; 2016: one object, 0/255 -> 0/1).
* Scored frames: 1 .. T-2 (the first and the last frame are dropped); the void mask is NOT used (void pixels count as
  background, as upstream passes ``void=None`` in the semi-supervised task).
* Results: ``<results_dir>/<seq>/<stem>.png`` for every scored GT stem, read as object ids (palette indices of mode
  ``P`` PNGs; grey values of mode ``L`` PNGs). 2016: ``L`` PNGs may be 0/255 (> 127 = object) or 0/1.
  ``K_res > K`` is an error naming the file (upstream exits); ``K_res < K`` leaves the missing objects empty (upstream
  zero-pads). A missing file, an RGB PNG, or a size differing from the GT are errors naming the file.
* Per object ``k`` (key ``<seq>_<k>``): per-frame J and F, then Mean/Recall/Decay
  (:func:`vidssl.evaluation.metrics.db_statistics`). Global numbers are plain means over *objects* (multi-object
  sequences weigh more); ``J&F-Mean = (J-Mean + F-Mean) / 2``.
* CSVs (:func:`write_csvs`): ``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv``, ``%.3f``,
  written atomically and always recomputed (upstream silently reuses existing CSVs; vidssl never reads them back).
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from vidssl.data.davis import DavisLayoutError, load_annotations, read_sequence_list
from vidssl.evaluation import metrics, metrics_reference
from vidssl.io.atomic import atomic_write_text
from vidssl.io.images import read_label_png

#: Column order of ``global_results-<split>.csv``.
GLOBAL_COLUMNS: tuple[str, ...] = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
#: Column order of ``per-sequence_results-<split>.csv`` (one row per object).
PER_SEQUENCE_COLUMNS: tuple[str, ...] = ("Sequence", "J-Mean", "F-Mean")


class ResultsError(ValueError):
    """A result PNG is unusable (wrong mode, size or object ids); the message names the file."""


@dataclass
class EvalResult:
    """Scores of one evaluation.

    Attributes:
        per_object: ``{"<seq>_<k>": {"J": (N,) float64, "F": (N,) float64, "J-Mean", "J-Recall", "J-Decay",
            "F-Mean", "F-Recall", "F-Decay": float}}`` in sequence order, objects 1..K; N = scored frames (T - 2).
        global_row: the 7 :data:`GLOBAL_COLUMNS` means over all objects.
        sequences: the sequences scored, in order.
        split, year: as passed to :func:`evaluate_results`.
        num_scored_frames: frames scored over all sequences (each counted once, not per object).
        seconds: wall time of the evaluation.
    """

    per_object: dict[str, dict[str, Any]]
    global_row: dict[str, float]
    sequences: list[str]
    split: str
    year: str
    num_scored_frames: int
    seconds: float = 0.0

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (arrays become lists, NaN becomes ``None``)."""
        def clean(v):
            if isinstance(v, np.ndarray):
                return [clean(float(x)) for x in v]
            if isinstance(v, float) and math.isnan(v):
                return None
            return v

        return {
            "split": self.split, "year": self.year, "sequences": list(self.sequences),
            "num_objects": len(self.per_object), "num_scored_frames": self.num_scored_frames,
            "seconds": self.seconds,
            "global": {k: clean(v) for k, v in self.global_row.items()},
            "per_object": {name: {k: clean(v) for k, v in rec.items()} for name, rec in self.per_object.items()},
        }


def _read_result_png(path: Path, *, year: str) -> np.ndarray:
    """Object ids ``(H, W) uint8`` of one result PNG under the year's convention."""
    try:
        raw, palette = read_label_png(path)
    except ValueError as exc:
        hint = ("; result PNGs must store object ids (indexed 'P' PNGs as written by vidssl.io.write_label_png): "
                "convert colour (RGB) masks to palette indices first") if "mode" in str(exc) else ""
        raise ResultsError(f"{exc}{hint}") from exc
    if year == "2016" and palette is None:
        odd = (raw > 1) & (raw <= 127)
        if odd.any():
            raise ResultsError(f"{path}: greyscale result for DAVIS-2016 must be 0/255 or 0/1, found value "
                               f"{int(raw[odd][0])}")
        return ((raw > 127) | (raw == 1)).astype(np.uint8)
    return raw


def read_result_masks(results_dir: str | os.PathLike, seq: str, stems: list[str], *, size: tuple[int, int],
                      num_objects: int, year: str = "2017") -> np.ndarray:
    """Read ``<results_dir>/<seq>/<stem>.png`` for every stem as object ids.

    Args:
        results_dir: folder with one sub-folder of PNGs per sequence.
        seq: sequence name.
        stems: the GT file stems to read (the scored frames).
        size: ``(H, W)`` every PNG must have (the GT size).
        num_objects: K of the GT; ids above it are an error (upstream exits).
        year: ``"2017"`` or ``"2016"`` (0/255 greyscale results accepted).

    Returns:
        ``(len(stems), H, W) uint8`` ids.

    Raises:
        FileNotFoundError: the sequence folder or some PNGs are missing (all missing names are listed).
        ResultsError: unreadable/RGB PNG, wrong size, or an id above ``num_objects``.
    """
    folder = Path(results_dir) / seq
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} for sequence {seq!r} does not exist")
    paths = [folder / f"{stem}.png" for stem in stems]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: {len(missing)} result PNG(s) missing, first {folder / missing[0]} "
            f"(missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}); results must be named like "
            f"the ground truth annotations")
    h, w = size
    out = np.empty((len(paths), h, w), dtype=np.uint8)
    for t, p in enumerate(paths):
        ids = _read_result_png(p, year=year)
        if ids.shape != (h, w):
            raise ResultsError(f"{p}: result is {ids.shape[1]}x{ids.shape[0]} (WxH) but the ground truth is {w}x{h}")
        top = int(ids.max(initial=0))
        if top > num_objects:
            hint = " (a 0/255 mask? pass year '2016' for single-object DAVIS-2016 scoring)" if top == 255 else ""
            raise ResultsError(f"{p}: object id {top} in the result, but sequence {seq!r} has only {num_objects} "
                               f"object(s) in its first ground-truth frame{hint}")
        out[t] = ids
    return out


def score_sequence(gt_ids: np.ndarray, pred_ids: np.ndarray, *, num_objects: int,
                   implementation: Literal["vectorised", "reference"] = "vectorised",
                   bound_th: float = metrics.BOUND_TH) -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-frame J and F of one sequence (no void, as in the semi-supervised task).

    Args:
        gt_ids: ``(N, H, W)`` ground-truth ids of the scored frames.
        pred_ids: ``(N, H, W)`` predicted ids of the same frames.
        num_objects: K; object ``k`` is ``ids == k`` for k = 1..K.
        implementation: ``"vectorised"`` (:mod:`vidssl.evaluation.metrics`) or ``"reference"`` (the per-frame
            :mod:`vidssl.evaluation.metrics_reference`, for cross-checks and benchmarks).
        bound_th: boundary tolerance (:func:`vidssl.evaluation.metrics.bound_pix`).

    Returns:
        ``(J, F)``, each ``(K, N)`` float64.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"gt_ids {gt_ids.shape} and pred_ids {pred_ids.shape} must have the same (N, H, W) shape")
    if implementation == "vectorised":
        mod = metrics
    elif implementation == "reference":
        mod = metrics_reference
    else:
        raise ValueError(f"implementation: expected 'vectorised' or 'reference', got {implementation!r}")
    n = gt_ids.shape[0]
    j = np.zeros((num_objects, n), dtype=np.float64)
    f = np.zeros((num_objects, n), dtype=np.float64)
    g = np.empty(gt_ids.shape, dtype=bool)  # per-object masks, buffers reused across objects
    p = np.empty(pred_ids.shape, dtype=bool)
    for k in range(1, num_objects + 1):
        np.equal(gt_ids, k, out=g)
        np.equal(pred_ids, k, out=p)
        j[k - 1] = mod.db_eval_iou(g, p)
        f[k - 1] = mod.db_eval_boundary(g, p, bound_th=bound_th)
    return j, f


def _global_row(per_object: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Plain means over objects, in :data:`GLOBAL_COLUMNS` order."""
    cols = {c: [rec[c] for rec in per_object.values()] for c in GLOBAL_COLUMNS[1:]}
    row = {c: float(np.mean(v)) for c, v in cols.items()}
    return {"J&F-Mean": float((np.mean(cols["J-Mean"]) + np.mean(cols["F-Mean"])) / 2.0), **row}


def evaluate_results(davis_root: str | os.PathLike, results_dir: str | os.PathLike, *, year: str = "2017",
                     split: str = "val", sequences: list[str] | None = None, resolution: str = "480p",
                     progress: bool = True,
                     implementation: Literal["vectorised", "reference"] = "vectorised") -> EvalResult:
    """Score a results folder against DAVIS ground truth with the official semi-supervised protocol (module doc).

    Args:
        davis_root: DAVIS root (``Annotations/``, ``JPEGImages/``, ``ImageSets/``).
        results_dir: one sub-folder of id PNGs per sequence, named like the GT.
        year: ``"2017"`` (multi-object, palette ids) or ``"2016"`` (single object, 0/255 masks).
        split: sequence list ``ImageSets/<year>/<split>.txt`` (ignored when ``sequences`` is given).
        sequences: explicit sequence names (validated against the DAVIS folders).
        resolution: DAVIS resolution folder.
        progress: show a tqdm bar over sequences (stderr).
        implementation: metric implementation (:func:`score_sequence`); both give identical numbers.

    Returns:
        :class:`EvalResult`.

    Raises:
        FileNotFoundError / ValueError subclasses naming the file or field at fault (see :func:`read_result_masks`
        and :func:`vidssl.data.davis.load_annotations`).
    """
    start = time.perf_counter()
    if not Path(results_dir).is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist")
    names = read_sequence_list(davis_root, year=year, split=split, sequences=sequences, resolution=resolution)
    per_object: dict[str, dict[str, Any]] = {}
    scored = 0
    for seq in tqdm(names, desc="evaluate", unit="seq", disable=not progress):
        gt = load_annotations(davis_root, seq, year=year, resolution=resolution)
        if gt.num_frames < 3:
            raise DavisLayoutError(f"{gt.paths[0].parent}: {gt.num_frames} annotated frame(s); the semi-supervised "
                                   f"protocol scores frames 1..T-2 and needs at least 3")
        stems = gt.stems[1:-1]
        pred = read_result_masks(results_dir, seq, stems, size=gt.size, num_objects=gt.num_objects, year=year)
        j, f = score_sequence(gt.ids[1:-1], pred, num_objects=gt.num_objects, implementation=implementation)
        scored += len(stems)
        for k in range(gt.num_objects):
            jm, jr, jd = metrics.db_statistics(j[k])
            fm, fr, fd = metrics.db_statistics(f[k])
            per_object[f"{seq}_{k + 1}"] = {"J": j[k], "F": f[k], "J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
                                            "F-Mean": fm, "F-Recall": fr, "F-Decay": fd}
    if not per_object:
        raise ValueError(f"no objects to score in {len(names)} sequence(s) of {davis_root}: every first "
                         f"annotation frame is empty")
    return EvalResult(per_object=per_object, global_row=_global_row(per_object), sequences=names, split=split,
                      year=str(year), num_scored_frames=scored, seconds=time.perf_counter() - start)


def _fmt(v: float) -> str:
    """``%.3f`` like pandas ``to_csv(float_format="%.3f")`` (NaN -> empty field)."""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else "%.3f" % v


def _csv_text(header: tuple[str, ...], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csvs(result: EvalResult, out_dir: str | os.PathLike, split: str | None = None) -> tuple[Path, Path]:
    """Write ``global_results-<split>.csv`` and ``per-sequence_results-<split>.csv`` into ``out_dir`` atomically.

    Same headers, row order (objects ``<seq>_<k>``) and ``%.3f`` formatting as the official script. Existing files
    are replaced, never read.

    Returns:
        ``(global_csv, per_sequence_csv)`` paths.
    """
    split = result.split if split is None else split
    out = Path(out_dir)
    g_path = out / f"global_results-{split}.csv"
    s_path = out / f"per-sequence_results-{split}.csv"
    atomic_write_text(g_path, _csv_text(GLOBAL_COLUMNS, [[_fmt(result.global_row[c]) for c in GLOBAL_COLUMNS]]))
    rows = [[name, _fmt(rec["J-Mean"]), _fmt(rec["F-Mean"])] for name, rec in result.per_object.items()]
    atomic_write_text(s_path, _csv_text(PER_SEQUENCE_COLUMNS, rows))
    return g_path, s_path


def _table(header: tuple[str, ...], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [" ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += [" ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_table(result: EvalResult, *, decimals: int = 3) -> str:
    """The printed summary of the official script: the global table, then one row per object."""
    def fmt(v: float) -> str:
        return "nan" if math.isnan(v) else f"{v:.{decimals}f}"

    g = _table(GLOBAL_COLUMNS, [[fmt(result.global_row[c]) for c in GLOBAL_COLUMNS]])
    s = _table(PER_SEQUENCE_COLUMNS,
               [[name, fmt(rec["J-Mean"]), fmt(rec["F-Mean"])] for name, rec in result.per_object.items()])
    return (f"--------------------------- Global results for {result.split} ---------------------------\n{g}\n\n"
            f"---------- Per sequence results for {result.split} ----------\n{s}")
