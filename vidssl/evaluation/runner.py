"""DAVIS label-propagation runner: frames + first-frame mask -> palette PNGs -> J&F -> metrics.json.

:func:`propagate_davis` is the library function behind ``vidssl propagate``. Per sequence it reads the frames,
computes features once per frame (batched, cached only while a frame can still be in a context), downsamples the
first-frame one-hot labels as the preset says, propagates with :func:`~vidssl.evaluation.propagation.propagate_video`,
upsamples every prediction to the original size with exact ``size=`` interpolation, takes the argmax and writes
mode-``P`` PNGs in the official layout::

    <out>/<seq>/<stem>.png          stem = the frame's file stem (00000 ...); frame 0 is the ground-truth copy
    <out>/global_results-<split>.csv, <out>/per-sequence_results-<split>.csv   (unless evaluate=False)
    <out>/metrics.json              global row, per-object numbers, every hyperparameter, versions, timings
    <out>/viz/<seq>/<stem>.jpg, <out>/viz/<seq>.mp4   with viz=True

Safety: an existing non-empty ``out`` is refused unless ``force``; everything is first written into a hidden
sibling folder and swapped in only when complete, so a crash never leaves a half-overwritten result (the old folder is
kept until the new one is in place). All input is validated before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from vidssl.config import to_dict
from vidssl.data.davis import DavisLayoutError, frame_paths, load_annotations, read_sequence_list
from vidssl.evaluation.features import FeatureExtractor, FrameFeatures
from vidssl.evaluation.presets import PropagationConfig, describe_config
from vidssl.evaluation.propagation import propagate_video, window_offsets
from vidssl.io.atomic import atomic_write_text
from vidssl.io.images import DAVIS_PALETTE, write_label_png

__all__ = [
    "ResultsExistError",
    "downsample_labels",
    "labels_to_ids",
    "propagate_davis",
    "propagate_sequence",
]


class ResultsExistError(FileExistsError):
    """The results folder already holds files and ``force`` was not given."""


@dataclasses.dataclass
class _SequenceInput:
    """What preflight learned about one sequence."""

    name: str
    frames: list[Path]
    stems: list[str]
    first_ids: np.ndarray  # (H, W) uint8
    num_objects: int
    palette: list[int] | None
    size: tuple[int, int]


def downsample_labels(ids: torch.Tensor, *, num_classes: int, size: tuple[int, int],
                      mode: str = "bilinear") -> torch.Tensor:
    """First-frame object ids ``(H, W)`` -> labels ``(K1, h, w)`` at feature resolution.

    ``bilinear`` (CRW): one-hot, then bilinear without antialiasing to the exact ``size`` (soft labels).
    ``nearest`` (DINO, VFS): PIL-style nearest on the id map (source pixel ``floor((i + 0.5) * H / h)``, torch's
    ``nearest-exact``), then one-hot.
    """
    if ids.ndim != 2:
        raise ValueError(f"ids: expected (H, W), got shape {tuple(ids.shape)}")
    ids = ids.long()
    if mode == "bilinear":
        onehot = rearrange(F.one_hot(ids, num_classes).float(), "h w k -> 1 k h w")
        return F.interpolate(onehot, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False,
                             antialias=False)[0]
    if mode == "nearest":
        small = F.interpolate(ids[None, None].float(), size=(int(size[0]), int(size[1])), mode="nearest-exact")
        return rearrange(F.one_hot(small[0, 0].long(), num_classes).float(), "h w k -> k h w")
    raise ValueError(f"label_down: {mode!r}; expected 'bilinear' or 'nearest'")


def labels_to_ids(labels: torch.Tensor, *, size: tuple[int, int], resized: tuple[int, int] | None = None,
                  norm_mask: bool = False) -> torch.Tensor:
    """Soft labels ``(K1, h, w)`` -> object ids ``(H, W)`` int64 at the original ``size``.

    Bilinear upsampling (``align_corners=False``) to ``resized`` when given (DINO: the resized input size) else to
    ``size``; optional per-channel min-max normalisation (channels whose max is > 0); argmax over channels; then, if
    ``resized`` differs from ``size``, PIL-style nearest (``nearest-exact``) to ``size``.
    """
    target = tuple(int(s) for s in (resized or size))
    up = F.interpolate(labels[None].float(), size=target, mode="bilinear", align_corners=False)[0]
    if norm_mask:
        flat = rearrange(up, "k h w -> k (h w)")
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        scaled = (up - lo[:, None, None]) / (hi - lo).clamp_min(1e-12)[:, None, None]  # constant channel -> 0
        up = torch.where((hi > 0)[:, None, None], scaled, up)
    ids = up.argmax(0)
    if target != tuple(size):
        ids = F.interpolate(ids[None, None].float(), size=tuple(size), mode="nearest-exact")[0, 0].long()
    return ids


def _check_out_dir(out_dir: Path, davis_root: Path, force: bool) -> None:
    root = davis_root.resolve()
    out = out_dir.resolve()
    protected = [root] + [root / d for d in ("JPEGImages", "Annotations", "ImageSets")]
    if out in protected or any(p in out.parents for p in protected[1:]):
        raise ValueError(f"{out_dir}: results must not be written into the dataset folders of {davis_root}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ResultsExistError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ResultsExistError(f"{out_dir}: results folder exists and is not empty; pass --force (force=True) to "
                                f"replace it (the old results are kept until the new ones are complete)")


def _preflight(davis_root: Path, names: list[str], *, year: str, resolution: str) -> list[_SequenceInput]:
    """Validate every sequence before anything is written (errors name the file)."""
    out = []
    for name in names:
        frames = frame_paths(davis_root, name, resolution=resolution)
        masks = load_annotations(davis_root, name, year=year, resolution=resolution, strict=True)
        stems = [p.stem for p in frames]
        ann_stems = masks.stems
        if stems != ann_stems:
            bad = next(i for i, (a, b) in enumerate(zip(stems, ann_stems)) if a != b)
            raise DavisLayoutError(f"{masks.paths[bad]}: annotation name does not match frame {frames[bad]}; "
                                   f"frames and annotations must share file stems")
        out.append(_SequenceInput(name=name, frames=frames, stems=stems, first_ids=masks.ids[0].copy(),
                                  num_objects=int(masks.num_objects), palette=masks.palette, size=masks.size))
        del masks
    return out


class _PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated``, else the process's peak RSS (reset when possible)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "_PeakMemory":
        self.scope = "process"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.scope = "cuda_allocated"
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM (peak RSS) of this process
                self.scope = "block"
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = self.read()

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


def propagate_sequence(seq: _SequenceInput, *, extractor: FeatureExtractor | str, cfg: PropagationConfig,
                       out_dir: Path, device: torch.device, progress: bool = False) -> dict[str, Any]:
    """Propagate one sequence and write ``<out_dir>/<seq>/<stem>.png``; returns timing/memory/size facts."""
    height, width = seq.size
    palette = seq.palette or list(DAVIS_PALETTE)
    num_classes = seq.num_objects + 1
    seq_dir = out_dir / seq.name
    seq_dir.mkdir(parents=True, exist_ok=True)
    first = torch.from_numpy(seq.first_ids.astype(np.int64))
    n = len(seq.frames)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=seq.name, unit="frame", leave=False)
    t0 = time.perf_counter()
    with _PeakMemory(device) as mem:
        write_label_png(seq_dir / f"{seq.stems[0]}.png", seq.first_ids, palette)
        facts: dict[str, Any] = {"frames": n, "size": [height, width], "objects": seq.num_objects}
        if isinstance(extractor, str):
            if extractor != "identity":
                raise ValueError(f"extractor: {extractor!r}; expected a feature extractor or 'identity'")
            for stem in seq.stems[1:]:
                write_label_png(seq_dir / f"{stem}.png", seq.first_ids, palette)
                if bar is not None:
                    bar.update(1)
        elif cfg.window is not None:  # MAST / CorrFlow: memory + ROI window softmax, hard feedback at full size
            from vidssl.evaluation.mast_propagation import propagate_sequence_window

            def write_ids(t: int, ids: torch.Tensor) -> None:
                if t > 0:
                    write_label_png(seq_dir / f"{seq.stems[t]}.png", ids.to(torch.uint8).cpu(), palette)
                if bar is not None:
                    bar.update(1)

            propagate_sequence_window(seq.frames, first, extractor=extractor, cfg=cfg.window, on_frame=write_ids,
                                      feature_batch=cfg.feature_batch)
            facts.update({"feature_size": list(extractor.feature_size(height, width)),
                          "input_size": list(extractor.input_size(height, width)),
                          "protocol": cfg.window.protocol})
        else:
            resized = extractor.input_size(height, width)
            feat_size = extractor.feature_size(height, width)
            labels0 = downsample_labels(first, num_classes=num_classes, size=feat_size, mode=cfg.label_down)
            present = torch.unique(first)
            lost = [int(k) for k in present.tolist() if k > 0 and float(labels0[k].max()) <= 0]
            if lost:
                warnings.warn(f"{seq.name}: object(s) {lost} vanish when the first-frame mask is downsampled to "
                              f"{feat_size[0]}x{feat_size[1]} ({cfg.label_down}); they cannot be propagated",
                              stacklevel=2)
            provider = FrameFeatures(extractor, seq.frames, size=seq.size, batch=cfg.feature_batch, l2=cfg.l2,
                                     device=device)
            up_to = resized if cfg.upsample_to == "resized" else None

            def write(t: int, y: torch.Tensor) -> None:
                if t > 0:
                    ids = labels_to_ids(y, size=(height, width), resized=up_to, norm_mask=cfg.norm_mask)
                    write_label_png(seq_dir / f"{seq.stems[t]}.png", ids.to(torch.uint8).cpu(), palette)
                if bar is not None:
                    bar.update(1)

            propagate_video(provider, labels0.to(device), num_frames=n, on_frame=write,
                            **cfg.propagation_kwargs())
            facts.update({"feature_size": list(feat_size), "input_size": list(resized),
                          "features_computed": provider.computed})
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    facts.update({"seconds": round(seconds, 4), "seconds_per_frame": round(seconds / max(1, n - 1), 4),
                  "peak_memory_bytes": mem.bytes, "peak_memory_scope": mem.scope})
    return facts


def _versions() -> dict[str, str]:
    import torchvision

    import vidssl

    return {"vidssl": vidssl.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``; an existing ``out_dir`` is removed only afterwards."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def propagate_davis(*, davis_root: str | os.PathLike, out_dir: str | os.PathLike,
                    extractor: FeatureExtractor | str, preset: PropagationConfig, year: str = "2017",
                    split: str = "val", sequences: list[str] | None = None, force: bool = False, viz: bool = False,
                    device: str | torch.device | None = None, progress: bool = True, evaluate: bool = True,
                    extra_info: dict | None = None, resolution: str = "480p",
                    log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Propagate the first-frame masks of DAVIS sequences, write palette PNGs, score them, write metrics.json.

    Args:
        davis_root: DAVIS root (``JPEGImages/``, ``Annotations/``, ``ImageSets/``).
        out_dir: results folder (created; refused when non-empty unless ``force``).
        extractor: a :class:`~vidssl.evaluation.features.FeatureExtractor`, or ``"identity"`` (copy the
            first-frame mask to every frame).
        preset: the propagation hyperparameters (see :mod:`vidssl.evaluation.presets`).
        year: ``"2017"`` (palette ids, 255 void) or ``"2016"`` (0/255 masks, one object; results use ids 0/1).
        split: sequence list ``ImageSets/<year>/<split>.txt`` (ignored when ``sequences`` is given).
        sequences: explicit subset of sequence names.
        force: replace an existing non-empty ``out_dir`` (the old one survives until the new one is complete).
        viz: also write overlays and one mp4 per sequence under ``out_dir/viz``.
        device: torch device for features and propagation; when given it overrides ``preset.device``.
        progress: tqdm progress bars.
        evaluate: score with the DAVIS evaluator and write its CSVs.
        extra_info: anything to record in metrics.json (e.g. the command line).
        resolution: DAVIS resolution folder.
        log: where the header and the result table are printed (``None`` = silent).

    Returns:
        the metrics.json content: ``global`` (evaluator global row, or ``None``), ``per_object``, ``hyperparameters``,
        ``extractor``, ``sequences`` (per-sequence timings and peak memory), ``versions``, ``extra_info`` ...
    """
    t_start = time.perf_counter()
    davis_root, out_dir = Path(davis_root), Path(out_dir)
    year = str(year)
    cfg = dataclasses.replace(preset, device=str(device)) if device is not None else preset
    cfg.validate("propagate")
    dev = torch.device(cfg.device)
    if isinstance(extractor, str) and extractor != "identity":
        raise ValueError(f"extractor: {extractor!r}; expected a feature extractor or 'identity'")
    _check_out_dir(out_dir, davis_root, force)
    names = read_sequence_list(davis_root, year=year, split=split, sequences=sequences, resolution=resolution)
    inputs = _preflight(davis_root, names, year=year, resolution=resolution)

    ext_info = ({"kind": "identity", "name": "identity"} if isinstance(extractor, str)
                else (extractor.info() if hasattr(extractor, "info")
                      else {"name": getattr(extractor, "name", type(extractor).__name__),
                            "stride": getattr(extractor, "stride", None)}))
    derived: dict[str, Any] = {}
    if not isinstance(extractor, str):
        derived["radius_input_px"] = (None if cfg.restrict_shape == "none" else cfg.radius * extractor.stride)
        if cfg.restrict_shape != "none":
            derived["window_candidates_per_restricted_frame"] = int(
                window_offsets(radius=cfg.radius, shape=cfg.restrict_shape).shape[0])
    if log is not None:
        log(f"vidssl propagate: {len(inputs)} sequence(s) from {davis_root} (year {year}, "
            f"{'sequences given' if sequences else 'split ' + split}) -> {out_dir}")
        log(f"features: {ext_info.get('name')}  device: {dev}  preset: {cfg.preset}")
        log("hyperparameters:")
        for line in describe_config(cfg, stride=None if isinstance(extractor, str) else extractor.stride):
            log(line)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        per_seq: dict[str, Any] = {}
        for seq in inputs:
            facts = propagate_sequence(seq, extractor=extractor, cfg=cfg, out_dir=tmp, device=dev,
                                       progress=progress)
            if viz:
                from vidssl.evaluation.viz import write_sequence_viz

                masks = [tmp / seq.name / f"{s}.png" for s in seq.stems]
                v = write_sequence_viz(seq.frames, masks, tmp / "viz", seq.name, palette=seq.palette)
                facts["viz"] = {"video": str(out_dir / "viz" / f"{seq.name}.mp4"),
                                "overlays": str(out_dir / "viz" / seq.name), "frames": v["frames"]}
            per_seq[seq.name] = facts
            if log is not None:
                log(f"  {seq.name}: {facts['frames']} frames, {facts['seconds']:.2f} s "
                    f"({facts['seconds_per_frame']:.3f} s/frame), peak memory "
                    f"{facts['peak_memory_bytes'] / 2**20:.0f} MiB")
        metrics: dict[str, Any] = {
            "davis_root": str(davis_root), "results_dir": str(out_dir), "year": year, "split": split,
            "resolution": resolution, "sequences": [s.name for s in inputs],
            "preset": cfg.preset, "hyperparameters": to_dict(cfg), "derived": derived, "extractor": ext_info,
            "global": None, "per_object": None, "per_sequence": per_seq, "versions": _versions(),
            "device": str(dev), "evaluated": bool(evaluate), "extra_info": _jsonable(extra_info or {}),
        }
        if evaluate:
            from vidssl.evaluation.evaluate import evaluate_results, format_table, write_csvs

            t_eval = time.perf_counter()
            result = evaluate_results(davis_root, tmp, year=year, split=split, sequences=[s.name for s in inputs],
                                      resolution=resolution, progress=progress)
            write_csvs(result, tmp, split)
            scores = result.to_json_dict()
            metrics["global"] = scores["global"]
            metrics["per_object"] = scores["per_object"]
            metrics["num_scored_frames"] = scores["num_scored_frames"]
            metrics["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
            if log is not None:
                log(format_table(result))
        metrics["total_seconds"] = round(time.perf_counter() - t_start, 3)
        atomic_write_text(tmp / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return metrics
