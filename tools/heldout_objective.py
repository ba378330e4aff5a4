"""Held-out pretext quantities of a trained run vs. the same architecture at random initialisation.

Rebuilds the whole training model of a checkpoint (encoder and every objective head, via
:func:`vidssl.engine.model_from_checkpoint`), builds a loader for held-out data (the run's ``data:`` section with
``--set`` overrides, e.g. other sequences) with :func:`vidssl.data.build_loader`, and averages every logged
quantity of the objectives' ``forward`` over ``--batches`` batches in eval mode (BatchNorm running statistics,
nothing updated: no queue/bank writes, no momentum step). The baseline is the same run config built from scratch
with the trainer's seed scheme (``torch.manual_seed(train.seed)`` before building, as
:func:`vidssl.engine.train` does), evaluated on the very same batches with the same objective generator seed, so
both see identical clips and identical in-objective augmentations. Schedule counters (every buffer named ``step``,
e.g. the curriculum position of DPC or CorrFlow's schedule) are copied from the trained model into the random init
first (:func:`align_schedules`), so a curriculum scores both in the same stage with the same number of candidates.

Generic: any registered objective whose ``forward`` logs ``mi_bound_nats`` / ``top1`` (instance discrimination,
CPC, DPC, VIVI's InfoNCE ...) gets them compared; every other logged key is averaged too. Other streams the run
defines are drawn on every batch (their ``weight`` is ignored). Caveat: policies whose candidates are stored state
(the MoCo queue, a memory bank) score held-out clips against the *stored* negatives -- training keys for the trained
model, random unit vectors for the random one -- so only in-batch policies (``negatives: batch``) compare like with
like; a memory bank also needs held-out item indices below its size.

Example (held-out DAVIS sequences; prints and writes JSON)::

    python tools/heldout_objective.py --checkpoint runs/moco_sample \\
        --set data.sequences=[dog-agility,rollerblade,motorbike,surf] --batches 20 --out runs/moco_sample/heldout.json

``--static`` replaces every frame of a clip by its first frame: a correspondence pretext (CRW's walk) then only has
to tell one frame's own nodes apart, which separates "cannot match across motion" from "cannot tell nodes apart".
In eval mode a random init's BatchNorm still has its initial running statistics, so its score there says little.

Output: ``{"checkpoint", "step", "batches", "batch_size", "seed", "schedules_aligned", "data", "trained": {key: mean},
"random_init": {key: mean}}``, keys as the training log writes them (``<objective>/mi_bound_nats``, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from vidssl.config import apply_overrides, to_dict
from vidssl.data import build_loader
from vidssl.engine import build_training_model, model_from_checkpoint, resolve_run_config
from vidssl.engine.checkpoint import resolve_checkpoint
from vidssl.io.atomic import atomic_write_text


def heldout_batches(cfg, *, num_batches: int, batch_size: int, seed: int, static: bool = False
                    ) -> list[dict[str, Any]]:
    """The first ``num_batches`` batches of every stream of ``cfg`` (main first), loaders seeded with ``seed``.

    ``static``: every frame of each main-stream clip is replaced by the clip's first frame (``batch["video"]``,
    ``(B, T, C, H, W)``): no motion and no crop change, so what remains of a correspondence pretext is telling one
    frame's own nodes apart."""
    loaders = {name: build_loader(data, batch_size=batch_size, seed=seed)
               for name, data in cfg.stream_configs().items()}
    iters = {name: iter(ld) for name, ld in loaders.items()}
    out = []
    for i in range(num_batches):
        drawn = {}
        for name, it in iters.items():
            try:
                drawn[name] = next(it)
            except StopIteration:  # a short held-out set: start another epoch
                loaders[name].set_epoch(i + 1)
                iters[name] = iter(loaders[name])
                drawn[name] = next(iters[name])
        batch = drawn.pop("main")
        if static:
            video = batch["video"]  # b t c h w
            batch = {**batch, "video": video[:, :1].expand_as(video).contiguous()}
        out.append({**batch, "streams": drawn} if drawn else batch)
    return out


@torch.no_grad()
def align_schedules(trained: torch.nn.Module, random_init: torch.nn.Module) -> list[str]:
    """Copy every buffer named ``step`` (a schedule / curriculum counter) of ``trained`` into ``random_init``'s buffer
    of the same name; returns the names copied. Both models must come from the same run config."""
    theirs = dict(random_init.named_buffers())
    copied = []
    for name, buf in trained.named_buffers():
        if name.rsplit(".", 1)[-1] != "step":
            continue
        if name not in theirs or theirs[name].shape != buf.shape:
            raise ValueError(f"random init has no schedule buffer {name!r} of shape {tuple(buf.shape)}: the two "
                             "models do not come from one run config")
        theirs[name].copy_(buf)
        copied.append(name)
    return copied


@torch.no_grad()
def mean_logs(model: torch.nn.Module, batches: list[dict[str, Any]], *, seed: int) -> dict[str, float]:
    """Eval-mode forward of ``model`` on each batch (one objective generator seeded with ``seed``); mean of each
    logged value (keys missing in some batches are averaged over the batches that have them)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        _, logs = model(batch, generator=gen)
        for k, v in logs.items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sorted(sums)}


def evaluate(checkpoint: str | Path, overrides: list[str], *, num_batches: int = 20, batch_size: int = 0,
             seed: int = 0, static: bool = False) -> dict[str, Any]:
    """Held-out mean logs of the checkpoint's model and of its architecture at random init (see module docstring)."""
    ckpt = resolve_checkpoint(checkpoint)
    trained, cfg, step = model_from_checkpoint(ckpt)
    stored = to_dict(cfg)
    heldout = resolve_run_config(base=apply_overrides(stored, list(overrides)))
    bs = batch_size or cfg.train.batch_size
    batches = heldout_batches(heldout, num_batches=num_batches, batch_size=bs, seed=seed, static=static)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the trainer's initialisation of the same run config
        random_init = build_training_model(cfg)
    aligned = align_schedules(trained, random_init)
    obj_seed = seed * 1_000_003  # the trainer's objective-generator scheme (rank 0)
    return {"checkpoint": str(ckpt), "step": step, "batches": num_batches, "batch_size": bs, "seed": seed,
            "static": static, "schedules_aligned": aligned, "data": to_dict(heldout.data),
            "trained": mean_logs(trained, batches, seed=obj_seed),
            "random_init": mean_logs(random_init, batches, seed=obj_seed)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override the stored run config for the held-out data, e.g. data.sequences=[a,b]")
    ap.add_argument("--batches", type=int, default=20, help="held-out batches averaged (default 20)")
    ap.add_argument("--batch-size", type=int, default=0, help="clips per batch (default: the run's train.batch_size)")
    ap.add_argument("--seed", type=int, default=0, help="loader and objective-generator seed (default 0)")
    ap.add_argument("--static", action="store_true",
                    help="repeat each clip's first frame over the whole clip (no motion): a correspondence pretext's "
                         "score when only one frame's own nodes must be told apart")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out", default="", help="also write the JSON here (atomically)")
    args = ap.parse_args(argv)
    if args.batches < 1:
        ap.error("--batches: must be >= 1")
    torch.set_num_threads(args.threads)
    result = evaluate(args.checkpoint, args.overrides, num_batches=args.batches, batch_size=args.batch_size,
                      seed=args.seed, static=args.static)
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
