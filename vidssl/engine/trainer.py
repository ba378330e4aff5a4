"""The training loop shared by every objective.

One path for a laptop CPU, one GPU and ``torchrun`` (DDP): the process group is detected from the environment,
batches come from :func:`vidssl.data.build_loader`, the objectives from the registry. Reproducible: the model is
initialised from ``train.seed``, data order and augmentation come from seeded generators, the objectives' own
randomness (patch jitter, edge dropout) from a dedicated generator whose state is checkpointed, so a run stopped
and resumed reaches the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from vidssl.config import to_dict
from vidssl.engine.checkpoint import (latest_checkpoint, load_weights_into, read_trainer_state, read_weights,
                                      save_checkpoint)
from vidssl.engine.config import ModelConfig, OptimConfig, RunConfig
from vidssl.engine.distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from vidssl.engine.objectives import MultiObjective
from vidssl.io.atomic import atomic_write_text
from vidssl.models.encoders import build_encoder
from vidssl.models.mast_encoder import MASTEncoder


def build_model_encoder(cfg: ModelConfig) -> nn.Module:
    """The shared encoder described by the ``model`` section."""
    if cfg.encoder == "mast_resnet18":
        enc = MASTEncoder(padding_mode=cfg.padding_mode)
    else:
        enc = build_encoder(cfg.encoder, out_layer=cfg.out_layer, stride8=cfg.stride8, padding_mode=cfg.padding_mode)
    if cfg.norm == "group":
        _batchnorm_to_groupnorm(enc)
    return enc


def _batchnorm_to_groupnorm(module: nn.Module, groups: int = 32) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(min(groups, child.num_features), child.num_features))
        else:
            _batchnorm_to_groupnorm(child, groups)


def build_training_model(cfg: RunConfig) -> MultiObjective:
    """Encoder + objectives of a run config (weights freshly initialised from the global RNG)."""
    return MultiObjective(build_model_encoder(cfg.model),
                          [(o.name, o.weight, o.params) for o in cfg.objectives])


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then constant / cosine / multistep."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":
        return cfg.lr * cfg.gamma ** sum(step >= m for m in cfg.milestones)
    t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _autocast(amp: str, device: torch.device):
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext(), None
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _truncate_log(path: Path, last_step: int) -> None:
    """On resume, drop log lines written after the checkpoint so the log stays one consistent history."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def train(cfg: RunConfig, out_dir: str | Path, *, resume: str | Path | None = None, progress: bool = True,
          loader: Any = None, echo: bool = True) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir``; resumes from ``resume`` or from ``out_dir``'s latest checkpoint.

    Args:
        cfg: resolved run config.
        out_dir: run folder (created; rank 0 writes ``config.json``, ``log.jsonl``, checkpoints).
        resume: a checkpoint to resume from; by default the newest one in ``out_dir`` if any.
        progress: tqdm progress bar on rank 0.
        loader: an already built loader (tests); by default :func:`vidssl.data.build_loader`.
        echo: print a line per logged step when the progress bar is off.

    Returns:
        summary dict (final step, last logged values, wall time, checkpoint path).
    """
    out_dir = Path(out_dir)
    dist_info: DistInfo = init_distributed(cfg.train.device)
    device = dist_info.device
    if cfg.train.threads > 0 and device.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.batch_size % dist_info.world_size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                         f"{dist_info.world_size} processes")
    config_dict = to_dict(cfg)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(config_dict, indent=2) + "\n")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_training_model(cfg)
    if cfg.data.clip_len < model.min_clip_len:
        raise ValueError(f"data.clip_len={cfg.data.clip_len} is too short for the objectives "
                         f"(they need at least {model.min_clip_len} frames)")
    model.to(device)
    if dist_info.distributed and device.type == "cuda" and cfg.model.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    opt = build_optimizer(model.parameters(), cfg.optim)
    autocast, scaler = _autocast(cfg.train.amp, device)
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg.train.seed * 1_000_003 + dist_info.rank)

    start_step = 0
    ckpt = Path(resume) if resume else latest_checkpoint(out_dir)
    if ckpt is not None:
        weights, _, _ = read_weights(ckpt)
        load_weights_into(model, weights)
        state = read_trainer_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"][min(dist_info.rank, len(state["rng"]) - 1)]
        gen.set_state(rng["objective"])
        start_step = int(state["step"])
        if dist_info.is_main:
            _truncate_log(out_dir / "log.jsonl", start_step)
            print(f"resumed from {ckpt} at step {start_step}", file=sys.stderr)

    ddp_model = model
    if dist_info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    if loader is None:
        from vidssl.data.loader import build_loader

        loader = build_loader(cfg.data, batch_size=cfg.train.batch_size // dist_info.world_size,
                              seed=cfg.train.seed, rank=dist_info.rank, world_size=dist_info.world_size,
                              device=str(device))
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("the data loader yields no batch: fewer clips than train.batch_size "
                         f"({cfg.train.batch_size}); add videos or lower the batch size")

    total = cfg.train.steps
    bar = tqdm(total=total, initial=start_step, disable=not (progress and dist_info.is_main),
               desc=f"pretrain {cfg.name}", dynamic_ncols=True)
    log_path = out_dir / "log.jsonl"
    step, last_logs, t_start = start_step, {}, time.time()
    window = {"data": 0.0, "step": 0.0, "clips": 0, "n": 0}
    model.train()
    last_ckpt = None
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        loader.set_epoch(epoch)
        it = iter(loader)
        for _ in range(skip):  # resume mid-epoch: the same batches as an uninterrupted run, skipped
            next(it)
        t0 = time.time()
        for batch in it:
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            t1 = time.time()
            lr = lr_at(step, cfg.optim, total)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast:
                loss, logs = ddp_model(batch, generator=gen)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            grad_norm = None
            if cfg.optim.grad_clip > 0:
                grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if not math.isfinite(logs["loss"]):
                raise FloatingPointError(f"loss is {logs['loss']} at step {step}; lower optim.lr or check the data")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.time()
            step += 1
            bs = batch["video"].shape[0] * dist_info.world_size
            window["data"] += t1 - t0
            window["step"] += t2 - t1
            window["clips"] += bs
            window["n"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
            if step % cfg.train.log_every == 0 or step == total:
                n = window["n"]
                rec = {"step": step, "epoch": epoch, "lr": lr, **logs,
                       "data_time": window["data"] / n, "step_time": window["step"] / n,
                       "clips_per_s": window["clips"] / max(1e-9, window["data"] + window["step"]),
                       "skipped": int(getattr(loader, "skipped", 0))}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                last_logs = rec
                window = {"data": 0.0, "step": 0.0, "clips": 0, "n": 0}
                if dist_info.is_main:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if echo and bar.disable:
                        print(f"step {step}/{total} loss {logs['loss']:.4f} lr {lr:.2e} "
                              f"data {rec['data_time']:.3f}s step {rec['step_time']:.3f}s "
                              f"{rec['clips_per_s']:.1f} clips/s", flush=True)
            if step % cfg.train.ckpt_every == 0 or step == total:
                last_ckpt = _save(out_dir, model, opt, scaler, gen, step, config_dict, cfg.train.keep_checkpoints,
                                  dist_info)
            if step >= total:
                break
            t0 = time.time()
    bar.close()
    barrier()
    cleanup_distributed()
    return {"step": step, "logs": last_logs, "wall_s": time.time() - t_start,
            "checkpoint": str(last_ckpt) if last_ckpt else None}


def _save(out_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, scaler, gen: torch.Generator, step: int,
          config: dict, keep: int, dist_info: DistInfo) -> Path | None:
    """Rank 0 writes; every rank contributes its RNG state so a resumed DDP run continues each stream."""
    rng = {"objective": gen.get_state()}
    if dist_info.distributed:
        import torch.distributed as dist

        states: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(states, rng)
        rngs = states
    else:
        rngs = [rng]
    path = None
    if dist_info.is_main:
        state = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
                 "step": step, "rng": rngs}
        path = save_checkpoint(out_dir, step=step, weights=model.state_dict(), trainer_state=state, config=config,
                               keep=keep)
    barrier()
    return path
