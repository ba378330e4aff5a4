"""Learning evidence of the correspondence learners' CPU recipes (issue #14): one command from recipes to the table.

For each recipe (default: ``crw_sample``, ``timecycle_sample``, ``corrflow_sample``, ``mast_sample``) and each seed
it trains the recipe with ``train.seed=<seed>`` into ``<runs-dir>/<name>_s<seed>`` -- or reuses that run when it is
finished (its ``config.json`` equals the resolved config and it holds the final step's checkpoint; a run stopped
earlier is resumed; a run of another config is refused, naming the keys that differ). It then propagates the
first-frame masks of the held-out sequences under every protocol (the method's own preset -- ``crw`` for CRW and
TimeCycle, which has no preset of its own in vidssl -- and the common ``crw`` preset) with

* the trained encoder (each seed),
* the same architecture at random init (each seed: the trained run's step-0 encoder, fed its colour space;
  :func:`vidssl.evaluation.sources.random_init_extractor`),
* Lab pixels and copying the first mask (once per protocol),

and writes the table as Markdown (``<out>/evidence.md``) and JSON (``<out>/evidence.json``): one row per learner,
protocol and feature source, J&F-Mean as mean +- sample std over the seeds. Propagation results (palette PNGs,
metrics.json) go under ``<out>/propagation/``; a result whose metrics.json records the same inputs is reused.

Examples::

    python tools/learning_evidence.py --short-side 240                       # the README table, 3 seeds
    python tools/learning_evidence.py --recipes crw_sample --seeds 0 --short-side 240
    python tools/learning_evidence.py --davis-root /data/DAVIS --year 2017 --split val --seeds 0 1 2
    python tools/learning_evidence.py --steps 2 --sequences dog-agility --presets crw --out /tmp/ev   # smoke run

``--short-side N`` is the propagation-cost lever, set the same way for every feature source: the top-k presets get
``resize=short_floor, short_side=N, size_multiple=8``, the window presets ``window.short_side=N``; 0 keeps the
official native size. ``--set [PRESET:]propagate.KEY=VALUE`` passes any other propagation key (to every selected
preset, or to the one named before the colon); a key a preset does not read is an error, never silently ignored.
Training data: each recipe's own ``data.root`` (relative to the working directory: run from the repository root),
changed for every recipe with ``--train-set data.root=PATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vidssl.config import ConfigError, to_dict
from vidssl.engine import (RunConfig, latest_checkpoint, model_config_of, resolve_run_config, run_config_from_dict,
                           train)
from vidssl.engine.checkpoint import checkpoint_dirs
from vidssl.evaluation.presets import PRESET_NAMES, PropagationConfig, preset_config
from vidssl.evaluation.runner import propagate_davis
from vidssl.evaluation.sources import build_extractor, checkpoint_extractor, random_init_extractor
from vidssl.io.atomic import atomic_write_text

#: The CPU recipes of the correspondence learners, in table order.
DEFAULT_RECIPES = ("crw_sample", "timecycle_sample", "corrflow_sample", "mast_sample")
#: The DAVIS-2016 sample sequences the CPU recipes never train on.
HELD_OUT = ("dog-agility", "rollerblade", "motorbike", "surf")
#: Baselines, in column order, with the names the table prints.
BASELINES = {"random": "random init", "lab": "Lab pixels", "identity": "copy frame 0"}
#: Method names by objective (the table's first column).
METHOD_NAMES = {"crw": "CRW", "timecycle": "TimeCycle", "corrflow": "CorrFlow", "mast": "MAST"}
#: The encoder the window protocols (mast, corrflow) read.
STRIDE4_ENCODER = "mast_resnet18"
#: ``--short-side`` for the top-k presets also floors the long side to a multiple of this (the stride-8 grid).
SIZE_MULTIPLE = 8


def default_davis_root() -> str:
    """``$VIDSSL_DAVIS_ROOT``, else the shared sample next to the repository (what the tests use)."""
    return os.environ.get("VIDSSL_DAVIS_ROOT") or str(
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "davis2016-sample")


@dataclass
class EvidenceOptions:
    """Everything one evidence run depends on (the command line, checked by :meth:`validate`)."""

    recipes: list[str] = field(default_factory=lambda: list(DEFAULT_RECIPES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    runs_dir: str = "runs/evidence"
    out: str = "runs/evidence/table"
    davis_root: str = field(default_factory=default_davis_root)
    year: str = "2016"
    split: str = "sample"
    sequences: list[str] | None = None  #: None: the held-out four with split "sample", else the whole split
    presets: list[str] = field(default_factory=lambda: ["own", "crw"])  #: "own" = the method's own preset
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    steps: int | None = None  #: train.steps override (run folders get a _steps<N> suffix)
    short_side: int = 0  #: 0 = native size (official)
    overrides: list[str] = field(default_factory=list)  #: [PRESET:]propagate.KEY=VALUE
    train_overrides: list[str] = field(default_factory=list)  #: KEY=VALUE for every recipe
    device: str = "cpu"  #: propagation device
    curve: bool = False  #: also score every stored checkpoint (trained features): the learning curve
    progress: bool = False

    def validate(self) -> None:
        """Reject bad input; every error names the option."""
        if not self.recipes:
            raise ConfigError("--recipes: at least one recipe is needed")
        if not self.seeds:
            raise ConfigError("--seeds: at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds: repeated seed in {self.seeds}")
        if any(s < 0 for s in self.seeds):
            raise ConfigError(f"--seeds: seeds must be >= 0, got {self.seeds}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps: must be >= 1, got {self.steps}")
        if self.short_side < 0:
            raise ConfigError(f"--short-side: must be >= 0 (0 = native size), got {self.short_side}")
        if str(self.year) not in ("2016", "2017"):
            raise ConfigError(f"--year: {self.year!r}; expected 2016 or 2017")
        if not Path(self.davis_root).is_dir():
            raise ConfigError(f"--davis-root: {self.davis_root} is not a folder (set it or VIDSSL_DAVIS_ROOT)")
        if self.sequences is not None and not self.sequences:
            raise ConfigError("--sequences: the list is empty")
        if not self.presets:
            raise ConfigError("--presets: at least one protocol is needed")
        for p in self.presets:
            if p != "own" and p not in PRESET_NAMES:
                raise ConfigError(f"--presets: unknown protocol {p!r}; expected own or one of {', '.join(PRESET_NAMES)}")
        for b in self.baselines:
            if b not in BASELINES:
                raise ConfigError(f"--baselines: unknown baseline {b!r}; expected some of {', '.join(BASELINES)}")
        for o in self.overrides:
            split_override(o)
        for o in self.train_overrides:
            if "=" not in o:
                raise ConfigError(f"--train-set: {o!r} is not KEY=VALUE")


def split_override(text: str) -> tuple[str | None, str]:
    """``"mast:propagate.window.radius=6"`` -> ``("mast", "propagate.window.radius=6")``; no prefix -> ``None``."""
    preset, sep, rest = text.partition(":")
    if not sep or "=" in preset:
        preset, rest = None, text
    if preset is not None and preset not in PRESET_NAMES:
        raise ConfigError(f"--set: {text!r} names unknown preset {preset!r}; expected one of {', '.join(PRESET_NAMES)}")
    key, eq, _ = rest.partition("=")
    if not eq or not key.startswith("propagate."):
        raise ConfigError(f"--set: {text!r}; expected [PRESET:]propagate.KEY=VALUE")
    return preset, rest


def own_preset(cfg: RunConfig) -> str:
    """The method's own propagation preset: the first objective that names one (mast, corrflow), else ``crw``
    (CRW's own; TimeCycle's square-resize protocol is not a vidssl preset)."""
    return next((o.name for o in cfg.objectives if o.name in PRESET_NAMES), "crw")


def protocol(name: str, opts: EvidenceOptions) -> PropagationConfig:
    """Preset ``name`` with ``--short-side`` and the ``--set`` overrides for it, checked (errors name the key)."""
    base = preset_config(name)
    values: list[str] = []
    if opts.short_side:
        if base.window is not None:
            values.append(f"propagate.window.short_side={opts.short_side}")
        else:
            values += ["propagate.resize=short_floor", f"propagate.short_side={opts.short_side}",
                       f"propagate.size_multiple={SIZE_MULTIPLE}"]
    for o in opts.overrides:
        target, text = split_override(o)
        if target in (None, name):
            values.append(text)
    cfg = preset_config(name, values)
    cfg = dataclasses.replace(cfg, device=opts.device)
    try:
        cfg.validate("propagate")
    except ConfigError as exc:
        raise ConfigError(f"--set / --short-side under preset {name!r}: {exc}") from exc
    return cfg


# ------------------------------------------------------------------------------------------------------ training
@dataclass
class TrainedRun:
    """One finished training run."""

    recipe: str
    seed: int
    run_dir: Path
    checkpoint: Path
    cfg: RunConfig
    reused: bool
    wall_s: float | None  #: training wall time (this call, or config.json -> final checkpoint of a reused run)


def run_config(recipe: str, seed: int, opts: EvidenceOptions) -> RunConfig:
    """The recipe resolved with ``train.seed``, ``--steps`` and ``--train-set``."""
    from vidssl.cli import UserError, find_config

    try:
        path = find_config(recipe)
    except UserError as exc:
        raise ConfigError(f"--recipes: {exc}") from exc
    overrides = list(opts.train_overrides) + [f"train.seed={seed}"]
    if opts.steps is not None:
        overrides.append(f"train.steps={opts.steps}")
    return resolve_run_config(path, overrides)


def run_dir_for(cfg: RunConfig, opts: EvidenceOptions) -> Path:
    suffix = f"_steps{opts.steps}" if opts.steps is not None else ""
    return Path(opts.runs_dir) / f"{cfg.name}_s{cfg.train.seed}{suffix}"


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "<root>"]


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("_", 1)[-1])


def ensure_trained(recipe: str, cfg: RunConfig, run_dir: Path, *, log: Callable[[str], None]) -> TrainedRun:
    """Reuse ``run_dir`` when it holds this config's final checkpoint, resume it when it stopped early, else train.

    A folder written by another config is refused (the error names the differing keys): resuming it would mix runs.
    """
    want = json.loads(json.dumps(to_dict(cfg)))
    stored_path = run_dir / "config.json"
    if stored_path.is_file():
        stored = json.loads(stored_path.read_text())
        try:  # resolved by today's code: keys added since the run was written take their defaults
            stored = json.loads(json.dumps(to_dict(run_config_from_dict(stored))))
        except ConfigError as exc:
            raise ConfigError(f"--runs-dir: {stored_path} no longer resolves ({exc}); move the run or pass another "
                              f"--runs-dir") from exc
        diff = _diff_keys(stored, want)
        if diff:
            raise ConfigError(f"--runs-dir: {run_dir} holds a run of another config (differs in {', '.join(diff[:6])}"
                              f"{' ...' if len(diff) > 6 else ''}); move it or pass another --runs-dir")
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is not None and not stored_path.is_file():
        raise ConfigError(f"--runs-dir: {run_dir} holds checkpoints but no config.json; move it or pass another "
                          f"--runs-dir")
    if ckpt is not None and _step_of(ckpt) == cfg.train.steps:
        model_file = ckpt / "model.safetensors"
        wall = model_file.stat().st_mtime - stored_path.stat().st_mtime if model_file.is_file() else None
        log(f"{recipe} seed {cfg.train.seed}: reusing {ckpt}")
        return TrainedRun(recipe, cfg.train.seed, run_dir, ckpt, cfg, True, wall)
    log(f"{recipe} seed {cfg.train.seed}: training {cfg.train.steps} steps -> {run_dir}"
        + (f" (resuming {ckpt})" if ckpt is not None else ""))
    summary = train(cfg, run_dir, progress=False, echo=True)  # a line per logged step
    done = latest_checkpoint(run_dir)
    if done is None or _step_of(done) != cfg.train.steps:
        raise RuntimeError(f"{run_dir}: training ended without the final checkpoint (step {cfg.train.steps})")
    return TrainedRun(recipe, cfg.train.seed, run_dir, done, cfg, False, float(summary["wall_s"]))


# --------------------------------------------------------------------------------------------------- propagation
class Scorer:
    """Propagates with one feature source under one protocol and returns the global J&F row; a result folder whose
    metrics.json records the same inputs (``extra_info.key``) is reused instead of recomputed."""

    def __init__(self, opts: EvidenceOptions, sequences: list[str] | None, log: Callable[[str], None]) -> None:
        self.opts, self.sequences, self.log = opts, sequences, log
        self.root = Path(opts.out) / "propagation"

    def __call__(self, folder: str, source: Callable[[], tuple[Any, dict, PropagationConfig]],
                 key: dict[str, Any]) -> dict[str, float]:
        out_dir = self.root / folder
        key = json.loads(json.dumps({**key, "davis_root": str(Path(self.opts.davis_root).resolve()),
                                     "year": str(self.opts.year), "split": self.opts.split,
                                     "sequences": self.sequences}))
        metrics_file = out_dir / "metrics.json"
        if metrics_file.is_file():
            old = json.loads(metrics_file.read_text())
            if old.get("extra_info", {}).get("key") == key and old.get("global"):
                self.log(f"  {folder}: reusing {metrics_file}")
                return _scores(old)
        extractor, info, used = source()
        t0 = time.perf_counter()
        res = propagate_davis(davis_root=self.opts.davis_root, out_dir=out_dir, extractor=extractor, preset=used,
                              year=str(self.opts.year), split=self.opts.split, sequences=self.sequences, force=True,
                              progress=self.opts.progress, extra_info={"key": key, "source": info}, log=None)
        row = _scores(res)
        self.log(f"  {folder}: J&F {row['J&F-Mean']:.3f} ({time.perf_counter() - t0:.0f} s)")
        return row


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics["global"][k]) for k in ("J&F-Mean", "J-Mean", "F-Mean")}


def _stats(values: list[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std}


def collect(opts: EvidenceOptions, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train or reuse every run, score every source under every protocol, return the evidence dict."""
    opts.validate()
    sequences = opts.sequences if opts.sequences is not None else (list(HELD_OUT) if opts.split == "sample"
                                                                  else None)
    # resolve every config and protocol first: bad input fails before hours of training
    plans = []
    for recipe in opts.recipes:
        cfgs = [run_config(recipe, seed, opts) for seed in opts.seeds]
        if sequences is not None and Path(cfgs[0].data.root).resolve() == Path(opts.davis_root).resolve():
            leaked = sorted(set(sequences) & set(cfgs[0].data.sequences))
            if leaked or not cfgs[0].data.sequences:
                raise ConfigError(f"--sequences: {recipe} trains on {leaked or 'every sequence'} of "
                                  f"{opts.davis_root} (data.sequences); evaluate on held-out sequences only")
        names = list(dict.fromkeys(own_preset(cfgs[0]) if p == "own" else p for p in opts.presets))
        protocols = {n: protocol(n, opts) for n in names}
        for n, prot in protocols.items():
            if prot.window is not None and cfgs[0].model.encoder != STRIDE4_ENCODER:
                raise ConfigError(f"--presets: {n} is a window protocol for the stride-4 {STRIDE4_ENCODER} encoder; "
                                  f"{recipe} trains {cfgs[0].model.encoder} (use own or crw/dino)")
        if any(cfgs[0].name == label for label, _, _ in plans):
            raise ConfigError(f"--recipes: two recipes are named {cfgs[0].name!r} (their runs and results would "
                              "share folders)")
        plans.append((cfgs[0].name, cfgs, protocols))  # the recipe's name labels its folders, a YAML path too

    score = Scorer(opts, sequences, log)
    runs: list[TrainedRun] = []
    rows: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    for recipe, cfgs, protocols in plans:
        trained = [ensure_trained(recipe, cfg, run_dir_for(cfg, opts), log=log) for cfg in cfgs]
        runs += trained
        method = " + ".join(METHOD_NAMES.get(o.name, o.name) for o in cfgs[0].objectives)
        for name, prot in protocols.items():
            proto_key = to_dict(prot)
            own = name == own_preset(cfgs[0])
            per_source: dict[str, dict[int | str, dict[str, float]]] = {"trained": {}}
            for run in trained:
                per_source["trained"][run.seed] = score(
                    f"{recipe}/{name}/trained_s{run.seed}",
                    lambda run=run: checkpoint_extractor(run.checkpoint, prot), _checkpoint_key(run.checkpoint, prot))
                for ckpt in checkpoint_dirs(run.run_dir) if opts.curve else []:
                    step = _step_of(ckpt)
                    row = per_source["trained"][run.seed] if ckpt == run.checkpoint else score(
                        f"{recipe}/{name}/curve_s{run.seed}/step_{step:08d}",
                        lambda ckpt=ckpt: checkpoint_extractor(ckpt, prot), _checkpoint_key(ckpt, prot))
                    curve.append({"recipe": recipe, "preset": name, "seed": run.seed, "step": step, **row})
            for base in opts.baselines:
                per_source[base] = {}
                if base == "random":
                    for run in trained:
                        model = model_config_of(to_dict(run.cfg))
                        per_source[base][run.seed] = score(
                            f"random/{name}/{_model_tag(model)}_s{run.seed}",
                            lambda model=model, seed=run.seed: random_init_extractor(model, seed=seed, preset=prot),
                            {"kind": "random", "model": to_dict(model), "seed": run.seed, "protocol": proto_key})
                else:
                    per_source[base]["-"] = score(
                        f"{base}/{name}", lambda base=base: build_extractor(encoder=base, preset=prot),
                        {"kind": base, "protocol": proto_key})
            for source, values in per_source.items():
                jf = [v["J&F-Mean"] for v in values.values()]
                rows.append({"recipe": recipe, "method": method, "preset": name, "own_preset": own,
                             "features": source, "seeds": [s for s in values if s != "-"],
                             "J&F": _stats(jf), "J-Mean": _stats([v["J-Mean"] for v in values.values()]),
                             "F-Mean": _stats([v["F-Mean"] for v in values.values()]),
                             "per_seed": {str(s): v for s, v in values.items()}})
    return {
        "settings": {**dataclasses.asdict(opts), "sequences": sequences,
                     "davis_root": str(Path(opts.davis_root).resolve())},
        "protocols": {f"{recipe}/{n}": to_dict(p) for recipe, _, prots in plans for n, p in prots.items()},
        "runs": [{"recipe": r.recipe, "seed": r.seed, "run_dir": str(r.run_dir), "checkpoint": str(r.checkpoint),
                  "reused": r.reused, "train_wall_s": r.wall_s, "steps": r.cfg.train.steps} for r in runs],
        "rows": rows,
        "curve": curve,
    }


def _checkpoint_key(ckpt: Path, prot: PropagationConfig) -> dict[str, Any]:
    """What a trained result depends on: the checkpoint (path, step, weights file time) and the protocol."""
    weights = ckpt / "model.safetensors"
    return {"kind": "trained", "checkpoint": str(ckpt.resolve()), "step": _step_of(ckpt),
            "weights_mtime": weights.stat().st_mtime if weights.is_file() else None, "protocol": to_dict(prot)}


def _model_tag(model: Any) -> str:
    return f"{model.encoder}.{model.out_layer}.{model.eval_layer}.{model.padding_mode}.{model.norm}.{model.colour}"


# ------------------------------------------------------------------------------------------------------- output
def _fmt(row: dict[str, Any]) -> str:
    """``mean ± std`` over seeds; one seed is marked; seed-free baselines (Lab, copy) print their one value."""
    stats = row["J&F"]
    if stats["std"] is not None:
        return f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    return f"{stats['mean']:.3f}" + (" (1 seed)" if row["seeds"] else "")


def _input_size(prot: dict[str, Any]) -> str:
    """How a protocol sizes the frames, from its recorded config: "native" or "short side N"."""
    window = prot.get("window")
    side = (window or {}).get("short_side", 0) if window else (prot["short_side"] if prot["resize"] != "native" else 0)
    return f"short side {side}" if side else "native"


def markdown(evidence: dict[str, Any]) -> str:
    """The README table: one line per learner and protocol, trained and each baseline as columns."""
    s = evidence["settings"]
    baselines = [b for b in BASELINES if b in s["baselines"]]
    seqs = ", ".join(s["sequences"]) if s["sequences"] else f"split {s['split']}"
    sets = "; propagation overrides: " + " ".join(s["overrides"]) if s["overrides"] else ""
    lines = [f"J&F-Mean on {seqs} ({s['davis_root']}, DAVIS-{s['year']}); trained and random init: mean ± std over "
             f"seeds {', '.join(str(x) for x in s['seeds'])}{sets}.", ""]
    header = ["method, recipe (steps, training wall time)", "preset", "trained"] + [BASELINES[b] for b in baselines]
    header.append("trained mean above every baseline")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    walls: dict[str, list[float]] = {}
    steps: dict[str, int] = {}
    for r in evidence["runs"]:
        steps[r["recipe"]] = r["steps"]
        if r["train_wall_s"] is not None:
            walls.setdefault(r["recipe"], []).append(r["train_wall_s"])
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in evidence["rows"]:
        by_key.setdefault((row["recipe"], row["preset"]), {"_method": row})[row["features"]] = row
    for (recipe, preset), cells in by_key.items():
        w = walls.get(recipe)
        wall = ("time unknown" if not w else f"{w[0] / 60:.1f} min" if len(w) == 1
                else f"{min(w) / 60:.1f}-{max(w) / 60:.1f} min")
        first = cells["_method"]
        tag = " (own)" if first["own_preset"] else ""
        trained = cells["trained"]
        beats = all(trained["J&F"]["mean"] > cells[b]["J&F"]["mean"] for b in baselines if b in cells)
        size = _input_size(evidence["protocols"][f"{recipe}/{preset}"])
        line = [f"{first['method']}, `{recipe}` ({steps[recipe]} steps, {wall})", f"`{preset}`{tag}, {size}",
                f"**{_fmt(trained)}**" if beats else _fmt(trained)]
        line += [_fmt(cells[b]) for b in baselines]
        line.append("yes" if beats else "no")
        lines.append("| " + " | ".join(line) + " |")
    lines += ["", "Per seed (trained): " + "; ".join(
        f"{r['recipe']}/{r['preset']}: " + ", ".join(f"s{k} {v['J&F-Mean']:.3f}" for k, v in r["per_seed"].items())
        for r in evidence["rows"] if r["features"] == "trained")]
    if evidence.get("curve"):
        lines += ["", "Learning curve (trained J&F-Mean by checkpoint step):"]
        series: dict[tuple[str, str, int], list[str]] = {}
        for c in evidence["curve"]:
            series.setdefault((c["recipe"], c["preset"], c["seed"]), []).append(f"{c['step']}: {c['J&F-Mean']:.3f}")
        lines += [f"- {recipe} / {preset} / seed {seed}: " + ", ".join(points)
                  for (recipe, preset, seed), points in series.items()]
    return "\n".join(lines) + "\n"


def write_outputs(evidence: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "evidence.md", out / "evidence.json"
    atomic_write_text(js, json.dumps(evidence, indent=2) + "\n")
    atomic_write_text(md, markdown(evidence))
    return md, js


def parse_args(argv: list[str] | None = None) -> EvidenceOptions:
    d = EvidenceOptions()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(d.recipes), help="comma-separated recipe names or YAML paths")
    ap.add_argument("--seeds", type=int, nargs="+", default=d.seeds, help="train.seed values (default 0 1 2)")
    ap.add_argument("--runs-dir", default=d.runs_dir, help="where runs are trained or found (<name>_s<seed>)")
    ap.add_argument("--out", default=d.out, help="folder of evidence.md, evidence.json and propagation/")
    ap.add_argument("--davis-root", default=d.davis_root, help="DAVIS root to propagate on (default: "
                    "$VIDSSL_DAVIS_ROOT or ../shared/data/davis2016-sample)")
    ap.add_argument("--year", default=d.year, choices=["2016", "2017"])
    ap.add_argument("--split", default=d.split, help="ImageSets/<year>/<split>.txt (default sample)")
    ap.add_argument("--sequences", help="comma-separated subset (default: the 4 held-out sample sequences with "
                    "--split sample, else the whole split)")
    ap.add_argument("--presets", default=",".join(d.presets), help="protocols: own (the method's preset) and/or "
                    f"{', '.join(PRESET_NAMES)} (default own,crw)")
    ap.add_argument("--baselines", default=",".join(d.baselines), help="some of random,lab,identity (default all)")
    ap.add_argument("--steps", type=int, help="train.steps override (tiny runs; folders get a _steps<N> suffix)")
    ap.add_argument("--short-side", type=int, default=0, help="propagate at this short side (0 = native, official)")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="[PRESET:]propagate.KEY=VALUE",
                    help="propagation override, for every preset or the named one")
    ap.add_argument("--train-set", action="append", default=[], dest="train_overrides", metavar="KEY=VALUE",
                    help="training override for every recipe (e.g. data.root=PATH)")
    ap.add_argument("--device", default=d.device, help="propagation device (cpu, cuda, cuda:N)")
    ap.add_argument("--curve", action="store_true", help="also score every stored checkpoint of each run (the "
                    "trained features' learning curve; keep them with train.keep_checkpoints)")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    a = ap.parse_args(argv)
    split_list = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    return EvidenceOptions(recipes=split_list(a.recipes), seeds=list(a.seeds), runs_dir=a.runs_dir, out=a.out,
                           davis_root=a.davis_root, year=a.year, split=a.split,
                           sequences=split_list(a.sequences) if a.sequences is not None else None,
                           presets=split_list(a.presets), baselines=split_list(a.baselines), steps=a.steps,
                           short_side=a.short_side, overrides=list(a.overrides),
                           train_overrides=list(a.train_overrides), device=a.device, curve=a.curve,
                           progress=a.progress)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
        evidence = collect(opts, log=lambda m: print(m, flush=True))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md, js = write_outputs(evidence, opts.out)
    print(md.read_text(), end="")
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
