"""Command line: ``vidssl pretrain | propagate | evaluate | probe | data synth | data index | info``.

Every subcommand is a thin layer over importable functions; errors in user input end with one line naming the
file or key (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _repo_configs() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def find_config(name: str) -> Path:
    """A recipe path, or a recipe name looked up in the repository's ``configs/`` folder."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (_repo_configs() / name, _repo_configs() / f"{name}.yaml"):
        if cand.is_file():
            return cand
    avail = sorted(q.stem for q in _repo_configs().glob("*.yaml")) if _repo_configs().is_dir() else []
    raise UserError(f"{name}: config not found (a YAML path, or one of: {', '.join(avail) or 'none'})")


DEMO_CONFIG = "mast_demo"


# --------------------------------------------------------------------------------------------------- pretrain
def _config_help() -> str:
    from vidssl.config import describe
    from vidssl.engine.config import RunConfig
    from vidssl.engine.objectives import objective_class, objective_names

    rows = [r for r in describe(RunConfig) if not r[0].startswith(("objectives", "streams"))]
    lines = ["config keys (--set KEY=VALUE; lists as [a, b]):"]
    lines += [f"  {k} ({t}; default {json.dumps(d)})" for k, t, d in rows]
    lines.append("  objectives.<i>.name / .weight / .<param> (objectives is a list; i = 0, 1, ...)")
    lines.append("  streams.<name>.batch_size / .weight / .data.<key> (further data streams, keys as data.*)")
    for name in objective_names():
        lines.append(f"objective {name!r} parameters:")
        lines += [f"  {k} ({t}; default {json.dumps(d)})" for k, t, d in describe(objective_class(name).Params)]
    return "\n".join(lines)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from vidssl.engine import resolve_run_config, train
    from vidssl.evaluation.probe import monitors_from_config

    config = find_config(args.config or DEMO_CONFIG)
    cfg = resolve_run_config(config, args.set, plugins=args.plugin)
    if args.print_config:
        from vidssl.config import to_dict

        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    monitors = monitors_from_config(cfg)  # the monitor.probe section (its frame folders are listed here)
    out = Path(args.out or Path("runs") / cfg.name)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    print(f"vidssl pretrain: recipe {config} -> {out}", flush=True)
    t0 = time.time()
    summary = train(cfg, out, resume=args.resume, progress=progress, monitors=monitors)
    wall = time.time() - t0
    logs = summary["logs"]
    print(f"trained {summary['step']} steps in {wall:.1f} s; final loss {logs.get('loss', float('nan')):.4f}; "
          f"checkpoint {summary['checkpoint']}", flush=True)
    if cfg.eval.enabled and summary["checkpoint"] and _is_main_process():
        from vidssl.evaluation.demo import evaluate_run

        evaluate_run(cfg, out, checkpoint=summary["checkpoint"], progress=progress)
    return 0


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


# -------------------------------------------------------------------------------------------------- propagate
def cmd_propagate(args: argparse.Namespace) -> int:
    from vidssl.config import apply_overrides, from_dict, to_dict
    from vidssl.evaluation.sources import build_extractor
    from vidssl.evaluation.presets import PropagationConfig, get_preset
    from vidssl.evaluation.runner import propagate_davis

    from vidssl.engine.objectives import load_plugins

    load_plugins(args.plugin, where="--plugin")
    sources = [x for x in (args.checkpoint, args.encoder, args.weights) if x]
    if args.checkpoint and args.encoder:
        raise UserError("--checkpoint and --encoder are exclusive: give one feature source")
    if not sources:
        raise UserError("give a feature source: --checkpoint RUN, --encoder NAME or --weights FILE")
    preset = get_preset(args.preset)
    sets = []
    for s in args.set:
        if not s.startswith("propagate."):
            raise UserError(f"--set {s}: propagation keys are written propagate.<key>=value")
        sets.append(s[len("propagate."):])
    prop_cfg = from_dict(PropagationConfig, apply_overrides(to_dict(preset), sets), prefix="propagate")
    layer_set = any(s.split("=", 1)[0].strip() == "layer" for s in sets)
    extractor, info, prop_cfg = build_extractor(checkpoint=args.checkpoint, encoder=args.encoder,
                                                weights=args.weights, seed=args.seed, preset=prop_cfg,
                                                device=args.device, layer=prop_cfg.layer if layer_set else None)
    info["command"] = "vidssl " + " ".join(sys.argv[1:])
    out = Path(args.out)
    result = propagate_davis(davis_root=args.davis_root, out_dir=out, extractor=extractor, preset=prop_cfg,
                             year=args.year, split=args.split,
                             sequences=args.sequences.split(",") if args.sequences else None,
                             force=args.force, viz=args.viz, device=args.device, progress=_progress(args),
                             evaluate=not args.no_eval, extra_info=info)
    if not args.no_eval:
        g = result["global"]
        print(f"J&F-Mean {g['J&F-Mean']:.4f}  J-Mean {g['J-Mean']:.4f}  F-Mean {g['F-Mean']:.4f}  "
              f"-> {out / 'metrics.json'}")
    return 0


def _progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() if getattr(args, "progress", None) is None else args.progress


# --------------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from vidssl.evaluation.evaluate import evaluate_results, format_table, write_csvs

    t0 = time.time()
    result = evaluate_results(args.davis_root, args.results, year=args.year, split=args.split,
                              sequences=args.sequences.split(",") if args.sequences else None,
                              progress=_progress(args))
    write_csvs(result, args.results, args.split)
    print(format_table(result))
    print(f"evaluated in {time.time() - t0:.2f} s; CSVs written to {args.results}")
    return 0


# ------------------------------------------------------------------------------------------------------ probe
def cmd_probe(args: argparse.Namespace) -> int:
    from vidssl.data import labelled
    from vidssl.engine.objectives import load_plugins
    from vidssl.evaluation.probe import default_protocols, format_summary, run_probe

    load_plugins(args.plugin, where="--plugin")
    if bool(args.checkpoint) == bool(args.encoder):
        raise UserError("give one feature source: --checkpoint RUN or --encoder NAME")
    inputs = [x for x in (args.images, args.videos, args.frames) if x]
    if len(inputs) != 1:
        raise UserError("give one input: --images DIR, --videos DIR or --frames ROOT")
    if args.splits and not args.videos:
        raise UserError("--splits goes with --videos (UCF101/HMDB51 split files)")
    if args.sequences and not args.frames:
        raise UserError("--sequences goes with --frames")
    if args.test_sequences and not args.frames:
        raise UserError("--test-sequences goes with --frames")
    try:
        seeds = [int(s) for s in args.seed.split(",")]
    except ValueError as exc:
        raise UserError(f"--seed: expected comma-separated integers, got {args.seed!r}") from exc
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()] if args.protocols else None
    if args.test_sequences and protocols and set(protocols) - {"arrow"}:
        raise UserError(f"--protocols {args.protocols}: with --test-sequences train and test share no class; only "
                        "arrow applies")
    out = Path(args.out)
    clips = {"clip_len": args.clip_len, "stride": args.stride}
    if args.clips_per_video is not None:
        clips["clips_per_video"] = args.clips_per_video
    if args.images:
        data = labelled.image_folder_set(args.images, test_fraction=args.test_fraction, seed=args.split_seed)
    elif args.videos:
        data = labelled.video_folder_set(args.videos, splits=args.splits, split_id=args.split_id,
                                         test_fraction=args.test_fraction, seed=args.split_seed, **clips)
    else:
        data = labelled.frame_folders_set(args.frames, sequences=args.sequences.split(",") if args.sequences else None,
                                          test_sequences=args.test_sequences.split(",") if args.test_sequences
                                          else None, **clips)
    protocols = protocols or list(default_protocols(data))  # every protocol that applies to this split
    c = data.counts()
    print(f"vidssl probe: {data.mode} {data.root}: {len(data.classes)} classes, {c['train']['clips']} train / "
          f"{c['test']['clips']} test clips", flush=True)
    report = run_probe(data, out, checkpoint=args.checkpoint, encoder=args.encoder, seeds=seeds, layer=args.layer,
                       protocols=protocols, device=args.device, size=args.size, batch_size=args.batch_size,
                       bn_stats=args.bn_stats, force=args.force, progress=_progress(args),
                       extra={"command": "vidssl " + " ".join(sys.argv[1:])})
    print(format_summary(report))
    print(f"probed in {report['timings_s']['total']:.1f} s -> {out / 'probe.json'}")
    return 0


# ------------------------------------------------------------------------------------------------------- data
def cmd_data_synth(args: argparse.Namespace) -> int:
    from vidssl.data import synthetic as syn

    cfg = syn.SynthConfig(num_frames=args.frames, height=args.size[0], width=args.size[1], seed=args.seed)
    out = Path(args.out)
    if args.format == "davis":
        root = syn.write_davis(out, cfg, num_train=args.videos, num_val=args.val_videos)
        print(f"wrote a DAVIS-layout tree ({args.videos} train, {args.val_videos} val) to {root}")
    elif args.format == "mp4":
        paths = syn.write_videos(out, cfg, num_videos=args.videos, lossless=args.lossless)
        print(f"wrote {len(paths)} mp4 files to {out}")
    else:
        paths = syn.write_multishot(out, cfg, num_videos=args.videos, num_shots=args.shots)
        print(f"wrote {len(paths)} multi-shot mp4 files (+ cut lists) to {out}")
    return 0


def cmd_data_index(args: argparse.Namespace) -> int:
    from vidssl.data.manifest import build_manifest

    entries, failures = build_manifest(args.root, args.out, workers=args.workers, resume=not args.no_resume,
                                       progress=_progress(args))
    print(f"indexed {len(entries)} videos into {args.out}; {len(failures)} unreadable")
    for f in failures:
        print(f"  skipped {f}", file=sys.stderr)
    return 0


def cmd_data_shots(args: argparse.Namespace) -> int:
    from vidssl.config import apply_overrides, from_dict, to_dict
    from vidssl.data.shots import detector_params, manifest_with_shots, run_shots

    cls = detector_params(args.detector)
    params = from_dict(cls, apply_overrides(to_dict(cls()), args.set), prefix="detector")
    if args.manifest_out and (len(args.paths) != 1 or not args.paths[0].endswith(".jsonl")):
        raise UserError("--manifest-out needs exactly one PATH, a .jsonl manifest")
    summary = run_shots(args.paths, args.out, detector=args.detector, params=params, workers=args.workers,
                        resume=not args.no_resume, batch_size=args.batch_size, backend=args.backend,
                        device=args.device, progress=_progress(args))
    print(f"shots of {summary.processed} videos written to {args.out} ({summary.skipped} already there); "
          f"{len(summary.failures)} failed")
    for f in summary.failures:
        print(f"  failed {f['path']}: {f['error']}", file=sys.stderr)
    if args.manifest_out:
        n = manifest_with_shots(args.paths[0], summary.records, args.manifest_out)
        print(f"manifest with {n} videos' shots written to {args.manifest_out}")
    return 0


# ------------------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    import importlib
    import platform

    import torch

    import vidssl

    print(f"vidssl {vidssl.__version__}  python {platform.python_version()}  {platform.platform()}")
    for mod in ("torch", "torchvision", "av", "torchcodec", "decord", "numpy", "einops", "safetensors"):
        try:
            m = importlib.import_module(mod)
            print(f"  {mod:12s} {getattr(m, '__version__', '?')}")
        except Exception as exc:  # noqa: BLE001 - report any import failure (missing libs, ABI)
            print(f"  {mod:12s} not available ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})")
    try:
        from vidssl.io.video import available_backends

        print(f"  video decoders: {', '.join(available_backends()) or 'none'}")
        if torch.cuda.is_available():
            print(f"  NVDEC decoders (data.device=cuda): {', '.join(available_backends(device='cuda')) or 'none'}")
    except ImportError:
        pass
    print(f"  cpu threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB")
    else:
        print("  cuda: not available")
    return 0


# ----------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidssl", description="Self-supervised learning from video.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add_progress(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--progress", dest="progress", action="store_true", default=None,
                        help="show progress bars (default: when stderr is a terminal)")
        sp.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")

    sp = sub.add_parser("pretrain", help="train a representation (no arguments: the CPU demo on synthetic data)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_help())
    sp.add_argument("--config", help=f"recipe YAML path or name in configs/ (default: {DEMO_CONFIG})")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable), e.g. --set optim.lr=3e-4")
    sp.add_argument("--out", help="run folder (default runs/<name>); an existing checkpoint there is resumed")
    sp.add_argument("--resume", metavar="PATH", help="resume from this checkpoint (folder or .safetensors)")
    sp.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sp.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (it registers objectives or encoders; stored in the run config)")
    add_progress(sp)
    sp.set_defaults(func=cmd_pretrain)

    sp = sub.add_parser("propagate", help="label propagation on DAVIS, then J&F")
    src = sp.add_argument_group("feature source (one of)")
    src.add_argument("--checkpoint", metavar="PATH", help="a vidssl run folder, checkpoint folder or .safetensors")
    src.add_argument("--encoder", metavar="NAME", help="built-in: resnet18, resnet50 (random init, stride 8), "
                     "mast_resnet18 (random init, stride 4; any preset), lab (raw Lab pixels), "
                     "identity (copies the first-frame mask)")
    src.add_argument("--weights", metavar="FILE", help="a torchvision ResNet state_dict (with --encoder resnet18/50)")
    sp.add_argument("--seed", type=int, default=0, help="seed of a random-init encoder")
    sp.add_argument("--davis-root", required=True, help="DAVIS root (JPEGImages/, Annotations/, ImageSets/)")
    sp.add_argument("--year", choices=["2016", "2017"], default="2017", help="2016: binary 0/255 masks")
    sp.add_argument("--split", default="val", help="sequence list ImageSets/<year>/<split>.txt")
    sp.add_argument("--sequences", help="comma-separated subset of sequences")
    sp.add_argument("--out", required=True, help="results folder (palette PNGs, CSVs, metrics.json)")
    sp.add_argument("--preset", default="crw", help="propagation protocol: crw, dino, mast or corrflow")
    sp.add_argument("--set", action="append", default=[], metavar="propagate.KEY=VALUE",
                    help="override a propagation hyperparameter, e.g. --set propagate.topk=5")
    sp.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the preset's, cpu)")
    sp.add_argument("--no-eval", action="store_true", help="write the PNGs only, do not score")
    sp.add_argument("--viz", action="store_true", help="write overlays and one mp4 per sequence under OUT/viz")
    sp.add_argument("--force", action="store_true", help="replace an existing results folder")
    sp.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (registers encoders; a checkpoint's own plugins are imported anyway)")
    add_progress(sp)
    sp.set_defaults(func=cmd_propagate)

    sp = sub.add_parser("evaluate", help="score a results folder with the official DAVIS J&F protocol")
    sp.add_argument("--davis-root", required=True)
    sp.add_argument("--results", required=True, help="folder with <sequence>/<frame>.png palette PNGs")
    sp.add_argument("--year", choices=["2016", "2017"], default="2017")
    sp.add_argument("--split", default="val")
    sp.add_argument("--sequences", help="comma-separated subset of sequences")
    add_progress(sp)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("probe", help="frozen-feature evaluation: linear probe, kNN, retrieval, arrow of time")
    src = sp.add_argument_group("feature source (one of; the same architecture at random init is always added)")
    src.add_argument("--checkpoint", metavar="RUN", help="a vidssl run folder, checkpoint folder or .safetensors")
    src.add_argument("--encoder", metavar="NAME", help="a registered encoder at random init (resnet18, resnet50, ...)")
    sp.add_argument("--seed", default="0", help="random-init seed(s), comma-separated (default 0)")
    inp = sp.add_argument_group("labelled input (one of)")
    inp.add_argument("--images", metavar="DIR", help="one subfolder per class (or DIR/train + DIR/test)")
    inp.add_argument("--videos", metavar="DIR", help="one subfolder per class holding videos or frame folders")
    inp.add_argument("--frames", metavar="ROOT", help="frame folders, each one class; first half of the frames "
                     "train, second half test (e.g. DAVIS JPEGImages/480p)")
    sp.add_argument("--splits", metavar="DIR", help="with --videos: UCF101 (classInd.txt, trainlist0K.txt, "
                    "testlist0K.txt) or HMDB51 (<class>_test_splitK.txt) split files")
    sp.add_argument("--split-id", type=int, default=1, help="K of the split files (default 1)")
    sp.add_argument("--sequences", help="with --frames: comma-separated frame folders (default: all)")
    sp.add_argument("--test-sequences", help="with --frames: split by video instead of by time: --sequences train, "
                    "these test (train and test share no class: arrow of time only)")
    sp.add_argument("--test-fraction", type=float, default=0.3,
                    help="without split files: share of each class's images/videos used as test (default 0.3)")
    sp.add_argument("--split-seed", type=int, default=0, help="seed of that split (default 0)")
    sp.add_argument("--clip-len", type=int, default=8, help="frames per clip (default 8)")
    sp.add_argument("--stride", type=int, default=1, help="frame step inside a clip (default 1)")
    sp.add_argument("--clips-per-video", type=int, default=None,
                    help="clips per video, starts spread uniformly (default 4; --frames: 8 per half)")
    sp.add_argument("--protocols", default=None, help="comma-separated subset of linear,knn,retrieval,arrow "
                    "(default: all; with --test-sequences: arrow)")
    sp.add_argument("--layer", help="ResNet stage read (default: the model's eval_layer)")
    sp.add_argument("--size", type=int, default=224, help="frames resized (short side) and centre-cropped to this")
    sp.add_argument("--bn-stats", choices=["stored", "train"], default="stored",
                    help="BatchNorm statistics: as stored (random init: 0/1), or recomputed on the train frames for "
                    "every encoder (a fairer random-init baseline)")
    sp.add_argument("--batch-size", type=int, default=32, help="frames per encoder call")
    sp.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    sp.add_argument("--out", required=True, help="folder of the report (probe.json)")
    sp.add_argument("--force", action="store_true", help="replace an existing probe.json")
    sp.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (registers encoders; a checkpoint's own plugins are imported anyway)")
    add_progress(sp)
    sp.set_defaults(func=cmd_probe)

    dp = sub.add_parser("data", help="data tools")
    dsub = dp.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sp = dsub.add_parser("synth", help="write synthetic videos (DAVIS layout, mp4, or multi-shot mp4)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--format", choices=["davis", "mp4", "multishot"], default="davis")
    sp.add_argument("--videos", type=int, default=8, help="videos (davis: train videos)")
    sp.add_argument("--val-videos", type=int, default=4, help="davis: val videos")
    sp.add_argument("--frames", type=int, default=16)
    sp.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--shots", type=int, default=3, help="multishot: shots per video")
    sp.add_argument("--lossless", action="store_true", help="mp4: lossless H.264")
    sp.set_defaults(func=cmd_data_synth)
    sp = dsub.add_parser("index", help="scan videos or frame folders into a manifest (JSONL)")
    sp.add_argument("root")
    sp.add_argument("--out", required=True, help="manifest path (.jsonl)")
    sp.add_argument("--workers", type=int, default=2)
    sp.add_argument("--no-resume", action="store_true", help="rescan files already in the manifest")
    add_progress(sp)
    sp.set_defaults(func=cmd_data_index)
    sp = dsub.add_parser("shots", help="shot boundaries of videos (or a manifest) into a JSONL shots file")
    sp.add_argument("paths", nargs="+", metavar="PATH", help="videos, frame folders, folders of videos, manifests")
    sp.add_argument("--out", required=True, help="shots file (.jsonl); videos already in it are skipped")
    sp.add_argument("--detector", choices=["content", "pyscenedetect"], default="content",
                    help="content: vidssl's histogram detector; pyscenedetect: its ContentDetector (extra)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="detector parameter, e.g. --set k=3 (content) or --set threshold=27 (pyscenedetect)")
    sp.add_argument("--workers", type=int, default=2, help="videos processed at once (threads)")
    sp.add_argument("--batch-size", type=int, default=64, help="frames decoded per batch")
    sp.add_argument("--backend", default="auto", help="video decoder: auto, pyav, torchcodec, decord")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (NVDEC decoding, histograms on the GPU)")
    sp.add_argument("--no-resume", action="store_true", help="re-detect videos already in the output")
    sp.add_argument("--manifest-out", metavar="PATH",
                    help="with one manifest PATH: write a copy with its shots column filled (for sampler shots)")
    add_progress(sp)
    sp.set_defaults(func=cmd_data_shots)
    dp.set_defaults(func=lambda a: (dp.print_help(), EXIT_USAGE)[1])

    sp = sub.add_parser("info", help="versions, decoders and devices found")
    sp.set_defaults(func=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from vidssl.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"vidssl {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


